"""The checked-in gRPC code is what the ``.proto`` generates (``python -m qlm_plugin.proto.regenerate``)."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest

from qlm_plugin.proto import regenerate
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_current(tmp_path: Path) -> None:
    if version("grpcio-tools") != regenerate.GRPCIO_TOOLS:
        pytest.skip(
            f"grpcio-tools {version('grpcio-tools')} is not {regenerate.GRPCIO_TOOLS}, the generator pinned"
        )
    for fresh in regenerate.generate(ROOT, tmp_path):
        checked_in = ROOT / fresh.relative_to(tmp_path)
        assert checked_in.read_text() == fresh.read_text(), (
            f"{checked_in.relative_to(ROOT)} is stale: run python -m qlm_plugin.proto.regenerate"
        )


def test_proto_mirrors_the_package_and_imports_from_one_root() -> None:
    assert pb.DESCRIPTOR.name == "qlm_plugin/proto/qlm/v1/qlm.proto"
    assert pb.DESCRIPTOR.package == "qlm.v1"
    assert set(pb.DESCRIPTOR.services_by_name) == {"Requests", "Instances", "Admin"}
    grpc_code = (ROOT / "qlm_plugin/proto/qlm/v1/qlm_pb2_grpc.py").read_text()
    assert "from qlm_plugin.proto.qlm.v1 import qlm_pb2" in grpc_code
