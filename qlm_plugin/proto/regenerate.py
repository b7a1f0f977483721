"""Regenerate the checked-in gRPC code from ``qlm/v1/qlm.proto``: ``python -m qlm_plugin.proto.regenerate``.

The import path is the repository root, so the generated modules import each other as
``qlm_plugin.proto.qlm.v1...`` (one import root). ``tests/test_proto.py`` regenerates into a
temporary folder and fails when the checked-in files differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO = "qlm_plugin/proto/qlm/v1/qlm.proto"
GENERATED = ("qlm_pb2.py", "qlm_pb2.pyi", "qlm_pb2_grpc.py")
#: The generator the checked-in code was made with (its output differs between releases).
GRPCIO_TOOLS = "1.85.1"


def generate(root: Path, out: Path) -> list[Path]:
    """Compile ``root/PROTO`` into ``out`` (laid out like ``root``); returns the generated files."""
    from grpc_tools import protoc  # build-time dependency (the test extra)

    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(root / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {root / PROTO}")
    folder = out / Path(PROTO).parent
    return [folder / name for name in GENERATED]


def main() -> int:
    from importlib.metadata import version

    if version("grpcio-tools") != GRPCIO_TOOLS:
        print(
            f"warning: grpcio-tools {version('grpcio-tools')} installed, the checked-in code was made "
            f"with {GRPCIO_TOOLS}",
            file=sys.stderr,
        )
    root = Path(__file__).resolve().parents[2]
    for path in generate(root, root):
        print(path.relative_to(root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
