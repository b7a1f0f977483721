"""How long the batch store keeps other work waiting while a large file goes in (docs/batch.md,
"Files"). Run from the checkout:

    python benchmarks/batch_store_stall.py [--mib 150]

One thread writes a file of ``--mib`` MiB into a store in a temporary folder, three ways: an upload
copied from its spool (``put_file_from``), a batch's output file a line at a time and shown with
the batch's final state (``new_file`` ... ``finalize``), and, for reference, the same output in one
transaction (``put_file``: how batch outputs were stored before stop 38). The main thread meanwhile
reads a batch record (what the event loop does between a batch's lines) every millisecond and
reports the longest wait. One MiB's write is the floor.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Callable

from qlm_plugin.coordinator.batch_store import CHUNK_BYTES, BatchRecord, BatchStore


def _beside(store: BatchStore, write: Callable[[], object]) -> tuple[float, float, int]:
    """(seconds the write took, the longest wait of a read beside it, reads)."""
    writer = threading.Thread(target=write)
    waits: list[float] = []
    start = time.perf_counter()
    writer.start()
    while writer.is_alive():
        t0 = time.perf_counter()
        store.get_batch("batch-none")
        waits.append(time.perf_counter() - t0)
        time.sleep(0.001)
    writer.join()
    return time.perf_counter() - start, max(waits, default=0.0), len(waits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=150, help="file size in MiB (default 150)")
    args = parser.parse_args()
    size = args.mib * CHUNK_BYTES
    line = b'{"custom_id": "x", "response": {"body": "' + b"a" * 4000 + b'"}}\n'  # a 4 kB answer
    lines = size // len(line)
    with tempfile.TemporaryDirectory() as folder:
        store = BatchStore(os.path.join(folder, "store.db"))
        try:
            spool = store.spool()
            block = os.urandom(CHUNK_BYTES)
            for _ in range(args.mib):
                spool.write(block)

            def output_in_chunks() -> None:
                writer = store.new_file("t", "batch_x_output.jsonl", "batch_output")
                for _ in range(lines):
                    writer.write(line)
                writer.flush()
                batch = BatchRecord(
                    "batch_x", "t", "file-in", "/v1/chat/completions", "24h", 86400.0, time.time()
                )
                store.finalize(batch, [writer])

            ways = {
                "upload (put_file_from)": lambda: store.put_file_from("t", "f.jsonl", "batch", spool, size),
                "batch output, a chunk at a time": output_in_chunks,
                "batch output in one transaction (before)": lambda: store.put_file(
                    "t", "out.jsonl", "batch_output", line * lines
                ),
            }
            for label, write in ways.items():
                took, longest, reads = _beside(store, write)
                print(
                    f"{label}, {args.mib} MiB: {took:.2f} s; {reads} reads beside it, longest wait "
                    f"{1000 * longest:.1f} ms"
                )
        finally:
            store.close()


if __name__ == "__main__":
    main()
