"""Sandboxed Jinja2: compile route templates at load, render them per recipient.

Message content only ever enters as *context values*; it is never compiled.
A subject of ``{{ 7*7 }}`` is a string in the context and renders as itself.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import HeaderOverrideError, TemplateRenderError
from .message import ParsedMessage, is_valid_address, parse_address
from .outcomes import ApiRequest

__all__ = [
    "ClientInfo",
    "CompiledTemplate",
    "TemplateRenderError",
    "build_context",
    "clean_data",
    "clean_text",
    "compile_template",
    "render_data",
    "HeaderOverrideError",
]


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _regex_search(value: Any, pattern: str, group: int | str = 0) -> str:
    """First match of ``pattern`` in ``value`` (or one of its groups), '' if none."""
    found = _regex(pattern).search(str(value))
    if found is None:
        return ""
    return found.group(group) or ""


def _regex_replace(value: Any, pattern: str, repl: str) -> str:
    return _regex(pattern).sub(repl, str(value))


def _first_line(value: Any) -> str:
    for line in str(value).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _make_environment() -> ImmutableSandboxedEnvironment:
    # autoescape off: the output is JSON data for the API, not HTML; the
    # provider's template does its own escaping.
    env = ImmutableSandboxedEnvironment(autoescape=False, keep_trailing_newline=False)
    env.filters["regex_search"] = _regex_search
    env.filters["regex_replace"] = _regex_replace
    env.filters["first_line"] = _first_line
    return env


_ENV = _make_environment()


@dataclass(frozen=True, slots=True)
class CompiledTemplate:
    """A route string compiled once at load. ``source`` is what the operator wrote.

    ``lookup``: for a template that is one variable and nothing else
    (``{{ subject }}``, ``{{ rcpt.local }}``), the name and attributes it reads.
    Rendering it then does what Jinja's compiled code does (``str()`` of the
    context value, each attribute through the sandbox's ``getattr``) without
    Jinja's context and generator set-up per render (bench/README.md);
    tests/test_templating_fast.py compares both. ``or_else``: the constant of
    ``{{ sender.name or 'Billing' }}``, in a 1-tuple (the constant may be None);
    Jinja's code for ``or`` is Python's.
    """

    source: str
    template: jinja2.Template | None  # None: no template syntax, the source is literal
    lookup: tuple[str, ...] | None = None
    or_else: tuple[Any] | None = None

    def render(self, context: Mapping[str, Any]) -> str:
        if self.template is None:
            return self.source
        lookup = self.lookup
        if lookup is not None and lookup[0] in context:
            value = context[lookup[0]]
            for attribute in lookup[1:]:
                value = _ENV.getattr(value, attribute)
            if self.or_else is not None:
                value = value or self.or_else[0]
            return str(value)
        # A name the context lacks resolves to Jinja's globals or Undefined: Jinja's business.
        return self.template.render(context)

    def __str__(self) -> str:
        return self.source


def compile_template(source: str) -> CompiledTemplate:
    """Compile one template string; raises ValueError with the Jinja2 error text."""
    if "{" not in source:
        return CompiledTemplate(source, None)
    try:
        template = _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"template syntax error: {exc.message}") from None
    return CompiledTemplate(source, template, *_one_variable(source))


def _one_variable(source: str) -> tuple[tuple[str, ...] | None, tuple[Any] | None]:
    """(("rcpt", "local"), None) for ``{{ rcpt.local }}``: a template whose whole
    output is one context variable or a chain of attributes of one, optionally
    ``or`` a constant (then its value, in a 1-tuple); (None, None) for anything else.

    Read from Jinja's own parse, so whitespace control, comments and the trailing
    newline mean what they mean to Jinja. ``self`` is Jinja's reference to the
    template, never a context variable; ``true``/``none`` parse as constants.
    """
    body = _ENV.parse(source).body
    if len(body) != 1 or not isinstance(body[0], nodes.Output) or len(body[0].nodes) != 1:
        return None, None
    node = body[0].nodes[0]
    or_else: tuple[Any] | None = None
    if isinstance(node, nodes.Or) and isinstance(node.right, nodes.Const):
        or_else = (node.right.value,)
        node = node.left
    attributes: list[str] = []
    while isinstance(node, nodes.Getattr):
        attributes.append(node.attr)
        node = node.node
    if not isinstance(node, nodes.Name) or node.name == "self":
        return None, None
    return (node.name, *reversed(attributes)), or_else


def compile_data(value: Any) -> Any:
    """Compile every string leaf of a ``data`` structure (for the config loader)."""
    if isinstance(value, str):
        return compile_template(value)
    if isinstance(value, dict):
        return {str(k): compile_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [compile_data(v) for v in value]
    return value


def render_data(value: Any, context: Mapping[str, Any], path: str = "data") -> Any:
    """Render a compiled ``data`` structure; non-string leaves pass through."""
    if isinstance(value, CompiledTemplate):
        return render_field(value, context, path)
    if isinstance(value, dict):
        return {k: render_data(v, context, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [render_data(v, context, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def render_field(template: CompiledTemplate, context: Mapping[str, Any], field: str) -> str:
    """Render one field; any failure becomes TemplateRenderError naming the field."""
    try:
        return template.render(context)
    except Exception as exc:  # sandbox SecurityError, filter errors, undefined calls...
        raise TemplateRenderError(field, type(exc).__name__) from exc


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """The SMTP client as templates see it: ``client.ip``."""

    ip: str
    port: int = 0

    def __str__(self) -> str:
        return self.ip


def build_context(
    message: ParsedMessage,
    *,
    mail_from: str,
    rcpt: str,
    user: str = "",
    client: ClientInfo | None = None,
    match: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The docs/routing.md template context for one recipient of one message."""
    return {
        "subject": message.subject,
        "sender": message.sender,
        "mail_from": mail_from,
        "rcpt": parse_address(rcpt),
        "to": message.to,
        "cc": message.cc,
        "headers": message.headers,
        "text": message.text,
        "html": message.html,
        "match": dict(match or {}),
        "message_id": message.message_id,
        "date": message.date,
        "attachments": message.attachments,
        "user": user,
        "client": client or ClientInfo(""),
    }


def client_info(peer: Any) -> ClientInfo:
    """ClientInfo from an asyncio peername tuple (or anything else)."""
    if isinstance(peer, tuple) and peer:
        return ClientInfo(str(peer[0]), int(peer[1]) if len(peer) > 1 else 0)
    if isinstance(peer, IPv4Address | IPv6Address):
        return ClientInfo(str(peer))
    return ClientInfo(str(peer or ""))


OVERRIDE_HEADERS = ("X-Template-Id", "X-Template-Data", "X-Alias", "X-Reply-To")


def header_overrides(message: ParsedMessage) -> dict[str, Any]:
    """Literal (never rendered) values from the opt-in override headers."""
    found: dict[str, Any] = {}
    headers = message.headers
    if headers.get("X-Template-Id", "").strip():
        found["template_id"] = headers["X-Template-Id"].strip()
    if "X-Template-Data" in headers:
        try:
            data = json.loads(headers["X-Template-Data"])
        except ValueError:
            raise HeaderOverrideError("X-Template-Data is not valid JSON") from None
        if not isinstance(data, dict):
            raise HeaderOverrideError("X-Template-Data is not a JSON object")
        found["data"] = data
    if headers.get("X-Alias", "").strip():
        found["alias"] = headers["X-Alias"].strip()
    if headers.get("X-Reply-To", "").strip():
        found["reply_to"] = headers["X-Reply-To"].strip()
    return found


# Unicode's control characters (Cc) but tab, line feed and carriage return (line
# ends are made "\n" first): C0 and DEL as UTF-8 bytes (never part of a longer
# sequence), C1 as characters (their UTF-8 form starts with 0xC2).
_C0_AND_DEL = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
_C1 = re.compile("[\x80-\x9f]+")


def clean_text(text: str) -> str:
    """``text`` as the API may get it: line ends "\n", other control characters removed.

    A NUL or an escape sequence in a Subject or display name is noise to a mail
    template and trouble to whatever stores it (issue 13). CR LF and a lone CR
    become "\n", as a message body's line ends already do; tab and "\n" stay.
    One C-speed ``bytes.translate`` pass: a 2 KiB body costs 3 us, where a regex
    over it costs 13 (bench/README.md).
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    raw = text.encode("utf-8", "surrogatepass")
    kept = raw.translate(None, _C0_AND_DEL)
    if len(kept) != len(raw):
        text = kept.decode("utf-8", "surrogatepass")
    if b"\xc2" in kept:
        text = _C1.sub("", text)
    return text


def clean_data(value: Any) -> Any:
    """:func:`clean_text` applied to every string (keys too) of a ``data`` structure."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(str(k)): clean_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_data(v) for v in value]
    return value


def render_request(
    *,
    template_id: CompiledTemplate,
    to: CompiledTemplate,
    alias: CompiledTemplate | None,
    reply_to: CompiledTemplate | None,
    is_random: bool | None,
    data: Mapping[str, Any],
    context: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
) -> ApiRequest:
    """Render a route's fields into the API request for one recipient."""
    # data, alias and reply_to reach the API as clean text (clean_text), whether
    # rendered or taken from an override header.
    rendered_data = clean_data(render_data(dict(data), context))
    overrides = overrides or {}
    tid = overrides.get("template_id") or render_field(template_id, context, "template_id").strip()
    address = render_field(to, context, "to").strip()
    if not is_valid_address(address):
        # `to` must be a bare address (docs/guarantees.md); a template that renders
        # anything else is the route's fault, not the recipient's.
        raise TemplateRenderError("to", "did not render to one bare address")
    alias_value = clean_text(
        overrides.get("alias") or (render_field(alias, context, "alias") if alias else "")
    ).strip()
    reply_value = clean_text(
        overrides.get("reply_to")
        or (render_field(reply_to, context, "reply_to") if reply_to else "")
    ).strip()
    if "data" in overrides:
        rendered_data = {**rendered_data, **clean_data(overrides["data"])}
    if not tid:
        raise TemplateRenderError("template_id", "rendered empty")
    return ApiRequest(
        template_id=tid,
        to=address,
        data=rendered_data,
        alias=alias_value or None,
        reply_to=reply_value or None,
        is_random=is_random,
    )
