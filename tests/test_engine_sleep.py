"""How the coordinator reads an engine that shares a device, around its sleeps and wakes: plain
sessions, no server (the whole path runs in ``integration/test_devices.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qlm_plugin.coordinator.engine_sleep import EngineSleep
from qlm_plugin.domain.instance import InstanceState


def state(*, loaded: bool) -> InstanceState:
    model = ("chat-a",)
    return InstanceState(
        "engine-a", "vllm", 0.0, model if loaded else (), () if loaded else model, None, 0, 0, 0, 0, 0, 1, 8
    )


@dataclass
class Sess:
    instance_id: str
    report: InstanceState | None
    backend: str = "vllm"
    gpu: str = "h100"
    capabilities: frozenset[str] = frozenset()
    alive: bool = True
    assigned: dict[str, int] = field(default_factory=dict)
    pending: dict[str, object] = field(default_factory=dict)


def sleeper(sessions: dict[str, Sess]) -> EngineSleep[Sess]:
    def send(s: Sess, op: str, model: str, warm: bool) -> str:
        return f"{op}:{s.instance_id}"

    return EngineSleep(sessions, send=send, done=lambda *a: None)


def test_a_report_made_before_an_acknowledged_sleep_does_not_wake_the_engine() -> None:
    s = Sess("engine-a", state(loaded=True))
    es = sleeper({"engine-a": s})
    es.acknowledged(s, "unload_model")
    assert es.asleep("engine-a")
    s.report = state(loaded=True)  # sent before the sleep, arriving after its acknowledgement
    es.reported(s)
    assert es.asleep("engine-a")


def test_an_engine_restarted_right_after_a_sleep_is_read_as_it_reports_awake() -> None:
    # A crash and a supervisor's restart within seconds of the sleep: the new process loads its
    # model. Read as asleep, the device would not settle it, and two engines would hold weights.
    old = Sess("engine-a", state(loaded=True))
    sessions = {"engine-a": old}
    es = sleeper(sessions)
    es.acknowledged(old, "unload_model")
    new = sessions["engine-a"] = Sess("engine-a", state(loaded=True))
    es.joined(new)
    es.reported(new)
    assert not es.asleep("engine-a")
    assert new.report is not None and new.report.models_loaded == ("chat-a",)
