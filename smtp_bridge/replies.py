"""SMTP replies as named constants, and the one table from API results to replies.

Pure: no sockets, no disk. Every reply the bridge sends is a :class:`Reply`
constant here, so tests compare against the constants and no reply text is
improvised elsewhere. :func:`reply_for` is the table of docs/replies.md as code.

Reply texts never carry secrets or exception text (docs/replies.md). Enhanced status
codes are RFC 3463 (class.subject.detail, https://www.rfc-editor.org/rfc/rfc3463);
the class digit always equals the first digit of the basic code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from smtp_bridge.outcomes import ApiResult, ResultKind

__all__ = [
    "Reply",
    # DATA outcomes (docs/replies.md)
    "OK",
    "DROPPED",
    "QUEUED",
    "ALREADY_DELIVERED",
    "ALREADY_QUEUED",
    "SAME_IN_FLIGHT",
    "CONFIG_ERROR",
    "HTTP_CONFIG_ERROR",
    "INTERNAL",
    "UNKNOWN_CODE",
    "REPLY_TO_REJECTED",
    "BAD_RECIPIENT",
    "BALANCE",
    "DATA_FORMAT",
    "NEVER_SENT",
    "OUTCOME_UNKNOWN",
    "THROTTLED",
    "UPSTREAM_UNAVAILABLE",
    "TOO_LARGE",
    "NO_ROUTE_DATA",
    "TEMPLATE_FAILED",
    "REJECTED",
    # SMTP-level replies
    "RCPT_BAD_SYNTAX",
    "RCPT_NO_ROUTE",
    "TOO_MANY_RECIPIENTS",
    "AUTH_REQUIRED",
    "BARE_LF",
    "SERVICE_UNAVAILABLE_SHUTDOWN",
    "TOO_MANY_CONNECTIONS",
    "AUTH_NOT_AVAILABLE",
    "AUTH_NEEDS_TLS",
    "AUTH_TOO_MANY_FAILURES",
    "IDLE_TIMEOUT",
    "SESSION_TIME_LIMIT",
    "TLS_ALREADY_ACTIVE",
    "TLS_NOT_AVAILABLE",
    "MALFORMED_ADDRESS",
    # the table and its helpers
    "reply_for",
    "override_key",
    "check_override",
    "parse_overrides",
    "opens_breaker",
    "is_throttled",
    "is_transport_failure",
    "is_permanent",
]

# RFC 5321 4.2: Reply-code = %x32-35 %x30-35 %x30-39; the bridge only ever sends
# 2yz, 4yz and 5yz. RFC 3463 2: subject and detail are "0" or 1-3 digits without a
# leading zero.
_REPLY_RE = re.compile(
    r"(?P<code>(?P<cls>[245])[0-5][0-9]) "
    r"(?P<status>(?P<scls>[0-9])\.(?:0|[1-9][0-9]{0,2})\.(?:0|[1-9][0-9]{0,2}))"
    r"(?: (?P<text>.*))?",
    re.DOTALL,
)
# RFC 5321 4.2: textstring = 1*( %d09 / %d32-126 ). Leaves room in the 512-octet
# reply line (RFC 5321 4.5.3.1.5) for the " id=<queue id>" suffix.
_TEXT_RE = re.compile(r"[\t\x20-\x7e]+")
_MAX_TEXT = 400


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply line: ``code status text``, e.g. ``451 4.3.2 ...``."""

    code: int
    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600

    def with_id(self, queue_id: str) -> str:
        """The reply line ending with ``id=<queue_id>``: every DATA reply does (docs/replies.md)."""
        return f"{self} id={queue_id}"

    @classmethod
    def parse(cls, line: str) -> Reply:
        """Parse an operator's reply such as ``451 4.3.2 Provider balance exhausted``.

        Raises ValueError saying what is wrong and what is expected.
        """
        if not isinstance(line, str):
            raise ValueError(f"expected a reply string like '451 4.3.0 text', got {line!r}")
        stripped = line.strip()
        m = _REPLY_RE.fullmatch(stripped)
        if m is None:
            raise ValueError(
                f"{stripped!r} is not an SMTP reply: expected "
                "'<2xx|4xx|5xx> <class.subject.detail> <text>', e.g. "
                "'451 4.3.2 Provider balance exhausted, try again later'"
            )
        if m["scls"] != m["cls"]:
            raise ValueError(
                f"{stripped!r}: enhanced status {m['status']} does not match reply code "
                f"{m['code']}: its first digit must be {m['cls']} (RFC 3463)"
            )
        text = m["text"] or ""
        if not text.strip():
            raise ValueError(f"{stripped!r}: the reply text after the status must not be empty")
        if "\r" in text or "\n" in text:
            raise ValueError(f"{stripped!r}: the reply text must be one line (no CR or LF)")
        if not _TEXT_RE.fullmatch(text):
            raise ValueError(f"{stripped!r}: the reply text must be printable ASCII (RFC 5321 4.2)")
        if len(text) > _MAX_TEXT:
            raise ValueError(f"reply text is {len(text)} characters; at most {_MAX_TEXT} allowed")
        return cls(int(m["code"]), m["status"], text)


# --- replies to DATA, derived from API results (docs/replies.md) -------------------------

OK = Reply(250, "2.0.0", "Ok")
#: A route with ``action: drop`` accepts and discards (the client must not retry).
DROPPED = Reply(250, "2.0.0", "Ok, discarded by policy")
#: queue and hybrid modes: committed to the spool (fsync'd), a worker delivers it.
QUEUED = Reply(250, "2.0.0", "Ok, queued for delivery")
#: A client retry of a message whose recipient was delivered: skipped, not sent again.
ALREADY_DELIVERED = Reply(250, "2.0.0", "Ok, already delivered")
#: A copy of a message already waiting in the spool: that copy delivers it.
ALREADY_QUEUED = Reply(250, "2.0.0", "Ok, already queued")
#: A copy of a message whose call is in flight elsewhere for longer than we wait.
SAME_IN_FLIGHT = Reply(451, "4.3.0", "The same message is being sent, try again later")
#: 40001/40002/40003: the bridge's key or template is wrong; never 535, which is
#: about the client's own login.
CONFIG_ERROR = Reply(
    451, "4.3.5", "Bridge configuration error (API key or template), try again later"
)
#: HTTP 401/403/404: wrong key or URL.
HTTP_CONFIG_ERROR = Reply(
    451, "4.3.5", "Bridge configuration error (API URL or key), try again later"
)
#: Internal errors, and 40004 (an empty ``to`` is the bridge's own fault).
INTERNAL = Reply(451, "4.3.0", "Internal error, try again later")
#: Any API code, HTTP status or body the table does not know: keep the mail.
UNKNOWN_CODE = Reply(451, "4.3.0", "Unexpected answer from the email API, try again later")
#: 40006 after the resend without reply_to still answered 40006 (the caller resends
#: once, docs/replies.md); only then does a 40006 reach the table.
REPLY_TO_REJECTED = Reply(
    451, "4.3.0", "Reply-to address rejected by the email API, try again later"
)
BAD_RECIPIENT = Reply(550, "5.1.3", "Recipient address rejected by the email provider")
#: 40007: temporary; opens the circuit breaker.
BALANCE = Reply(451, "4.3.2", "Email provider balance exhausted, try again later")
DATA_FORMAT = Reply(554, "5.6.0", "Message data rejected by the email provider")
#: Connection refused, DNS or TLS failure: the request never left; safe to retry.
NEVER_SENT = Reply(451, "4.4.1", "Email API unreachable, try again later")
#: Timeout or reset after the request was sent.
OUTCOME_UNKNOWN = Reply(451, "4.4.2", "Email API did not answer, outcome unknown; try again later")
THROTTLED = Reply(451, "4.4.5", "Email API rate limit reached, try again later")
#: HTTP 502/503/504.
UPSTREAM_UNAVAILABLE = Reply(451, "4.4.1", "Email API unavailable, try again later")
#: HTTP 413, and the bridge's own size limit.
TOO_LARGE = Reply(552, "5.3.4", "Message too large")
NO_ROUTE_DATA = Reply(550, "5.7.1", "No route accepts this message")
TEMPLATE_FAILED = Reply(451, "4.3.5", "Template rendering failed, try again later")
#: Default reply of a route with ``action: reject``.
REJECTED = Reply(550, "5.7.1", "Message rejected by policy")

# --- SMTP-level replies (docs/guarantees.md, docs/configuration.md) -------------------

RCPT_BAD_SYNTAX = Reply(553, "5.1.3", "Bad recipient address syntax")
RCPT_NO_ROUTE = Reply(550, "5.1.1", "Recipient not accepted: no route")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
#: SMTP smuggling defence with ``bare_lf: reject``.
BARE_LF = Reply(550, "5.5.2", "Bare LF line ends are not accepted, use CRLF")
SERVICE_UNAVAILABLE_SHUTDOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
AUTH_NOT_AVAILABLE = Reply(502, "5.5.1", "Authentication not available")
#: RFC 4954 section 6: AUTH over plaintext when the bridge requires TLS first.
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_TOO_MANY_FAILURES = Reply(421, "4.7.0", "Too many failed authentication attempts")
#: ``smtp.timeout`` passed without a command (RFC 5321 4.5.3.2.7: the server
#: should close with 421 rather than hang up silently).
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout exceeded, closing connection")
#: ``smtp.max_session_time`` reached: the wall-clock cap of one session.
SESSION_TIME_LIMIT = Reply(421, "4.4.2", "Session time limit reached, closing connection")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS already active")
TLS_NOT_AVAILABLE = Reply(502, "5.5.1", "STARTTLS not available")
#: aiosmtpd's answer to an unparsable path or a local part over 64 octets.
MALFORMED_ADDRESS = Reply(553, "5.1.3", "Malformed address")


# --- the table ---------------------------------------------------------------------

_API_CODES: dict[int, Reply] = {
    200: OK,
    40001: CONFIG_ERROR,  # API key empty
    40002: CONFIG_ERROR,  # authentication failed
    40003: CONFIG_ERROR,  # template ID incorrect
    40004: INTERNAL,  # recipient empty: RCPT checks make it the bridge's own fault
    40005: BAD_RECIPIENT,
    40006: REPLY_TO_REJECTED,  # only after the resend without reply_to
    40007: BALANCE,
    40008: DATA_FORMAT,
}

_HTTP_STATUSES: dict[int, Reply] = {
    429: THROTTLED,
    502: UPSTREAM_UNAVAILABLE,
    503: UPSTREAM_UNAVAILABLE,
    504: UPSTREAM_UNAVAILABLE,
    401: HTTP_CONFIG_ERROR,
    403: HTTP_CONFIG_ERROR,
    404: HTTP_CONFIG_ERROR,
    413: TOO_LARGE,
}

_KIND_REPLIES: dict[ResultKind, Reply] = {
    ResultKind.NEVER_SENT: NEVER_SENT,
    ResultKind.UNKNOWN: OUTCOME_UNKNOWN,
    ResultKind.BAD_BODY: UNKNOWN_CODE,  # could be a proxy page, not the API
}

# Kinds without a code or status are overridable under their enum value.
_KIND_KEYS = frozenset(k.value for k in _KIND_REPLIES)
_API_KEY_RE = re.compile(r"[0-9]{1,9}")
_HTTP_KEY_RE = re.compile(r"http:([1-5][0-9][0-9])")


def _default_reply(result: ApiResult) -> Reply:
    if result.kind is ResultKind.API:
        if result.code is None:
            return UNKNOWN_CODE
        return _API_CODES.get(result.code, UNKNOWN_CODE)
    if result.kind is ResultKind.HTTP:
        if result.http_status is None:
            return UNKNOWN_CODE
        return _HTTP_STATUSES.get(result.http_status, UNKNOWN_CODE)
    return _KIND_REPLIES.get(result.kind, UNKNOWN_CODE)


def override_key(result: ApiResult) -> str | None:
    """The ``replies:`` key that overrides the reply for ``result``.

    API codes are keyed by the code as a string (``"40007"``), HTTP statuses as
    ``"http:429"``, and results without either by their kind (``"never_sent"``,
    ``"unknown"``, ``"bad_body"``).
    """
    if result.kind is ResultKind.API:
        return None if result.code is None else str(result.code)
    if result.kind is ResultKind.HTTP:
        return None if result.http_status is None else f"http:{result.http_status}"
    return str(result.kind.value)


def reply_for(result: ApiResult, overrides: Mapping[str, Reply] | None = None) -> Reply:
    """The SMTP reply for one API result: docs/replies.md, with operator overrides.

    An override replaces the default reply for its key (see :func:`override_key`).
    As a last guard against losing mail, an override that would turn a failure
    into a 2xx (or a delivery into a failure) is ignored; :func:`check_override`
    refuses such overrides at config load.
    """
    default = _default_reply(result)
    if overrides:
        key = override_key(result)
        if key is not None:
            override = overrides.get(key)
            if override is not None and override.is_success == default.is_success:
                return override
    return default


def check_override(key: str, value: str) -> Reply:
    """Validate one ``replies:`` entry and return its reply; ValueError says why not.

    A key is an API code (``"40007"``), ``"http:<status>"`` or one of
    ``never_sent``, ``unknown``, ``bad_body``. Code 200 must map to a 2xx reply and
    everything else to a 4xx or 5xx: an override must never make a failure look
    delivered.
    """
    if not isinstance(key, str):
        raise ValueError(f"reply override key {key!r} must be a string such as '40007'")
    if _API_KEY_RE.fullmatch(key):
        success = int(key) == 200
    elif m := _HTTP_KEY_RE.fullmatch(key):
        if m[1] == "200":
            raise ValueError("'http:200' never applies: HTTP 200 is an API answer or 'bad_body'")
        success = False
    elif key in _KIND_KEYS:
        success = False
    else:
        raise ValueError(
            f"unknown reply override key {key!r}: expected an API code such as '40007', "
            f"'http:<status>' such as 'http:429', or one of {', '.join(sorted(_KIND_KEYS))}"
        )
    reply = Reply.parse(value)
    if success and not reply.is_success:
        raise ValueError(f"the reply for {key!r} must be a 2xx reply, got {reply.code}")
    if not success and reply.is_success:
        raise ValueError(
            f"the reply for {key!r} must be a 4xx or 5xx reply: a 2xx would report "
            "an undelivered message as delivered"
        )
    return reply


def parse_overrides(raw: Mapping[str, str]) -> dict[str, Reply]:
    """Validate a whole ``replies:`` mapping; the first bad entry raises ValueError."""
    out: dict[str, Reply] = {}
    for key, value in raw.items():
        try:
            out[key] = check_override(key, value)
        except ValueError as exc:
            raise ValueError(f"replies.{key}: {exc}") from None
    return out


# --- circuit breaker inputs (end of docs/replies.md) ----------------------------------------

_BREAKER_CODES = frozenset({40001, 40002, 40007})


def opens_breaker(result: ApiResult) -> bool:
    """True for answers that open the breaker at once: 40001, 40002, 40007.

    Not HTTP 429 (:func:`is_throttled`): a rate limit slows the key down, and
    pauses it only for a Retry-After or a run of them (docs/guarantees.md (breaker and rate limit)).
    """
    return result.kind is ResultKind.API and result.code in _BREAKER_CODES


def is_throttled(result: ApiResult) -> bool:
    """True for HTTP 429: the API asks for a slower pace."""
    return result.kind is ResultKind.HTTP and result.http_status == 429


def is_transport_failure(result: ApiResult) -> bool:
    """True for failures counted towards ``api.breaker_failures``: never sent, unknown, 5xx."""
    if result.kind in (ResultKind.NEVER_SENT, ResultKind.UNKNOWN):
        return True
    return (
        result.kind is ResultKind.HTTP
        and result.http_status is not None
        and 500 <= result.http_status < 600
    )


def is_permanent(result: ApiResult, overrides: Mapping[str, Reply] | None = None) -> bool:
    """True when the reply for ``result`` is a 5xx: retrying cannot help."""
    return reply_for(result, overrides).is_permanent
