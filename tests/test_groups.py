"""Request groups."""

from __future__ import annotations

from qlm_plugin.domain.groups import group_key
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
