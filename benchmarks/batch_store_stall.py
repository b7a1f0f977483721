"""How long the batch store keeps other work waiting while a large upload copies in
(docs/batch.md, "Files"). Run from the checkout:

    python benchmarks/batch_store_stall.py [--mib 150]

One thread copies a spooled upload of ``--mib`` MiB into a store in a temporary folder; the main
thread meanwhile reads a batch record (what the event loop does between a batch's lines) every
millisecond and reports the longest wait. One MiB's write is the floor.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

from qlm_plugin.coordinator.batch_store import CHUNK_BYTES, BatchStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=150, help="upload size in MiB (default 150)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        store = BatchStore(os.path.join(folder, "store.db"))
        try:
            spool = store.spool()
            block = os.urandom(CHUNK_BYTES)
            for _ in range(args.mib):
                spool.write(block)
            size = args.mib * CHUNK_BYTES
            upload = threading.Thread(target=store.put_file_from, args=("t", "f.jsonl", "batch", spool, size))
            waits: list[float] = []
            start = time.perf_counter()
            upload.start()
            while upload.is_alive():
                t0 = time.perf_counter()
                store.get_batch("batch-none")
                waits.append(time.perf_counter() - t0)
                time.sleep(0.001)
            upload.join()
            took = time.perf_counter() - start
        finally:
            store.close()
    print(
        f"upload of {args.mib} MiB: {took:.2f} s; {len(waits)} reads beside it, "
        f"longest wait {1000 * max(waits, default=0.0):.1f} ms"
    )


if __name__ == "__main__":
    main()
