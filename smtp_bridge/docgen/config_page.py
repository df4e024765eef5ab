"""docs/configuration.md from the pydantic config model: each key's type, default and meaning."""

from __future__ import annotations

import ast
import functools
import inspect
import ipaddress
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr, WithJsonSchema

from .. import config
from ..patterns import Pattern
from ..replies import Reply
from ..templating import CompiledTemplate
from .markdown import anchor, cell, header

__all__ = ["MEANINGS", "ConfigKey", "config_keys", "render_configuration"]


#: The meaning of each config key, by dotted path ("[]" is any list item,
#: "<name>" any mapping key). A field's own ``description`` (pydantic) wins;
#: a key missing here falls back to the comment above its field (smtp_bridge/config/).
MEANINGS: dict[str, str] = {
    "smtp": "The SMTP (or LMTP) front door.",
    "smtp.listen": "Addresses to listen on; `[::]:25` means IPv6 and IPv4 (see `dual_stack`).",
    "smtp.dual_stack": (
        "`[::]` listeners take IPv4 clients too (`IPV6_V6ONLY` off); false: IPv6 only."
        " `0.0.0.0:port` listed beside `[::]:port` keeps one socket per family."
    ),
    "smtp.hostname": "Banner and EHLO name.",
    "smtp.protocol": (
        "`lmtp`: LHLO, and after DATA one reply per recipient (Postfix's lmtp transport)."
    ),
    "smtp.tls": "TLS 1.2+; without it only plain SMTP. Re-read on reload.",
    "smtp.tls.cert": "PEM certificate chain.",
    "smtp.tls.key": "PEM private key, unencrypted; must fit the certificate.",
    "smtp.tls.starttls": "Offer STARTTLS on the plain listeners.",
    "smtp.tls.implicit_listen": "Extra listeners speaking TLS from the first byte (RFC 8314).",
    "smtp.auth": "SMTP AUTH (PLAIN, LOGIN).",
    "smtp.auth.require_tls": (
        "Refuse AUTH over plaintext (`538 5.7.11`), except from trusted networks."
    ),
    "smtp.auth.users": "Accounts by user name; none means only trusted networks may send.",
    "smtp.auth.users.<name>.password_hash": (
        "Made by `smtp-bridge hash-password`; a plaintext is refused."
    ),
    "smtp.auth.users.<name>.app_key": "This user's own API key (default: `api.app_key`).",
    "smtp.trusted_networks": "Clients that may send without AUTH; exempt from the per-IP limit.",
    "smtp.proxy_protocol": (
        "Every connection starts with a PROXY v1/v2 header naming the real client."
    ),
    "smtp.proxy_from": (
        "The load balancers allowed to send the PROXY header; required with `proxy_protocol`."
    ),
    "smtp.max_message_size": "Larger messages get `552 5.3.4` (at MAIL FROM when `SIZE=` says so).",
    "smtp.max_recipients": "More RCPT TO in one message get `452 4.5.3`.",
    "smtp.max_connections": "Connections open at once, in total (`421 4.7.0` beyond).",
    "smtp.max_connections_per_ip": "Connections per client address; trusted networks are exempt.",
    "smtp.max_commands_per_session": (
        "Times each command may come in one session: the messages one connection may carry"
        " (RCPT: times `max_recipients`; VRFY, HELP: 10); beyond, `421 4.7.0` and closed."
    ),
    "smtp.timeout": "Idle time between commands (`421 4.4.2`); `api.timeout` must be shorter.",
    "smtp.max_session_time": "Wall-clock cap of one session (`421 4.4.2`); 0 = none.",
    "smtp.shutdown_timeout": "On SIGTERM, how long sessions in progress may finish.",
    "smtp.bare_lf": "Bare LF line ends: made CRLF, or refused with `550 5.5.2` (SMTP smuggling).",
    "api": "The AOTsend API.",
    "api.url": "The send endpoint.",
    "api.app_key": "The API key; no default: set it or `app_key_file`.",
    "api.encoding": "Request body: form-encoded or JSON.",
    "api.timeout": "Per API call; must be shorter than `smtp.timeout`.",
    "api.max_concurrency": (
        "API calls in flight at once (queue workers get all of them in queue mode, half otherwise)."
    ),
    "api.rate_limit": "Calls per second across the process, spaced 1/rate apart; 0 = unlimited.",
    "api.breaker_failures": (
        "Transport failures in a row (never sent, unknown, HTTP 5xx) that open the breaker."
    ),
    "api.breaker_interval": "While the breaker is open, one probe call per interval.",
    "delivery": "Who holds the mail, and for how long ([guarantees](guarantees.md)).",
    "delivery.mode": (
        "`direct`, `hybrid` or `queue`: see [delivery modes](guarantees.md#delivery-modes). "
        "Needs a restart."
    ),
    "delivery.state_dir": "The SQLite state store and spool; needs durable disk. Needs a restart.",
    "delivery.store": (
        "A database URL instead of SQLite under `state_dir` (several instances share it)."
    ),
    "delivery.dedup_ttl": "How long a delivered (message, recipient) pair is remembered.",
    "delivery.claim_lease": (
        "A spool claim's lease on the store's clock, renewed while the attempt runs."
    ),
    "delivery.max_age": "Spooled mail still failing after this is a dead letter.",
    "delivery.backoff": (
        "Delay after the n-th failure (the last repeats), +-20% jitter, never before a Retry-After."
    ),
    "delivery.bounce_template_id": (
        'Template of the failure notice to the envelope sender; `""` = none.'
    ),
    "delivery.in_flow_delay": (
        "Queue mode flow control: longest wait for a delivery token after DATA; 0 = off."
    ),
    "admin": "The admin HTTP endpoint.",
    "admin.listen": "The console at `/`, `/healthz`, `/readyz`, `/metrics`; `null` turns it off.",
    "admin.token": ("Bearer token or HTTP Basic password for every path; required off loopback."),
    "admin.history": "How long the console keeps a message's history; `0` keeps none.",
    "quotas": "Recipients per window, checked at RCPT; over it `451 4.7.1` naming the quota.",
    "quotas[].match": "Envelope conditions, all must hold; none: every recipient counts.",
    "quotas[].match.rcpt": "The envelope recipient.",
    "quotas[].match.mail_from": "The envelope sender.",
    "quotas[].match.user": "The SMTP AUTH user.",
    "quotas[].match.client": "The client's address (behind PROXY: the real client).",
    "quotas[].per": "What to count by: client address, AUTH user, sender, or route.",
    "quotas[].recipients": "The rate: N/s, N/m, N/h or N/d; a fixed window from the first.",
    "routes": "First match wins; a route without conditions matches everything.",
    "routes[].name": "Unique; in logs and metrics.",
    "routes[].match": "All given conditions must hold; a list means any of its patterns.",
    "routes[].match.rcpt": "The envelope recipient.",
    "routes[].match.mail_from": "The envelope sender.",
    "routes[].match.user": "The SMTP AUTH user.",
    "routes[].match.client": "The client's address (behind PROXY: the real client).",
    "routes[].match.subject": "The decoded Subject (decided at DATA).",
    "routes[].match.headers": "Header name to pattern(s) (decided at DATA).",
    "routes[].match.body": "The text part (decided at DATA).",
    "routes[].action": (
        "`relay` calls the API; `drop` accepts and discards; `reject` answers `reply`."
    ),
    "routes[].reply": "`action: reject` only; a 4xx or 5xx reply.",
    "routes[].template_id": "The AOTsend template id; required for `relay`.",
    "routes[].to": "The recipient address sent to the API.",
    "routes[].alias": "Sender display name.",
    "routes[].reply_to": "Reply address; a 40006 resends once without it.",
    "routes[].is_random": "Rotate sender domains; not sent when unset.",
    "routes[].data": (
        "Template variables; every string is a template, nested mappings and lists allowed."
    ),
    "routes[].allow_header_overrides": (
        "Let `X-Template-Id`, `X-Template-Data`, `X-Alias`, `X-Reply-To` override the route."
    ),
    "replies": (
        "Overrides of the [reply table](replies.md): API code, `http:<status>`, `never_sent`, "
        "`unknown` or `bad_body` to a reply."
    ),
}

#: Defaults that are not a constant of the model.
_DEFAULT_TEXT = {
    "smtp.hostname": "this host's FQDN",
    "routes[].name": "`route-<position>`",
}


@dataclass(frozen=True, slots=True)
class ConfigKey:
    """One row of docs/configuration.md."""

    path: str
    type: str
    default: str
    meaning: str


def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """``Annotated[X, m...]`` -> (X, [m...]), flattening nested ``Annotated``."""
    metadata: list[Any] = []
    while get_origin(tp) is Annotated:
        tp, *more = get_args(tp)
        metadata = [*more, *metadata]
    return tp, metadata


def _model_in(tp: Any) -> tuple[type[BaseModel], str] | None:
    """The section model inside a field type, with the path suffix that reaches it."""
    tp, _ = _unwrap(tp)
    origin = get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp, ""
    if origin in (Union, types.UnionType):
        found = [m for a in get_args(tp) if (m := _model_in(a))]
        return found[0] if len(found) == 1 else None
    if origin is list:
        inner = _model_in(get_args(tp)[0])
        return (inner[0], "[]" + inner[1]) if inner else None
    if origin is dict:
        inner = _model_in(get_args(tp)[1])
        return (inner[0], ".<name>" + inner[1]) if inner else None
    return None


_NAMES: dict[Any, str] = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    Path: "path",
    SecretStr: "secret",
    Pattern: "pattern",
    CompiledTemplate: "template",
    Reply: "SMTP reply",
    ipaddress.IPv4Network: "CIDR",
    ipaddress.IPv6Network: "CIDR",
    Any: "any",
}


def _type_name(tp: Any, metadata: Sequence[Any] = ()) -> str:
    tp, more = _unwrap(tp)
    metadata = [*metadata, *more]
    validators = {getattr(m, "func", None) for m in metadata}
    schemas = [m.json_schema for m in metadata if isinstance(m, WithJsonSchema)]
    if config.parse_duration in validators:
        return "duration"
    if config.parse_size in validators:
        return "size"
    origin = get_origin(tp)
    if origin is Literal:
        return " \\| ".join(f"`{v}`" for v in get_args(tp))
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in get_args(tp) if a is not type(None)]
        return " or ".join(dict.fromkeys(names))
    if origin is list:
        item = _type_name(get_args(tp)[0])
        one_or_list = any(
            isinstance(s, dict) and any(o.get("type") == "array" for o in s.get("anyOf", []))
            for s in schemas
        )
        return f"{item} or list of them" if one_or_list else f"list of {item}"
    if origin is dict:
        return f"mapping: name to {_type_name(get_args(tp)[1])}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "section"
    if tp is str and schemas and isinstance(schemas[0], dict) and "description" in schemas[0]:
        return str(schemas[0]["description"]).split(" or ")[0]  # e.g. "host:port"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _seconds(value: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if value >= size and value % size == 0:
            return f"{value / size:g}{unit}"
    return f"{value * 1000:g}ms" if 0 < value < 1 else f"{value:g}s"


def _bytes(value: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value % size == 0:
            return f"{value // size}{unit}"
    return str(value)


def _value(value: Any, kind: str) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_value(v, kind) for v in value) + "]"
    if isinstance(value, dict | BaseModel):
        return "{}" if isinstance(value, dict) else ""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if "duration" in kind and isinstance(value, int | float):
        return _seconds(float(value))
    if "size" in kind and isinstance(value, int):
        return _bytes(value)
    if isinstance(value, str) and not value:
        return '""'
    return str(value)


@functools.cache
def _comments_above_fields(model: type[BaseModel]) -> dict[str, str]:
    """``# comment`` lines right above each field a config model declares, by field.

    Read from the model's own source, wherever in the config package it lives.
    """
    source = inspect.getsource(model)
    lines = source.splitlines()
    found: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef) or node.name != model.__name__:
            continue
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                above: list[str] = []
                row = item.lineno - 2
                while row >= 0 and lines[row].strip().startswith("#"):
                    above.insert(0, lines[row].strip().lstrip("#").strip())
                    row -= 1
                if above:
                    found[item.target.id] = " ".join(above)
    return found


def _meaning(path: str, model: type[BaseModel], name: str) -> str:
    field = model.model_fields.get(name)
    if field is not None and field.description:
        return field.description
    return MEANINGS.get(path) or _comments_above_fields(model).get(name, "")


def config_keys(
    model: type[BaseModel] = config.Config, prefix: str = ""
) -> Iterator[tuple[str, list[ConfigKey]]]:
    """Sections of the config, each as (dotted path, its keys), depth first."""
    rows: list[ConfigKey] = []
    nested: list[tuple[type[BaseModel], str]] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        kind = _type_name(field.annotation, field.metadata)
        section = _model_in(field.annotation)
        if path in _DEFAULT_TEXT:
            default = _DEFAULT_TEXT[path]
        elif field.is_required():
            default = "required"
        else:
            default = _value(field.get_default(call_default_factory=True), kind)
            default = f"`{default}`" if default else ""
        if section:
            nested.append((section[0], path + section[1]))
            kind = kind.replace("section", f"[section](#{anchor(path + section[1])})")
        rows.append(ConfigKey(path, kind, default, _meaning(path, model, name)))
        if name in getattr(model, "secret_fields", ()):
            meaning = f"Read `{name}` from this file instead (systemd `LoadCredential=`)."
            rows.append(ConfigKey(f"{path}_file", "path", "", meaning))
    yield prefix, rows
    for sub, sub_prefix in nested:
        yield from config_keys(sub, sub_prefix)


def render_configuration() -> str:
    """docs/configuration.md: every key with its type, default and meaning."""
    out = [
        header("`smtp_bridge/config/`"),
        "# Configuration keys\n\n",
        "Every key the loader accepts; any other key is an error. The file is YAML\n",
        "(`--config F`, default `/etc/smtp-bridge/config.yaml`); `smtp-bridge schema`\n",
        "prints the same model as JSON Schema and `smtp-bridge check-config` validates\n",
        "a file, reporting every problem as `file:line: key.path: what is wrong`.\n\n",
        "- `${VAR}` and `${VAR:-default}` are replaced from the environment (unset\n",
        "  without a default is an error); `$$` is a literal `$`.\n",
        "- A key with a `_file` twin (secrets) reads its value from that file; give one\n",
        "  or the other.\n",
        "- **duration**: `500ms`, `30s`, `2m`, `1h`, `3d`, `1w` or a number of seconds.\n",
        "  **size**: `512KB` (1000s), `10MiB` (1024s), `1G` or a number of bytes.\n",
        "- **pattern**: a shell glob, or a Python regex after `re:` (searched, not\n",
        "  anchored); both case-insensitive. **template**: a sandboxed Jinja2 template\n",
        "  (context in [routing.md](routing.md#template-context)).\n",
        "- A list of patterns, networks or addresses may also be written as one value.\n",
    ]
    for prefix, rows in config_keys():
        title = f"`{prefix}`" if prefix else "Top level"
        out.append(f"\n## {title}\n\n")
        if prefix and (intro := MEANINGS.get(prefix.removesuffix("[]").removesuffix(".<name>"))):
            out.append(f"{intro}\n\n")
        out.append("| key | type | default | meaning |\n|---|---|---|---|\n")
        for row in rows:
            key = row.path.rsplit(".", 1)[-1] if prefix else row.path
            out.append(
                f"| `{key}` | {cell(row.type)} | {cell(row.default)} | {cell(row.meaning)} |\n"
            )
    return "".join(out)
