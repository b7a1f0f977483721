"""``qlm serve --ray`` and ``qlm scale`` without a cluster: addresses, a Ray that cannot be reached
(a precise error in seconds, never a wait for ever), bad counts, and how a resize spreads over a
model's groups (``integration/test_ray.py`` runs them on a cluster)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed")

from qlm_plugin.deploy.child_process import free_port
from qlm_plugin.deploy.ray_fleet import plan_scale, ray_address


def _qlm(*args: str, cwd: Path) -> tuple[int, str, float]:
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "qlm_plugin.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )
    return r.returncode, r.stdout + r.stderr, time.monotonic() - t0


def test_a_resize_keeps_a_models_groups_even_and_removes_the_newest_first_by_number() -> None:
    # two groups of one model (say H100 and A100 instances), serials as the fleet numbered them
    assert plan_scale({0: [1], 1: [2]}, 4) == ([0, 1], [])  # the smaller group first, ties: the first
    assert plan_scale({0: [1, 5], 1: [2]}, 4) == ([1], [])
    # newest by number, not by text ("m-10" sorts before "m-2"), from the larger group first
    assert plan_scale({0: [1, 2, 10], 1: [3]}, 2) == ([], [10, 2])
    assert plan_scale({0: [1, 3], 1: [2, 4]}, 1) == ([], [4, 3, 2])
    assert plan_scale({0: [1], 1: []}, 1) == ([], [])


def test_ray_addresses_are_read_as_ray_reads_them_and_others_refused() -> None:
    assert ray_address("ray://head.example:10002") == ("head.example", 10002)
    assert ray_address("ray://head.example") == ("head.example", 10001)  # Ray Client's default port
    host, port = ray_address("127.0.0.1:6379")
    assert port == 6379 and host  # Ray dials this machine's address for a loopback one
    for bad in ("head", "head:port", "ray://:1"):
        with pytest.raises(ValueError, match="not a Ray"):
            ray_address(bad)


def test_a_ray_that_cannot_be_reached_stops_serve_and_scale_at_once_with_the_error(tmp_path: Path) -> None:
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there: ray.init would retry it for ever
    rc, out, took = _qlm(
        "serve", "--ray", closed, "--instances", "2", "--http-port", "0", "--grpc-port", "0", cwd=tmp_path
    )
    assert rc == 1 and f"qlm serve: error: Ray not reachable at {closed}" in out, out
    assert took < 30
    rc, out, took = _qlm("scale", "llama-3.1-8b", "2", "--ray", closed, cwd=tmp_path)
    assert rc == 1 and f"qlm scale: error: Ray not reachable at {closed}" in out, out
    assert took < 30
    # a bad count is refused before Ray is asked anything
    rc, out, _ = _qlm("scale", "llama-3.1-8b", "-1", "--ray", closed, cwd=tmp_path)
    assert rc == 1 and "qlm scale: error: count must be >= 0" in out and "not reachable" not in out, out


def test_joining_a_port_that_answers_but_is_no_rays_ends_in_the_time_given(tmp_path: Path) -> None:
    with socket.socket() as listener:  # accepts, never answers as Ray's GCS would
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = (
            "import sys; from qlm_plugin.deploy import ray_fleet\n"
            "try:\n"
            f"    ray_fleet.connect('127.0.0.1:{port}', timeout_s=3)\n"
            "except ConnectionError as exc:\n"
            "    print('refused:', exc); sys.exit(3)\n"
        )
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        took = time.monotonic() - t0
    assert r.returncode == 3 and "did not answer in 3 s" in r.stdout, r.stdout + r.stderr[-2000:]
    assert took < 30
