"""The worker's end of the front-door relay against a scripted core on a real Unix socket: the
answer to a submission and the request's end in one message (a fast request), a refusal, a core
that goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from qlm_plugin.coordinator import http_api
from qlm_plugin.coordinator.jobs import SubmitError
from qlm_plugin.coordinator.relay import RelayClient, read_frame, write_frame
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def with_core(tmp_path: Path, script: Script, body: Callable[[RelayClient], Awaitable[None]]) -> None:
    async def main() -> None:
        path = str(tmp_path / "relay.sock")

        async def link(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert await read_frame(reader) == b"secret"
            await script(reader, writer)

        server = await asyncio.start_unix_server(link, path)
        client = RelayClient(path, "secret")
        await client.start()
        try:
            await asyncio.wait_for(body(client), 5)
        finally:
            await client.close()
            server.close()

    asyncio.run(main())


def job(rid: str, state: str, text: str = "", tokens: int = 0) -> pb.RelayJob:
    return pb.RelayJob(
        request_id=rid, model="m", max_tokens=4, arrival_time=1.0, state=state, text=text, tokens=tokens
    )


def test_an_answer_and_the_end_in_one_message_finish_the_request(tmp_path: Path) -> None:
    async def core(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (call,) = pb.RelayCalls.FromString(await read_frame(reader)).calls
        assert call.submit.model == "m"
        chunk = pb.RelayChunk(request_id="r1", chunk=pb.OutputChunk(text=" b", index=1, tokens=1))
        events = [
            pb.RelayEvent(seq=call.seq, accepted=job("r1", "dispatched", " a", 1)),
            pb.RelayEvent(chunk=chunk),
            pb.RelayEvent(finished=job("r1", "finished", tokens=2)),
        ]
        write_frame(writer, pb.RelayEvents(events=events).SerializeToString())
        await writer.drain()
        await reader.read()

    async def body(client: RelayClient) -> None:
        submitted, duplicate = await client.submit(pb.RequestSpec(model="m", prompt="x"))
        assert not duplicate
        await submitted.done.wait()
        assert (submitted.state, submitted.text, submitted.tokens) == ("finished", " a b", 2)
        chunks = [c async for c in client.follow(submitted)]
        assert chunks[0].text == " a b" and chunks[-1].finished

    with_core(tmp_path, core, body)


def test_a_refusal_is_the_core_s_error(tmp_path: Path) -> None:
    async def core(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (call,) = pb.RelayCalls.FromString(await read_frame(reader)).calls
        refusal = pb.RelayRefusal(code="limit", field="tenant", message="too many", retry_after_s=1.0)
        write_frame(
            writer, pb.RelayEvents(events=[pb.RelayEvent(seq=call.seq, refused=refusal)]).SerializeToString()
        )
        await writer.drain()
        await reader.read()

    async def body(client: RelayClient) -> None:
        with pytest.raises(SubmitError) as err:
            await client.submit(pb.RequestSpec(model="m"))
        assert (err.value.code, err.value.field, str(err.value), err.value.retry_after_s) == (
            "limit",
            "tenant",
            "too many",
            1.0,
        )

    with_core(tmp_path, core, body)


@pytest.mark.parametrize("key", ["k1", ""])
def test_a_core_that_goes_away_halts_what_is_open_and_refuses_what_comes(tmp_path: Path, key: str) -> None:
    """What is open was accepted, so journaled: its client is told it is kept (unavailable, as at a
    graceful stop), not that it failed (its retry with its key found the whole answer). Without a
    key no one can ask for it after the restart, which cancels it: its client is told to send it
    again (it was told "kept")."""

    async def core(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (call,) = pb.RelayCalls.FromString(await read_frame(reader)).calls
        write_frame(
            writer,
            pb.RelayEvents(
                events=[pb.RelayEvent(seq=call.seq, accepted=job("r1", "queued"))]
            ).SerializeToString(),
        )
        await writer.drain()
        writer.close()

    async def body(client: RelayClient) -> None:
        submitted, _ = await client.submit(pb.RequestSpec(model="m", idempotency_key=key))
        await client.closed.wait()
        assert submitted.done.is_set() and submitted.halted
        status, message = http_api.unfinished(submitted)
        assert status == 503 and "coordinator core went away" in message
        if key:
            assert submitted.state == "queued" and "kept and served" in message
        else:
            assert submitted.state == "cancelled" and "send it again" in message and "kept and" not in message
        with pytest.raises(SubmitError) as err:
            await client.submit(pb.RequestSpec(model="m"))
        assert err.value.code == "unavailable"

    with_core(tmp_path, core, body)


@pytest.mark.parametrize("case", ["two clients of one worker", "one left, another worker's stays"])
def test_a_dead_workers_clients_leave_as_many_as_were_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """The core cancelled once per request when a worker's link ended: two clients of that worker
    sharing a key left the request running for nobody; one that had already left took another
    worker's client's answer with it (the coordinator counts each waiting client)."""
    from qlm_plugin.coordinator import coordinator as coordinator_module
    from qlm_plugin.coordinator.jobs import CLIENT_GONE, WORKER_GONE
    from qlm_plugin.coordinator.relay import RelayService
    from qlm_plugin.testing.stack import LocalStack, run_with_stack

    monkeypatch.setattr(coordinator_module, "ABANDON_GRACE_S", 0.2)
    spec = pb.RequestSpec(model="llama-3.1-8b", prompt="x", max_tokens=5000, idempotency_key="k")

    async def body(st: LocalStack) -> None:
        service = RelayService(st.coordinator, "secret")
        path = str(tmp_path / "relay.sock")
        await service.serve(path)
        x, y = RelayClient(path, "secret"), RelayClient(path, "secret")
        await x.start()
        await y.start()
        try:
            first, _ = await x.submit(spec, cancel_if_caller_leaves=WORKER_GONE)
            if case == "two clients of one worker":
                await x.submit(spec, cancel_if_caller_leaves=WORKER_GONE)
            else:
                x.cancel(first.id, CLIENT_GONE)  # its client left; another worker's is waiting
                await y.submit(spec, cancel_if_caller_leaves=WORKER_GONE)
            await asyncio.sleep(0.1)
            await x.close()  # the worker dies
            await asyncio.sleep(1.0)  # past the grace a key's retry has
            state = st.coordinator.jobs[first.id].state
            assert state == ("cancelled" if case == "two clients of one worker" else "dispatched"), state
        finally:
            await y.close()
            await service.close()

    run_with_stack(tmp_path, body, speed=1.0)
