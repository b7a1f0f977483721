"""The front door against slow, silent and abusive clients, and the details OpenAI's clients read
(codes, request ids): real servers on loopback, with and without front-door workers, the bounds
on time shortened through their module constants."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from qlm_plugin.adapters.sim.engine import SimInstance
from qlm_plugin.adapters.sim.realtime import synthetic_text
from qlm_plugin.coordinator import http_api
from qlm_plugin.coordinator import server as server_module
from qlm_plugin.coordinator.openai_params import MAX_LOGIT_BIAS, MAX_MESSAGES, MAX_STOP
from qlm_plugin.testing.stack import LocalStack, local_stack, run_with_stack
from qlm_plugin.workloads.scenario import load_scenario

MODEL = "llama-3.1-8b"


def one_slot() -> list[SimInstance]:
    """One simulated instance serving one request at a time: the others wait in the queue."""
    scenario = load_scenario()
    group = scenario.instances[0]
    costs = scenario.cost_models_for(group.gpu)
    return [SimInstance("sim-0", group.gpu, costs, initial_model=group.models[0], max_num_seqs=1)]


def run(tmp_path: Path, workers: int, body: Any, **kw: Any) -> None:
    async def main() -> None:
        config = {"http": {"port": 0, "workers": workers}, **kw.pop("config", {})}
        async with local_stack(tmp_path, config=config, **kw) as stack:
            await body(stack)

    asyncio.run(main())


async def raw_socket(stack: LocalStack, **opts: int) -> socket.socket:
    sock = socket.socket()
    for name, value in opts.items():
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, name), value)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", stack.server.http_port))
    return sock


def request_bytes(body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n"
    return head.encode() + data


def shrink_send_buffers(port: int) -> None:
    """The send buffer of this process's socket listening on ``port``, which its connections
    inherit, at its smallest: a client that does not read then stalls the server's writes within
    kilobytes, not the megabytes that loopback buffers."""
    (inode,) = [
        cols[9]
        for cols in (row.split() for row in Path("/proc/net/tcp").read_text().splitlines()[1:])
        if int(cols[1].split(":")[1], 16) == port and cols[3] == "0A"  # LISTEN
    ]
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == f"socket:[{inode}]":
                with socket.socket(fileno=os.dup(int(fd.name))) as listener:
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                return
    raise AssertionError(f"no socket listens on port {port}")


async def read_until_closed(sock: socket.socket, timeout_s: float) -> tuple[bytes, bool]:
    """What comes until the server closes (or resets) the connection, and whether it did."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            while data := await loop.sock_recv(sock, 65536):
                got += data
    except TimeoutError:
        return bytes(got), False
    except ConnectionResetError:
        pass
    return bytes(got), True


async def unread_answer(st: LocalStack, request: dict[str, Any]) -> tuple[bytes, bool]:
    """Send ``request`` on a socket that then reads nothing (small buffers both ways) until the
    request is done and the stall bound (shortened to 0.5 s) has passed; then what came, and
    whether the server closed the connection."""
    shrink_send_buffers(st.server.http_port)
    sock = await raw_socket(st, SO_RCVBUF=4096)
    await asyncio.get_running_loop().sock_sendall(sock, request_bytes(request))
    while not st.coordinator.jobs:
        await asyncio.sleep(0.01)
    (job,) = st.coordinator.jobs.values()
    await asyncio.wait_for(job.done.wait(), 30)
    await asyncio.sleep(1.5)  # past the stall bound, not reading
    got, closed = await read_until_closed(sock, 5.0)
    sock.close()
    return got, closed


# ------------------------------------------------------------------------ silent and slow clients


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_waiting_in_the_queue_gets_keep_alives_that_clients_skip(
    tmp_path: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nginx (and the openai SDK with a timeout) drops a stream silent for 60 s, and the request
    with it: while it waits in the queue, a comment line goes out every ``KEEPALIVE_S``."""
    monkeypatch.setattr(http_api, "KEEPALIVE_S", 0.2)

    async def body(st: LocalStack) -> None:
        url = f"{st.http_url}/v1/completions"
        batch = {"x-qlm-class": "batch"}
        async with aiohttp.ClientSession() as http:
            # The one slot is busy for about a second: the streams below wait in the queue.
            busy = asyncio.create_task(
                http.post(url, json={"model": MODEL, "prompt": "a", "max_tokens": 4000}, headers=batch)
            )
            while not st.coordinator.jobs:
                await asyncio.sleep(0.01)
            oa = openai.AsyncOpenAI(base_url=f"{st.http_url}/v1", api_key="none", max_retries=0)
            sdk = await oa.completions.create(
                model=MODEL, prompt="b", max_tokens=5, stream=True, extra_headers=batch
            )
            async with http.post(
                url, json={"model": MODEL, "prompt": "c", "max_tokens": 5, "stream": True}, headers=batch
            ) as r:
                lines = [line.strip() async for line in r.content if line.strip()]
            (await busy).release()
            chunks = [c async for c in sdk]  # the SDK skips the comments
            await oa.close()
        first_data = next(i for i, line in enumerate(lines) if line.startswith(b"data: "))
        assert first_data >= 2 and set(lines[:first_data]) == {b": keep-alive"}, lines[:first_data]
        assert lines[-1] == b"data: [DONE]"
        rid = r.headers["x-qlm-request-id"]
        text = [json.loads(line[6:])["choices"][0]["text"] for line in lines if line.startswith(b"data: {")]
        assert "".join(text) == synthetic_text(rid, 0, 5)
        sdk_rid = chunks[0].id.removeprefix("cmpl-")
        assert "".join(c.choices[0].text for c in chunks) == synthetic_text(sdk_rid, 0, 5)

    run(tmp_path, workers, body, speed=20.0, sims=one_slot(), instances=1)


@pytest.mark.parametrize(
    "tokens",
    [
        30_000,  # its writes stall mid-stream
        8_000,  # all of it fits in the buffers: it stalls at its end, where it was left unsent
    ],
)
def test_a_stream_the_client_does_not_read_is_cut_off_once_a_write_stalls(
    tmp_path: Path, tokens: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that never reads held its connection, and a socket, for ever: a write that does
    not drain within ``WRITE_STALL_S`` aborts it (the request is cancelled, as for a client that
    left, when it is still running), quietly: no server error is logged for it."""
    monkeypatch.setattr(http_api, "WRITE_STALL_S", 0.5)

    async def body(st: LocalStack) -> None:
        request = {"model": MODEL, "prompt": "x", "max_tokens": tokens, "stream": True}
        got, closed = await unread_answer(st, request)
        assert closed and b"data: [DONE]" not in got, got[-200:]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text

    run_with_stack(tmp_path, body, speed=100.0, instances=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_whole_answer_the_client_does_not_read_is_cut_off_once_its_write_stalls(
    tmp_path: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long answer that is not streamed, to a client that never reads: aiohttp wrote it without
    a bound, and the handler (and its socket) waited for ever. Past ``WRITE_STALL_S`` the
    connection is aborted."""
    monkeypatch.setattr(http_api, "WRITE_STALL_S", 0.5)

    async def body(st: LocalStack) -> None:
        got, closed = await unread_answer(st, {"model": MODEL, "prompt": "x", "max_tokens": 30_000})
        assert closed and len(got) < 30_000 * 4, len(got)  # cut off, not the whole answer

    run(tmp_path, workers, body, speed=100.0, instances=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_idle_connections_and_slow_request_heads_are_closed(
    tmp_path: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that sends nothing, or never a whole request head (slowloris), was held for an
    hour (aiohttp's default): it is closed after ``IDLE_TIMEOUT_S``."""
    monkeypatch.setattr(http_api, "IDLE_TIMEOUT_S", 0.5)

    async def body(st: LocalStack) -> None:
        loop = asyncio.get_running_loop()
        idle = await raw_socket(st)
        slow = await raw_socket(st)
        await loop.sock_sendall(slow, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        for sock in (idle, slow):
            got, closed = await read_until_closed(sock, 5.0)
            assert closed and got == b"", got
            sock.close()
        assert time.monotonic() - t0 < 3

    run(tmp_path, workers, body, instances=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_body_that_stops_arriving_is_answered_408_and_its_connection_closed(
    tmp_path: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole request head and then part of the body, then nothing: the handler waited for the
    rest for ever (aiohttp bounds the head, not the body). Past ``BODY_STALL_S`` without a byte it
    answers 408 with an OpenAI error object and ``Connection: close`` (aiohttp reads what still
    comes for up to 10 s, so the client can read the answer, then closes), and took no request. A
    body that keeps coming, slower than that bound in all but each of its pieces, is served."""
    monkeypatch.setattr(http_api, "BODY_STALL_S", 0.5)

    async def body(st: LocalStack) -> None:
        loop = asyncio.get_running_loop()
        whole = request_bytes({"model": MODEL, "prompt": "x", "max_tokens": 4})
        head, _, data = whole.partition(b"\r\n\r\n")
        stalled = await raw_socket(st)
        await loop.sock_sendall(stalled, head + b"\r\n\r\n" + data[:10])
        t0 = time.monotonic()
        got = b""
        while not got.endswith(b"}}"):  # the answer (the connection closes after aiohttp's linger)
            got += await asyncio.wait_for(loop.sock_recv(stalled, 65536), 5)
        stalled.close()
        assert got.startswith(b"HTTP/1.1 408") and b"Connection: close" in got, got[:300]
        error = json.loads(got.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "timeout" and "sent nothing for 0.5 s" in error["message"], error
        assert time.monotonic() - t0 < 5
        assert not st.coordinator.jobs  # nothing was accepted
        slow = await raw_socket(st)  # each piece within the bound, the whole body over it
        await loop.sock_sendall(slow, head + b"\r\n\r\n")
        for i in range(0, len(data), 8):
            await asyncio.sleep(0.1)
            await loop.sock_sendall(slow, data[i : i + 8])
        answer = b""
        while b"}}" not in answer and b'"usage"' not in answer:
            answer += await asyncio.wait_for(loop.sock_recv(slow, 65536), 10)
        slow.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]

    run(tmp_path, workers, body, instances=1)


def test_the_open_files_limit_is_raised_towards_the_hard_one(tmp_path: Path) -> None:
    """Under a soft limit of 1,024 open files, about 1,000 idle connections cut HTTP and gRPC off.
    It is raised to the hard limit, at most 65,536 (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:

        async def body(st: LocalStack) -> None:
            assert resource.getrlimit(resource.RLIMIT_NOFILE) == (
                min(hard, server_module.OPEN_FILES_TARGET),
                hard,
            )

        run_with_stack(tmp_path, body, instances=1)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ----------------------------------------------------------------------------- abusive bodies


def test_abusive_body_shapes_are_refused_naming_the_field(tmp_path: Path) -> None:
    chat = [{"role": "user", "content": "x"}]
    cases: list[tuple[str, dict[str, Any], str | None]] = [
        ("/v1/completions", {"stop": ["s"] * (MAX_STOP + 1)}, "stop"),
        ("/v1/completions", {"stop": ["s"] * MAX_STOP}, None),
        ("/v1/completions", {"logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias"),
        ("/v1/completions", {"logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS)}}, None),
        ("/v1/chat/completions", {"messages": chat * (MAX_MESSAGES + 1)}, "messages"),
        ("/v1/chat/completions", {"messages": chat * MAX_MESSAGES}, None),
        # OpenAI and vLLM refuse stream options on an answer that does not stream
        ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/completions", {"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ]

    async def check(st: LocalStack) -> None:
        async with aiohttp.ClientSession() as http:
            for path, extra, param in cases:
                base = {"model": MODEL, "max_tokens": 2, **({} if "messages" in extra else {"prompt": "x"})}
                async with http.post(f"{st.http_url}{path}", json={**base, **extra}) as r:
                    out = await r.json()
                if param is None:
                    assert r.status == 200, (list(extra), out)
                    continue
                assert r.status == 400, (list(extra), out)
                assert out["error"]["param"] == param and out["error"]["message"].startswith(param), out
                assert out["error"]["type"] == "invalid_request_error", out

    run_with_stack(tmp_path, check, instances=1)


# --------------------------------------------------------------------- what OpenAI's clients read


def test_a_tenant_over_its_limit_gets_openai_rate_limit_code(tmp_path: Path) -> None:
    async def check(st: LocalStack) -> None:
        url = f"{st.http_url}/v1/completions"
        async with aiohttp.ClientSession() as http:
            first = asyncio.create_task(
                http.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": 3000})
            )
            while not st.coordinator.jobs:
                await asyncio.sleep(0.01)
            async with http.post(url, json={"model": MODEL, "prompt": "y", "max_tokens": 2}) as r:
                out = await r.json()
            assert r.status == 429 and r.headers["Retry-After"] == "1", out
            assert (out["error"]["type"], out["error"]["code"]) == ("rate_limit_error", "rate_limit_exceeded")
            oa = openai.AsyncOpenAI(base_url=f"{st.http_url}/v1", api_key="none", max_retries=0)
            with pytest.raises(openai.RateLimitError) as err:
                await oa.completions.create(model=MODEL, prompt="z", max_tokens=2)
            assert err.value.code == "rate_limit_exceeded"
            await oa.close()
            (await first).release()

    run_with_stack(
        tmp_path, check, speed=5.0, instances=1, config={"tenant_limits": {"max_queued_requests": 1}}
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_a_cancelled_request_answers_499_with_its_id_and_a_full_error_object(
    tmp_path: Path, workers: int
) -> None:
    async def check(st: LocalStack) -> None:
        url = f"{st.http_url}/v1/completions"

        seen: set[str] = set()

        async def cancel_when_running() -> str:
            """Cancels the next request once it runs, as an operator would."""
            while not (
                running := [j.id for j in st.coordinator.jobs.values() if j.tokens and j.id not in seen]
            ):
                await asyncio.sleep(0.01)
            (rid,) = running
            seen.add(rid)
            st.coordinator.cancel(rid, "cancelled by the operator")
            return rid

        async with aiohttp.ClientSession() as http:
            waiting = asyncio.create_task(
                http.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": 5000})
            )
            rid = await cancel_when_running()
            async with await waiting as r:
                out = await r.json()
            assert r.status == 499, out
            assert r.headers["x-qlm-request-id"] == rid == r.headers["x-request-id"]
            assert out["error"] == {
                "message": f"request {rid} cancelled: cancelled by the operator",
                "type": "invalid_request_error",
                "param": None,
                "code": "cancelled",
            }
            # in a stream: the same error object in its last event
            async with http.post(
                url, json={"model": MODEL, "prompt": "x", "max_tokens": 5000, "stream": True}
            ) as r:
                cancelling = asyncio.create_task(cancel_when_running())
                events = [line[6:] async for line in r.content if line.startswith(b"data: ")]
            rid = await cancelling
            assert events[-1].strip() == b"[DONE]"
            error = json.loads(events[-2])["error"]
            assert error == {
                "message": f"request {rid} cancelled: cancelled by the operator",
                "type": "invalid_request_error",
                "param": None,
                "code": "cancelled",
            }

    run(tmp_path, workers, check, speed=5.0, instances=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_answer_carries_an_x_request_id(tmp_path: Path, workers: int) -> None:
    """OpenAI's SDKs show ``x-request-id`` as ``_request_id``: the client's own where it sent one,
    else the request's id (a fresh one where no request was made)."""

    async def check(st: LocalStack) -> None:
        url = f"{st.http_url}/v1/completions"
        ok = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json=ok) as r:
                assert r.status == 200 and r.headers["x-request-id"] == r.headers["x-qlm-request-id"]
            async with http.post(url, json={**ok, "stream": True}) as r:
                await r.read()
                assert r.headers["x-request-id"] == r.headers["x-qlm-request-id"]
            async with http.post(url, json=ok, headers={"x-request-id": "mine-1"}) as r:
                assert r.headers["x-request-id"] == "mine-1"
            async with http.post(url, json=ok, headers={"x-request-id": "x" * 300}) as r:
                assert r.headers["x-request-id"] == r.headers["x-qlm-request-id"]
            ids = set()
            for method, path in [("POST", "/v1/completions"), ("GET", "/v1/nowhere"), ("GET", "/health")]:
                async with http.request(method, f"{st.http_url}{path}", data=b"{}") as r:
                    ids.add(r.headers["x-request-id"])
            assert len(ids) == 3
            async with http.get(f"{st.http_url}/v1/models", headers={"x-request-id": "mine-2"}) as r:
                assert r.headers["x-request-id"] == "mine-2"  # passed through from the core by a worker
        oa = openai.AsyncOpenAI(base_url=f"{st.http_url}/v1", api_key="none", max_retries=0)
        answer = await oa.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert answer._request_id == answer.model_extra["qlm"]["request_id"]  # type: ignore[index]
        await oa.close()

    run(tmp_path, workers, check, instances=1)


def test_a_body_trickled_past_its_whole_time_is_answered_408(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte every so often, each within the stall bound, kept a connection (and its handler) for
    as long as the client liked: found by review. The whole body has BODY_TOTAL_S to arrive."""
    monkeypatch.setattr(http_api, "BODY_STALL_S", 0.5)
    monkeypatch.setattr(http_api, "BODY_TOTAL_S", 1.0)

    async def body(st: LocalStack) -> None:
        loop = asyncio.get_running_loop()
        whole = request_bytes({"model": MODEL, "prompt": "x" * 200, "max_tokens": 4})
        head, _, data = whole.partition(b"\r\n\r\n")
        sock = await raw_socket(st)
        await loop.sock_sendall(sock, head + b"\r\n\r\n")
        got = b""
        for i in range(len(data)):
            await loop.sock_sendall(sock, data[i : i + 1])
            await asyncio.sleep(0.2)
            sock.setblocking(False)
            try:
                got += sock.recv(65536)
            except BlockingIOError:
                continue
            if got:
                break
        sock.close()
        assert got.startswith(b"HTTP/1.1 408"), got[:200]
        assert b"over 1 s in all" in got
        assert not st.coordinator.jobs

    run(tmp_path, 0, body)
