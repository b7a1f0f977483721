"""The coordinator's security end to end, in one process: bearer tokens and their scopes over HTTP
and gRPC, tenant-bound tokens, the loopback-only rule without tokens, per-tenant queue limits, and
mutual TLS on both servers (the simulated instances' agents included)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qlm_plugin.adapters.sim.engine import SimInstance
from qlm_plugin.adapters.sim.process import SimEngineLink
from qlm_plugin.adapters.sim.realtime import synthetic_text
from qlm_plugin.coordinator.auth import Authenticator, AuthError, http_ssl_context
from qlm_plugin.coordinator.config import CoordinatorConfig, Listen
from qlm_plugin.coordinator.server import CoordinatorServer
from qlm_plugin.deploy.child_process import free_port
from qlm_plugin.proto.qlm.v1 import qlm_pb2 as pb
from qlm_plugin.proto.qlm.v1 import qlm_pb2_grpc as pb_grpc
from qlm_plugin.testing.processes import http_call, serve_process, stop_all, wait_healthy
from qlm_plugin.testing.stack import LocalInstance, LocalStack, local_stack
from qlm_plugin.transport.agent import AgentRefused, AgentSettings, InstanceAgent
from qlm_plugin.transport.client import CoordinatorClient
from qlm_plugin.workloads.scenario import load_scenario

MODEL = "llama-3.1-8b"

#: Secrets reach the coordinator through its ``env`` (never through the config file).
ENV = {"T_CLIENT": "c-secret", "T_INST": "i-secret", "T_ADMIN": "a-secret", "T_TENANT_A": "ta-secret"}
TOKENS: dict[str, Any] = {
    "tokens": [
        {"token_env": "T_CLIENT", "scopes": ["client"], "name": "client"},
        {"token_env": "T_INST", "scopes": ["instance"], "name": "instance"},
        {"token_env": "T_ADMIN", "scopes": ["admin"], "name": "admin"},
        {"token_env": "T_TENANT_A", "scopes": ["client"], "tenant": "tenant-a", "name": "tenant-a"},
    ]
}
#: Requests that stay unfinished for the length of a test at speed 1.0.
LONG = 4000


def run(tmp_path: Path, body: Callable[[LocalStack], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        async with local_stack(tmp_path, **kw) as stack:
            await body(stack)

    asyncio.run(main())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call_http(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with http.request(method, url, json=body, headers=headers) as r:
        if r.content_type == "application/json":
            return r.status, await r.json()
        return r.status, await r.text()


def error_of(status: int, out: Any, want_status: int, want_type: str) -> str:
    """The message of an OpenAI-shaped error answer, once its status and type are as expected."""
    assert status == want_status, out
    assert out["error"]["type"] == want_type, out
    message: str = out["error"]["message"]
    return message


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def drain(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]


def completion(prompt: str = "hello there", max_tokens: int = 8, **qlm: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
    if qlm:
        body["qlm"] = qlm
    return body


def spec(tenant: str = "", max_tokens: int = 8, prompt: str = "hello there") -> pb.RequestSpec:
    return pb.RequestSpec(model=MODEL, prompt=prompt, max_tokens=max_tokens, tenant=tenant)


def start_agent(st: LocalStack, instance_id: str, settings: AgentSettings) -> LocalInstance:
    """Another simulated instance with an agent of its own settings (the stack stops it at exit)."""
    group = st.server.scenario.instances[0]
    costs = st.server.scenario.cost_models_for(group.gpu)
    link = SimEngineLink(st.sim, SimInstance(instance_id, group.gpu, costs, initial_model=group.models[0]))
    agent = link.agent = InstanceAgent(settings, link)
    stop = asyncio.Event()
    li = LocalInstance(link, agent, stop, asyncio.get_running_loop().create_task(agent.run(stop)))
    st.instances[instance_id] = li
    return li


def registered(st: LocalStack) -> set[str]:
    return {i.instance_id for i in st.coordinator.fleet.qlm_list_instances()}


# ------------------------------------------------------------------------------- tokens over HTTP


def test_http_needs_a_client_token_and_metrics_an_admin_token(tmp_path: Path) -> None:
    (tmp_path / "ops.token").write_text("ops-secret\n")
    cfg = {"tokens": [*TOKENS["tokens"], {"token_file": str(tmp_path / "ops.token"), "scopes": ["admin"]}]}

    async def body(st: LocalStack) -> None:
        url = f"{st.http_url}/v1/completions"
        async with aiohttp.ClientSession() as http:
            status, out = await call_http(http, "POST", url, completion())
            msg = error_of(status, out, 401, "authentication_error")
            assert "missing bearer token" in msg and "'client'" in msg, msg

            status, out = await call_http(
                http, "POST", url, completion(), {"Authorization": "Basic c-secret"}
            )
            msg = error_of(status, out, 401, "authentication_error")
            assert "must be 'Bearer <token>'" in msg, msg

            status, out = await call_http(http, "POST", url, completion(), bearer("guessed-secret"))
            msg = error_of(status, out, 401, "authentication_error")
            assert msg == "unknown bearer token", msg  # and the token is not echoed back

            status, out = await call_http(http, "POST", url, completion(), bearer("i-secret"))
            msg = error_of(status, out, 403, "permission_error")
            assert "lacks the 'client' scope" in msg and "it has: instance" in msg, msg

            status, out = await call_http(http, "POST", url, completion(), bearer("a-secret"))
            msg = error_of(status, out, 403, "permission_error")
            assert "lacks the 'client' scope" in msg, msg

            status, out = await call_http(http, "GET", f"{st.http_url}/v1/models")
            msg = error_of(status, out, 401, "authentication_error")
            assert "missing bearer token" in msg, msg
            assert out["error"]["code"] == "unauthenticated", out  # it was null here, and on /metrics
            for path in ("/v1/models", "/v1/files", "/metrics"):  # a 401 says how to authenticate
                async with http.get(f"{st.http_url}{path}") as r:
                    assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Bearer realm="qlm"', path
            async with http.get(f"{st.http_url}/metrics", headers=bearer("c-secret")) as r:
                assert r.status == 403 and "WWW-Authenticate" not in r.headers

            assert not st.coordinator.jobs, "a refused request must not be queued"

            status, out = await call_http(http, "POST", url, completion(max_tokens=8), bearer("c-secret"))
            assert status == 200, out
            rid = out["qlm"]["request_id"]
            assert out["choices"][0]["text"] == synthetic_text(rid, 0, 8)
            assert out["qlm"]["tenant"] == "default"

            status, out = await call_http(http, "GET", f"{st.http_url}/v1/models", headers=bearer("c-secret"))
            assert status == 200 and out["data"][0]["id"], out

            metrics = f"{st.http_url}/metrics"
            status, out = await call_http(http, "GET", metrics)
            msg = error_of(status, out, 401, "authentication_error")
            assert "missing bearer token" in msg and "'admin'" in msg, msg

            status, out = await call_http(http, "GET", metrics, headers=bearer("c-secret"))
            msg = error_of(status, out, 403, "permission_error")
            assert "lacks the 'admin' scope" in msg and "it has: client" in msg, msg

            status, out = await call_http(http, "GET", metrics, headers=bearer("a-secret"))
            assert status == 200 and "# TYPE" in out, out
            status, out = await call_http(http, "GET", metrics, headers=bearer("ops-secret"))  # token_file
            assert status == 200 and "# TYPE" in out, out
            status, out = await call_http(http, "POST", url, completion(), bearer("ops-secret"))
            msg = error_of(status, out, 403, "permission_error")  # named, but not where it is kept
            assert msg.startswith("token 'ops.token' lacks") and str(tmp_path) not in msg, msg

            status, out = await call_http(http, "GET", f"{st.http_url}/health")
            assert status == 200 and out["status"] == "ok", out

    run(tmp_path, body, speed=50.0, config=cfg, env=ENV, token="i-secret")


# ------------------------------------------------------------------------------- tokens over gRPC


def test_grpc_services_need_their_scopes_and_health_needs_none(tmp_path: Path) -> None:
    async def body(st: LocalStack) -> None:
        target = st.grpc_target
        async with (
            CoordinatorClient(target) as anonymous,
            CoordinatorClient(target, token="i-secret") as instance,
            CoordinatorClient(target, token="c-secret") as client,
            CoordinatorClient(target, token="a-secret") as admin,
        ):
            err = await rpc_error(anonymous.submit(spec()))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
            assert "missing bearer token" in (err.details() or ""), err

            async with CoordinatorClient(target, token="guessed") as guessed:
                err = await rpc_error(guessed.submit(spec()))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
            assert err.details() == "unknown bearer token", err

            err = await rpc_error(instance.submit(spec()))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
            assert "lacks the 'client' scope" in (err.details() or ""), err

            # Streaming methods are refused the same way (the refusal keeps the handler's shape).
            err = await rpc_error(drain(anonymous.stream("nothing", timeout_s=5)))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
            assert "missing bearer token" in (err.details() or ""), err

            instances = pb_grpc.InstancesStub(client.channel)
            err = await rpc_error(
                instances.Register(
                    pb.RegisterRequest(instance_id="intruder"), metadata=client.metadata, timeout=5
                )
            )
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
            assert "lacks the 'instance' scope" in (err.details() or ""), err

            credits = iter([pb.PullCredit(session="stolen", free_slots=8)])
            pull = instances.Pull(credits, metadata=client.metadata, timeout=5)
            err = await rpc_error(drain(pull))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
            assert "lacks the 'instance' scope" in (err.details() or ""), err
            assert registered(st) == {"sim-0", "sim-1"}

            err = await rpc_error(client.queue())
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
            assert "lacks the 'admin' scope" in (err.details() or ""), err

            err = await rpc_error(instance.instances())
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
            assert "lacks the 'admin' scope" in (err.details() or ""), err

            reply = await client.submit(spec(max_tokens=8))
            assert reply.accepted, reply
            chunks = [c async for c in client.stream(reply.request_id, timeout_s=10)]
            assert chunks[-1].finished, chunks

            snapshot = await admin.queue()
            assert snapshot.queued + snapshot.dispatched == 0, snapshot
            listed = await admin.instances()
            assert {i.instance_id for i in listed.instances} == {"sim-0", "sim-1"}, listed

            health = health_pb2_grpc.HealthStub(anonymous.channel)
            for service in ("", "qlm.v1.Requests", "qlm.v1.Admin"):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING, service

    run(tmp_path, body, speed=50.0, config=TOKENS, env=ENV, token="i-secret")


# ------------------------------------------------------------------------ instances' own tokens


def test_an_agent_without_the_instance_token_never_registers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="qlm_plugin.transport.agent")

    async def body(st: LocalStack) -> None:
        target = st.settings.target
        start_agent(st, "no-token", AgentSettings(target))
        start_agent(st, "wrong-token", AgentSettings(target, token="guessed"))
        start_agent(st, "client-token", AgentSettings(target, token="c-secret"))
        start_agent(st, "admin-token", AgentSettings(target, token="a-secret"))
        late = start_agent(st, "late-good", AgentSettings(target, token="i-secret"))  # the control
        await asyncio.wait_for(late.agent.connected.wait(), 10)
        await asyncio.sleep(1.0)  # time for retries of the refused agents (backoff 0.1, 0.2, 0.4 s...)

        assert registered(st) == {"sim-0", "late-good"}
        for name in ("no-token", "wrong-token", "client-token", "admin-token"):
            agent = st.instances[name].agent
            assert agent.sessions_started == 0 and not agent.connected.is_set(), name
        async with CoordinatorClient(st.grpc_target, token="a-secret") as admin:
            listed = await admin.instances()
        assert {i.instance_id for i in listed.instances} == {"sim-0", "late-good"}, listed

        # each gave up at once, saying why (it retried for ever, logged as a lost connection)
        said = {}
        for name in ("no-token", "wrong-token", "client-token", "admin-token"):
            task = st.instances.pop(name).task
            assert task.done() and isinstance(task.exception(), AgentRefused), name
            said[name] = str(task.exception())
        assert "UNAUTHENTICATED: missing bearer token" in said["no-token"], said
        assert "UNAUTHENTICATED: unknown bearer token" in said["wrong-token"], said
        assert "PERMISSION_DENIED" in said["client-token"] and "'instance' scope" in said["client-token"], (
            said
        )
        assert all("give it an instance token" in m for m in said.values()), said
        assert not [r for r in caplog.records if "retrying" in r.getMessage()]

    run(tmp_path, body, instances=1, speed=50.0, config=TOKENS, env=ENV, token="i-secret")


def test_an_instance_bound_token_registers_and_reports_for_its_instances_only(tmp_path: Path) -> None:
    """A token for gpu-1 cannot register gpu-2, nor act on gpu-2's session (its id leaked)."""
    env = {**ENV, "T_GPU1": "gpu1-secret"}
    cfg = {
        "tokens": [
            *TOKENS["tokens"],
            {
                "token_env": "T_GPU1",
                "scopes": ["instance"],
                "instances": ["gpu-1", "gpu-1-*"],
                "name": "gpu1",
            },
        ]
    }

    async def body(st: LocalStack) -> None:
        target = st.settings.target
        own = start_agent(st, "gpu-1", AgentSettings(target, token="gpu1-secret"))
        spare = start_agent(st, "gpu-1-b", AgentSettings(target, token="gpu1-secret"))
        other = start_agent(st, "gpu-2", AgentSettings(target, token="gpu1-secret"))
        await asyncio.wait_for(own.agent.connected.wait(), 10)
        await asyncio.wait_for(spare.agent.connected.wait(), 10)
        await asyncio.sleep(1.0)
        assert registered(st) == {"sim-0", "gpu-1", "gpu-1-b"}
        assert other.agent.sessions_started == 0
        st.instances.pop("gpu-2")  # refused, it stopped at once
        assert other.task.done() and "may act for instances gpu-1" in str(other.task.exception())

        victim = st.coordinator.fleet.live("sim-0")
        assert victim is not None
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.InstancesStub(channel)  # type: ignore[no-untyped-call]  # generated stub
            err = await rpc_error(
                stub.Heartbeat(
                    pb.StateReport(session=victim.id), metadata=[("authorization", "Bearer gpu1-secret")]
                )
            )
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "'gpu1'" in (err.details() or "") and "'sim-0'" in (err.details() or "")
            err = await rpc_error(
                stub.Report(
                    pb.EventBatch(session=victim.id, seq=99),
                    metadata=[("authorization", "Bearer gpu1-secret")],
                )
            )
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert st.coordinator.fleet.live("sim-0") is victim and victim.reported_seq < 99

    run(tmp_path, body, instances=1, speed=50.0, config=cfg, env=env, token="i-secret")


# -------------------------------------------------------------------------- tenant-bound tokens


def test_a_tenant_bound_token_acts_for_its_tenant_only(tmp_path: Path) -> None:
    async def body(st: LocalStack) -> None:
        jobs = st.coordinator.jobs
        async with aiohttp.ClientSession() as http:
            status, out = await call_http(
                http,
                "POST",
                f"{st.http_url}/v1/completions",
                completion(tenant="tenant-b"),
                {**bearer("ta-secret"), "x-qlm-tenant": "tenant-c"},
            )
        assert status == 200, out
        assert jobs[out["qlm"]["request_id"]].request.tenant == "tenant-a"
        assert out["qlm"]["tenant"] == "tenant-a"

        async with (
            CoordinatorClient(st.grpc_target, token="ta-secret") as tenant_a,
            CoordinatorClient(st.grpc_target, token="c-secret") as unbound,
        ):
            own = await tenant_a.submit(spec(tenant="tenant-b"))
            assert own.accepted and jobs[own.request_id].request.tenant == "tenant-a"
            batch = await tenant_a.submit_batch([spec(tenant="tenant-b"), spec()])
            assert [jobs[r.request_id].request.tenant for r in batch] == ["tenant-a", "tenant-a"]
            assert (await tenant_a.status(own.request_id)).request_id == own.request_id

            # An unbound client token says which tenant it submits for.
            done_b = await unbound.submit(spec(tenant="tenant-b"))
            live_b = await unbound.submit(spec(tenant="tenant-b", max_tokens=LONG))
            assert jobs[live_b.request_id].request.tenant == "tenant-b"
            await asyncio.wait_for(jobs[done_b.request_id].done.wait(), 10)

            # Another tenant's requests, live or finished, look like ones that do not exist.
            missing = await rpc_error(tenant_a.status("no-such-request"))
            for rid in (done_b.request_id, live_b.request_id):
                err = await rpc_error(tenant_a.status(rid))
                assert err.code() == grpc.StatusCode.NOT_FOUND, err
                assert err.details() == f"no request {rid!r}", err
                assert err.details() == (missing.details() or "").replace("no-such-request", rid)
            err = await rpc_error(tenant_a.cancel(live_b.request_id))
            assert err.code() == grpc.StatusCode.NOT_FOUND and "no request" in (err.details() or ""), err
            err = await rpc_error(drain(tenant_a.stream(live_b.request_id, timeout_s=5)))
            assert err.code() == grpc.StatusCode.NOT_FOUND and "no request" in (err.details() or ""), err
            assert jobs[live_b.request_id].state in ("queued", "dispatched"), "a refused cancel cancelled"

            # The unbound token sees every tenant's requests.
            assert (await unbound.status(own.request_id)).request_id == own.request_id
            assert (await unbound.cancel(live_b.request_id)).cancelled

    run(tmp_path, body, speed=50.0, config=TOKENS, env=ENV, token="i-secret")


def test_a_tenant_chooses_its_request_ids_without_meeting_another_tenants(tmp_path: Path) -> None:
    """Request ids a client chooses are kept under its tenant's name: another tenant's "job-1"
    neither refuses this one's (an id taken was a 'yes' to "does anyone use this id?", and let one
    tenant hold ids another would choose) nor is found by it. The client sees its own id."""

    async def body(st: LocalStack) -> None:
        jobs = st.coordinator.jobs
        async with (
            CoordinatorClient(st.grpc_target, token="ta-secret") as tenant_a,
            CoordinatorClient(st.grpc_target, token="c-secret") as unbound,
        ):
            chosen = spec(tenant="tenant-b", max_tokens=LONG)
            chosen.request_id = "job-1"
            theirs = await unbound.submit(chosen)
            mine = await tenant_a.submit(chosen)  # was: INVALID_ARGUMENT, "'job-1' is already taken"
            assert (theirs.request_id, mine.request_id) == ("job-1", "job-1")
            assert jobs["job-1"].request.tenant == "tenant-b"
            assert jobs["tenant-a/job-1"].request.tenant == "tenant-a"
            status = await tenant_a.status("job-1")
            assert (status.request_id, status.state) == ("job-1", jobs["tenant-a/job-1"].state)
            again = await rpc_error(tenant_a.submit(chosen))
            assert again.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert again.details() == "request_id: request id 'job-1' is already taken", again
            chosen.request_id = "tenant-b/job-1"  # no way into another tenant's names
            slash = await rpc_error(tenant_a.submit(chosen))
            assert slash.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (slash.details() or "").startswith("request_id: must not contain '/'"), slash
            assert (await rpc_error(tenant_a.status("tenant-b/job-1"))).code() == grpc.StatusCode.NOT_FOUND
            chosen.request_id = "j" * 256  # the longest id any client may choose, its tenant's name aside
            assert (await tenant_a.submit(chosen)).request_id == "j" * 256
            assert (await tenant_a.cancel("j" * 256)).cancelled
            assert (await tenant_a.cancel("job-1")).cancelled
            assert jobs["job-1"].state in ("queued", "dispatched"), "the other tenant's was cancelled"
            # the unbound token sees every tenant's requests, by the ids the coordinator keeps
            assert (await unbound.status("tenant-a/job-1")).state == "cancelled"
            assert (await unbound.cancel("job-1")).cancelled

    run(tmp_path, body, speed=50.0, config=TOKENS, env=ENV, token="i-secret")


def test_a_finished_request_stays_its_tenants_after_its_class_is_gone(tmp_path: Path) -> None:
    """Restarted with a scenario that no longer has the request's class: its status is still
    its tenant's, and no other tenant's."""
    scenario = load_scenario()
    rid = ""

    async def first(st: LocalStack) -> None:
        nonlocal rid
        async with CoordinatorClient(st.grpc_target, token="ta-secret") as tenant_a:
            reply = await tenant_a.submit(
                pb.RequestSpec(model=MODEL, prompt="x", max_tokens=3, slo=pb.SLO(slo_class="batch"))
            )
            rid = reply.request_id
            await asyncio.wait_for(st.coordinator.jobs[rid].done.wait(), 10)
        await st.coordinator.journal.flush()

    async def second(st: LocalStack) -> None:
        async with (
            CoordinatorClient(st.grpc_target, token="ta-secret") as tenant_a,
            CoordinatorClient(st.grpc_target, token="tb-secret") as tenant_b,
        ):
            assert (await tenant_a.status(rid)).state == "finished"
            err = await rpc_error(tenant_b.status(rid))
            assert err.code() == grpc.StatusCode.NOT_FOUND, err

    tokens = {"tokens": [*TOKENS["tokens"], {"token_env": "T_TENANT_B", "scopes": ["client"], "tenant": "b"}]}
    env = {**ENV, "T_TENANT_B": "tb-secret"}
    run(tmp_path, first, speed=50.0, config=tokens, env=env, token="i-secret", scenario=scenario)
    without_batch = scenario.model_copy(
        update={"classes": [c for c in scenario.classes if c.name != "batch"]}
    )
    run(tmp_path, second, speed=50.0, config=tokens, env=env, token="i-secret", scenario=without_batch)


# ------------------------------------------------------------------- tokens from QLM_* variables


def test_tokens_from_the_qlm_environment_variables_separate_scopes(tmp_path: Path) -> None:
    env = {"QLM_CLIENT_TOKEN": "c-env", "QLM_INSTANCE_TOKEN": "i-env", "QLM_ADMIN_TOKEN": "a-env"}

    async def body(st: LocalStack) -> None:
        url = f"{st.http_url}/v1/completions"
        async with aiohttp.ClientSession() as http:
            status, out = await call_http(http, "POST", url, completion())
            msg = error_of(status, out, 401, "authentication_error")
            assert "missing bearer token" in msg, msg

            status, out = await call_http(http, "POST", url, completion(), bearer("i-env"))
            msg = error_of(status, out, 403, "permission_error")
            assert "'QLM_INSTANCE_TOKEN' lacks the 'client' scope" in msg, msg

            status, out = await call_http(http, "GET", f"{st.http_url}/metrics", headers=bearer("c-env"))
            msg = error_of(status, out, 403, "permission_error")
            assert "lacks the 'admin' scope" in msg, msg

            status, out = await call_http(http, "GET", f"{st.http_url}/metrics", headers=bearer("a-env"))
            assert status == 200, out

            status, out = await call_http(http, "POST", url, completion(max_tokens=6), bearer("c-env"))
            assert status == 200 and out["usage"]["completion_tokens"] == 6, out

        async with (
            CoordinatorClient(st.grpc_target, token="a-env") as admin,
            CoordinatorClient(st.grpc_target, token="c-env") as client,
        ):
            err = await rpc_error(admin.submit(spec()))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
            assert "lacks the 'client' scope" in (err.details() or ""), err
            err = await rpc_error(client.queue())
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
            assert "lacks the 'admin' scope" in (err.details() or ""), err
            assert len((await admin.instances()).instances) == 2

    run(tmp_path, body, speed=50.0, env=env, token="i-env")


def test_authenticator_scopes_from_the_environment() -> None:
    cfg = CoordinatorConfig()
    # One value in two variables is one token with both scopes.
    auth = Authenticator.from_config(cfg, {"QLM_CLIENT_TOKEN": "same", "QLM_ADMIN_TOKEN": "same"})
    assert auth.authenticate("Bearer same", "client").scopes == {"client", "admin"}
    with pytest.raises(AuthError, match="lacks the 'instance' scope") as info:
        auth.authenticate("Bearer same", "instance")
    assert info.value.status == "forbidden"
    # Tokens in the config replace the QLM_* variables entirely.
    cfg = CoordinatorConfig.model_validate(TOKENS)
    auth = Authenticator.from_config(cfg, {**ENV, "QLM_ADMIN_TOKEN": "env-admin"})
    with pytest.raises(AuthError, match="unknown bearer token") as info:
        auth.authenticate("Bearer env-admin", "admin")
    assert info.value.status == "unauthenticated"
    assert auth.authenticate("Bearer ta-secret", "client").tenant == "tenant-a"
    # An empty or missing variable is no token (it must not authenticate an empty bearer).
    assert not Authenticator.from_config(CoordinatorConfig(), {"QLM_CLIENT_TOKEN": ""}).enabled
    with pytest.raises(AuthError, match="'Bearer <token>'"):
        Authenticator.from_config(CoordinatorConfig(), {"QLM_CLIENT_TOKEN": "x"}).authenticate(
            "Bearer ", "client"
        )


# ----------------------------------------------------------------------------- the bind check


def test_without_tokens_only_loopback_binds_are_allowed(tmp_path: Path) -> None:
    exposed = CoordinatorConfig(http=Listen(host="0.0.0.0", port=0), grpc=Listen(port=0))
    with pytest.raises(ValueError, match="loopback") as info:
        CoordinatorServer(exposed, env={})
    assert "http 0.0.0.0" in str(info.value) and "QLM_CLIENT_TOKEN" in str(info.value)

    grpc_exposed = CoordinatorConfig(http=Listen(port=0), grpc=Listen(host="10.1.2.3", port=0))
    with pytest.raises(ValueError, match="loopback") as info:
        CoordinatorServer(grpc_exposed, env={})
    assert "grpc 10.1.2.3" in str(info.value)

    # Loopback in any spelling is fine without tokens (nothing is started).
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        CoordinatorServer(CoordinatorConfig(http=Listen(host=host, port=0), grpc=Listen(port=0)), env={})

    # With a token, from the config or from QLM_*, the same bind is allowed.
    configured = exposed.model_copy(update={"tokens": CoordinatorConfig.model_validate(TOKENS).tokens})
    assert CoordinatorServer(configured, env=ENV).auth.enabled
    assert CoordinatorServer(exposed, env={"QLM_ADMIN_TOKEN": "a"}).auth.enabled

    # A configured token whose variable is unset stops the start: never silently open.
    with pytest.raises(ValueError, match="T_CLIENT is unset"):
        CoordinatorServer(configured, env={k: v for k, v in ENV.items() if k != "T_CLIENT"})
    (tmp_path / "empty.token").write_text("\n")
    empty_file = exposed.model_copy(
        update={
            "tokens": CoordinatorConfig.model_validate(
                {"tokens": [{"token_file": str(tmp_path / "empty.token"), "scopes": ["admin"]}]}
            ).tokens
        }
    )
    with pytest.raises(ValueError, match="is empty"):
        CoordinatorServer(empty_file, env={})


# --------------------------------------------------------------------------- per-tenant limits


def test_per_tenant_limits_refuse_the_excess_of_one_tenant_only(tmp_path: Path) -> None:
    cfg = {
        "tenant_limits": {"max_queued_requests": 5},
        "tenants": {"big": {"max_queued_requests": 7}, "tok": {"max_queued_tokens": 2500}},
    }

    async def body(st: LocalStack) -> None:
        jobs = st.coordinator.jobs
        url = f"{st.http_url}/v1/completions"
        async with aiohttp.ClientSession() as http, CoordinatorClient(st.grpc_target) as client:
            for tenant, limit in (("small", 5), ("big", 7)):
                for _ in range(limit):
                    reply = await client.submit(spec(tenant=tenant, max_tokens=LONG))
                    assert reply.accepted, reply
                assert all(
                    j.state in ("queued", "dispatched") for j in jobs.values() if j.request.tenant == tenant
                )

                status, out = await call_http(http, "POST", url, completion(max_tokens=LONG, tenant=tenant))
                msg = error_of(status, out, 429, "rate_limit_error")
                assert out["error"]["code"] == "rate_limit_exceeded", out
                assert f"tenant {tenant!r} has {limit} unfinished requests (limit {limit})" in msg, msg

                err = await rpc_error(client.submit(spec(tenant=tenant, max_tokens=LONG)))
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                assert f"tenant {tenant!r}" in (err.details() or "") and f"(limit {limit})" in (
                    err.details() or ""
                )

            # Another tenant is still served: over gRPC, and over HTTP (streamed: the answer begins at once).
            assert (await client.submit(spec(tenant="other", max_tokens=LONG))).accepted
            async with http.post(
                url, json={**completion(max_tokens=LONG, tenant="other"), "stream": True}
            ) as r:
                assert r.status == 200, await r.text()

            # The token limit: prompt + max_tokens of a tenant's unfinished requests.
            first = await client.submit(spec(tenant="tok", max_tokens=1000, prompt="x"))
            assert (
                first.accepted
                and (await client.submit(spec(tenant="tok", max_tokens=1000, prompt="x"))).accepted
            )
            status, out = await call_http(http, "POST", url, completion("x", 1000, tenant="tok"))
            msg = error_of(status, out, 429, "rate_limit_error")
            assert "tenant 'tok' has" in msg and "tokens queued" in msg and "limit of 2500" in msg, msg
            err = await rpc_error(client.submit(spec(tenant="tok", max_tokens=1000, prompt="x")))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            assert "limit of 2500" in (err.details() or ""), err
            assert (
                await client.submit(spec(tenant="tok", max_tokens=400, prompt="x"))
            ).accepted  # still fits

            # One that could never fit, even alone, is refused for what it is: a retry cannot help.
            status, out = await call_http(http, "POST", url, completion("x", 3000, tenant="tok"))
            msg = error_of(status, out, 400, "invalid_request_error")
            assert out["error"]["param"] == "max_tokens" and "limit of 2500 queued tokens" in msg, out
            assert "none was given" not in msg
            # A chat naming no max_tokens may run to the end of the context: the refusal says so.
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "qlm": {"tenant": "tok"}}
            status, out = await call_http(http, "POST", f"{st.http_url}/v1/chat/completions", chat)
            msg = error_of(status, out, 400, "invalid_request_error")
            assert out["error"]["param"] == "max_tokens" and "none was given" in msg, out

            # A finished request frees its share.
            assert (await client.cancel(first.request_id)).cancelled
            await asyncio.wait_for(jobs[first.request_id].done.wait(), 5)
            assert (await client.submit(spec(tenant="tok", max_tokens=1000, prompt="x"))).accepted

    run(tmp_path, body, speed=1.0, config=cfg)


def test_per_tenant_limits_hold_under_concurrent_submissions(tmp_path: Path) -> None:
    async def body(st: LocalStack) -> None:
        async with CoordinatorClient(st.grpc_target) as client:
            replies = await client.submit_batch([spec(tenant="batch", max_tokens=LONG) for _ in range(8)])
            assert sum(r.accepted for r in replies) == 5, [r.code or "accepted" for r in replies]
            assert {r.code for r in replies if not r.accepted} == {"limit"}
            calls = [client.submit(spec(tenant="parallel", max_tokens=LONG)) for _ in range(8)]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            assert sum(isinstance(o, pb.SubmitReply) for o in outcomes) == 5, outcomes

    run(tmp_path, body, speed=1.0, config={"tenant_limits": {"max_queued_requests": 5}})


# ------------------------------------------------------------------------------------ mutual TLS


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
    ips: tuple[str, ...] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if ips:
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(tmp: Path) -> Pki:
    def write(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, rogue_ca_key = key(), key()
    ca = _issue("qlm test CA", ca_key, None, ca=True)
    rogue_ca = _issue("rogue CA", rogue_ca_key, None, ca=True)
    server_key, client_key, rogue_key = key(), key(), key()
    server = _issue(
        "coordinator",
        server_key,
        (ca.subject, ca_key),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        ips=("127.0.0.1",),
    )
    client = _issue("client", client_key, (ca.subject, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = _issue(
        "client", rogue_key, (rogue_ca.subject, rogue_ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    ca_path, _ = write("ca", ca, ca_key)
    return Pki(
        ca_path,
        *write("server", server, server_key),
        *write("client", client, client_key),
        *write("rogue", rogue, rogue_key),
    )


def client_context(pki: Pki, cert: tuple[Path, Path] | None, tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    if tls12:  # the server refuses within the handshake (TLS 1.3: after it)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def https_refused(url: str, ctx: ssl.SSLContext) -> BaseException:
    """The error of a request the server's TLS layer refuses: a broken connection, no HTTP answer."""
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError) as info:
            async with http.post(url, json=completion(), ssl=ctx) as r:
                pytest.fail(f"answered {r.status}: {await r.text()}")
    return info.value


def test_mutual_tls_on_http_and_grpc(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    ca = pki.ca.read_bytes()
    client_pair = (pki.client_key.read_bytes(), pki.client_cert.read_bytes())
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key), "client_ca": str(pki.ca)}
    # Only the configured CA vouches for clients (not the system's trust store).
    server_ctx = http_ssl_context(CoordinatorConfig.model_validate({"tls": tls}))
    assert server_ctx is not None and server_ctx.verify_mode == ssl.CERT_REQUIRED
    assert [c["subject"] for c in server_ctx.get_ca_certs()] == [((("commonName", "qlm test CA"),),)]

    async def body(st: LocalStack) -> None:
        # The agents came in over TLS with their client certificates (local_stack waited for them).
        assert registered(st) == {"sim-0", "sim-1"}
        # One without a client certificate does not get in.
        start_agent(st, "no-cert", AgentSettings(st.settings.target, root_certificates=ca))

        url = f"https://127.0.0.1:{st.server.http_port}/v1/completions"
        async with aiohttp.ClientSession() as http:
            ctx = client_context(pki, (pki.client_cert, pki.client_key))
            status, out = await call_http_tls(http, url, ctx)
        assert status == 200, out
        assert out["choices"][0]["text"] == synthetic_text(out["qlm"]["request_id"], 0, 8)

        # Without a certificate from the configured CA, the TLS layer drops the connection: no HTTP
        # answer. (Its alert races the reset, so the reason is not reliably readable client-side.)
        for cert in (None, (pki.rogue_cert, pki.rogue_key)):
            for tls12 in (False, True):
                err = await https_refused(url, client_context(pki, cert, tls12))
                assert isinstance(err, (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)), repr(err)
        err = await https_refused(url.replace("https:", "http:"), client_context(pki, None))
        assert isinstance(err, (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)), repr(err)

        target = st.grpc_target
        async with CoordinatorClient(target, root_certificates=ca, client_cert=client_pair) as client:
            reply = await client.submit(spec(max_tokens=8))
            assert reply.accepted, reply
            chunks = [c async for c in client.stream(reply.request_id, timeout_s=10)]
            assert chunks[-1].finished and "".join(c.text for c in chunks) == synthetic_text(
                reply.request_id, 0, 8
            )
            health = health_pb2_grpc.HealthStub(client.channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING

        async with CoordinatorClient(target, root_certificates=ca, timeout_s=5) as no_cert:
            err = await rpc_error(no_cert.submit(spec()))
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        rogue_pair = (pki.rogue_key.read_bytes(), pki.rogue_cert.read_bytes())
        async with CoordinatorClient(
            target, root_certificates=ca, client_cert=rogue_pair, timeout_s=5
        ) as rogue:
            err = await rpc_error(rogue.submit(spec()))
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        async with CoordinatorClient(target, timeout_s=5) as plaintext:
            err = await rpc_error(plaintext.submit(spec()))
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err

        assert registered(st) == {"sim-0", "sim-1"}
        assert st.instances["no-cert"].agent.sessions_started == 0

    agent = AgentSettings("", root_certificates=ca, client_cert=client_pair)
    run(tmp_path, body, speed=50.0, config={"tls": tls}, agent_settings=agent)


async def call_http_tls(http: aiohttp.ClientSession, url: str, ctx: ssl.SSLContext) -> tuple[int, Any]:
    async with http.post(url, json=completion(), ssl=ctx) as r:
        return r.status, await r.json(content_type=None)


def test_qlm_serve_with_a_client_token_alone_gives_its_own_instances_a_token(tmp_path: Path) -> None:
    """`QLM_CLIENT_TOKEN=... qlm serve` protects the front door; the instances it starts itself
    still register (they were started with no token and retried for ever), and a token written
    with a trailing newline (`echo`, a Kubernetes secret) is the token without it."""
    http = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLM_") or k == "QLM_PLUGINS"}
    env["QLM_CLIENT_TOKEN"] = "front-secret\n"
    proc = serve_process(tmp_path, http, free_port(), "--instances", "1", "--speed", "20", env=env)
    url = f"http://127.0.0.1:{http}"
    try:
        wait_healthy(url, proc, tmp_path / "serve.log")
        body = {"model": "llama-3.1-8b", "prompt": "hi", "max_tokens": 4}
        assert http_call(f"{url}/v1/completions", body)[0] == 401
        status, answer = http_call(f"{url}/v1/completions", body, token="front-secret")
        assert status == 200, answer
    finally:
        stop_all([proc])


def test_qlm_serve_with_tls_starts_instances_that_connect_over_it(tmp_path: Path) -> None:
    """With `tls:` its own instances were started without a CA: they retried for ever, and no
    instance ever registered. They trust `tls.ca` now; with client certificates required, which
    it cannot give them, `qlm serve` says so at once."""
    pki = make_pki(tmp_path)
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca)}
    (tmp_path / "tls.yaml").write_text(json.dumps({"tls": tls}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLM_") or k == "QLM_PLUGINS"}
    args = ("--instances", "1", "--speed", "20", "--config", str(tmp_path / "tls.yaml"))
    proc = serve_process(tmp_path, free_port(), free_port(), *args, env=env)
    log = tmp_path / "serve.log"
    try:
        deadline = time.monotonic() + 60
        while "instance sim0-0 registered" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert "retrying" not in log.read_text()
    finally:
        stop_all([proc])
    (tmp_path / "tls.yaml").write_text(json.dumps({"tls": {**tls, "client_ca": str(pki.ca)}}))
    refused = serve_process(tmp_path, free_port(), free_port(), *args, env=env)
    assert refused.wait(30) == 1
    assert "qlm serve cannot give its own instances what TLS needs" in log.read_text()


def test_a_second_coordinator_on_a_taken_grpc_port_is_refused(tmp_path: Path) -> None:
    """gRPC binds with SO_REUSEPORT by default: two coordinators on one port both started, and
    instances and clients reached either at random."""

    async def main() -> None:
        port = free_port()

        def cfg(name: str) -> CoordinatorConfig:
            return CoordinatorConfig.model_validate(
                {"http": {"port": 0}, "grpc": {"port": port}, "journal": {"path": str(tmp_path / name)}}
            )

        first = CoordinatorServer(cfg("a.db"))
        await first.start()
        second = CoordinatorServer(cfg("b.db"))
        try:
            with pytest.raises(OSError, match=r"cannot bind gRPC to 127\.0\.0\.1:\d+ \(in use"):
                await second.start()
        finally:
            await second.stop(drain_timeout_s=0)
            await first.stop(drain_timeout_s=0)

    asyncio.run(main())
