"""The ``smtp``, ``api``, ``delivery`` and ``admin`` sections, each checked on its own.

A comment above a field is its meaning in docs/configuration.md when the docs
generator has none of its own (smtp_bridge/docgen/config_page.py).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, SecretStr, field_validator, model_validator

from ..auth import check_hash_format
from ..errors import TlsError
from ..tls import server_context
from .base import ConfigModel
from .problems import Loc, _Problems
from .values import (
    Duration,
    HostName,
    HttpUrl,
    ListenAddress,
    ListenList,
    NetworkList,
    OptionalSecret,
    ReadableFile,
    Size,
    split_host_port,
)

__all__ = [
    "AdminConfig",
    "ApiConfig",
    "AuthConfig",
    "AuthUser",
    "DeliveryConfig",
    "SmtpConfig",
    "TlsConfig",
]


def _valid_password_hash(value: SecretStr) -> SecretStr:
    """Hashed passwords only: a plaintext here would silently never match."""
    check_hash_format(value.get_secret_value())  # its message never repeats the value
    return value


class TlsConfig(ConfigModel):
    cert: ReadableFile
    key: ReadableFile
    starttls: bool = True
    implicit_listen: ListenList = Field(default_factory=list)

    @model_validator(mode="after")
    def _loadable(self) -> TlsConfig:
        # Load the pair now, so check-config and a SIGHUP reload refuse a key
        # that does not match its certificate instead of failing every handshake.
        try:
            server_context(self.cert, self.key)
        except TlsError as exc:
            raise _Problems([(("cert",), str(exc))]) from None
        return self


class AuthUser(ConfigModel):
    secret_fields = ("password_hash", "app_key")

    password_hash: Annotated[SecretStr, AfterValidator(_valid_password_hash)]
    app_key: OptionalSecret = None


class AuthConfig(ConfigModel):
    require_tls: bool = True
    users: dict[str, AuthUser] = Field(default_factory=dict)


def _default_trusted() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]


class SmtpConfig(ConfigModel):
    listen: ListenList = Field(default_factory=lambda: ["127.0.0.1:2525"])
    # "[::]:port" takes IPv4 clients too (IPV6_V6ONLY off); false: IPv6 only.
    dual_stack: bool = True
    hostname: HostName = Field(default_factory=socket.getfqdn)
    protocol: Literal["smtp", "lmtp"] = "smtp"
    tls: TlsConfig | None = None
    auth: AuthConfig = Field(default_factory=AuthConfig)
    trusted_networks: NetworkList = Field(default_factory=_default_trusted)
    proxy_protocol: bool = False
    # Load balancers allowed to send the PROXY header; required with proxy_protocol.
    proxy_from: NetworkList = Field(default_factory=list)
    max_message_size: Size = 10 * 1024 * 1024
    max_recipients: int = Field(default=50, ge=1)
    max_connections: int = Field(default=1000, ge=1)
    max_connections_per_ip: int = Field(default=20, ge=1)
    # How often each command may come in one session (RCPT: times max_recipients;
    # VRFY, HELP: 10); past it 421 4.7.0 and the close. One message = one MAIL.
    max_commands_per_session: int = Field(default=10_000, ge=1)
    timeout: Duration = 60.0
    # Wall-clock cap per session (slow-drip clients), 0 = none.
    max_session_time: Duration = 600.0
    shutdown_timeout: Duration = 30.0
    bare_lf: Literal["normalize", "reject"] = "normalize"

    @model_validator(mode="after")
    def _smtp_checks(self) -> SmtpConfig:
        problems: list[tuple[Loc, str]] = []
        if self.proxy_protocol and not self.proxy_from:
            message = (
                "required with proxy_protocol: true; list the load balancers' networks "
                "(CIDR), e.g. [10.0.0.0/24]: the PROXY header is accepted only from them"
            )
            problems.append((("proxy_from",), message))
        if self.timeout <= 0:
            problems.append((("timeout",), "must be longer than 0s"))
        if problems:
            raise _Problems(problems)
        return self


class ApiConfig(ConfigModel):
    secret_fields = ("app_key",)

    url: HttpUrl = "https://www.aotsend.com/index/api/send_email"
    app_key: OptionalSecret = None
    encoding: Literal["form", "json"] = "form"
    timeout: Duration = 10.0
    max_concurrency: int = Field(default=64, ge=1)
    rate_limit: float = Field(default=0, ge=0)
    breaker_failures: int = Field(default=5, ge=1)
    breaker_interval: Duration = 30.0
    # The longest pause a Retry-After may ask for; longer ones are cut (with a warning).
    max_retry_after: Duration = Field(default=300.0, gt=0)


class DeliveryConfig(ConfigModel):
    mode: Literal["direct", "hybrid", "queue"] = "direct"
    state_dir: Path = Path("/var/lib/smtp-bridge")
    # repr=False: a database URL may carry a password.
    store: str | None = Field(default=None, repr=False)
    dedup_ttl: Duration = 86400.0
    # Byte-identical messages without Message-ID or Idempotency-Key are only
    # deduplicated this long: the same alert text sent twice is two alerts.
    anonymous_dedup_ttl: Duration = 3600.0
    # A spool claim's lease on the store's clock, renewed while the attempt runs.
    claim_lease: Duration = Field(default=60.0, gt=0)
    max_age: Duration = 3 * 86400.0
    backoff: list[Duration] = Field(default_factory=lambda: [30.0, 120.0, 600.0, 1800.0, 3600.0])
    bounce_template_id: str = ""
    # Queue mode: longest wait for a delivery token before accepting anyway, 0 = off.
    in_flow_delay: Duration = 1.0

    @field_validator("backoff")
    @classmethod
    def _backoff(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("give at least one delay")
        return value

    @field_validator("store")
    @classmethod
    def _store(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not re.match(r"^(postgresql|postgres|sqlite)://", value):
            # The value itself is not echoed: it may contain a password.
            raise ValueError(
                "expected a database URL: postgresql://user@host/db or sqlite:///path "
                "(leave it out for SQLite under state_dir)"
            )
        return value


def _is_loopback(listen: str) -> bool:
    host = split_host_port(listen)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "", "0.0.0.0"'s friends and host names: reachable from elsewhere


class AdminConfig(ConfigModel):
    secret_fields = ("token",)

    listen: ListenAddress | None = "127.0.0.1:9025"
    # The console's and /metrics' password: a bearer token or HTTP Basic password.
    token: OptionalSecret = None
    # How long the console keeps a message's history; 0 keeps none.
    history: Duration = Field(default=7 * 86400.0, ge=0)

    @model_validator(mode="after")
    def _token_off_loopback(self) -> AdminConfig:
        if self.listen is not None and self.token is None and not _is_loopback(self.listen):
            message = (
                f"required when listen ({self.listen}) is not a loopback address: the console"
                " can retry and purge mail (admin.token or admin.token_file)"
            )
            raise _Problems([(("token",), message)])
        return self
