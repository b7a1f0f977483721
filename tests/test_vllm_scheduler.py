"""The QLM scheduler mixin (:mod:`qlm_plugin.adapters.vllm.scheduler`) on a fake of vLLM's
``Scheduler``: plain request objects, no vLLM. The fake seats waiting requests in the queue's order
up to ``max_num_active_reqs``, skips those waiting for their grammar as vLLM does, prefills a prompt
in one step and decodes one token per step."""

from __future__ import annotations

import enum
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from qlm_plugin.adapters.vllm.engine_agent import Link, VLLMEngineLink, settings_from
from qlm_plugin.adapters.vllm.orders import EvictionOrder
from qlm_plugin.adapters.vllm.scheduler import scheduler_class


class Status(enum.IntEnum):  # vLLM's RequestStatus, the members the mixin reads
    WAITING = enum.auto()
    WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR = enum.auto()
    WAITING_FOR_REMOTE_KVS = enum.auto()
    WAITING_FOR_STREAMING_REQ = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()


_n = 0


@dataclass(eq=False)
class VReq:
    request_id: str
    max_tokens: int = 4000
    extra_args: dict[str, Any] | None = None
    num_prompt_tokens: int = 32
    arrival_time: float = 0.0
    priority: int = 0
    num_output_tokens: int = 0
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    structured_output_request: Any = None
    sampling_params: Any = field(init=False)

    def __post_init__(self) -> None:
        import time

        self.arrival_time = self.arrival_time or time.time()
        self.sampling_params = SimpleNamespace(extra_args=self.extra_args)


def req(rid: str | None = None, **kw: Any) -> VReq:
    global _n
    _n += 1
    return VReq(rid or f"r{_n}", **kw)


class FakeVLLMScheduler:
    def __init__(self, max_num_seqs: int = 2, max_num_active_reqs: int | None = None) -> None:
        model_config = SimpleNamespace(served_model_name="tiny", model="tiny")
        self.vllm_config = SimpleNamespace(model_config=model_config, additional_config=None)
        self.running: list[VReq] = []
        self.requests: dict[str, VReq] = {}
        self.waiting: Any = None
        self.kv_holding_waiting: Any = None
        self.policy: Any = "fcfs"
        self.max_num_running_reqs = max_num_seqs
        self.max_num_active_reqs = max_num_active_reqs or max_num_seqs
        self.kv_cache_manager = SimpleNamespace(usage=0.0)
        self.freed: list[str] = []

    def add_request(self, r: VReq) -> None:
        self.requests[r.request_id] = r
        self.waiting.add_request(r)

    def schedule(self) -> Any:
        new, skipped = [], []
        while self.waiting and len(self.running) < self.max_num_active_reqs:
            r = self.waiting.pop_request()
            if (
                r.status == Status.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR
                and r.structured_output_request.grammar is None
            ):
                skipped.append(r)
                continue
            if r.num_computed_tokens == 0:
                new.append(r)
            r.status = Status.RUNNING
            self.running.append(r)
        self.waiting.prepend_requests(skipped)
        tokens = {}
        for r in self.running:  # computed at schedule time, as vLLM does
            tokens[r.request_id] = max(1, r.num_prompt_tokens + r.num_output_tokens - r.num_computed_tokens)
            r.num_computed_tokens += tokens[r.request_id]
        return SimpleNamespace(
            total_num_scheduled_tokens=sum(tokens.values()),
            num_scheduled_tokens=tokens,
            scheduled_new_reqs=new,
        )

    def update_from_output(self, out: Any, model_runner_output: Any) -> dict[int, Any]:
        for rid in out.num_scheduled_tokens:
            r = self.requests.get(rid)
            if r is None or r.status != Status.RUNNING:
                continue
            r.num_output_tokens += 1
            if r.num_output_tokens >= r.max_tokens:
                r.status = Status.FINISHED_LENGTH_CAPPED
                self.running.remove(r)
                self._free_request(r)
        return {}

    def _preempt_request(self, r: VReq, now: float) -> None:
        r.status = Status.PREEMPTED
        r.num_computed_tokens = 0
        self.waiting.prepend_request(r)

    def _free_request(self, r: VReq) -> None:
        self.freed.append(r.request_id)
        del self.requests[r.request_id]


QLMFake = scheduler_class(FakeVLLMScheduler, request_status=Status, priority_policy="priority")


@pytest.fixture(autouse=True)
def _no_coordinator(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("QLM_COORDINATOR", "QLM_VLLM_STEPS", "QLM_VLLM_REQUESTS", "QLM_VLLM_STATS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QLM_DISABLE_PLUGIN_AUTOLOAD", "1")


def make(**kw: Any) -> Any:
    s = QLMFake(**kw)
    s.qlm_brain.policy.step_s = 0.02
    s.qlm_brain.observe_step = lambda *a: None  # the fake's steps take microseconds: keep the pace
    return s


def step(s: Any) -> Any:
    out = s.schedule()
    s.update_from_output(out, None)
    return out


def batch(s: Any, n: int, **xargs: Any) -> list[VReq]:
    """``n`` long batch requests with slack to spare, running."""
    reqs = [req(extra_args={"qlm_e2e_ms": 3.6e6, **xargs}) for _ in range(n)]
    for r in reqs:
        s.add_request(r)
    for _ in range(3):
        step(s)
    assert all(r.status == Status.RUNNING for r in reqs)
    return reqs


def urgent(**kw: Any) -> VReq:
    return req(extra_args={"qlm_ttft_ms": 300}, max_tokens=16, **kw)


def test_a_malformed_field_or_a_failing_brain_never_stops_the_engine(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = make()
    r = req(extra_args={"qlm_priority": float("inf"), "qlm_attempt": float("nan"), "qlm_predicted_q90": 1e30})
    s.add_request(r)  # raised OverflowError
    step(s)
    assert r.status == Status.RUNNING and s.qlm_fields[r.request_id].priority == 0

    def broken(*args: Any) -> None:
        raise RuntimeError("bug")

    s.qlm_brain.finished = broken
    s.qlm_brain.seat_for = broken
    s.running.remove(r)
    s._free_request(r)  # vLLM's own bookkeeping runs all the same
    assert s.freed == [r.request_id] and r.request_id not in s.qlm_fields
    batch(s, 2)
    s.add_request(urgent())
    step(s)
    step(s)
    errors = [x.getMessage() for x in caplog.records if x.levelname == "ERROR"]
    assert len(errors) == 2 and "_free_request" in errors[0] and "evictions" in errors[1]


@pytest.mark.parametrize("head", [None, {"qlm_e2e_ms": 400}, {"qlm_priority": -100}])
def test_an_urgent_request_behind_one_without_a_ttft_still_gets_a_seat(head: dict[str, Any] | None) -> None:
    """The seat check looked at the head of the queue only: an end-to-end-bound request or a
    client-priority one ranked first hid every urgent request behind it."""
    s = make()
    batch(s, 2)
    if head is not None:
        s.add_request(req(extra_args=head, max_tokens=16))
    u = urgent()
    s.add_request(u)
    step(s)
    assert s.qlm_counters["evictions"] == 1
    for _ in range(20):
        step(s)
    assert u.num_output_tokens > 0


def test_a_request_vllm_skips_costs_no_eviction_and_keeps_its_claim_to_a_seat() -> None:
    """A request waiting for its grammar took a seat eviction it could not use, and was marked as
    given a seat: once its grammar was ready it never got one."""
    s = make()
    running = batch(s, 2)
    u = urgent(status=Status.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR)
    u.structured_output_request = SimpleNamespace(grammar=None)
    s.add_request(u)
    step(s)
    assert s.qlm_counters["evictions"] == 0 and all(r in s.running for r in running)
    u.structured_output_request.grammar = object()
    step(s)
    assert s.qlm_counters["evictions"] == 1 and u.status == Status.RUNNING


def test_a_seat_freed_for_a_request_the_step_did_not_seat_is_given_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = make()
    batch(s, 2)
    u = urgent()
    s.add_request(u)
    real = FakeVLLMScheduler.schedule

    def hold_back(self: Any) -> Any:  # vLLM seats it not this time (its token budget, say)
        self.waiting.remove_request(u)
        out = real(self)
        self.waiting.add_request(u)
        return out

    monkeypatch.setattr(FakeVLLMScheduler, "schedule", hold_back)
    step(s)
    assert s.qlm_counters["evictions"] == 1 and not s.qlm_seats.given(u.request_id)
    monkeypatch.setattr(FakeVLLMScheduler, "schedule", real)
    step(s)  # the victim took its seat back; the next one frees one again
    assert s.qlm_counters["evictions"] == 2 and u.status == Status.RUNNING
    assert s.qlm_seats.given(u.request_id)


def test_seats_are_max_num_active_seqs_where_vllm_has_them() -> None:
    """``--max-num-active-seqs 2`` under ``max_num_seqs`` 4: the scheduler believed 2 seats free and
    never freed one; the agent offered the coordinator 2 more requests than the engine admits."""
    s = make(max_num_seqs=4, max_num_active_reqs=2)
    batch(s, 2)
    u = urgent()
    s.add_request(u)
    step(s)
    assert s.qlm_counters["evictions"] == 1 and u.status == Status.RUNNING
    sched = SimpleNamespace(
        vllm_config=SimpleNamespace(model_config=s.vllm_config.model_config, kv_transfer_config=None),
        cache_config=SimpleNamespace(num_gpu_blocks=100),
        max_num_running_reqs=4,
        max_num_active_reqs=2,
        qlm_snapshot=(1, 0, 0.0, 0.0, 0),
        qlm_steps=[],
    )
    link = VLLMEngineLink(sched, {"instance_id": "e", "endpoint": "", "gpu": "cpu"})
    assert link.free_slots() == 1 and link.state().max_num_seqs == 2


def test_async_step_timings_go_to_their_own_step() -> None:
    """With async scheduling vLLM schedules step N+1 before it updates from step N: the prefill step
    was recorded as the decode step after it, and that one was lost."""
    s = make()
    s.add_request(req(num_prompt_tokens=200, max_tokens=50))
    a, b = s.schedule(), s.schedule()
    assert (a.total_num_scheduled_tokens, b.total_num_scheduled_tokens) == (200, 1)
    s.update_from_output(a, None)
    s.update_from_output(b, None)
    steps = [(t.prefill_tokens, t.decode_tokens) for t in s.qlm_steps]
    assert steps == [(200, 0), (0, 1)] and not s._qlm_pending_steps


def test_parallel_samples_share_a_coordinator_id_until_the_last_finishes() -> None:
    """With n > 1 every child carries the request's ``qlm_id``: the first to finish dropped the id,
    and a coordinator's eviction order could not reach the others."""
    s = make(max_num_seqs=4)
    xargs = {"qlm_id": "job-1", "qlm_ttft_ms": 1000}
    short, long = req("0_x", extra_args=xargs, max_tokens=2), req("1_x", extra_args=xargs, max_tokens=50)
    s.add_request(short)
    s.add_request(long)
    for _ in range(3):
        step(s)
    assert short.request_id in s.freed and s.qlm_by_id == {"job-1": {"1_x"}}
    assert s._qlm_running("job-1") is long
    s.running.remove(long)
    long.status = Status.FINISHED_ABORTED
    s._free_request(long)
    assert s.qlm_by_id == {}


def test_evictions_are_queued_for_the_agent_only_when_there_is_one() -> None:
    """Without a coordinator nobody reads the eviction reports: they piled up for the engine's life."""
    s = make()
    batch(s, 2, qlm_id="x")
    s.add_request(urgent())
    step(s)
    assert s.qlm_counters["evictions"] == 1 and s.qlm_link is None and not s.qlm_evicted


def test_an_eviction_report_out_of_int32_range_is_dropped_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An attempt beyond int32 (now clamped when parsed) raised ValueError in the scheduler's thread."""
    calls: list[Any] = []
    link = Link.__new__(Link)  # no agent thread: step_done's part in the scheduler's thread
    evicted = deque([("big", 3 * 10**9, 5), ("ok", 2, 5)])
    link.engine = SimpleNamespace(sched=SimpleNamespace(qlm_evicted=evicted), free_slots=lambda: 0)  # type: ignore[assignment]
    link.loop = SimpleNamespace(call_soon_threadsafe=lambda f, *a: calls.append(a))  # type: ignore[assignment]
    link.agent = SimpleNamespace(emit=None, room=None)  # type: ignore[assignment]
    link._room = 0
    with caplog.at_level(logging.WARNING):
        link.step_done()
    assert [e[0].request_id for e in calls] == ["ok"] and "cannot report" in caplog.text


class FakeV1Scheduler(FakeVLLMScheduler):
    """vLLM 0.32's V1 runner bookkeeping: the requests the previous step scheduled, and the
    preemption's ``drop_stale_output``."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.prev_step_scheduled_req_ids: set[str] = set()
        self.requires_kv_delivery = True
        self.dropped: list[bool] = []

    def schedule(self) -> Any:
        out = super().schedule()
        self.prev_step_scheduled_req_ids = set(out.num_scheduled_tokens)
        return out

    def _preempt_request(self, r: VReq, now: float, drop_stale_output: bool = False) -> None:  # type: ignore[override]
        self.dropped.append(drop_stale_output)
        super()._preempt_request(r, now)


def test_a_request_evicted_between_steps_is_not_taken_for_one_scheduled_in_the_previous_step() -> None:
    """Evicted before a step and seated again in it (an operator's order while a seat is free),
    it stayed in ``prev_step_scheduled_req_ids``: vLLM's V1 model runner then gets no token ids
    for it (a KeyError in EngineCore on a GPU). vLLM's own reset_prefix_cache clears it so."""
    s = scheduler_class(FakeV1Scheduler, request_status=Status, priority_policy="priority")(max_num_seqs=3)
    s.qlm_brain.observe_step = lambda *a: None
    a, b = batch(s, 2)
    assert {a.request_id, b.request_id} <= s.prev_step_scheduled_req_ids
    s.qlm_orders.append(EvictionOrder(b.request_id, "", came=time.monotonic()))  # an operator's
    s._qlm_before_step()
    assert s.qlm_counters["evictions"] == 1 and s.dropped == [True]  # vLLM's drop_stale_output
    assert a.request_id in s.prev_step_scheduled_req_ids
    assert b.request_id not in s.prev_step_scheduled_req_ids


def test_settings_that_are_not_an_object_stop_the_engine_saying_why() -> None:
    for bad in (None, "x", [1]):
        with pytest.raises(ValueError, match="'qlm' must be an object of settings"):
            settings_from({"qlm": bad}, env={})
    assert settings_from({"qlm": {"coordinator": "h:1"}}, env={}) is not None


def test_the_counters_are_written_when_the_engine_empties(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's server kills EngineCore at SIGTERM before the scheduler's shutdown writes them: a
    benchmark read counters up to 199 steps old, or none."""
    stats = tmp_path / "stats.jsonl"
    monkeypatch.setenv("QLM_VLLM_STATS", str(stats))
    s = make()
    s.add_request(req(max_tokens=3))
    for _ in range(6):
        step(s)
    assert json.loads(stats.read_text().splitlines()[-1])["steps"] >= 3


def test_the_scheduler_classes_pickle_by_reference() -> None:
    """Named QLMScheduler, the built class pickled as the factory class of that name (a
    PicklingError where vLLM spawns its engine with the class object rather than its path)."""
    import subprocess
    import sys
    from pathlib import Path

    import qlm_plugin.adapters.vllm as vllm_adapter

    shims = Path(vllm_adapter.__file__).parent / "cpu_compat"
    code = (
        "import pickle; from qlm_plugin.adapters.vllm import scheduler as s; "
        "a, b = s.QLMSyncScheduler, s.QLMAsyncScheduler; "
        "assert pickle.loads(pickle.dumps(a)) is a and pickle.loads(pickle.dumps(b)) is b; "
        "assert (a.__name__, b.__name__) == ('QLMSyncScheduler', 'QLMAsyncScheduler')"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shims), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_seat_is_freed_while_vllm_would_give_it_to_a_request_holding_kv() -> None:
    """vLLM seats the waiting requests that hold KV blocks first: a seat freed for an urgent request
    went to one of them, and the urgent request cost an eviction at every step while they lasted."""
    s = make()
    batch(s, 2)
    holding = req(extra_args={"qlm_e2e_ms": 3.6e6})
    holding.num_computed_tokens = 16  # an async KV load's request: it waits holding its blocks
    s.requests[holding.request_id] = holding
    s.kv_holding_waiting.add_request(holding)
    s.add_request(urgent())
    s._qlm_before_step()
    assert s.qlm_counters["evictions"] == 0
    s.kv_holding_waiting.remove_requests([holding])
    s._qlm_before_step()
    assert s.qlm_counters["evictions"] == 1  # once it is seated, the urgent request's turn
