"""Request groups and virtual queues."""

from __future__ import annotations

import pytest

from qlm_plugin.domain.groups import VirtualQueue, group_key
from qlm_plugin.domain.request import DEFAULT_CLASSES, Request, make_request


def r(
    i: int, model: str = "a", t: float = 0.0, ttft: float | None = 1.0, cls: str = "interactive"
) -> Request:
    slo_class = DEFAULT_CLASSES[cls]
    return make_request(
        f"r{i}", model, 10, 10, t, slo_class=slo_class, ttft_s=ttft if cls == "interactive" else None
    )


def test_same_model_class_and_close_deadlines_share_a_group() -> None:
    assert group_key(r(1, t=0.0)) == group_key(r(2, t=2.0))
    assert group_key(r(1, t=0.0)) != group_key(r(2, t=10.0)), "deadlines 10 s apart: another group"
    assert group_key(r(1)) != group_key(r(2, model="b"))
    assert group_key(r(1)) != group_key(r(2, cls="batch"))


def test_pull_serves_groups_in_queue_order_and_requests_by_deadline() -> None:
    q = VirtualQueue("i0")
    q.extend([r(1, t=1.0), r(2, t=0.5), r(3, model="b"), r(4, t=0.0)])
    assert [g.model for g in q.groups] == ["a", "b"]
    assert [x.id for x in q] == ["r4", "r2", "r1", "r3"]
    assert q.pull().id == "r4"  # type: ignore[union-attr]
    assert q.pull(model="b").id == "r3"  # type: ignore[union-attr]
    assert len(q) == 2 and [g.model for g in q.groups] == ["a"], "an emptied group leaves the queue"


def test_reorder_applies_the_planner_order() -> None:
    q = VirtualQueue("i0")
    q.extend([r(1), r(2, model="b"), r(3, model="c")])
    keys = {g.model: g.key for g in q.groups}
    q.reorder([keys["c"], keys["a"]])
    assert [g.model for g in q.groups] == ["c", "a", "b"]
    with pytest.raises(ValueError, match="twice"):
        q.reorder([keys["c"], keys["c"]])


def test_remove_and_duplicates() -> None:
    q = VirtualQueue("i0")
    q.add(r(1))
    with pytest.raises(ValueError, match="already"):
        q.add(r(1))
    assert "r1" in q
    assert q.remove("r1").id == "r1"
    assert "r1" not in q and q.peek() is None and q.pull() is None
    with pytest.raises(KeyError):
        q.remove("r1")


def test_group_totals() -> None:
    q = VirtualQueue("i0")
    q.extend([r(1, t=0.3), r(2, t=0.1)])
    (g,) = q.groups
    assert len(g) == 2 and g.prompt_tokens == 20 and g.earliest_deadline == pytest.approx(1.1)
