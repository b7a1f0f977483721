"""Conformance suite for backend adapters: what every adapter must do, checked through the hooks only.

Use it from an adapter's tests::

    from qlm_plugin.testing.conformance import AdapterConformance

    class TestMyAdapter(AdapterConformance):
        @pytest.fixture
        def harness(self):
            h = MyHarness()   # implements BackendHarness
            yield h
            h.close()

Optional abilities (swap, model loading) are tested when the adapter lists them in its instances'
capabilities and skipped otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Protocol

import pluggy
import pytest

from qlm_plugin.domain.instance import EvictMode, EvictResult, InstanceInfo, InstanceState
from qlm_plugin.domain.outcome import RequestOutcome, Status
from qlm_plugin.domain.request import Request, make_request
from qlm_plugin.hooks import get_plugin_manager, hookimpl, list_instances

#: Requests an eviction check may take: a real engine can finish one before the order lands.
EVICT_ATTEMPTS = 6


class HarnessUnavailable(Exception):
    """An adapter's harness cannot run here (what it needs is said in the message): its
    conformance tests are skipped with that reason, never passed."""


class BackendHarness(Protocol):
    """How the suite drives one adapter."""

    def start(self, pm: pluggy.PluginManager) -> None:
        """Register the adapter's plugin in ``pm`` and connect whatever it needs."""

    def instance_id(self) -> str:
        """An instance the suite may use (serving :meth:`model` at start)."""

    def model(self) -> str:
        """A model that instance serves."""

    def other_model(self) -> str | None:
        """A second model the instance can load, or None (model-loading tests are skipped)."""

    def advance(self, seconds: float) -> None:
        """Let the backend make progress for ``seconds`` (simulated or real time)."""

    def close(self) -> None: ...

    # Optional: ``long_request_tokens`` (int, default 400), the output length of the requests the
    # eviction checks evict. A fast real engine wants them long enough to outlast the order's trip.


class _Recorder:
    def __init__(self) -> None:
        self.finished: list[RequestOutcome] = []
        self.queued: list[tuple[str, str | None]] = []

    @hookimpl
    def qlm_request_queued(self, request: Request, instance_id: str | None, now: float) -> None:
        self.queued.append((request.id, instance_id))

    @hookimpl
    def qlm_request_finished(self, outcome: RequestOutcome, now: float) -> None:
        self.finished.append(outcome)


def _wait_until(
    harness: BackendHarness, cond: Callable[[], bool], budget_s: float, step_s: float = 0.05
) -> bool:
    waited = 0.0
    deadline = time.monotonic() + max(budget_s, 60.0)
    while not cond():
        if waited >= budget_s or time.monotonic() > deadline:
            return False
        harness.advance(step_s)
        waited += step_s
    return True


class AdapterConformance:
    """Subclass and provide a ``harness`` fixture yielding a :class:`BackendHarness`."""

    #: How much backend time the suite grants a small request to finish.
    completion_budget_s = 120.0

    @pytest.fixture
    def harness(self) -> Iterator[BackendHarness]:
        raise NotImplementedError("provide a 'harness' fixture")

    @pytest.fixture
    def wired(self, harness: BackendHarness) -> tuple[BackendHarness, pluggy.PluginManager, _Recorder]:
        pm = get_plugin_manager(autoload=False)
        recorder = _Recorder()
        pm.register(recorder, name="conformance-recorder")
        harness.start(pm)
        return harness, pm, recorder

    # -------------------------------------------------------------- helpers
    _n = 0

    def _request(self, harness: BackendHarness, prompt: int = 32, out: int = 16) -> Request:
        AdapterConformance._n += 1
        return make_request(
            f"conf-{AdapterConformance._n}",
            harness.model(),
            prompt,
            out,
            0.0,
            e2e_s=3600.0,
            true_output_tokens=out,
        )

    @staticmethod
    def _state(pm: pluggy.PluginManager, iid: str, detail: bool = True) -> InstanceState:
        state = pm.hook.qlm_instance_state(instance_id=iid, detail=detail)
        assert isinstance(state, InstanceState), f"qlm_instance_state({iid!r}) returned {state!r}"
        return state

    @staticmethod
    def _caps(pm: pluggy.PluginManager, iid: str) -> frozenset[str]:
        infos = [i for i in list_instances(pm) if i.instance_id == iid]
        return infos[0].capabilities if infos else frozenset()

    # -------------------------------------------------------------- listing and state
    def test_lists_its_instances_with_unique_ids(
        self, wired: tuple[BackendHarness, pluggy.PluginManager, _Recorder]
    ) -> None:
        harness, pm, _ = wired
        infos: list[InstanceInfo] = list_instances(pm)
        ids = [i.instance_id for i in infos]
        assert harness.instance_id() in ids
        assert len(ids) == len(set(ids)), f"duplicate instance ids: {ids}"
        assert all(i.backend for i in infos)

    def test_state_is_consistent(self, wired: tuple[BackendHarness, pluggy.PluginManager, _Recorder]) -> None:
        harness, pm, _ = wired
        s = self._state(pm, harness.instance_id())
        assert s.instance_id == harness.instance_id()
        assert harness.model() in s.models_loaded or s.loading_model == harness.model()
        assert min(s.num_running, s.num_waiting, s.num_swapped, s.queued_tokens, s.kv_blocks_used) >= 0
        assert s.kv_blocks_used <= s.kv_blocks_total
        assert 0 <= s.num_waiting_urgent <= s.num_waiting
        assert s.max_num_seqs >= 1
        assert s.healthy

    def test_foreign_instance_ids_are_not_answered(
        self, wired: tuple[BackendHarness, pluggy.PluginManager, _Recorder]
    ) -> None:
        harness, pm, _ = wired
        foreign = "no-such-instance-\u2603"
        assert pm.hook.qlm_instance_state(instance_id=foreign, detail=False) is None
        assert pm.hook.qlm_dispatch(instance_id=foreign, request=self._request(harness)) is None
        assert (
            pm.hook.qlm_evict(
                instance_id=foreign, request_id="x", mode=EvictMode.RECOMPUTE, for_request_id=None
            )
            is None
        )
        assert pm.hook.qlm_load_model(instance_id=foreign, model=harness.model(), target="gpu") is None

    # -------------------------------------------------------------- serving
    def test_dispatched_requests_finish_exactly_once(
        self, wired: tuple[BackendHarness, pluggy.PluginManager, _Recorder]
    ) -> None:
        harness, pm, recorder = wired
        iid = harness.instance_id()
        requests = [self._request(harness, prompt=16 + 8 * i, out=4 + i) for i in range(6)]
        for r in requests:
            assert pm.hook.qlm_dispatch(instance_id=iid, request=r) is True
        assert recorder.queued == [(r.id, iid) for r in requests], "qlm_request_queued once per dispatch"
        # A real engine may finish a short request before the state is read: each one is running,
        # waiting or finished (read after the state, so that one finishing in between is counted).
        s = self._state(pm, iid)
        done = {o.request.id for o in recorder.finished}
        assert len(done) + s.num_running + s.num_waiting >= len(requests)
        assert set(s.running_ids) | set(s.waiting_ids) | done == {r.id for r in requests}
        assert len(s.running_ids) + len(s.waiting_ids) == len(set(s.running_ids) | set(s.waiting_ids)), "once"
        assert _wait_until(harness, lambda: len(recorder.finished) >= len(requests), self.completion_budget_s)
        harness.advance(0.1)
        ids = [o.request.id for o in recorder.finished]
        assert sorted(ids) == sorted(r.id for r in requests), "each request finishes exactly once"
        for o in recorder.finished:
            assert o.status is Status.FINISHED
            assert o.first_token_time is not None and o.finish_time is not None
            assert o.first_token_time <= o.finish_time
            assert 1 <= o.output_tokens <= o.request.max_tokens
        s = self._state(pm, iid)
        assert s.num_running == s.num_waiting == 0

    def test_evict_recompute_then_completes_once(
        self, wired: tuple[BackendHarness, pluggy.PluginManager, _Recorder]
    ) -> None:
        self._evict_and_complete(wired, EvictMode.RECOMPUTE)

    def test_evict_swap_then_completes_once(
        self, wired: tuple[BackendHarness, pluggy.PluginManager, _Recorder]
    ) -> None:
        harness, pm, _ = wired
        if "swap" not in self._caps(pm, harness.instance_id()):
            pytest.skip("adapter has no host KV tier")
        self._evict_and_complete(wired, EvictMode.SWAP)

    def _evict_and_complete(
        self, wired: tuple[BackendHarness, pluggy.PluginManager, _Recorder], mode: EvictMode
    ) -> None:
        harness, pm, recorder = wired
        iid = harness.instance_id()
        # A real engine may finish the request before the order reaches it (the tiny test model
        # is fast): that eviction is then a no-op, and the check is run again on a new request.
        for _ in range(EVICT_ATTEMPTS):
            r = self._request(harness, prompt=64, out=getattr(harness, "long_request_tokens", 400))
            assert pm.hook.qlm_dispatch(instance_id=iid, request=r) is True
            running = lambda rid=r.id: rid in self._state(pm, iid).running_ids  # noqa: E731
            assert _wait_until(harness, running, 30.0, 0.01)
            harness.advance(0.05)
            try:
                result = pm.hook.qlm_evict(instance_id=iid, request_id=r.id, mode=mode, for_request_id=None)
            except KeyError:
                result = None  # it finished meanwhile
            if result is not None:
                assert isinstance(result, EvictResult)
                assert result.request_id == r.id
                assert result.mode in (mode, EvictMode.RECOMPUTE)
                assert result.wasted_tokens >= 0
                if result.mode is EvictMode.SWAP:
                    assert result.wasted_tokens == 0
            finished = lambda rid=r.id: any(o.request.id == rid for o in recorder.finished)  # noqa: E731
            assert _wait_until(harness, finished, self.completion_budget_s)
            harness.advance(0.1)
            done = [o for o in recorder.finished if o.request.id == r.id]
            assert len(done) == 1, "an evicted request still finishes, exactly once"
            assert done[0].output_tokens == r.max_tokens
            if result is not None and done[0].preemptions >= 1:
                return
        pytest.fail(f"no eviction took effect in {EVICT_ATTEMPTS} tries: each request finished first")

    def test_evict_of_a_request_not_running_raises_key_error(
        self, wired: tuple[BackendHarness, pluggy.PluginManager, _Recorder]
    ) -> None:
        harness, pm, _ = wired
        with pytest.raises(KeyError):
            pm.hook.qlm_evict(
                instance_id=harness.instance_id(),
                request_id="never-sent",
                mode=EvictMode.RECOMPUTE,
                for_request_id=None,
            )

    # -------------------------------------------------------------- models
    def test_load_other_model_then_serve_it(
        self, wired: tuple[BackendHarness, pluggy.PluginManager, _Recorder]
    ) -> None:
        harness, pm, recorder = wired
        other = harness.other_model()
        if other is None or "load_model" not in self._caps(pm, harness.instance_id()):
            pytest.skip("adapter cannot load another model here")
        iid = harness.instance_id()
        now = self._state(pm, iid).now
        result = pm.hook.qlm_load_model(instance_id=iid, model=other, target="gpu")
        assert result is not None and result.model == other and result.ready_at >= now
        assert _wait_until(
            harness, lambda: other in self._state(pm, iid).models_loaded, result.ready_at - now + 60.0, 0.5
        )
        assert harness.model() not in self._state(pm, iid).models_loaded
        if "warm_start" in self._caps(pm, iid):
            assert harness.model() in self._state(pm, iid).models_warm, "the swapped-out model stays warm"
        r = make_request(
            "conf-other", other, 16, 4, self._state(pm, iid).now + 0.0, e2e_s=3600.0, true_output_tokens=4
        )
        assert pm.hook.qlm_dispatch(instance_id=iid, request=r) is True
        assert _wait_until(
            harness, lambda: any(o.request.id == r.id for o in recorder.finished), self.completion_budget_s
        )
