"""Coordinator settings: loading, validation messages, and the token scopes they define."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlm_plugin.coordinator.auth import Authenticator, AuthError
from qlm_plugin.coordinator.config import ConfigError, CoordinatorConfig, load_config


def test_embedded_defaults() -> None:
    cfg = load_config(None)
    assert (cfg.http.host, cfg.http.port, cfg.grpc.port, cfg.policy) == ("127.0.0.1", 8000, 50051, "qlm")
    assert cfg.journal.synchronous == "normal" and cfg.tokens == [] and cfg.tls is None


def test_errors_name_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("grpc: {port: 70000}\nhttp: {prot: 1}\nheartbeat_timeout_s: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert f"{path}: grpc.port:" in text
    assert f"{path}: http.prot: unknown key" in text
    path.write_text("heartbeat_interval_s: 1\nheartbeat_timeout_s: 0.5\n")
    with pytest.raises(ConfigError, match="heartbeat_timeout_s must be longer"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("tokens: [{scopes: [client]}]\n")
    with pytest.raises(ConfigError, match="exactly one of token_env or token_file"):
        load_config(path)


def test_relative_scenario_paths_follow_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("scenario: fleet.yaml\n")
    assert load_config(path).scenario == str(tmp_path / "fleet.yaml")


def test_tokens_carry_scopes_and_tenants(tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text("adm\n")
    cfg = CoordinatorConfig.model_validate(
        {
            "tokens": [
                {"token_env": "C", "scopes": ["client"], "tenant": "acme"},
                {"token_file": str(tmp_path / "admin.token"), "scopes": ["admin", "client"]},
            ]
        }
    )
    auth = Authenticator.from_config(cfg, {"C": "cli"})
    assert auth.enabled
    assert auth.authenticate("Bearer cli", "client").tenant == "acme"
    assert auth.authenticate("bearer adm", "admin").scopes == {"admin", "client"}
    for header, scope, status, words in [
        (None, "client", "unauthenticated", "missing bearer token"),
        ("Basic abc", "client", "unauthenticated", "Bearer <token>"),
        ("Bearer nope", "client", "unauthenticated", "unknown bearer token"),
        ("Bearer cli", "admin", "forbidden", "lacks the 'admin' scope"),
    ]:
        with pytest.raises(AuthError) as err:
            auth.authenticate(header, scope)
        assert err.value.status == status and words in str(err.value)
    with pytest.raises(ValueError, match="environment variable C is unset"):
        Authenticator.from_config(cfg, {})


def test_environment_tokens_without_config() -> None:
    auth = Authenticator.from_config(
        CoordinatorConfig(), {"QLM_CLIENT_TOKEN": "c", "QLM_INSTANCE_TOKEN": "i"}
    )
    assert auth.authenticate("Bearer c", "client").scopes == {"client"}
    with pytest.raises(AuthError):
        auth.authenticate("Bearer i", "client")
    assert not Authenticator.from_config(CoordinatorConfig(), {}).enabled
