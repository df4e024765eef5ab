"""Typed, frozen configuration (docs/configuration.md) and its loader.

``load_config`` reads YAML, expands ``${VAR}`` / ``${VAR:-default}``, reads
``*_file`` secrets, validates with pydantic, compiles patterns and templates,
and reports *every* problem at once as ``file:line: key.path: what is wrong``.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict

from .auth import check_hash_format
from .errors import ConfigError, ConfigIssue, TlsError
from .patterns import Pattern, compile_pattern
from .replies import Reply, check_override
from .templating import CompiledTemplate, compile_template
from .tls import server_context

__all__ = [
    "AdminConfig",
    "ApiConfig",
    "AuthConfig",
    "AuthUser",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "DEFAULT_CONFIG_PATH",
    "DeliveryConfig",
    "MatchConfig",
    "QuotaConfig",
    "QuotaMatch",
    "Rate",
    "RouteConfig",
    "SmtpConfig",
    "TlsConfig",
    "json_schema",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "split_host_port",
]

DEFAULT_CONFIG_PATH = Path("/etc/smtp-bridge/config.yaml")


# ---------------------------------------------------------------- errors


Loc = tuple[str | int, ...]


class _Problems(ValueError):
    """Problems a model validator found, each at a key path *below* the model.

    pydantic locates a model validator's error at the model itself; the loader
    unpacks these so each problem points at its own key and line.
    """

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        super().__init__(
            "; ".join(f"{_dotted(loc)}: {msg}" if loc else msg for loc, msg in problems)
        )
        self.problems = problems


# ---------------------------------------------------------------- value types

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "ki": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "mi": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "gi": 1024**3,
}


def parse_duration(value: Any) -> float:
    """Seconds from ``30s``, ``2m``, ``1h``, ``3d``, ``500ms`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 2m, 1h or 3d")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        found = _DURATION_RE.match(str(value))
        if not found:
            raise ValueError(f"expected a duration such as 30s, 2m, 1h or 3d, got {value!r}")
        seconds = float(found.group(1)) * _DURATION_UNITS[found.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from ``10MiB``, ``512KB``, ``1G`` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10MiB")
    if isinstance(value, int):
        size = value
    else:
        found = _SIZE_RE.match(str(value))
        if not found:
            raise ValueError(f"expected a size such as 10MiB or 512KB, got {value!r}")
        size = int(float(found.group(1)) * _SIZE_UNITS[(found.group(2) or "").lower()])
    if size <= 0:
        raise ValueError("a size must be positive")
    return size


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str | int) and not isinstance(value, bool) else value


def _to_pattern(value: Any) -> Pattern:
    if isinstance(value, Pattern):
        return value
    if not isinstance(value, str):
        raise ValueError("a pattern must be a string (a glob, or a regex after 're:')")
    return compile_pattern(value)


def _to_template(value: Any) -> CompiledTemplate:
    if isinstance(value, CompiledTemplate):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError("expected a string (a Jinja2 template)")
    return _compile_quietly(value)


def _compile_quietly(source: str) -> CompiledTemplate:
    """``compile_template`` without Jinja's DeprecationWarning for escapes like ``'\\S'``.

    Jinja decodes string literals with ``unicode-escape``, which keeps an unknown
    escape as written (what a regex such as docs/configuration.md's ``regex_search('https://\\S+')``
    wants) but warns; where warnings are errors, Jinja reports that warning as a
    syntax error, so the same file would pass or fail depending on -W flags.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return compile_template(source)


def _to_reply(value: Any) -> Reply:
    if isinstance(value, Reply):
        return value
    return Reply.parse(str(value))


_DURATION_SCHEMA = {
    "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": _DURATION_RE.pattern}]
}
_SIZE_SCHEMA = {
    "anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": _SIZE_RE.pattern}]
}

Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]
Size = Annotated[int, BeforeValidator(parse_size), WithJsonSchema(_SIZE_SCHEMA)]
PatternT = Annotated[
    Pattern,
    BeforeValidator(_to_pattern),
    WithJsonSchema({"type": "string", "description": "shell glob, or 're:' + Python regex"}),
]


def _one_or_list(item: JsonDict) -> WithJsonSchema:
    """Schema of a field that takes one value or a list of them (``_as_list``)."""
    return WithJsonSchema({"anyOf": [item, {"type": "array", "items": item}]})


_PATTERN_SCHEMA: JsonDict = {"type": "string", "description": "shell glob, or 're:' + Python regex"}
_NETWORK_SCHEMA: JsonDict = {"type": "string", "description": "CIDR, e.g. 10.0.0.0/8"}
_LISTEN_SCHEMA: JsonDict = {"type": "string", "description": "host:port or [ipv6]:port"}
PatternList = Annotated[list[PatternT], BeforeValidator(_as_list), _one_or_list(_PATTERN_SCHEMA)]
TemplateT = Annotated[
    CompiledTemplate,
    BeforeValidator(_to_template),
    WithJsonSchema({"type": ["string", "number"], "description": "Jinja2 template (sandboxed)"}),
]
ReplyT = Annotated[
    Reply,
    BeforeValidator(_to_reply),
    WithJsonSchema({"type": "string", "pattern": r"^[245]\d\d [245]\.\d{1,3}\.\d{1,3} .+"}),
]
Network = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    BeforeValidator(lambda v: ipaddress.ip_network(str(v), strict=False)),
    WithJsonSchema(_NETWORK_SCHEMA),
]
NetworkList = Annotated[list[Network], BeforeValidator(_as_list), _one_or_list(_NETWORK_SCHEMA)]


def _check_listen(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected host:port or [ipv6]:port, e.g. 127.0.0.1:2525")
    host, port = split_host_port(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return value


ListenAddress = Annotated[str, BeforeValidator(_check_listen), WithJsonSchema(_LISTEN_SCHEMA)]
ListenList = Annotated[list[ListenAddress], BeforeValidator(_as_list), _one_or_list(_LISTEN_SCHEMA)]


def split_host_port(value: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port); raises ValueError otherwise."""
    found = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)", value.strip())
    if not found:
        raise ValueError(f"expected host:port or [ipv6]:port, got {value!r}")
    host = found.group(1) if found.group(1) is not None else found.group(3)
    port = int(found.group(2) or found.group(4))
    return host, port


# ---------------------------------------------------------------- models


def _schema_extra(schema: JsonDict, model: type[Any]) -> None:
    """Document the ``<field>_file`` keys that ``_read_secret_files`` accepts."""
    properties = schema.get("properties")
    fields: tuple[str, ...] = getattr(model, "secret_fields", ())
    if not fields or not isinstance(properties, dict):
        return
    required = schema.get("required")
    for name in fields:
        properties[f"{name}_file"] = {
            "type": "string",
            "description": f"read {name} from this file (e.g. systemd LoadCredential=)",
        }
        if isinstance(required, list) and name in required:
            required.remove(name)
            schema["oneOf"] = [{"required": [name]}, {"required": [f"{name}_file"]}]
    if isinstance(required, list) and not required:
        del schema["required"]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, arbitrary_types_allowed=True, json_schema_extra=_schema_extra
    )
    #: Secret fields that also accept ``<field>_file: PATH``.
    secret_fields: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, data: Any) -> Any:
        return _read_secret_files(data, cls.secret_fields) if cls.secret_fields else data


def _read_secret_files(data: Any, fields: tuple[str, ...]) -> Any:
    """Replace ``<field>_file: PATH`` by the file's content (systemd LoadCredential=)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    problems: list[tuple[Loc, str]] = []
    for name in fields:
        file_key = f"{name}_file"
        if file_key not in data:
            continue
        if data.get(name) not in (None, ""):
            problems.append(((file_key,), f"give either {name} or {file_key}, not both"))
            continue
        path = Path(str(data.pop(file_key)))
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            problems.append(((file_key,), f"cannot read {path}: {exc.strerror}"))
            continue
        except UnicodeDecodeError:
            problems.append(((file_key,), f"{path} is not UTF-8 text"))
            continue
        if not secret:
            problems.append(((file_key,), f"{path} is empty"))
            continue
        data[name] = secret
    if problems:
        raise _Problems(problems)
    return data


def _check_readable(path: Path) -> Path:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return path


ReadableFile = Annotated[Path, AfterValidator(_check_readable)]


def _empty_as_none(value: SecretStr | None) -> SecretStr | None:
    # ``app_key: ${KEY:-}`` means "no key here", as if the line were absent.
    return value if value is not None and value.get_secret_value() else None


OptionalSecret = Annotated[SecretStr | None, AfterValidator(_empty_as_none)]


def _valid_password_hash(value: SecretStr) -> SecretStr:
    """Hashed passwords only: a plaintext here would silently never match."""
    check_hash_format(value.get_secret_value())  # its message never repeats the value
    return value


class TlsConfig(_Model):
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


class AuthUser(_Model):
    secret_fields = ("password_hash", "app_key")

    password_hash: Annotated[SecretStr, AfterValidator(_valid_password_hash)]
    app_key: OptionalSecret = None


class AuthConfig(_Model):
    require_tls: bool = True
    users: dict[str, AuthUser] = Field(default_factory=dict)


def _default_trusted() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]


class SmtpConfig(_Model):
    listen: ListenList = Field(default_factory=lambda: ["127.0.0.1:2525"])
    # "[::]:port" takes IPv4 clients too (IPV6_V6ONLY off); false: IPv6 only.
    dual_stack: bool = True
    hostname: str = Field(default_factory=socket.getfqdn)
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

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9.\-]{1,253}", value):
            raise ValueError("expected a host name (letters, digits, dots, hyphens)")
        return value

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


class ApiConfig(_Model):
    secret_fields = ("app_key",)

    url: str = "https://www.aotsend.com/index/api/send_email"
    app_key: OptionalSecret = None
    encoding: Literal["form", "json"] = "form"
    timeout: Duration = 10.0
    max_concurrency: int = Field(default=64, ge=1)
    rate_limit: float = Field(default=0, ge=0)
    breaker_failures: int = Field(default=5, ge=1)
    breaker_interval: Duration = 30.0
    # The longest pause a Retry-After may ask for; longer ones are cut (with a warning).
    max_retry_after: Duration = Field(default=300.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("expected an http:// or https:// URL")
        return value


class DeliveryConfig(_Model):
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


class AdminConfig(_Model):
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


class MatchConfig(_Model):
    rcpt: PatternList | None = None
    mail_from: PatternList | None = None
    user: PatternList | None = None
    client: NetworkList | None = None
    subject: PatternList | None = None
    headers: dict[str, PatternList] | None = None
    body: PatternList | None = None

    @property
    def has_content_conditions(self) -> bool:
        """True when the route can only be decided once the message is read."""
        return bool(self.subject or self.headers or self.body)


def _route_schema(schema: JsonDict, model: type[Any]) -> None:
    # Unnamed routes are named by position (Config._name_routes).
    required = schema.get("required")
    if isinstance(required, list) and "name" in required:
        required.remove("name")
        if not required:
            del schema["required"]


class RouteConfig(_Model):
    model_config = ConfigDict(json_schema_extra=_route_schema)

    name: str = Field(min_length=1)
    match: MatchConfig = Field(default_factory=MatchConfig)
    action: Literal["relay", "drop", "reject"] = "relay"
    reply: ReplyT | None = None
    template_id: TemplateT | None = None
    to: TemplateT = Field(default_factory=lambda: compile_template("{{ rcpt.address }}"))
    alias: TemplateT | None = None
    reply_to: TemplateT | None = None
    is_random: bool | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    allow_header_overrides: bool = False

    @model_validator(mode="after")
    def _action_fields(self) -> RouteConfig:
        problems: list[tuple[Loc, str]] = []
        if self.action == "relay" and self.template_id is None:
            problems.append(
                (
                    ("template_id",),
                    "required key is missing: a relay route (the default action) needs template_id",
                )
            )
        if self.reply is not None:
            if self.action != "reject":
                problems.append((("reply",), "reply is only for action: reject"))
            elif self.reply.is_success:
                problems.append((("reply",), "the reply of a reject route must be 4xx or 5xx"))
        if problems:
            raise _Problems(problems)
        return self


_RATE_RE = re.compile(r"\s*([0-9]{1,12})\s*/\s*([smhd])\s*", re.IGNORECASE)
_RATE_UNITS: Mapping[str, float] = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` per ``window`` seconds, written ``N/s``, ``N/m``, ``N/h`` or ``N/d``."""

    count: int
    window: float

    def __str__(self) -> str:
        unit = next(u for u, seconds in _RATE_UNITS.items() if seconds == self.window)
        return f"{self.count}/{unit}"


def _to_rate(value: Any) -> Rate:
    if isinstance(value, Rate):
        return value
    found = _RATE_RE.fullmatch(value) if isinstance(value, str) else None
    if found is None:
        raise ValueError("expected a rate like 1000/h: a count, '/', and s, m, h or d")
    count = int(found.group(1))
    if count < 1:
        raise ValueError("the count of a rate must be at least 1")
    return Rate(count, _RATE_UNITS[found.group(2).lower()])


RateT = Annotated[
    Rate,
    BeforeValidator(_to_rate),
    WithJsonSchema({"type": "string", "pattern": r"^\s*[0-9]+\s*/\s*[smhdSMHD]\s*$"}),
]


class QuotaMatch(_Model):
    """A quota's conditions: the envelope's only, since it is checked at RCPT."""

    rcpt: PatternList | None = None
    mail_from: PatternList | None = None
    user: PatternList | None = None
    client: NetworkList | None = None


class QuotaConfig(_Model):
    """``quotas:`` entry: recipients per window, counted per key, for matching envelopes."""

    # Named in the 451 reply and a metric label: plain characters only.
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    match: QuotaMatch = Field(default_factory=QuotaMatch)
    per: Literal["client", "user", "mail_from", "route"]
    recipients: RateT


class Config(_Model):
    smtp: SmtpConfig = Field(default_factory=SmtpConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    routes: list[RouteConfig] = Field(min_length=1)
    replies: dict[str, ReplyT] = Field(default_factory=dict)
    quotas: list[QuotaConfig] = Field(default_factory=list)

    @field_validator("routes", mode="before")
    @classmethod
    def _name_routes(cls, value: Any) -> Any:
        """Name unnamed routes ``route-<position>``, never reusing a name already given."""
        if not isinstance(value, list):
            return value
        taken = {r.get("name") for r in value if isinstance(r, dict)}
        named: list[Any] = []
        for i, route in enumerate(value):
            if isinstance(route, dict) and "name" not in route:
                name, n = f"route-{i + 1}", 1
                while name in taken:
                    n += 1
                    name = f"route-{i + 1}-{n}"
                taken.add(name)
                route = {"name": name, **route}
            named.append(route)
        return named

    @field_validator("replies", mode="before")
    @classmethod
    def _check_replies(cls, value: Any) -> Any:
        """Every override through ``replies.check_override``: no 2xx for a failure key."""
        if not isinstance(value, Mapping):
            return value
        checked: dict[str, Reply] = {}
        problems: list[tuple[Loc, str]] = []
        for key, reply in value.items():
            try:
                checked[str(key)] = check_override(str(key), str(reply))
            except ValueError as exc:
                problems.append(((str(key),), str(exc)))
        if problems:
            raise _Problems(problems)
        return checked

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        problems: list[tuple[Loc, str]] = []
        seen: set[str] = set()
        for i, route in enumerate(self.routes):
            if route.name in seen:
                message = f"duplicate route name {route.name!r}: names must be unique"
                problems.append((("routes", i, "name"), message))
            seen.add(route.name)
        quota_names: set[str] = set()
        for i, quota in enumerate(self.quotas):
            if quota.name in quota_names:
                message = f"duplicate quota name {quota.name!r}: names must be unique"
                problems.append((("quotas", i, "name"), message))
            quota_names.add(quota.name)
        if self.api.timeout >= self.smtp.timeout:
            message = (
                f"must be shorter than smtp.timeout ({_seconds(self.smtp.timeout)}), "
                "so the API answers before the SMTP client gives up"
            )
            problems.append((("api", "timeout"), message))
        delivery = self.delivery
        if delivery.mode == "queue" and delivery.in_flow_delay >= self.smtp.timeout:
            message = (
                f"must be shorter than smtp.timeout ({_seconds(self.smtp.timeout)}), "
                "so the client hears 250 before the session times out (0 turns it off)"
            )
            problems.append((("delivery", "in_flow_delay"), message))
        if problems:
            raise _Problems(problems)
        return self

    def app_key(self) -> str:
        """The global API key ('' when unset)."""
        return self.api.app_key.get_secret_value() if self.api.app_key else ""


def _seconds(value: float) -> str:
    return f"{value:g}s"


# ---------------------------------------------------------------- loading

_ENV_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Located:
    """YAML turned into plain data, remembering the line of every key path."""

    def __init__(self, text: str, env: Mapping[str, str]) -> None:
        self.lines: dict[Loc, int] = {}
        self.problems: list[tuple[Loc, str]] = []
        self._env = env
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            self.data: Any = {} if node is None else self._build(node, (), loader)
        finally:
            loader.dispose()

    def _build(self, node: yaml.Node, loc: Loc, loader: yaml.SafeLoader) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            # Keys merged in with `<<: *anchor` come first and may be overridden.
            own = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
            loader.flatten_mapping(node)
            result: dict[Any, Any] = {}
            written: set[str] = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    self.problems.append((loc, "mapping keys must be strings"))
                    continue
                # The key as written: `on:` stays "on" (not True), `40007:` is "40007".
                key = str(key_node.value)
                sub = (*loc, key)
                if id(key_node) in own:
                    if key in written:
                        self.problems.append((sub, "duplicate key"))
                    written.add(key)
                if key in result:  # a later value replaces a merged one: forget its lines
                    for stale in [k for k in self.lines if k[: len(sub)] == sub]:
                        del self.lines[stale]
                self.lines[sub] = key_node.start_mark.line + 1
                result[key] = self._build(value_node, sub, loader)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self._build(v, (*loc, i), loader) for i, v in enumerate(node.value)]
        value = loader.construct_object(node)
        if isinstance(value, str) and "$" in value:
            value = self._expand(value, loc)
        return value

    def _expand(self, value: str, loc: Loc) -> str:
        def replace(found: re.Match[str]) -> str:
            if found.group(0) == "$$":
                return "$"
            name, default = found.group(1), found.group(2)
            if name in self._env and (self._env[name] != "" or default is None):
                return self._env[name]
            if default is not None:
                return default
            self.problems.append((loc, f"environment variable {name} is not set"))
            return ""

        return _ENV_RE.sub(replace, value)

    def line_of(self, loc: Loc) -> int | None:
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.lines:
                return self.lines[loc[:end]]
        return None


def _dotted(loc: Loc) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


#: pydantic error types -> what the operator should write instead.
_EXPECTED = {
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "list_type": "expected a list",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "path_type": "expected a file path",
    "missing": "required key is missing",
    "string_too_short": "must not be empty",
}


def _pydantic_message(error: Mapping[str, Any]) -> str:
    """pydantic's message without its jargon ("Input should be", "Value error,")."""
    kind = str(error.get("type", ""))
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "too_short":
        count = ctx.get("min_length", 1)
        return f"expected at least {count} item{'' if count == 1 else 's'}"
    message = str(error.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if kind == "literal_error":
        got = error.get("input")
        return message.replace("Input should be", "expected") + f", got {got!r}"
    return message.replace("Input should be", "must be")


def _strip_annotation(annotation: Any) -> Any:
    """``Annotated[X, ...]`` and ``X | None`` -> X (the model, when a union holds one)."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if len(args) == 1:
                annotation = args[0]
            elif len(models) == 1:
                annotation = models[0]
            else:
                return annotation
        else:
            return annotation


def _known_keys(loc: Loc) -> list[str]:
    """Allowed keys of the mapping holding ``loc``'s last key, for 'unknown key' hints."""
    annotation: Any = Config
    for item in loc[:-1]:
        annotation = _strip_annotation(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(item))
            if field is None:
                return []
            annotation = field.annotation
        elif get_origin(annotation) is list and isinstance(item, int):
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) is dict and isinstance(item, str):
            annotation = get_args(annotation)[1]
        else:
            return []
    annotation = _strip_annotation(annotation)
    if not (isinstance(annotation, type) and issubclass(annotation, _Model)):
        return []
    files = [f"{name}_file" for name in annotation.secret_fields]
    return sorted([*annotation.model_fields, *files])


def _unknown_key_message(loc: Loc) -> str:
    known = _known_keys(loc)
    if not known:
        return "unknown key"
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown key{hint}; expected one of: {', '.join(known)}"


def _validation_problems(exc: ValidationError) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    for error in exc.errors():
        loc: Loc = tuple(error["loc"])
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, _Problems):
            problems.extend(((*loc, *sub), msg) for sub, msg in cause.problems)
        elif error.get("type") == "extra_forbidden":
            problems.append((loc, _unknown_key_message(loc)))
        else:
            problems.append((loc, _pydantic_message(error)))
    return problems


def parse_config(
    text: str, *, filename: str = "<config>", env: Mapping[str, str] | None = None
) -> Config:
    """Validate config text; raises ConfigError listing every problem found."""
    try:
        located = _Located(text, os.environ if env is None else env)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or "invalid YAML"
        message = f"YAML syntax error: {problem}"
        raise ConfigError([ConfigIssue(filename, line, "", message)]) from None

    def issue(loc: Loc, message: str) -> ConfigIssue:
        return ConfigIssue(filename, located.line_of(loc), _dotted(loc), message)

    issues = [issue(loc, msg) for loc, msg in located.problems]
    if not isinstance(located.data, dict):
        issues.append(
            ConfigIssue(
                filename,
                1,
                "",
                "the top level must be a mapping of sections "
                "(smtp, api, delivery, admin, routes, replies)",
            )
        )
        raise ConfigError(issues)
    # A value whose ${VAR} is unset is already reported; its knock-on errors are noise.
    reported = {loc for loc, _ in located.problems}

    compiled_data, data_problems = _compile_route_data(located.data)
    issues.extend(issue(loc, msg) for loc, msg in data_problems)
    config: Config | None = None
    try:
        config = Config.model_validate(located.data)
    except ValidationError as exc:
        issues.extend(
            issue(loc, msg)
            for loc, msg in _validation_problems(exc)
            if not any(loc[: len(r)] == r for r in reported)
        )
    if issues or config is None:
        issues.sort(key=lambda i: (i.line or 0, i.path))
        raise ConfigError(issues)
    routes = [
        route.model_copy(update={"data": compiled_data.get(i, {})})
        for i, route in enumerate(config.routes)
    ]
    return config.model_copy(update={"routes": routes})


def _compile_route_data(raw: dict[str, Any]) -> tuple[dict[int, Any], list[tuple[Loc, str]]]:
    """Compile the string leaves of every route's ``data`` with exact locations."""
    compiled: dict[int, Any] = {}
    problems: list[tuple[Loc, str]] = []

    def walk(value: Any, loc: Loc) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*loc, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*loc, i)) for i, v in enumerate(value)]
        if isinstance(value, str):
            try:
                return _compile_quietly(value)
            except ValueError as exc:
                problems.append((loc, str(exc)))
        return value

    routes = raw.get("routes")
    if isinstance(routes, list):
        for i, route in enumerate(routes):
            if isinstance(route, dict) and "data" in route:
                if not isinstance(route["data"], dict):
                    problems.append((("routes", i, "data"), "expected a mapping of variables"))
                    route["data"] = {}
                    continue
                compiled[i] = walk(route["data"], ("routes", i, "data"))
    return compiled, problems


def load_config(path: Path | str, *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raises ConfigError (also for an unreadable file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        issue = ConfigIssue(str(path), None, "", f"cannot read: {exc.strerror}")
        raise ConfigError([issue]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue(str(path), None, "", "not UTF-8 text")]) from None
    return parse_config(text, filename=str(path), env=env)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file, for editors (``smtp-bridge schema``)."""
    schema = Config.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "smtp-bridge configuration"
    return schema
