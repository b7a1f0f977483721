"""An asyncio client of the coordinator's gRPC API for tools and tests: submit, status, cancel,
stream a request's output, and the admin views. Every call carries a deadline."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import TracebackType

import grpc

from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.proto.qlm.v1 import qlm_pb2_grpc as pb_grpc
from qlm_plugin.transport import MAX_MESSAGE_BYTES

#: Default deadline of a unary call, seconds.
TIMEOUT_S = 10.0


class CoordinatorClient:
    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        client_cert: tuple[bytes, bytes] | None = None,
        timeout_s: float = TIMEOUT_S,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        """``timeout_s``: each unary call's deadline (a call's own ``timeout_s`` overrides it);
        ``metadata``: sent with every call besides the token (a ``traceparent``, ...). Errors are
        grpc's ``AioRpcError``, with the status codes of ``docs/coordinator.md``'s gRPC API."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]  # a long output's status
        if root_certificates is None:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        else:
            key, chain = client_cert or (None, None)
            creds = grpc.ssl_channel_credentials(root_certificates, key, chain)
            self.channel = grpc.aio.secure_channel(target, creds, options=options)
        self.metadata = [*(("authorization", f"Bearer {token}"),) * bool(token), *metadata]
        self.timeout_s = timeout_s
        self.requests = pb_grpc.RequestsStub(self.channel)  # type: ignore[no-untyped-call]  # generated stub
        self.admin = pb_grpc.AdminStub(self.channel)  # type: ignore[no-untyped-call]  # generated stub

    def _deadline(self, timeout_s: float | None) -> float:
        if timeout_s is None:
            return self.timeout_s
        if not timeout_s > 0:  # 0 meant the default, silently
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        return timeout_s

    async def __aenter__(self) -> CoordinatorClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def submit(self, spec: pb.RequestSpec, timeout_s: float | None = None) -> pb.SubmitReply:
        reply: pb.SubmitReply = await self.requests.Submit(
            pb.SubmitRequest(request=spec), timeout=self._deadline(timeout_s), metadata=self.metadata
        )
        return reply

    async def submit_batch(
        self, specs: list[pb.RequestSpec], timeout_s: float | None = None
    ) -> list[pb.SubmitReply]:
        reply: pb.SubmitBatchReply = await self.requests.SubmitBatch(
            pb.SubmitBatchRequest(requests=specs), timeout=self._deadline(timeout_s), metadata=self.metadata
        )
        return list(reply.replies)

    async def status(self, request_id: str, timeout_s: float | None = None) -> pb.RequestStatus:
        reply: pb.RequestStatus = await self.requests.Status(
            pb.RequestRef(request_id=request_id), timeout=self._deadline(timeout_s), metadata=self.metadata
        )
        return reply

    async def cancel(self, request_id: str, timeout_s: float | None = None) -> pb.CancelReply:
        reply: pb.CancelReply = await self.requests.Cancel(
            pb.RequestRef(request_id=request_id), timeout=self._deadline(timeout_s), metadata=self.metadata
        )
        return reply

    async def stream(self, request_id: str, timeout_s: float) -> AsyncIterator[pb.OutputChunk]:
        """The request's output from the start; ``timeout_s`` bounds the whole stream."""
        call = self.requests.Stream(
            pb.RequestRef(request_id=request_id), timeout=timeout_s, metadata=self.metadata
        )
        async for chunk in call:
            yield chunk

    async def queue(self, model: str = "", limit: int = 0) -> pb.QueueSnapshot:
        reply: pb.QueueSnapshot = await self.admin.GetQueue(
            pb.QueueQuery(model=model, limit=limit), timeout=self.timeout_s, metadata=self.metadata
        )
        return reply

    async def plan(self) -> pb.PlanSnapshot:
        reply: pb.PlanSnapshot = await self.admin.GetPlan(
            pb.PlanQuery(), timeout=self.timeout_s, metadata=self.metadata
        )
        return reply

    async def instances(self) -> pb.InstancesSnapshot:
        reply: pb.InstancesSnapshot = await self.admin.ListInstances(
            pb.InstancesQuery(), timeout=self.timeout_s, metadata=self.metadata
        )
        return reply

    async def evict(self, request_id: str, mode: str = "") -> pb.EvictReply:
        reply: pb.EvictReply = await self.admin.Evict(
            pb.EvictOrder(request_id=request_id, mode=mode), timeout=self.timeout_s, metadata=self.metadata
        )
        return reply
