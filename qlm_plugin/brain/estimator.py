"""The waiting-time estimator (QLM's RWT estimator): when a request gets its first token and when it
finishes, as distributions, and so its probability of meeting its SLO.

A pooled, fluid multi-server model: the seats of every instance serving the model free at the
predicted finish of their running requests (overdue ones predicted again from their progress), then
work through the seat-seconds queued ahead of the request (the global queue's work index), while
more urgent work keeps arriving and is served first; the per-step prefill token budget is a second
bottleneck. The variance is the central-limit sum of the predicted variances ahead over the seats,
widened by a Student-t when few requests are ahead (:mod:`qlm_plugin.brain.waiting_time`). What a
client is told is measured where it can be: while the request's lane (model and SLO class) has a
backlog, the wait told is how long the lane's oldest waiting request has waited so far.

The estimator owns what it learns: the step-cost fit of each instance (from the step timings the
backends report), the arrival rates of urgent work, the seats' predicted finish times, each lane's
delay history, and the calibration of its estimates against outcomes (per class and magnitude
band: corrected means, and an empirical P(meet)). Thread safety: none; one event loop owns it.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qlm_plugin.brain.fleet_view import FleetView, InstanceView
from qlm_plugin.brain.global_queue import REFERENCE_BATCH, Entry, GlobalQueue
from qlm_plugin.brain.waiting_time import (
    HeadOfLine,
    PMeetCalibrator,
    ResidualCalibrator,
    SeatTimes,
    StepCalibrator,
    heavy_tail_factor,
    p_meet,
)
from qlm_plugin.domain.costmodel import CostModel
from qlm_plugin.domain.distributions import LengthDistribution, WaitEstimate
from qlm_plugin.domain.instance import InstanceState
from qlm_plugin.domain.outcome import RequestOutcome
from qlm_plugin.domain.request import Request

#: Memory of the arrival-rate estimates, seconds.
RATE_MEMORY_S = 10.0
#: The calibrator band that pools every magnitude of one class and quantity.
POOLED = 99
#: The waiting time's standard deviation is at least this fraction of its mean (model error).
MODEL_CV = 0.5
#: Window over which the queue's measured drain rate is taken, seconds.
DRAIN_WINDOW_S = 30.0
#: Admissions whose estimate is scored against what happened (``accuracy``): the last this many.
WAIT_LOG_SIZE = 200_000
#: Laxity beyond which later TTFT-bound arrivals will overtake a request while it waits.
OVERTAKE_HORIZON_S = 5.0

Predict = Callable[[Request, int], LengthDistribution]


@dataclass(slots=True)
class InstanceSteps:
    """What an instance's step timings taught: its step-cost fit per model, and its measured time
    per engine step (decode and mixed-in prefill), an exponential average."""

    calibrators: dict[str, StepCalibrator] = field(default_factory=dict)
    step_s: float | None = None
    last_start: float = -math.inf

    def calibrator(self, view: InstanceView, model: str) -> StepCalibrator:
        cal = self.calibrators.get(model)
        if cal is None:
            cal = self.calibrators[model] = StepCalibrator(view.costs[model])
        return cal

    def observe(self, state: InstanceState) -> None:
        for s in state.step_timings:
            if s.start <= self.last_start or s.decode_tokens == 0:
                continue
            self.last_start = s.start
            self.step_s = s.duration_s if self.step_s is None else 0.9 * self.step_s + 0.1 * s.duration_s


class WaitEstimator:
    """The waiting-time estimator role: it owns its step-cost fits (per instance and model), its
    residual calibrators (per class and magnitude band) and the arrival rates it tracks.
    ``predict(request, generated_tokens)``: the remaining output length (the predictor role).
    ``repredict_min_s``: an overdue request is predicted again no sooner than this (on a wall clock,
    every call comes at a new time: without it the same requests would be re-predicted on every
    call)."""

    def __init__(
        self,
        cost_models: Mapping[str, CostModel],
        queue: GlobalQueue,
        fleet: FleetView,
        predict: Predict,
        *,
        repredict_min_s: float = 0.0,
    ) -> None:
        self._ref_cost = cost_models
        self.queue = queue
        self.fleet = fleet
        self.predict = predict
        self.repredict_min_s = repredict_min_s
        self.clock = 0.0  # the latest time the queue manager was called with
        self._steps: dict[str, InstanceSteps] = {}
        self._arrivals: dict[str, tuple[float, float, float, float]] = {}  # (req/s, seat-s/s, tokens/s, at)
        self._residuals: dict[str, tuple[float, SeatTimes]] = {}  # model -> (built at, seats)
        # model -> (predicted finish, request id) of its running requests, sorted
        self._finishing: dict[str, list[tuple[float, str]]] = {}
        self._calib: dict[tuple[str, str, int], ResidualCalibrator] = {}
        self._raw: dict[str, tuple[float, float]] = {}  # id -> raw model (wait, completion) predictions
        self._told: dict[str, PMeetCalibrator] = {}  # per class: the P(meet) clients are told
        self._p_model: dict[str, float] = {}  # id -> the model's P(meet) at admission
        # (request id, admitted at, wait told, P(meet) told, its time to first token, met): the
        # last two filled in when it ends; kept for the last WAIT_LOG_SIZE admissions
        self.wait_log: deque[list[Any]] = deque(maxlen=WAIT_LOG_SIZE)
        self._unended: dict[str, list[Any]] = {}  # admitted, not ended: its entry of the log
        # (model, TTFT-bound) -> dispatches made while work still waited behind them: (time,
        # seat-seconds), and their sum over the window (the rate a backlog drains, as measured)
        self._drained: dict[tuple[str, bool], deque[tuple[float, float]]] = {}
        self._drained_sum: dict[tuple[str, bool], float] = {}
        self._lanes: dict[tuple[str, str], HeadOfLine] = {}  # (model, class) -> its delay history

    # ------------------------------------------------------------------ step costs
    def steps(self, instance_id: str) -> InstanceSteps:
        steps = self._steps.get(instance_id)
        if steps is None:
            steps = self._steps[instance_id] = InstanceSteps()
        return steps

    def observe_steps(self, view: InstanceView, state: InstanceState) -> None:
        """A detailed refresh brought step timings: refit the step cost, update the step time."""
        model = view.model()
        assert model is not None
        steps = self.steps(view.instance_id)
        steps.calibrator(view, model).observe(state.step_timings)
        steps.observe(state)

    def forget(self, instance_id: str) -> None:
        """The instance left: what was learnt of it goes (it may come back as another engine)."""
        self._steps.pop(instance_id, None)
        self._residuals.clear()

    def step_cost(self, view: InstanceView, model: str) -> StepCalibrator:
        return self.steps(view.instance_id).calibrator(view, model)

    def tpot(self, view: InstanceView, model: str) -> float:
        """Time per output token on ``view`` now: the measured step time when there is one (it
        includes the prefill mixed into decode steps under load), else the calibrated cost model."""
        steps = self.steps(view.instance_id)
        if steps.step_s is not None and view.running:
            return steps.step_s
        return steps.calibrator(view, model).step_s(0, max(1, len(view.running)))

    def load_factor(self, model: str) -> float:
        """Measured step time over the reference step time the queued seat-seconds were priced at."""
        return self.fleet.recent("load", model, self.clock, lambda: self._compute_load_factor(model))

    def _compute_load_factor(self, model: str) -> float:
        cost = self._ref_cost.get(model)
        serving = self.fleet.serving(model)
        if cost is None or not serving:
            return 1.0
        tpot = sum(self.tpot(v, model) for v in serving) / len(serving)
        return max(0.5, tpot / cost.decode_tpot_s(REFERENCE_BATCH))

    def prefill_rate(self, model: str) -> float:
        """Prompt tokens per second the model's serving instances can prefill at most: one over
        the calibrated per-token prefill cost, less the share of each step the decodes take."""
        return self.fleet.recent("prefill", model, self.clock, lambda: self._compute_prefill_rate(model))

    def _compute_prefill_rate(self, model: str) -> float:
        total = 0.0
        for view in self.fleet.serving(model):
            b0, b1, b2 = self.step_cost(view, model).coef
            if b1 <= 0:
                continue
            step = self.tpot(view, model)
            decode_share = min(0.9, (b0 + b2 * len(view.running)) / max(step, 1e-6))
            total += (1.0 - decode_share) / b1
        return total

    # ------------------------------------------------------------------ urgent arrivals
    def note_arrival(self, entry: Entry, now: float) -> None:
        """Exponentially decayed rates (10 s memory) of TTFT-bound arrivals per model: requests/s
        and seat-seconds/s (the urgent inflow that overtakes batch work while it waits); and the
        request joins its lane's delay history."""
        self._lane(entry.request).arrived(entry.request.id, entry.request.arrival_time)
        if entry.request.slo.ttft_deadline is None:
            return
        m = entry.request.model
        rate, work, prompt, last = self._arrivals.get(m, (0.0, 0.0, 0.0, now))
        decay = math.exp(-(now - last) / RATE_MEMORY_S)
        self._arrivals[m] = (
            rate * decay + 1.0 / RATE_MEMORY_S,
            work * decay + entry.service_s / RATE_MEMORY_S,
            prompt * decay + entry.request.prompt_tokens / RATE_MEMORY_S,
            now,
        )

    def urgent_rates(self, model: str, now: float) -> tuple[float, float, float]:
        """(requests/s, seat-seconds/s, prompt tokens/s) of recent TTFT-bound arrivals."""
        rate, work, prompt, last = self._arrivals.get(model, (0.0, 0.0, 0.0, now))
        decay = math.exp(-(now - last) / RATE_MEMORY_S)
        return rate * decay, work * decay, prompt * decay

    def drain_rate(self, model: str, ttft_bound: bool, now: float) -> float | None:
        """Seat-seconds per second of the model's work of one lane (TTFT-bound or not) handed to
        engines over the last ``DRAIN_WINDOW_S`` while work still waited (whatever bounds it:
        seats, KV, the step budget, held-back seats, the urgent work that overtakes); None when no
        backlog was drained lately (the seat model answers alone)."""
        lane = (model, ttft_bound)
        window = self._drained.get(lane)
        if not window:
            return None
        while window and window[0][0] < now - DRAIN_WINDOW_S:
            self._drained_sum[lane] -= window.popleft()[1]
        if len(window) < 8:
            return None
        span = max(now - window[0][0], 1.0)
        return max(self._drained_sum[lane], 0.0) / span

    # ------------------------------------------------------------------ seats
    def started(self, e: Entry, now: float) -> None:
        """``e`` took a seat: its seat frees at its predicted finish. While work still waits for
        the model, the dispatch counts toward the measured drain rate."""
        model = e.request.model
        if len(self.queue.queue(model)):
            lane = (model, e.request.slo.ttft_deadline is not None)
            window = self._drained.setdefault(lane, deque())
            window.append((now, e.service_s))
            self._drained_sum[lane] = self._drained_sum.get(lane, 0.0) + e.service_s
        e.finish_at = now + e.service_s * self.load_factor(model)
        bisect.insort(self._finishing.setdefault(model, []), (e.finish_at, e.request.id))
        self.residuals_changed(model)

    def left(self, e: Entry) -> None:
        """``e`` left its seat (finished, or back in the queue)."""
        fin = self._finishing.get(e.request.model)
        if fin:
            i = bisect.bisect_left(fin, (e.finish_at, e.request.id))
            if i < len(fin) and fin[i] == (e.finish_at, e.request.id):
                del fin[i]

    def residuals_changed(self, model: str) -> None:
        """A dispatch or a completion changed the model's seats. On a wall clock the cached seats
        expire with time instead (a few ms), or a busy queue would rebuild them on every call."""
        if self.repredict_min_s == 0:
            self._residuals.pop(model, None)

    def fleet_changed(self) -> None:
        """Seats appeared, went or changed model: every cached seat list is stale."""
        self._residuals.clear()

    def seat_times(self, model: str, now: float) -> tuple[SeatTimes, float]:
        """When each seat of the model's serving instances frees, and how long ago (seconds) those
        times were taken: free seats at 0, busy ones at their request's predicted finish (kept
        sorted as requests are dispatched and finish), seats of an instance still loading the model
        at its ready time."""
        cached = self._residuals.get(model)
        if cached is not None:
            age = now - cached[0]
            if age == 0 or 0 < age < self.repredict_min_s / 4:
                # Wall clock: reused for a few ms (seats free as time passes), not rebuilt per call.
                return cached[1], age
        busy = self._finishing.setdefault(model, [])
        self._repredict_overdue(busy, now)
        seats = 0
        loading: list[float] = []
        for view in self.fleet.serving(model):
            s = view.state
            assert s is not None
            n = min(s.max_num_seqs, view.costs[model].max_num_seqs)
            if s.loading_model == model:
                loading.extend([view.load_s(model)] * n)
            else:
                seats += n
        running = [max(f - now, 0.0) for f, _ in busy[:seats]]
        times = SeatTimes([0.0] * max(0, seats - len(running)) + running + loading)
        self._residuals[model] = (now, times)
        return times, 0.0

    def _repredict_overdue(self, busy: list[tuple[float, str]], now: float, limit: int = 64) -> None:
        """Running requests that outlived their prediction: predict again from their progress
        (the remaining length given the tokens generated so far), so their seat is not taken for
        free while they keep running."""
        while busy and busy[0][0] <= now and limit > 0:
            _, rid = busy.pop(0)
            limit -= 1
            e = self.queue.entries.get(rid)
            if e is None or e.instance is None:
                continue
            view = self.fleet.instances[e.instance]
            tpot = self.tpot(view, e.request.model)
            generated = int((now - (e.dispatched_at or now)) / max(tpot, 1e-6))
            remaining = self.predict(e.request, min(generated, e.request.max_tokens - 1))
            e.finish_at = now + max(max(remaining.mean, 1.0) * tpot, self.repredict_min_s)
            bisect.insort(busy, (e.finish_at, rid))

    # ------------------------------------------------------------------ the estimate
    def estimate(self, entry: Entry, now: float, *, record: bool = True) -> WaitEstimate:
        """Wait until first token and completion, pooled over the instances serving the model.
        ``record``: keep the raw prediction, to calibrate against the outcome (an admission's; a
        later look at a queued request predicts from another time)."""
        r = entry.request
        fleet = self.fleet
        if entry.dispatched_at is not None and entry.instance is not None:
            # on an engine with a seat: its prefill at the next step, then its decode
            view = fleet.instances[entry.instance]
            tpot = self.tpot(view, r.model)
            wait = self.step_cost(view, r.model).step_s(r.prompt_tokens, len(view.running)) + tpot
            done = wait + entry.length.mean * tpot
            sd = math.sqrt(entry.length.var) * tpot
            return WaitEstimate(entry.instance, wait, 0.0, done, sd, p_meet(r, now, wait, 0.0, done, sd))
        q = self.queue.queue(r.model)
        count, work, var = q.index.ahead(entry.key[0])
        residuals, age = self.seat_times(r.model, now)
        serving = fleet.serving(r.model)
        if not serving:
            # nobody serves it: the cheapest swap, then it runs first
            cands = [v for v in fleet.instances.values() if r.model in v.costs and v.state is not None]
            if not cands:
                return WaitEstimate("", math.inf, 0.0, math.inf, 0.0, 0.0)
            load = min(v.load_s(r.model) for v in cands)
            seats = cands[0].costs[r.model].max_num_seqs
            residuals, age = SeatTimes([load] * seats), 0.0
        seats = max(1, len(residuals))
        scale = self.load_factor(r.model)
        inflow = 0.0
        if entry.key[0] - now > OVERTAKE_HORIZON_S:
            # capped: a transient burst must not make the wait infinite
            inflow = min(self.urgent_rates(r.model, now)[1] * scale, 0.9 * seats)
        # Measured first: the rate this lane's backlog was handed to engines lately already holds
        # what the seat model misses (KV, the step budget and held-back seats bind before the
        # seats do; urgent work overtakes). The seat model adds when seats free.
        drain = self.drain_rate(r.model, r.slo.ttft_deadline is not None, now) if serving else None
        if drain is not None:
            start = max(residuals.start_s(work * scale, 0.0, age), work / drain)
        else:
            start = residuals.start_s(work * scale, inflow, age)
        # The other bottleneck: the per-step prefill token budget (prompt tokens ahead, plus urgent
        # prompts arriving meanwhile, at the fleet's prefill rate).
        capacity = self.prefill_rate(r.model)
        if capacity > 0:
            urgent_tokens = self.urgent_rates(r.model, now)[2] if inflow > 0 else 0.0
            spare = max(capacity - urgent_tokens, 0.1 * capacity)
            start = max(start, q.index.prompt_ahead(entry.key[0]) / spare)
        cost = self._ref_cost.get(r.model)
        prefill = cost.step_s(r.prompt_tokens, 0) if cost else 0.0
        tpot = cost.decode_tpot_s(REFERENCE_BATCH) * scale if cost else 0.0
        # The spread of the work ahead understates the model's own error (arrivals, the engines'
        # batching): at least MODEL_CV of the mean, so a near miss is not told P(meet) = 0.
        wait_std = max(math.sqrt(var) * scale / seats * heavy_tail_factor(count), MODEL_CV * start)
        wait_mean = start + prefill
        done_mean = wait_mean + entry.length.mean * tpot
        done_std = math.sqrt(wait_std * wait_std + entry.length.var * tpot * tpot)
        pm = p_meet(r, now, wait_mean, wait_std, done_mean, done_std)
        # Online calibration against outcomes (per class): corrected means, empirical P(meet).
        raw_wait, raw_done = wait_mean, done_mean
        cw = self._calibrator(r.slo_class, "wait", raw_wait)
        cd = self._calibrator(r.slo_class, "done", raw_done)
        wait_mean, done_mean = cw.corrected(raw_wait), cd.corrected(raw_done)
        probs = []
        if r.slo.ttft_deadline is not None:
            probs.append(cw.p_within(raw_wait, r.slo.ttft_deadline - now))
        if r.slo.e2e_deadline is not None:
            probs.append(cd.p_within(raw_done, r.slo.e2e_deadline - now))
        if probs and all(p is not None for p in probs):
            pm = min(p for p in probs if p is not None)
        if record:
            self._raw[r.id] = (raw_wait, raw_done)
        iid = serving[0].instance_id if serving else ""
        return WaitEstimate(iid, wait_mean, wait_std, done_mean, done_std, pm)

    def _calibrator(self, slo_class: str, what: str, raw_s: float) -> ResidualCalibrator:
        """The calibrator of a class, quantity and magnitude band of the raw prediction (errors of a
        0.1 s wait and of a 30 s wait have different causes, so they are corrected apart); until a
        band has seen enough outcomes, the class's pooled one over every band."""
        c = self._band(slo_class, what, self._band_of(raw_s))
        return c if c.ready else self._band(slo_class, what, POOLED)

    @staticmethod
    def _band_of(raw_s: float) -> int:
        return -1 if not math.isfinite(raw_s) else max(-3, min(8, math.floor(math.log2(max(raw_s, 0.05)))))

    def _band(self, slo_class: str, what: str, band: int) -> ResidualCalibrator:
        key = (slo_class, what, band)
        c = self._calib.get(key)
        if c is None:
            c = self._calib[key] = ResidualCalibrator(min_samples=30)
        return c

    def _learn(self, slo_class: str, what: str, raw_s: float, actual_s: float) -> None:
        self._band(slo_class, what, self._band_of(raw_s)).observe(raw_s, actual_s)
        self._band(slo_class, what, POOLED).observe(raw_s, actual_s)

    def _lane(self, request: Request) -> HeadOfLine:
        key = (request.model, request.slo_class)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = HeadOfLine(self._waits_in_order)
        return lane

    def _waits_in_order(self, request_id: str) -> bool:
        e = self.queue.entries.get(request_id)
        return e is not None and e.dispatched_at is None and not e.late

    def told(self, request: Request, estimate: WaitEstimate, now: float) -> WaitEstimate:
        """The estimate as told to a client. Its P(meet): calibrated against how often requests of
        the class told as much met their SLO lately. Its wait: while the request's lane has a
        backlog, the lane's head-of-line delay (measured) and the prefill, not the model's (the
        queue manager acts on the model's own estimate, whose thresholds it was tuned on; a client
        and admission control get what was measured)."""
        c = self._told.get(request.slo_class)
        if c is None:
            c = self._told[request.slo_class] = PMeetCalibrator()
        wait, done = estimate.wait_mean_s, estimate.completion_mean_s
        entry = self.queue.entries.get(request.id)
        seated = entry is not None and entry.dispatched_at is not None  # an eviction made it a seat
        behind = 0.0 if seated else self._lane(request).delay_s(now)
        if behind > 0:
            cost = self._ref_cost.get(request.model)
            measured = behind + (cost.step_s(request.prompt_tokens, 0) if cost else 0.0)
            done += measured - wait
            wait = measured
        return dataclasses.replace(
            estimate, wait_mean_s=wait, completion_mean_s=done, p_meet=c.told(estimate.p_meet)
        )

    # ------------------------------------------------------------------ outcomes
    def admitted(self, request_id: str, now: float, estimate: WaitEstimate, p_model: float) -> None:
        """The estimate a request was admitted with (as told), scored when it finishes, and the
        model's own P(meet), to calibrate the next ones."""
        if len(self.wait_log) == self.wait_log.maxlen:  # the oldest leaves the log: forgotten
            self._unended.pop(self.wait_log[0][0], None)
        entry = [request_id, now, estimate.wait_mean_s, estimate.p_meet, None, None]
        self.wait_log.append(entry)
        self._unended[request_id] = entry
        self._p_model[request_id] = p_model

    def observe(self, outcome: RequestOutcome) -> None:
        """A request ended: calibrate the estimates made at its admission against what happened."""
        rid = outcome.request.id
        r = outcome.request
        entry = self._unended.pop(rid, None)
        if entry is not None:
            if outcome.first_token_time is not None:
                entry[4] = outcome.first_token_time - r.arrival_time
            entry[5] = outcome.met_ttft() if r.slo.ttft_deadline is not None else outcome.met_slo()
        p_model = self._p_model.pop(rid, None)
        c = self._told.get(r.slo_class)
        if p_model is not None and c is not None:
            c.observe(p_model, outcome.met_slo())
        raw = self._raw.pop(rid, None)
        if raw is not None and outcome.first_token_time is not None:
            ttft = outcome.first_token_time - r.arrival_time
            self._learn(r.slo_class, "wait", raw[0], ttft)
            if outcome.finish_time is not None:
                self._learn(r.slo_class, "done", raw[1], outcome.finish_time - r.arrival_time)

    def accuracy(self) -> dict[str, float]:
        """Predicted (at admission) against measured time to first token: MAPE over waits above
        1 s, and calibration: of requests given P(meet) near 0.9, the fraction that met."""
        pairs = [(p, ttft) for _rid, _t, p, _pm, ttft, _met in self.wait_log if ttft is not None]
        big = [(p, a) for p, a in pairs if a > 1.0]
        out: dict[str, float] = {"est_samples": float(len(pairs))}
        if big:
            out["est_mape_over_1s"] = sum(abs(p - a) / a for p, a in big) / len(big)
            out["est_samples_over_1s"] = float(len(big))
        near = [
            met for _rid, _t, _p, pm, _ttft, met in self.wait_log if met is not None and 0.85 <= pm <= 0.95
        ]
        if near:
            out["est_p09_observed"] = sum(near) / len(near)
            out["est_p09_samples"] = float(len(near))
        return out
