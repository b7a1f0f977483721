"""The references ``qlm loadtest`` measures the coordinator against. Over HTTP: an aiohttp server on
the same event loop and JSON codec that answers the same OpenAI requests (``/v1/completions``,
``/v1/chat/completions``, streamed or not) with the same synthetic tokens at once, with no queue,
journal or engine behind it. Over gRPC: the coordinator's ``Requests`` service answering each
``Submit`` and ``SubmitBatch`` as accepted at once, on the same ``grpc.aio`` server and loop. What
they cost is what this machine's HTTP and gRPC stacks cost at all.

``python -m qlm_plugin.coordinator.passthrough PORT [GRPC_PORT]``: serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from typing import Any

import grpc
from aiohttp import web

from qlm_plugin import event_loop
from qlm_plugin.adapters.sim.realtime import synthetic_text
from qlm_plugin.coordinator.http_api import json_response
from qlm_plugin.coordinator.json_codec import dumps
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.proto.qlm.v1 import qlm_pb2_grpc as pb_grpc


async def _answer(request: web.Request) -> web.StreamResponse:
    body = json.loads(await request.read())
    chat = request.path.endswith("/chat/completions")
    rid = uuid.uuid4().hex
    tokens = int(body.get("max_tokens") or 16)
    text = synthetic_text(rid, 0, tokens)
    base = {"id": f"cmpl-{rid}", "created": int(time.time()), "model": body.get("model")}
    if not body.get("stream"):
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
            if chat
            else {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
        )
        usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
        obj = "chat.completion" if chat else "text_completion"
        return json_response({**base, "object": obj, "choices": [choice], "usage": usage})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for i in range(tokens):
        piece = synthetic_text(rid, i, 1)
        delta = {"content": piece} if chat else None
        choice = {"index": 0, "delta": delta} if chat else {"index": 0, "text": piece}
        await resp.write(b"data: " + dumps({**base, "choices": [choice]}) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def app() -> web.Application:
    application = web.Application()
    application.router.add_post("/v1/completions", _answer)
    application.router.add_post("/v1/chat/completions", _answer)
    application.router.add_get("/health", _health)
    return application


async def _health(_request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


def _accepted() -> pb.SubmitReply:
    return pb.SubmitReply(request_id=uuid.uuid4().hex, accepted=True, can_meet_slo=True, p_meet=1.0)


class Requests(pb_grpc.RequestsServicer):
    """Accepts every submission at once: no validation, journal, queue or engine."""

    async def Submit(self, request: pb.SubmitRequest, context: Any) -> pb.SubmitReply:
        return _accepted()

    async def SubmitBatch(self, request: pb.SubmitBatchRequest, context: Any) -> pb.SubmitBatchReply:
        return pb.SubmitBatchReply(replies=[_accepted() for _ in request.requests])


async def serve(port: int, grpc_port: int | None = None) -> None:
    runner = web.AppRunner(app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()  # as the coordinator's
    server = None
    if grpc_port is not None:
        server = grpc.aio.server()
        pb_grpc.add_RequestsServicer_to_server(Requests(), server)  # type: ignore[no-untyped-call]  # generated stub
        server.add_insecure_port(f"127.0.0.1:{grpc_port}")
        await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if server is not None:
        await server.stop(None)
    await runner.cleanup()


if __name__ == "__main__":
    event_loop.run(serve(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None))
