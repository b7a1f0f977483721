"""Bearer tokens with scopes (client, instance, admin), and the TLS settings of both servers.

A token is looked up by its SHA-256 digest, so no token is compared byte by byte in Python. With
no token configured (neither in the config nor in ``QLM_*_TOKEN``), authentication is off and the
coordinator binds loopback addresses only (:func:`check_bind`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import os
import secrets
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlm_plugin.coordinator.config import SCOPE_ENV, CoordinatorConfig, TokenEntry


class AuthError(Exception):
    """``status`` is ``unauthenticated`` (no or unknown token) or ``forbidden`` (wrong scope)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    scopes: frozenset[str]
    tenant: str | None = None  # client tokens bound to a tenant
    instances: tuple[str, ...] | None = None  # instance tokens bound to these id patterns

    def may_act_for(self, instance_id: str) -> bool:
        """Whether this principal may register, and report for, the instance ``instance_id``."""
        return self.instances is None or any(fnmatch.fnmatchcase(instance_id, p) for p in self.instances)

    def check_instance(self, instance_id: str) -> None:
        if not self.may_act_for(instance_id):
            allowed = ", ".join(self.instances or ())
            raise AuthError(
                "forbidden", f"token {self.name!r} may act for instances {allowed}, not {instance_id!r}"
            )


#: What a caller is when authentication is off.
ANONYMOUS = Principal("anonymous", frozenset({"client", "instance", "admin"}))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def own_instances_token(cfg: CoordinatorConfig, env: Mapping[str, str]) -> str | None:
    """A new instance token for the instances a command starts itself (``qlm serve``), where
    authentication is on and ``QLM_INSTANCE_TOKEN`` holds none that the coordinator takes: a
    front door protected by a client token alone, or instance tokens read from files."""
    auth = Authenticator.from_config(cfg, env)
    if not auth.enabled:
        return None
    given = env.get(SCOPE_ENV["instance"], "")
    if given:
        try:
            auth.authenticate(f"Bearer {given}", "instance")
            return None
        except AuthError:
            pass
    return secrets.token_urlsafe(32)


def _read_token(entry: TokenEntry, env: Mapping[str, str]) -> str:
    if entry.token_env is not None:
        # stripped as a header's token is: a secret written with `echo` ends with a newline
        value = env.get(entry.token_env, "").strip()
        if not value:
            raise ValueError(
                f"token {entry.name or entry.token_env}: environment variable {entry.token_env} is unset"
            )
        return value
    assert entry.token_file is not None
    try:
        value = Path(entry.token_file).read_text().splitlines()[0].strip()
    except (OSError, IndexError) as exc:
        raise ValueError(
            f"token {entry.name or entry.token_file}: cannot read {entry.token_file}: {exc}"
        ) from None
    if not value:
        raise ValueError(f"token {entry.name or entry.token_file}: {entry.token_file} is empty")
    return value


def _check_usable(token: str, source: str) -> str:
    """``token``, if a client can send it: HTTP headers and gRPC metadata carry printable ASCII."""
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise ValueError(f"token {source}: must be printable ASCII without spaces (no header could carry it)")
    return token


class Authenticator:
    """Maps bearer tokens to principals. Immutable after construction: safe from any thread."""

    def __init__(self, principals: Mapping[str, Principal]) -> None:
        self._by_digest = {_digest(tok): p for tok, p in principals.items()}

    @classmethod
    def from_config(
        cls, cfg: CoordinatorConfig, env: Mapping[str, str] | None = None, own_instances: str | None = None
    ) -> Authenticator:
        """The configured tokens (else the ``QLM_*_TOKEN`` variables of ``env``); ``own_instances``:
        an instance token of the instances the coordinator's command starts itself."""
        env = os.environ if env is None else env
        principals: dict[str, Principal] = {}
        for entry in cfg.tokens:
            token = _check_usable(
                _read_token(entry, env), entry.name or entry.token_env or entry.token_file or ""
            )
            if token in principals:  # two entries, one secret: which scopes would it hold?
                other = entry.name or entry.token_env or entry.token_file
                raise ValueError(f"tokens {principals[token].name!r} and {other!r} have the same value")
            principals[token] = Principal(  # named in refusals: a file's name, not where it is kept
                entry.name
                or entry.token_env
                or (entry.token_file and Path(entry.token_file).name)
                or "token",
                frozenset(entry.scopes),
                entry.tenant,
                tuple(entry.instances) if entry.instances is not None else None,
            )
        if not cfg.tokens:
            for scope, var in SCOPE_ENV.items():
                token = env.get(var, "").strip()
                if token:
                    _check_usable(token, var)
                    old = principals.get(token)
                    scopes = (old.scopes if old else frozenset()) | {scope}
                    principals[token] = Principal(var if old is None else old.name, scopes)
        if own_instances is not None and principals:
            principals[own_instances] = Principal("own-instances", frozenset({"instance"}))
        return cls(principals)

    def export(self) -> list[list[Any]]:
        """The table as JSON-able rows (digests, not tokens), for :meth:`from_export` in a
        front-door worker process."""
        return [
            [
                d.hex(),
                p.name,
                sorted(p.scopes),
                p.tenant,
                list(p.instances) if p.instances is not None else None,
            ]
            for d, p in self._by_digest.items()
        ]

    @classmethod
    def from_export(cls, rows: list[list[Any]]) -> Authenticator:
        auth = cls({})
        auth._by_digest = {
            bytes.fromhex(d): Principal(
                name, frozenset(scopes), tenant, tuple(inst) if inst is not None else None
            )
            for d, name, scopes, tenant, inst in rows
        }
        return auth

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def authenticate(self, authorization: str | None, scope: str) -> Principal:
        """The principal behind an ``Authorization`` header value, if it holds ``scope``."""
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            raise AuthError("unauthenticated", f"missing bearer token (this call needs the {scope!r} scope)")
        kind, _, token = authorization.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise AuthError("unauthenticated", "the Authorization header must be 'Bearer <token>'")
        principal = self._by_digest.get(_digest(token.strip()))
        if principal is None:
            raise AuthError("unauthenticated", "unknown bearer token")
        if scope not in principal.scopes:
            held = ", ".join(sorted(principal.scopes))
            raise AuthError(
                "forbidden", f"token {principal.name!r} lacks the {scope!r} scope (it has: {held})"
            )
        return principal


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(cfg: CoordinatorConfig, auth: Authenticator, warn: Callable[[str], Any]) -> None:
    """Without tokens, only loopback binds are allowed (anyone who can connect could submit)."""
    if auth.enabled:
        return
    exposed = [
        f"{name} {lst.host}"
        for name, lst in (("http", cfg.http), ("grpc", cfg.grpc))
        if not is_loopback(lst.host)
    ]
    if exposed:
        raise ValueError(
            f"no token is configured, so the coordinator binds loopback only; refusing {', '.join(exposed)} "
            f"(set tokens in the config or {', '.join(SCOPE_ENV.values())})"
        )
    warn("no token configured: authentication is off, listening on loopback only")


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def http_ssl_context(cfg: CoordinatorConfig) -> ssl.SSLContext | None:
    if cfg.tls is None:
        return None
    return tls_server_context(cfg.tls.cert, cfg.tls.key, cfg.tls.client_ca)


def tls_server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def grpc_server_credentials(cfg: CoordinatorConfig) -> Any:
    """``grpc.ServerCredentials`` for the TLS settings, or None for plaintext."""
    if cfg.tls is None:
        return None
    import grpc

    ca = _read(cfg.tls.client_ca) if cfg.tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(_read(cfg.tls.key), _read(cfg.tls.cert))], root_certificates=ca, require_client_auth=ca is not None
    )
