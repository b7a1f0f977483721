"""`qlm serve` as a terminal runs it: Ctrl-C (SIGINT to its whole process group) drains the
coordinator while its instances finish the requests in flight; an instance that dies is started
again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from qlm_plugin.deploy.child_process import free_port


def _post(url: str, body: dict[str, Any], out: dict[str, Any]) -> None:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            out["status"], out["body"] = r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        out["status"], out["body"] = exc.code, exc.read()
    except OSError as exc:
        out["status"], out["body"] = 0, str(exc)


def _health(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_ctrl_c_drains_while_instances_finish_and_a_dead_instance_comes_back(tmp_path: Path) -> None:
    http = free_port()
    args = ["--http-port", str(http), "--grpc-port", str(free_port()), "--instances", "1", "--speed", "5"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLM_") or k == "QLM_PLUGINS"}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "qlm_plugin.cli", "serve", *args, "--journal", str(tmp_path / "j.db")],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 60
        while _health(url) != 200:
            assert serve.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)

        # An instance killed is started again, and serves.
        (instance,) = _children(serve.pid)
        os.kill(instance, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not (_children(serve.pid) and _children(serve.pid) != [instance] and _health(url) == 200):
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
