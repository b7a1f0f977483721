"""Coordinator settings: loading, validation messages, and the token scopes they define."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlm_plugin.coordinator.auth import Authenticator, AuthError, own_instances_token
from qlm_plugin.coordinator.config import ConfigError, CoordinatorConfig, load_config, with_overrides


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
    path.write_text("http: {port: 1}\nhttp: {port: 2}\n")  # YAML kept the last, silently
    with pytest.raises(ConfigError, match=rf"{path}:2: http: given twice"):
        load_config(path)
    path.write_text("drain_timeout_s: .inf\n")
    with pytest.raises(ConfigError, match="drain_timeout_s: Input should be a finite number"):
        load_config(path)
    path.write_text("tokens: [{scopes: [client]}]\n")
    with pytest.raises(ConfigError, match="exactly one of token_env or token_file"):
        load_config(path)
    for not_a_mapping in ("[]\n", "false\n", "0\n", "- a\n"):  # were taken as the defaults
        path.write_text(not_a_mapping)
        with pytest.raises(ConfigError, match=f"{path}: the config must be a YAML mapping"):
            load_config(path)
    path.write_text("")
    assert load_config(path) == CoordinatorConfig()  # an empty file: the defaults
    path.write_text("tenant_limits: &a\n  max_queued_requests: *a\n")  # was a RecursionError traceback
    with pytest.raises(ConfigError, match=f"{path}: not valid YAML: an alias names a node that holds it"):
        load_config(path)
    path.write_bytes(b"grpc: {port: 1}\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=f"{path}: not UTF-8 text"):
        load_config(path)


def test_a_tenants_override_keeps_the_limits_it_does_not_name(tmp_path: Path) -> None:
    """A tenant given more requests keeps the deployment's other limits (it got the built-in
    defaults instead: 50 M queued tokens and 2 GiB of files where the deployment allowed less)."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "tenant_limits: {max_queued_tokens: 1000, max_stored_bytes: 1000000}\n"
        "tenants: {batch-team: {max_queued_requests: 5000}, big: {max_queued_tokens: 9000}}\n"
    )
    cfg = load_config(path)
    team, big, other = (cfg.limits_for(t) for t in ("batch-team", "big", "anyone"))
    assert (team.max_queued_requests, team.max_queued_tokens, team.max_stored_bytes) == (5000, 1000, 1000000)
    assert (big.max_queued_requests, big.max_queued_tokens) == (10_000, 9000)
    assert other == cfg.tenant_limits and other.max_queued_tokens == 1000
    path.write_text("tenants: {t: {max_queued_tokens: 0}}\n")
    with pytest.raises(ConfigError, match=r"tenants\.t\.max_queued_tokens"):
        load_config(path)


def test_a_listen_address_without_its_port_takes_the_default_port(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("http: {host: 0.0.0.0}\ngrpc: {host: 127.0.0.2}\n")
    cfg = load_config(path)
    assert (cfg.http.host, cfg.http.port, cfg.grpc.host, cfg.grpc.port) == (
        "0.0.0.0",
        8000,
        "127.0.0.2",
        50051,
    )


def test_tls_files_are_read_with_the_config_and_a_bad_one_is_named(tmp_path: Path) -> None:
    """A TLS file missing, or not PEM, was reported by gRPC as its port being in use."""
    path = tmp_path / "c.yaml"
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for tls, words in (
        (f"{{cert: {tmp_path}/none.pem, key: {junk}}}", "tls: cert: no such file"),
        (f"{{cert: {junk}, key: {junk}}}", "tls: cert and key do not load as a PEM certificate chain"),
    ):
        path.write_text(f"tls: {tls}\n")
        with pytest.raises(ConfigError, match=words):
            load_config(path)


def test_relative_paths_follow_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the scenario did: run from another folder, a config opened a new journal there (the
    requests the last stop kept were not served), and its TLS files were not found."""
    conf, other = tmp_path / "conf", tmp_path / "other"
    conf.mkdir()
    other.mkdir()
    (conf / "token").write_text("s3cret\n")
    path = conf / "c.yaml"
    path.write_text(
        "scenario: fleet.yaml\njournal: {path: j.db}\nbatches: {path: store/b.db}\n"
        "tokens: [{token_file: token, scopes: [client]}]\n"
    )
    monkeypatch.chdir(other)
    cfg = load_config(Path("..") / "conf" / "c.yaml")
    assert cfg.scenario == str(conf / "fleet.yaml")
    assert (cfg.journal.path, cfg.batches.path) == (str(conf / "j.db"), str(conf / "store" / "b.db"))
    assert cfg.tokens[0].token_file == str(conf / "token")
    assert Authenticator.from_config(cfg).authenticate("Bearer s3cret", "client") is not None
    absolute = other / "abs.db"
    path.write_text(f"journal: {{path: {absolute}}}\n")
    assert load_config(path).journal.path == str(absolute)  # an absolute one as it is


def test_the_batch_store_is_as_durable_as_the_journal_and_apart_from_it(tmp_path: Path) -> None:
    from qlm_plugin.coordinator.batch_store import BatchStore

    store = BatchStore(tmp_path / "b.db", synchronous="full")  # (it kept NORMAL whatever the journal's)
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    path = tmp_path / "c.yaml"
    path.write_text("journal: {path: same.db}\nbatches: {path: same.db}\n")
    with pytest.raises(ConfigError, match=r"batches\.path: must be another file than journal\.path"):
        load_config(path)
    _self_signed(tmp_path / "c.pem", tmp_path / "k.pem")
    (tmp_path / "junk.pem").write_text("garbage\n")
    path.write_text("tls: {cert: c.pem, key: k.pem, ca: c.pem}\n")
    assert load_config(path).tls is not None
    path.write_text("tls: {cert: c.pem, key: k.pem, ca: junk.pem}\n")
    with pytest.raises(ConfigError, match="tls: ca: does not load as PEM CA certificates"):
        load_config(path)  # (it was checked as a file only: the instances qlm serve starts never connected)


def _self_signed(cert: Path, key: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


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


def test_tokens_that_no_client_could_send_or_settings_that_would_be_ignored_are_errors(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.yaml"
    for tokens, words in [
        ("[{token_env: '', scopes: [client]}]", "tokens.0.token_env"),
        ("[{token_env: C, scopes: [client], tenant: ''}]", "tokens.0.tenant"),
        ("[{token_env: C, scopes: [admin], tenant: acme}]", "tenant binds client tokens only"),
        ("[{token_env: C, scopes: [client], instances: [gpu-1]}]", "instances binds instance tokens only"),
    ]:
        path.write_text(f"tokens: {tokens}\n")
        with pytest.raises(ConfigError, match=words):
            load_config(path)
    path.write_text("http: {port: 9000}\ngrpc: {port: 9000}\n")
    with pytest.raises(ConfigError, match=r"cannot both listen on 127\.0\.0\.1:9000"):
        load_config(path)
    cfg = CoordinatorConfig.model_validate({"tokens": [{"token_env": "C", "scopes": ["client"]}]})
    with pytest.raises(ValueError, match="printable ASCII"):
        Authenticator.from_config(cfg, {"C": "sécret"})
    with pytest.raises(ValueError, match="printable ASCII"):
        Authenticator.from_config(CoordinatorConfig(), {"QLM_CLIENT_TOKEN": "two words"})


def test_a_token_from_the_environment_is_read_without_surrounding_whitespace() -> None:
    cfg = CoordinatorConfig.model_validate({"tokens": [{"token_env": "C", "scopes": ["client"]}]})
    assert Authenticator.from_config(cfg, {"C": "cli\n"}).authenticate("Bearer cli", "client")
    auth = Authenticator.from_config(CoordinatorConfig(), {"QLM_CLIENT_TOKEN": " c\n"})
    assert auth.authenticate("Bearer c", "client").scopes == {"client"}


def test_own_instances_get_a_token_only_where_they_have_none_that_works() -> None:
    client_only = CoordinatorConfig()
    assert own_instances_token(client_only, {}) is None  # authentication off
    env = {"QLM_CLIENT_TOKEN": "c"}
    token = own_instances_token(client_only, env)
    assert token is not None
    auth = Authenticator.from_config(client_only, env, token)
    assert auth.authenticate(f"Bearer {token}", "instance").scopes == {"instance"}
    with pytest.raises(AuthError):
        auth.authenticate(f"Bearer {token}", "client")
    assert own_instances_token(client_only, {**env, "QLM_INSTANCE_TOKEN": "i"}) is None


def test_command_line_settings_are_validated_as_the_file_is() -> None:
    cfg = with_overrides(CoordinatorConfig(), {"http": {"port": 9001}}, "the command line")
    assert cfg.http.port == 9001
    # named as the flag given, not as the key it sets
    with pytest.raises(ConfigError, match=r"the command line: --http-port: Input should be less than"):
        with_overrides(CoordinatorConfig(), {"http": {"port": 70000}}, "the command line")


def test_a_value_that_may_be_a_number_or_auto_is_one_error_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("http: {workers: 100}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: http.workers: Input should be less than or equal to 64 or Input should be 'auto'"
    )


def test_the_settings_a_file_gives_are_known_after_command_line_overrides(tmp_path: Path) -> None:
    """`qlm serve --engine vllm` shares a device when the file sets device_max_awake, as with
    --max-awake (the key was ignored without the flag): what the file gave must stay known."""
    path = tmp_path / "c.yaml"
    path.write_text("device_max_awake: 2\n")
    cfg = with_overrides(load_config(path), {"policy": "fcfs"}, "the command line")
    assert {"device_max_awake", "policy"} <= cfg.model_fields_set
    assert (
        "device_max_awake"
        not in with_overrides(CoordinatorConfig(), {"policy": "fcfs"}, "x").model_fields_set
    )


def test_a_bad_tenant_limit_is_one_error_not_one_per_tenant(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "tenant_limits: {max_queued_request: 5, max_file_bytes: 0}\n"
        "tenants: {acme: {max_queued_tokens: 10}, beta: {}}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and all("tenant_limits." in line for line in lines), lines
