"""How the coordinator sees a connected instance between its state reports: work handed over since
the last report is counted, in the seats it will take first, and only what does not fit waits."""

from __future__ import annotations

import time

import pytest

from qlm_plugin.brain.fleet_view import InstanceView
from qlm_plugin.coordinator.instances import RemoteFleet, Session
from qlm_plugin.domain.instance import InstanceState


def _fleet(running: int, waiting: int, handed_over: int) -> tuple[RemoteFleet, InstanceState]:
    fleet = RemoteFleet(dispatch=lambda s, r: True)
    s = Session("vllm-a", "vllm", "cpu", frozenset(), "http://127.0.0.1:1")
    s.report = InstanceState(
        instance_id="vllm-a",
        backend="vllm",
        now=time.time(),
        models_loaded=("tiny",),
        models_warm=(),
        loading_model=None,
        num_running=running,
        num_waiting=waiting,
        num_swapped=0,
        queued_tokens=0,
        kv_blocks_used=0,
        kv_blocks_total=100_000,
        max_num_seqs=8,
    )
    # the reported requests, and those handed over since
    s.assigned = {f"r{i}": 1 for i in range(running + waiting + handed_over)}
    fleet.sessions[s.instance_id] = s
    state = fleet.qlm_instance_state(instance_id="vllm-a", detail=False)
    assert state is not None
    return fleet, state


@pytest.mark.parametrize(
    ("running", "waiting", "handed_over", "seen_running", "seen_waiting"),
    [
        (0, 0, 1, 1, 0),  # one on its way: a seat taken, the other seven still free
        (2, 0, 3, 5, 0),
        (6, 0, 4, 8, 2),  # more than the free seats: the rest waits
        (8, 1, 2, 8, 3),  # a queue already: everything new waits behind it
        (3, 0, 0, 3, 0),  # nothing on its way: the report as it is
    ],
)
def test_work_on_its_way_takes_free_seats_before_it_waits(
    running: int, waiting: int, handed_over: int, seen_running: int, seen_waiting: int
) -> None:
    _, state = _fleet(running, waiting, handed_over)
    assert (state.num_running, state.num_waiting) == (seen_running, seen_waiting)


def test_a_burst_is_handed_over_at_once_not_one_request_per_report() -> None:
    """The queue manager pulls while an instance has free seats: one request on its way must not
    close the other seven (each would otherwise wait for a report that the engine has it)."""
    _, state = _fleet(running=0, waiting=0, handed_over=1)
    assert InstanceView("vllm-a", {}, state=state).free_slots() == 7
    _, full = _fleet(running=0, waiting=0, handed_over=8)
    assert InstanceView("vllm-a", {}, state=full).free_slots() == 0
