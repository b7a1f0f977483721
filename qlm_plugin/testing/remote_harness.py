"""A conformance harness for adapters that connect as agents (the black-box adapter, the vLLM
adapter): their backend hooks are the coordinator's, answered over gRPC sessions.

A coordinator (policy ``fcfs``: nothing is reordered or held back) runs on an event loop in a
background thread; the adapter's agent connects to it over real gRPC; a bridge plugin in the
suite's plugin manager answers the backend hooks with the coordinator's view of the instance and
reports each request's end back to the suite. Time is real: ``advance`` sleeps.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pluggy

from qlm_plugin.coordinator.config import CoordinatorConfig, HTTPListen, Listen
from qlm_plugin.coordinator.coordinator import Coordinator
from qlm_plugin.coordinator.jobs import Job
from qlm_plugin.coordinator.journal import JobRecord
from qlm_plugin.coordinator.server import CoordinatorServer
from qlm_plugin.domain.instance import EvictMode, EvictResult, InstanceInfo, InstanceState, LoadResult
from qlm_plugin.domain.outcome import RequestOutcome, Status
from qlm_plugin.domain.request import Request
from qlm_plugin.hooks import hookimpl
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.workloads.scenario import Scenario

T = TypeVar("T")


class RemoteHarness:
    """``connect(target)`` starts the adapter's agent for instance ``instance_id`` against the
    coordinator's gRPC address (on the harness's loop) and returns what ``disconnect`` needs."""

    def __init__(
        self,
        scenario: Scenario,
        instance_id: str,
        model: str,
        connect: Callable[[str], Coroutine[Any, Any, Any]],
        disconnect: Callable[[Any], Coroutine[Any, Any, None]],
        *,
        grpc_port: int = 0,
        long_request_tokens: int = 400,
    ) -> None:
        self.grpc_port = grpc_port  # fixed: engines started once per process find each new coordinator
        self.long_request_tokens = long_request_tokens
        self.scenario = scenario
        self._iid = instance_id
        self._model = model
        self._connect = connect
        self._disconnect = disconnect
        self._tmp = tempfile.TemporaryDirectory()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="remote-harness", daemon=True)
        self._thread.start()
        self.server: CoordinatorServer | None = None
        self._agent: Any = None
        self.requests: dict[str, Request] = {}  # the suite's own request objects, by id

    # ------------------------------------------------------------------ plumbing
    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def sync(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return self.call(run())

    @property
    def coordinator(self) -> Coordinator:
        assert self.server is not None and self.server.coordinator is not None
        return self.server.coordinator

    # ------------------------------------------------------------------ BackendHarness
    def start(self, pm: pluggy.PluginManager) -> None:
        cfg = CoordinatorConfig(
            http=HTTPListen(port=0),
            grpc=Listen(port=self.grpc_port),
            policy="fcfs",
            journal={"path": str(Path(self._tmp.name) / "journal.db")},  # type: ignore[arg-type]
            heartbeat_interval_s=0.2,
            heartbeat_timeout_s=15.0,
            recovery_grace_s=0.0,
        )
        self.server = CoordinatorServer(cfg, self.scenario, env={}, warn=lambda _m: None)
        self.call(self.server.start())
        self.coordinator.pm.register(_Reporter(self, pm), name="conformance-reporter")
        self._agent = self.call(self._connect(f"127.0.0.1:{self.server.grpc_port}"))
        deadline = time.monotonic() + 120
        while not self.sync(lambda: self.coordinator.fleet.live(self._iid) is not None):
            if time.monotonic() > deadline:
                raise TimeoutError(f"instance {self._iid} never registered")
            time.sleep(0.05)
        pm.register(_Bridge(self, pm), name="remote-bridge")

    def instance_id(self) -> str:
        return self._iid

    def model(self) -> str:
        return self._model

    def other_model(self) -> str | None:
        return None  # one engine per model

    def advance(self, seconds: float) -> None:
        time.sleep(seconds)

    def close(self) -> None:
        try:
            if self._agent is not None:
                self.call(self._disconnect(self._agent))
            if self.server is not None:
                self.call(self.server.stop(drain_timeout_s=0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self._tmp.cleanup()

    # ------------------------------------------------------------------ on the loop
    async def dispatch(self, instance_id: str, request: Request) -> bool:
        coord = self.coordinator
        s = coord.fleet.live(instance_id)
        if s is None:
            return False
        spec = pb.RequestSpec(
            request_id=request.id,
            model=request.model,
            prompt="hello " * max(1, request.prompt_tokens - 1),
            prompt_tokens=request.prompt_tokens,
            max_tokens=request.max_tokens,
            true_output_tokens=request.true_output_tokens or 0,
            slo=pb.SLO(slo_class="batch"),
            operation="text_completion",
        )
        job = Job(request, spec)
        await coord.journal.accept(
            JobRecord(request.id, request.tenant, {"request_id": request.id}, time.time())
        )
        coord.book.jobs[request.id] = job
        self.requests[request.id] = request
        return coord.dispatcher.dispatch(s, request)


class _Reporter:
    """In the coordinator's plugin manager: tells the suite when one of its requests ended."""

    def __init__(self, harness: RemoteHarness, suite: pluggy.PluginManager) -> None:
        self.harness = harness
        self.suite = suite

    @hookimpl
    def qlm_request_finished(self, outcome: RequestOutcome, now: float) -> None:
        request = self.harness.requests.get(outcome.request.id)
        if request is None or outcome.status not in (Status.FINISHED, Status.CANCELLED):
            return  # not the suite's, or only handed back to be served again
        job = self.harness.coordinator.book.jobs.get(request.id)
        self.suite.hook.qlm_request_finished(
            outcome=RequestOutcome(
                request,
                outcome.status,
                instance_id=outcome.instance_id,
                first_token_time=outcome.first_token_time,
                finish_time=outcome.finish_time,
                output_tokens=outcome.output_tokens,
                preemptions=job.preemptions if job is not None else outcome.preemptions,
            ),
            now=now,
        )


class _Bridge:
    """In the suite's plugin manager: the backend hooks, answered by the coordinator's sessions."""

    name = "remote"

    def __init__(self, harness: RemoteHarness, suite: pluggy.PluginManager) -> None:
        self.h = harness
        self.suite = suite

    @hookimpl
    def qlm_list_instances(self) -> list[InstanceInfo]:
        return self.h.sync(lambda: self.h.coordinator.fleet.qlm_list_instances())

    @hookimpl
    def qlm_instance_state(self, instance_id: str, detail: bool) -> InstanceState | None:
        def state() -> InstanceState | None:
            fleet = self.h.coordinator.fleet
            s = fleet.live(instance_id)
            base = fleet.qlm_instance_state(instance_id, detail)
            if s is None or base is None:
                return None
            # What the coordinator has handed the instance and not seen finish is on it: running,
            # as far as a remote instance's own (periodic) report can be trusted to say.
            held = tuple(sorted(s.assigned))
            from dataclasses import replace

            return replace(
                base,
                num_running=len(held),
                num_waiting=0,
                num_waiting_urgent=0,
                running_ids=held if detail else (),
                waiting_ids=(),
                healthy=True,
            )

        return self.h.sync(state)

    @hookimpl
    def qlm_dispatch(self, instance_id: str, request: Request) -> bool | None:
        if instance_id != self.h.instance_id():
            return None
        ok = self.h.call(self.h.dispatch(instance_id, request))
        if ok:
            self.suite.hook.qlm_request_queued(request=request, instance_id=instance_id, now=time.time())
        return ok

    @hookimpl
    def qlm_evict(
        self, instance_id: str, request_id: str, mode: EvictMode, for_request_id: str | None
    ) -> EvictResult | None:
        if instance_id != self.h.instance_id():
            return None
        fleet = self.h.coordinator.fleet
        return self.h.sync(lambda: fleet.qlm_evict(instance_id, request_id, mode, for_request_id))

    @hookimpl
    def qlm_load_model(self, instance_id: str, model: str, target: str) -> LoadResult | None:
        if instance_id != self.h.instance_id():
            return None
        return self.h.sync(lambda: self.h.coordinator.fleet.qlm_load_model(instance_id, model, target))
