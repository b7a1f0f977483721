"""The HTTP front door in worker processes (``http.workers``, ``qlm serve --http-workers``): real
worker processes on the shared port, each talking to the core over its relay stream. The whole
suite also runs this way (``QLM_HTTP_WORKERS=2 python -m pytest``); these tests hold what only
workers have: the work spread over them, a worker that dies, the relay's own checks."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qlm_plugin.adapters.sim.realtime import synthetic_text
from qlm_plugin.coordinator import coordinator as coordinator_module
from qlm_plugin.coordinator.http_workers import resolve_workers
from qlm_plugin.coordinator.relay import write_frame
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.testing.stack import LocalStack, local_stack

MODEL = "llama-3.1-8b"
WORKERS = {"http": {"port": 0, "workers": 2}}
ENV = {"T_CLIENT": "c-secret", "T_ADMIN": "a-secret", "T_INST": "i-secret"}
TOKENS: dict[str, Any] = {
    "tokens": [
        {"token_env": "T_CLIENT", "scopes": ["client"], "tenant": "acme", "name": "client"},
        {"token_env": "T_ADMIN", "scopes": ["admin"], "name": "admin"},
        {"token_env": "T_INST", "scopes": ["instance"], "name": "instance"},
    ]
}


def run(tmp_path: Path, body: Callable[[LocalStack], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        config = {**WORKERS, **kw.pop("config", {})}
        async with local_stack(tmp_path, config=config, **kw) as stack:
            assert stack.server.workers is not None and len(stack.server.workers.pids) == 2
            await body(stack)

    asyncio.run(main())


def completion(tokens: int = 8, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello", "max_tokens": tokens, **kw}


def _serving_pid(response: aiohttp.ClientResponse, server_port: int, pids: list[int]) -> int | None:
    """The worker process holding the server side of ``response``'s connection; None where the
    whole answer came before this looked (a busy machine): the connection is closed by then."""
    if response.connection is None or response.connection.transport is None:
        return None
    client_port = response.connection.transport.get_extra_info("sockname")[1]
    inode = ""
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = row.split()
        if int(cols[1].split(":")[1], 16) == server_port and int(cols[2].split(":")[1], 16) == client_port:
            inode = cols[9]
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no worker holds the connection from port {client_port}")


def test_requests_are_served_by_every_worker_with_the_same_answers(tmp_path: Path) -> None:
    async def body(stack: LocalStack) -> None:
        assert stack.server.workers is not None
        pids = stack.server.workers.pids
        served_by: list[int] = []
        # One connection per request: the kernel hands the connections to both workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:

            async def one(i: int) -> None:
                stream = i % 2 == 0
                async with s.post(f"{stack.http_url}/v1/completions", json=completion(stream=stream)) as r:
                    assert r.status == 200
                    rid = r.headers["x-qlm-request-id"]
                    if stream:  # the connection is held while the stream is read
                        if (pid := _serving_pid(r, stack.server.http_port, pids)) is not None:
                            served_by.append(pid)
                        text = "".join(
                            json.loads(line[6:])["choices"][0].get("text", "")
                            for line in (await r.text()).splitlines()
                            if line.startswith("data: {")
                        )
                    else:
                        text = (await r.json())["choices"][0]["text"]
                    assert text == synthetic_text(rid, 0, 8)

            await asyncio.gather(*(one(i) for i in range(200)))
        assert set(served_by) == set(pids) and len(served_by) >= 50, collections.Counter(served_by)

    run(tmp_path, body, speed=200.0)


def test_auth_tenants_and_the_routes_passed_to_the_core(tmp_path: Path) -> None:
    async def body(stack: LocalStack) -> None:
        url = stack.http_url
        client = {"Authorization": "Bearer c-secret"}
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{url}/v1/completions", json=completion()) as r:
                assert r.status == 401
                assert "missing bearer token" in (await r.json())["error"]["message"]
            async with s.post(f"{url}/v1/completions", json=completion(), headers=client) as r:
                assert r.status == 200
                assert (await r.json())["qlm"]["tenant"] == "acme"  # the token's, whatever the request says
            async with s.post(f"{url}/v1/completions", json=completion(model="nope"), headers=client) as r:
                assert r.status == 404
                assert (await r.json())["error"]["param"] == "model"
            # Served by the core, through a worker.
            async with s.get(f"{url}/health") as r:
                assert r.status == 200 and (await r.json())["instances"] == 2
            async with s.get(f"{url}/v1/models", headers=client) as r:
                assert [m["id"] for m in (await r.json())["data"]] == [MODEL]
            async with s.get(f"{url}/metrics") as r:
                assert r.status == 401
            async with s.get(f"{url}/metrics", headers={"Authorization": "Bearer a-secret"}) as r:
                assert r.status == 200 and "qlm" in await r.text()
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            line = '{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "%s"}}'
            form.add_field("file", (line % MODEL).encode(), filename="in.jsonl")
            async with s.post(f"{url}/v1/files", data=form, headers=client) as r:
                assert r.status == 200, await r.text()
                file_id = (await r.json())["id"]
            async with s.get(f"{url}/v1/files/{file_id}/content", headers=client) as r:
                assert (await r.read()).decode() == line % MODEL
            async with s.get(f"{url}/v1/nowhere") as r:
                assert r.status == 404

    run(tmp_path, body, config=TOKENS, env=ENV, token="i-secret")


def test_a_client_that_leaves_cancels_its_request_in_the_core(tmp_path: Path) -> None:
    async def body(stack: LocalStack) -> None:
        async with aiohttp.ClientSession() as s:
            r = await s.post(f"{stack.http_url}/v1/completions", json=completion(5000, stream=True))
            rid = r.headers["x-qlm-request-id"]
            await r.content.readline()
            r.close()  # the client goes away mid-stream
        job = stack.coordinator.lookup(rid)
        assert job is not None
        await asyncio.wait_for(job.done.wait(), 10)
        assert job.state == "cancelled"

    run(tmp_path, body, speed=5.0)


def test_a_dead_worker_is_replaced_and_its_requests_cancelled(tmp_path: Path) -> None:
    async def body(stack: LocalStack) -> None:
        pool = stack.server.workers
        assert pool is not None
        pids = pool.pids
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            responses = []
            for _ in range(8):
                r = await s.post(f"{stack.http_url}/v1/completions", json=completion(5000, stream=True))
                await r.content.readline()  # the stream is under way
                responses.append(r)
            owner = {
                r.headers["x-qlm-request-id"]: _serving_pid(r, stack.server.http_port, pids)
                for r in responses
            }
            victim = next(iter(owner.values()))
            assert victim is not None  # 5000 tokens: each stream is held open
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while victim in pool.pids or len(pool.pids) < 2:
                assert time.monotonic() < deadline, "the worker was not replaced"
                await asyncio.sleep(0.1)
            # Its clients' requests are cancelled in the core; the other worker's go on.
            for rid, pid in owner.items():
                job = stack.coordinator.lookup(rid)
                assert job is not None
                if pid == victim:
                    await asyncio.wait_for(job.done.wait(), 10)
                    assert job.state == "cancelled" and "front-door worker" in job.error
                else:
                    assert job.state not in ("cancelled", "failed", "finished")
            for r in responses:
                r.close()
            for _ in range(10):  # and the port serves on
                async with s.post(f"{stack.http_url}/v1/completions", json=completion()) as r:
                    assert r.status == 200

    run(tmp_path, body, speed=5.0)


@pytest.mark.parametrize("workers", [0, 2])
def test_one_idempotency_key_six_times_at_once_is_one_request(tmp_path: Path, workers: int) -> None:
    async def main() -> None:
        config = {"http": {"port": 0, "workers": workers}}
        async with (
            local_stack(tmp_path, config=config, speed=50.0) as stack,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
        ):

            async def one() -> dict[str, Any]:
                body = completion(40, qlm={"idempotency_key": "k-1"})
                async with s.post(f"{stack.http_url}/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    answer: dict[str, Any] = await r.json()
                    return answer

            answers = await asyncio.gather(*(one() for _ in range(6)))
        rids = {a["qlm"]["request_id"] for a in answers}
        assert len(rids) == 1
        (rid,) = rids
        assert all(a["choices"][0]["text"] == synthetic_text(rid, 0, 40) for a in answers)

    asyncio.run(main())


def test_the_relay_refuses_a_caller_without_the_secret(tmp_path: Path) -> None:
    async def body(stack: LocalStack) -> None:
        pool = stack.server.workers
        assert pool is not None
        reader, writer = await asyncio.open_unix_connection(pool._settings["relay"])
        write_frame(writer, b"guess")
        calls = pb.RelayCalls(calls=[pb.RelayCall(seq=1, submit=pb.RequestSpec(model=MODEL, prompt="x"))])
        write_frame(writer, calls.SerializeToString())
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, unanswered
        writer.close()
        assert not stack.coordinator.jobs

    run(tmp_path, body)


def test_the_number_of_workers_comes_from_config_then_environment_then_the_machine() -> None:
    assert resolve_workers(3, {"QLM_HTTP_WORKERS": "1"}) == 3
    assert resolve_workers(None, {"QLM_HTTP_WORKERS": "1"}) == 1
    assert resolve_workers(None, {"QLM_HTTP_WORKERS": "auto"}) == resolve_workers(None, {})
    cores = len(os.sched_getaffinity(0))
    assert resolve_workers(None, {}) == (0 if cores <= 2 else min(cores - 1, 16))
    with pytest.raises(ValueError, match="QLM_HTTP_WORKERS='two'"):
        resolve_workers(None, {"QLM_HTTP_WORKERS": "two"})
    with pytest.raises(ValueError, match="expected 0 to 64 workers"):  # 100 took 30 s to start
        resolve_workers(None, {"QLM_HTTP_WORKERS": "100"})
    assert resolve_workers("auto", {"QLM_HTTP_WORKERS": "1"}) == resolve_workers(None, {})  # as in the config


@pytest.mark.parametrize("workers", [0, 2])
def test_a_graceful_restart_keeps_the_requests_its_clients_were_waiting_for(
    tmp_path: Path, workers: int
) -> None:
    """The server closing its connections on stop is not the clients leaving: their requests stay
    journaled (each waiting client is told so: a 503 to retry), and a client that submits again
    with its key after the restart gets its answer."""
    config = {"http": {"port": 0, "workers": workers}, "drain_timeout_s": 0.2}
    body = completion(4000, qlm={"idempotency_key": "restart-1"})

    async def main() -> None:
        async with local_stack(tmp_path, config=config, speed=20.0) as stack, aiohttp.ClientSession() as s:
            waiting = asyncio.create_task(s.post(f"{stack.http_url}/v1/completions", json=body))
            while not stack.coordinator.jobs:
                await asyncio.sleep(0.01)
            (rid,) = stack.coordinator.jobs
            await stack.server.stop()
            told = await waiting
            assert told.status == 503 and told.headers["Retry-After"]
            message = (await told.json())["error"]["message"]
            assert "the coordinator is shutting down" in message and "kept" in message, message
        async with local_stack(tmp_path, config=config, speed=20.0) as stack:
            async with (
                aiohttp.ClientSession() as s,
                s.post(f"{stack.http_url}/v1/completions", json=body) as r,
            ):
                assert r.status == 200, await r.text()
                answer = await r.json()
            assert answer["qlm"]["request_id"] == rid
            assert answer["choices"][0]["text"] == synthetic_text(rid, 0, 4000)

    asyncio.run(main())


def test_sigterm_to_the_whole_process_group_leaves_the_workers_to_the_core(tmp_path: Path) -> None:
    """systemd's KillMode=control-group (or `kill -TERM -PGID`) signals every process: a worker
    that stopped on it cut its clients' streams and had their requests cancelled while the core
    was still draining. The core stops its workers itself, once it has drained."""

    async def body(st: LocalStack) -> None:
        assert st.server.workers is not None
        pids = list(st.server.workers.pids)
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{st.http_url}/v1/completions", json=completion(300, stream=True)) as r,
        ):
            assert r.status == 200
            await r.content.readline()  # streaming: it runs on an instance
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
            lines = [line async for line in r.content if line.strip()]
        assert lines[-1].strip() == b"data: [DONE]", lines[-3:]
        assert list(st.server.workers.pids) == pids, "the workers went on"

    run(tmp_path, body, speed=20.0)


@pytest.mark.parametrize("workers", [2])  # the core's rule; without workers the same (a suite run with 2)
def test_a_retry_with_its_idempotency_key_after_a_timeout_gets_the_whole_answer(
    tmp_path: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The openai SDK times out, then retries with the same key: the timeout's disconnect had
    cancelled the request, and the retry (and every later one, for days) got 499. Nor did a
    second client sharing the key survive the first one leaving. A caller leaving a keyed request
    now cancels it only if no caller waits for it and none comes back with the key in
    ``ABANDON_GRACE_S``; without a key, or past that, it is cancelled as before."""
    monkeypatch.setattr(coordinator_module, "ABANDON_GRACE_S", 1.5)

    async def main() -> None:
        config = {"http": {"port": 0, "workers": workers}}
        async with (
            local_stack(tmp_path, config=config, speed=2.0) as stack,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
        ):
            url = f"{stack.http_url}/v1/completions"

            async def gives_up(body: dict[str, Any]) -> None:
                with pytest.raises(asyncio.TimeoutError):
                    async with s.post(url, json=body, timeout=aiohttp.ClientTimeout(total=0.3)) as r:
                        await r.read()

            async def answer(body: dict[str, Any]) -> dict[str, Any]:
                async with s.post(url, json=body) as r:
                    assert r.status == 200, await r.text()
                    return dict(await r.json())

            keyed = completion(200, qlm={"idempotency_key": "retry-me"})
            await gives_up(keyed)
            await asyncio.sleep(0.5)  # the client's back-off
            first = await answer(keyed)  # the retry: the same request, served once, whole
            rid = first["qlm"]["request_id"]
            assert first["choices"][0]["text"] == synthetic_text(rid, 0, 200)

            shared = completion(200, qlm={"idempotency_key": "shared"})
            other = asyncio.create_task(answer(shared))
            await asyncio.sleep(0.2)
            await gives_up(shared)  # one of two clients leaves: the other still gets the answer
            shared_answer = await other
            assert shared_answer["choices"][0]["text"] == synthetic_text(
                shared_answer["qlm"]["request_id"], 0, 200
            )

            await gives_up(completion(3000, qlm={"idempotency_key": "nobody-comes-back"}))
            await asyncio.sleep(2.5)
            (job,) = [
                j for j in stack.coordinator.jobs.values() if j.spec.idempotency_key == "nobody-comes-back"
            ]
            assert job.state == "cancelled" and "no retry came" in job.error, (job.state, job.error)

            await gives_up(completion(3000, prompt="unkeyed"))
            await asyncio.sleep(0.3)
            (job,) = [j for j in stack.coordinator.jobs.values() if j.spec.prompt == "unkeyed"]
            assert job.state == "cancelled", job.state

    asyncio.run(main())


@pytest.mark.parametrize("workers", [0, 2])
def test_an_idempotency_key_reused_for_another_request_is_refused(tmp_path: Path, workers: int) -> None:
    """The same key with another prompt, or on the chat endpoint, silently got the first request's
    answer. It is now refused, 422, naming ``idempotency_key``; the same request again still gets
    its answer."""

    async def main() -> None:
        config = {"http": {"port": 0, "workers": workers}}
        async with (
            local_stack(tmp_path, config=config, speed=50.0) as stack,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
        ):
            url = stack.http_url
            body = completion(8, qlm={"idempotency_key": "k"})
            async with s.post(f"{url}/v1/completions", json=body) as r:
                assert r.status == 200
                rid = (await r.json())["qlm"]["request_id"]
            async with s.post(f"{url}/v1/completions", json=body) as r:
                assert r.status == 200 and (await r.json())["qlm"]["request_id"] == rid
            for path, other in (
                ("/v1/completions", {**body, "prompt": "another prompt"}),
                (
                    "/v1/chat/completions",
                    {
                        "model": MODEL,
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 8,
                        "qlm": {"idempotency_key": "k"},
                    },
                ),
            ):
                async with s.post(f"{url}{path}", json=other) as r:
                    error = (await r.json())["error"]
                    assert r.status == 422 and error["param"] == "idempotency_key", (r.status, error)

    asyncio.run(main())


@pytest.mark.parametrize("workers", [0, 2])
def test_a_gzip_body_passed_to_the_core_is_read_once_and_a_bad_one_is_a_400(
    tmp_path: Path, workers: int
) -> None:
    """Through a worker, a gzip body reached the core still marked gzip, already decoded: the core
    answered 500 decoding it again; a body that does not decode was a 503 "core unreachable"
    there, and a plain-text 500 without workers (the Batch API did not catch it)."""
    import gzip

    async def body(stack: LocalStack) -> None:
        url = stack.http_url
        async with aiohttp.ClientSession() as s:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            line = '{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "%s"}}'
            form.add_field("file", (line % MODEL).encode(), filename="in.jsonl")
            async with s.post(f"{url}/v1/files", data=form) as r:
                file_id = (await r.json())["id"]
            create = json.dumps(
                {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
            ).encode()
            gz = {"content-type": "application/json", "content-encoding": "gzip"}
            async with s.post(f"{url}/v1/batches", data=gzip.compress(create), headers=gz) as r:
                assert r.status == 200, await r.text()
            async with s.post(f"{url}/v1/batches", data=b"not gzip at all", headers=gz) as r:
                assert r.status == 400, await r.text()
                assert (await r.json())["error"]["code"] == "invalid_body"

    async def main() -> None:
        async with local_stack(tmp_path, config={"http": {"port": 0, "workers": workers}}) as stack:
            await body(stack)

    asyncio.run(main())
