"""The coordinator's settings: addresses, journal, timeouts, auth, TLS and tenant limits.

A YAML file (``qlm serve --config FILE``) or the embedded defaults; the fleet (models, SLO classes,
simulated instances) comes from a scenario file (``scenario:``, the packaged default when unset).
Secrets never live in the file itself: tokens are named by environment variable (``token_env``) or
read from a file (``token_file``).
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

#: The ports listened on when the config names none.
DEFAULT_PORTS = {"http": 8000, "grpc": 50051}
#: The scopes a bearer token can carry.
SCOPES = ("client", "instance", "admin")
#: Environment variables read when the config names no tokens: one token per scope.
SCOPE_ENV = {"client": "QLM_CLIENT_TOKEN", "instance": "QLM_INSTANCE_TOKEN", "admin": "QLM_ADMIN_TOKEN"}


class ConfigError(ValueError):
    """A configuration problem, with the file and key path in the message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def join_host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets (gRPC and URLs read ``::1:50051`` as no address)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def local_host(bind_host: str) -> str:
    """The address a client on this machine reaches a server bound at ``bind_host`` by."""
    if bind_host in ("0.0.0.0", "", "localhost"):
        return "127.0.0.1"
    return "::1" if bind_host == "::" else bind_host


class Listen(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)


class HTTPListen(Listen):
    # Front-door worker processes sharing the port (docs/coordinator.md, "Performance"); 0: the
    # core process serves HTTP itself; "auto": enough to use the machine; None: $QLM_HTTP_WORKERS,
    # else "auto" (the variable's values, so that one can be moved to the other).
    workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] | None = None


class TokenEntry(_Strict):
    """One bearer token: its scopes, and for client tokens optionally the tenant it acts for."""

    token_env: str | None = Field(default=None, min_length=1)  # the token is this variable's value
    token_file: str | None = Field(default=None, min_length=1)  # or the first line of this file
    scopes: list[Literal["client", "instance", "admin"]] = Field(min_length=1)
    # client tokens: requests are this tenant's, whatever the request says
    tenant: str | None = Field(default=None, min_length=1)
    # instance tokens: the instance ids it may register and act for (shell-style patterns, such as
    # "gpu-1" or "node3-*"); unset: any
    instances: list[str] | None = Field(default=None, min_length=1)
    name: str = ""  # for logs

    @model_validator(mode="after")
    def _one_source(self) -> TokenEntry:
        if (self.token_env is None) == (self.token_file is None):
            raise ValueError("give exactly one of token_env or token_file")
        # settings that would be silently ignored are mistakes
        if self.tenant is not None and "client" not in self.scopes:
            raise ValueError("tenant binds client tokens only: this token has no 'client' scope")
        if self.instances is not None and "instance" not in self.scopes:
            raise ValueError("instances binds instance tokens only: this token has no 'instance' scope")
        return self


class TLS(_Strict):
    cert: str  # PEM certificate chain of the server
    key: str  # PEM private key
    client_ca: str | None = None  # PEM CA bundle: when set, clients must present a certificate it signed
    # PEM CA that signed ``cert``: what the instances ``qlm serve`` starts itself trust (default:
    # ``cert`` itself, as for a self-signed one)
    ca: str | None = None

    @model_validator(mode="after")
    def _loads(self) -> TLS:
        """Read here, once: a file missing or not PEM was reported by gRPC as its port in use."""
        for name in ("cert", "key", "client_ca", "ca"):
            file = getattr(self, name)
            if file is not None and not Path(file).is_file():
                raise ValueError(
                    f"{name}: no such file {file!r} (relative paths start from the config file's "
                    "folder; on the command line, from the working folder)"
                )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"cert and key do not load as a PEM certificate chain and its key: {exc}"
            ) from None
        for name in ("client_ca", "ca"):  # (ca: what the instances qlm serve starts trust)
            file = getattr(self, name)
            if file is None:
                continue
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(file)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"{name}: does not load as PEM CA certificates: {exc}") from None
        return self


class TenantLimits(_Strict):
    max_queued_requests: int = Field(default=10_000, ge=1)
    max_queued_tokens: int = Field(default=50_000_000, ge=1)  # prompt + max_tokens of unfinished requests
    max_file_bytes: int = Field(default=200 * 2**20, ge=1)  # one uploaded file (OpenAI's limit)
    max_stored_bytes: int = Field(default=2 * 2**30, ge=1)  # all of a tenant's files, outputs included


class BatchSettings(_Strict):
    """The Batch API's store and pace."""

    path: str | None = None  # files and batches; None: beside the journal (qlm-journal.batches.db)
    max_requests: int = Field(default=50_000, ge=1)  # lines of one batch (OpenAI's limit)
    # unfinished requests of one batch at a time (also at most half its tenant's max_queued_requests)
    max_in_flight: int = Field(default=4096, ge=1)
    # the shortest completion_window accepted (OpenAI's only window is 24h; shorter ones are ours)
    min_window_s: float = Field(default=60.0, gt=0)
    # a batch file's life when its upload or batch names none (OpenAI's default for batch files);
    # null: kept until deleted
    file_expiry_s: int | None = Field(default=30 * 86400, ge=60)
    # the input files of a tenant's unfinished batches together, bytes: a batch holds its parsed
    # lines in memory (about 4.5 times its file), and the batches of one file were not counted,
    # so a tenant could take the coordinator's memory with a few API calls
    max_open_bytes: int = Field(default=200 * 2**20, ge=1)


class JournalSettings(_Strict):
    path: str = Field(default="qlm-journal.db", min_length=1)
    synchronous: Literal["normal", "full"] = "normal"  # normal survives a process crash; full, power loss
    # how long a finished request's record is kept (its status, a retry with its idempotency key);
    # past a day and an hour at least: a batch's answers are read back from it after a restart
    retain_finished_s: float = Field(default=2 * 86400.0, ge=25 * 3600.0)


class CoordinatorConfig(_Strict):
    http: HTTPListen = HTTPListen(port=DEFAULT_PORTS["http"])
    grpc: Listen = Listen(port=DEFAULT_PORTS["grpc"])
    policy: str = "qlm"
    scenario: str | None = None  # fleet: models, classes, simulated instances (packaged default if None)
    journal: JournalSettings = JournalSettings()
    heartbeat_interval_s: float = Field(default=0.5, gt=0)
    heartbeat_timeout_s: float = Field(default=3.0, gt=0)
    # after a restart, instances have this long to come back and reclaim their work (longer than
    # the agents' reconnect backoff, which is capped at 5 s)
    recovery_grace_s: float = Field(default=10.0, ge=0)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    max_attempts: int = Field(default=3, ge=1)  # dispatches of one request before it fails
    # An engine that serves HTTP itself (vLLM): how long its stream of a request may stay silent
    # before the attempt fails as stalled (and resumes elsewhere after what was delivered). A
    # request the engine queues gets no byte until it starts: above the longest queueing expected.
    forward_read_timeout_s: float = Field(default=600.0, gt=0)
    reject_below_p_meet: float = Field(default=0.05, ge=0, le=1)  # reject_if_late threshold
    # A new request for a model no live instance serves waits this long for one to register, then
    # is refused (HTTP 503, gRPC UNAVAILABLE): when no instance of the model was ever seen, and when
    # the model's instances were seen but are all gone (a restarting engine takes tens of seconds).
    # Requests accepted while an instance served the model wait for one within their own deadline;
    # past it, once none has come for instance_return_wait_s, they fail (none waits for ever).
    instance_wait_s: float = Field(default=5.0, ge=0)
    instance_return_wait_s: float = Field(default=60.0, ge=0)
    # Engines sharing a device (docs/vllm.md): the sleep a swapped-out engine gets. 1: its weights
    # to host memory (a warm wake); 2: dropped (a cold wake reloads them, host memory stays free).
    device_sleep_level: Literal[1, 2] = 1
    # How many of a device's engines are awake at once (K); the queue manager sees K instances
    # ("slots") per device, each holding one model at a time.
    device_max_awake: int = Field(default=1, ge=1)
    tokens: list[TokenEntry] = []
    tls: TLS | None = None
    tenant_limits: TenantLimits = TenantLimits()
    # per-tenant overrides: a limit a tenant does not name is tenant_limits' (a tenant given more
    # requests kept the built-in defaults of the others, looser than tenant_limits asked)
    tenants: dict[str, TenantLimits] = {}

    @model_validator(mode="before")
    @classmethod
    def _tenants_inherit(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("tenants"), dict):
            base = data.get("tenant_limits")
            base = base.model_dump() if isinstance(base, TenantLimits) else base
            if isinstance(base, dict):
                try:  # a bad base is its own error, once (it was one more per tenant, at its keys)
                    TenantLimits.model_validate(base)
                except ValidationError:
                    return data
                data = {
                    **data,
                    "tenants": {
                        name: {**base, **over} if isinstance(over, dict) else over
                        for name, over in data["tenants"].items()
                    },
                }
        return data

    batches: BatchSettings = BatchSettings()
    metrics_public: bool = False  # /metrics without a token even when tokens are configured

    @field_validator("http", "grpc", mode="before")
    @classmethod
    def _listen(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name == "http" and isinstance(value, Listen) and not isinstance(value, HTTPListen):
            value = value.model_dump()
        if isinstance(value, dict) and "port" not in value:  # `http: {host: ...}` alone: the default port
            value = {**value, "port": DEFAULT_PORTS[str(info.field_name)]}
        return value

    @model_validator(mode="after")
    def _timeouts(self) -> CoordinatorConfig:
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must be longer than heartbeat_interval_s")
        if self.http.port and self.http.port == self.grpc.port and self.http.host == self.grpc.host:
            raise ValueError(f"http and grpc cannot both listen on {self.http.host}:{self.http.port}")
        if self.batches.path and Path(self.batches.path).resolve() == Path(self.journal.path).resolve():
            raise ValueError(
                "batches.path: must be another file than journal.path (each is its own database)"
            )
        return self

    def limits_for(self, tenant: str) -> TenantLimits:
        return self.tenants.get(tenant, self.tenant_limits)


def load_config(path: str | os.PathLike[str] | None = None) -> CoordinatorConfig:
    """The settings in ``path`` (YAML), or the embedded defaults for None."""
    if path is None:
        return CoordinatorConfig()
    from qlm_plugin.workloads.scenario import duplicate_keys

    p = Path(path)
    try:
        text = p.read_text()
        twice = duplicate_keys(text)  # first: it refuses an alias inside itself, which loads endless
        data = yaml.safe_load(text)
        data = {} if data is None else data  # an empty file: the defaults (a list or a value: refused)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if twice:
        raise ConfigError(
            "\n".join(f"{p}:{line}: {key}: given twice (YAML keeps only the last)" for line, key in twice)
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config must be a YAML mapping of settings, got a {type(data).__name__}")
    return _validated(_paths_from(data, p.parent.resolve()), str(p))


#: The file paths of a config: (section, key); section None: at the top.
_PATHS = (
    (None, "scenario"),
    ("journal", "path"),
    ("batches", "path"),
    ("tls", "cert"),
    ("tls", "key"),
    ("tls", "client_ca"),
    ("tls", "ca"),
)


def _paths_from(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """``data`` with its relative file paths made absolute from ``base``, the config's folder: all
    of them, as the scenario was (the journal, the batch store, TLS files and token files went
    from the working folder: run from another folder, a config opened a new journal, and the
    requests the last stop kept were not served)."""
    out = dict(data)

    def absolute(value: Any) -> Any:
        return (
            str(base / value) if isinstance(value, str) and value and not Path(value).is_absolute() else value
        )

    for section, key in _PATHS:
        if section is None:
            if key in out:
                out[key] = absolute(out[key])
        elif isinstance(out.get(section), dict) and key in out[section]:
            out[section] = {**out[section], key: absolute(out[section][key])}
    if isinstance(out.get("tokens"), list):
        out["tokens"] = [
            {**t, "token_file": absolute(t["token_file"])} if isinstance(t, dict) and "token_file" in t else t
            for t in out["tokens"]
        ]
    return out


def with_overrides(cfg: CoordinatorConfig, update: dict[str, Any], source: str) -> CoordinatorConfig:
    """``cfg`` with ``update`` (settings given on the command line), validated as a file is; the
    settings it holds as given (``model_fields_set``) are the file's and the command line's."""
    merged = _validated({**cfg.model_dump(), **update}, source, FLAGS)
    merged.__pydantic_fields_set__ = cfg.model_fields_set | update.keys()
    return merged


#: The command line's names of the settings it overrides (an error names the flag given).
FLAGS = {
    "http.port": "--http-port",
    "grpc.port": "--grpc-port",
    "http.host": "--host",
    "grpc.host": "--host",
    "http.workers": "--http-workers",
    "journal.path": "--journal",
    "policy": "--policy",
    "scenario": "--scenario",
}


def _validated(data: dict[str, Any], source: str, names: dict[str, str] | None = None) -> CoordinatorConfig:
    """``data`` as settings; :class:`ConfigError` names each bad key (``names``: what to call it
    instead, a flag), one line per key: the branches of a value that may be a number or ``auto``
    (``http.workers``) are one line, and pydantic's own words (``constrained-int``, a class name)
    are left out."""
    try:
        return CoordinatorConfig.model_validate(data)
    except ValidationError as exc:
        said: dict[str, list[str]] = {}
        for err in exc.errors():
            loc = [str(x) for x in err["loc"] if not str(x).startswith(("constrained-", "literal["))]
            where = ".".join(loc) or "(top)"
            msg = (
                "unknown key"
                if err["type"] == "extra_forbidden"
                else err["msg"].removeprefix("Value error, ").split(" or instance of ")[0]
            )
            said.setdefault(where, []).append(msg)
        lines = [
            f"{source}: {(names or {}).get(where, where)}: {' or '.join(dict.fromkeys(msgs))}"
            for where, msgs in said.items()
        ]
        raise ConfigError("\n".join(lines)) from None
