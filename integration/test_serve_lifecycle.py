"""`qlm serve` as a terminal runs it: Ctrl-C (SIGINT to its whole process group) drains the
coordinator while its instances finish the requests in flight; an instance that dies is started
again."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from qlm_plugin.deploy.child_process import free_port
from qlm_plugin.testing.processes import http_call, serve_process, wait_healthy


def _post(url: str, body: dict[str, Any], out: dict[str, Any]) -> None:
    status, answer = http_call(url, body, timeout_s=60)
    out["status"], out["body"] = status, json.loads(answer) if status == 200 else answer


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_ctrl_c_drains_while_instances_finish_and_a_dead_instance_comes_back(tmp_path: Path) -> None:
    http = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLM_") or k == "QLM_PLUGINS"}
    args = ("--instances", "1", "--speed", "5")
    # its own process group, as a terminal's foreground job
    serve = serve_process(tmp_path, http, free_port(), *args, env=env, new_session=True)
    log = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{http}"
    try:
        wait_healthy(url, serve, log)

        # An instance killed is started again, and serves.
        (instance,) = _children(serve.pid)
        os.kill(instance, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not (
            _children(serve.pid)
            and _children(serve.pid) != [instance]
            and http_call(f"{url}/health")[0] == 200
        ):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        assert "exited with status -9" in log.read_text()

        answer: dict[str, Any] = {}
        body = {"model": "llama-3.1-8b", "prompt": "hi", "max_tokens": 3000}
        call = threading.Thread(target=_post, args=(f"{url}/v1/completions", body, answer))
        call.start()
        time.sleep(1.0)  # it runs on the instance
        os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        call.join(60)
        assert answer.get("status") == 200, (answer, log.read_text()[-3000:])
        assert answer["body"]["usage"]["completion_tokens"] == 3000
        assert serve.wait(30) == 0
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
