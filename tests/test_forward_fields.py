"""What the coordinator sends a vLLM engine it forwards a request to, read back the way the QLM
scheduler reads it: deadlines as budgets from the engine's receipt (its clock may disagree with the
coordinator's), and the client's priority among the QLM fields (vLLM refuses its own ``priority``
field unless the engine runs ``--scheduling-policy priority``)."""

from __future__ import annotations

import json
import time

import pytest

from qlm_plugin.adapters.vllm.fields import parse_fields
from qlm_plugin.coordinator.forward import endpoint_path, request_body
from qlm_plugin.coordinator.jobs import Job
from qlm_plugin.domain.request import SLO, Request
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb


def _job(*, ttft_s: float | None, e2e_s: float | None, priority: int = 0, tokens: int = 0) -> Job:
    now = time.time()
    request = Request(
        "r1",
        "m",
        10,
        100,
        now,
        SLO(now + ttft_s if ttft_s else None, now + e2e_s if e2e_s else None),
        priority=priority,
    )
    spec = pb.RequestSpec(
        request_id="r1", model="m", prompt="hi", max_tokens=100, slo=pb.SLO(priority=priority)
    )
    job = Job(request, spec)
    job.tokens = tokens
    job.chunks = [" x"] * tokens
    return job


def test_deadlines_go_to_the_engine_as_budgets_counted_from_its_receipt() -> None:
    body = request_body(_job(ttft_s=2.0, e2e_s=60.0), 1, "m")
    xargs = body["vllm_xargs"]
    assert "qlm_ttft_deadline" not in xargs and "qlm_e2e_deadline" not in xargs
    assert xargs["qlm_ttft_ms"] == pytest.approx(2000, abs=50)
    engine_clock = time.time() + 3600.0  # the engine's host is an hour ahead
    fields = parse_fields(xargs, priority=0, arrival_time=engine_clock)
    assert fields.ttft_deadline == pytest.approx(engine_clock + 2.0, abs=0.05)
    assert fields.e2e_deadline == pytest.approx(engine_clock + 60.0, abs=0.05)


def test_a_resumed_request_has_no_ttft_budget_and_a_late_one_the_smallest() -> None:
    resumed = request_body(_job(ttft_s=2.0, e2e_s=None, tokens=3), 2, "m")["vllm_xargs"]
    assert "qlm_ttft_ms" not in resumed  # its first token was delivered already
    late = _job(ttft_s=None, e2e_s=60.0)
    late.request.slo = SLO(None, time.time() - 5)
    assert request_body(late, 1, "m")["vllm_xargs"]["qlm_e2e_ms"] == pytest.approx(1.0)  # due now, not "none"


def test_the_client_priority_rides_in_the_qlm_fields_not_in_vllms_own() -> None:
    body = request_body(_job(ttft_s=None, e2e_s=None, priority=-3), 1, "m")
    assert "priority" not in body
    assert parse_fields(body["vllm_xargs"], priority=0, arrival_time=time.time()).priority == -3


def test_a_prompt_of_token_ids_is_sent_as_ids_and_resumes_after_the_delivered_ids() -> None:
    job = _job(ttft_s=None, e2e_s=None)
    job.spec.prompt = ""
    job.spec.prompt_token_ids.extend([5, 6, 7])
    assert request_body(job, 1, "m")["prompt"] == [5, 6, 7]
    job.tokens, job.chunks = 2, [" a", " b"]
    # the delivered text as the engine tokenized it (its /tokenize), when its own ids are unknown
    assert request_body(job, 2, "m", resume_ids=[40, 41])["prompt"] == [5, 6, 7, 40, 41]
    job.prompt_ids, job.output_ids = [1, 5, 6, 7], [40, 41]  # the engine's own ids, kept by the forward
    assert request_body(job, 2, "m")["prompt"] == [1, 5, 6, 7, 40, 41]


def test_the_queue_managers_predicted_length_reaches_the_engine_which_uses_it_until_its_own_is_warm() -> None:
    from qlm_plugin.adapters.vllm.engine_brain import EngineBrain
    from qlm_plugin.domain.distributions import LengthDistribution

    predicted = LengthDistribution(60.0, 900.0, ((0.5, 50.0), (0.9, 110.0), (0.99, 200.0)))
    xargs = request_body(_job(ttft_s=None, e2e_s=60.0), 1, "m", predicted=predicted)["vllm_xargs"]
    assert (xargs["qlm_predicted_tokens"], xargs["qlm_predicted_q90"]) == (50.0, 110.0)
    fields = parse_fields(xargs, priority=0, arrival_time=time.time())
    engine = EngineBrain("m", "e0", autoload=False)

    class Arrived:
        request_id, arrival_time, num_prompt_tokens, num_output_tokens = "r1", time.time(), 10, 0
        num_computed_tokens, max_tokens, priority = 0, 100, 0

    engine.admit(Arrived(), fields, time.time())
    told = engine.policy.predict(engine.requests["r1"], 0)
    assert (told.quantile(0.5), told.quantile(0.9)) == (50.0, 100.0)  # q90 clipped to max_tokens
    assert "qlm_predicted_tokens" not in request_body(_job(ttft_s=None, e2e_s=60.0), 1, "m")["vllm_xargs"]


def test_a_chat_goes_to_the_engines_chat_endpoint_and_resumes_as_the_assistants_message() -> None:
    job = _job(ttft_s=None, e2e_s=None)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    job.spec.operation, job.spec.chat_messages = "chat", json.dumps(messages)
    body = request_body(job, 1, "m")
    assert endpoint_path(body) == "/v1/chat/completions"  # the engine applies its chat template
    assert body["messages"] == messages and "prompt" not in body and "continue_final_message" not in body
    job.tokens, job.chunks = 2, [" Hello", " there"]  # served again after two tokens, ids unknown
    body = request_body(job, 2, "m")
    assert body["messages"] == [*messages, {"role": "assistant", "content": " Hello there"}]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["max_tokens"] == 98
    # with the engine's ids of the templated prompt and of the answer so far: exactly those
    job.prompt_ids, job.output_ids = [9, 8, 7], [40, 41]
    body = request_body(job, 2, "m")
    assert endpoint_path(body) == "/v1/completions" and body["prompt"] == [9, 8, 7, 40, 41]
    assert "messages" not in body
