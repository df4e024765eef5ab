"""One log line per event, JSON by default (journald), with bound context.

Callers log ``log_event(logger, "delivered", queue_id=..., rcpt=...)``; the
formatter renders the fields. JSON escaping keeps CR, LF and terminal escapes
sent by clients from ever reaching a log line raw; the text format escapes
them too. Secrets are never passed as fields: the key names below are redacted
as a second line of defence, and the values registered with
:func:`register_secrets` (API keys, password hashes from the config) are
scrubbed from every formatted line as a third.

:func:`log_context` attaches fields (session id, client, queue id) to every
event logged inside it, in the same asyncio task and the tasks it creates, so a
delivery task's ``api_call`` lines carry the session they belong to.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

__all__ = [
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "log_context",
    "log_event",
    "register_secrets",
    "unregister_secrets",
    "LOGGER",
]

LOGGER = logging.getLogger("smtp_bridge")

_REDACT = frozenset(
    {"app_key", "password", "password_hash", "secret", "authorization", "api_key", "token"}
)
_FIELDS_ATTR = "bridge_fields"
_CONTEXT: ContextVar[Mapping[str, Any] | None] = ContextVar("smtp_bridge_log_context", default=None)
#: Secret values never to appear in a line; shorter ones would scrub ordinary words.
#: Counted: two bridges in one process (tests) may register the same value.
_SECRETS: Counter[str] = Counter()
_MIN_SECRET_LENGTH = 6


def log_event(
    logger: logging.Logger, event: str, *, level: int = logging.INFO, **fields: Any
) -> None:
    """Log ``event`` with structured ``fields`` (one line, whatever the format).

    Fields bound with :func:`log_context` come first; explicit ones win.
    """
    if logger.isEnabledFor(level):
        bound = _CONTEXT.get()
        if bound:
            fields = {**bound, **fields}
        logger.log(level, event, extra={_FIELDS_ATTR: fields})


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every event logged inside the block, and in tasks started
    there (each task copies the context when created, so they keep it after)."""
    token = _CONTEXT.set({**(_CONTEXT.get() or {}), **fields})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def register_secrets(values: Iterable[str]) -> list[str]:
    """Scrub these values from every line formatted from now on (process-wide),
    until :func:`unregister_secrets` is given what this returned."""
    forms: list[str] = []
    for value in values:
        if len(value) >= _MIN_SECRET_LENGTH:
            # As written, and as a JSON line escapes it.
            forms.extend({value, json.dumps(value, ensure_ascii=True)[1:-1]})
    _SECRETS.update(forms)
    return forms


def unregister_secrets(forms: Iterable[str]) -> None:
    """Undo one :func:`register_secrets` (a bridge stopped, or a reload replaced them)."""
    _SECRETS.subtract(forms)
    for form in [f for f, n in _SECRETS.items() if n <= 0]:
        del _SECRETS[form]


def _scrub(line: str) -> str:
    for secret in _SECRETS:
        if secret in line:
            line = line.replace(secret, "***")
    return line


def _clean(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: ("***" if k in _REDACT else v) for k, v in fields.items() if v is not None}


class JsonFormatter(logging.Formatter):
    """``{"ts":..., "level":..., "event":..., **fields}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        # _clean() and line.update() in one pass: the same keys in the same places.
        for key, value in getattr(record, _FIELDS_ATTR, _NO_FIELDS).items():
            if value is not None:
                line[key] = "***" if key in _REDACT else value
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = record.exc_info[0].__name__
            line["traceback"] = self.formatException(record.exc_info)
        return _scrub(_JSON.encode(line))


#: json.dumps(line, default=str, ensure_ascii=True, separators=(",", ":")) builds
#: this encoder anew on every call (only the all-defaults call reuses one): the
#: same bytes for half the cost of a line's encoding (bench/README.md).
_JSON = json.JSONEncoder(default=str, ensure_ascii=True, separators=(",", ":"))
_NO_FIELDS: Mapping[str, Any] = {}


def _escape(value: Any) -> str:
    text = str(value)
    # repr-style escaping for control characters only; keeps text readable.
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


class TextFormatter(logging.Formatter):
    """Human-readable ``time level event key=value ...`` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = _clean(getattr(record, _FIELDS_ATTR, {}))
        parts = [stamp, record.levelname.lower(), _escape(record.getMessage())]
        parts += [f"{k}={_escape(v)}" for k, v in fields.items()]
        text = " ".join(parts)
        if record.exc_info and record.exc_info[0] is not None:
            text += "\n" + self.formatException(record.exc_info)
        return _scrub(text)


def configure_logging(fmt: Literal["json", "text"] = "json", level: str = "info") -> None:
    """Send smtp_bridge's log lines to stderr; quiet aiosmtpd's own chatter.

    Our lines never show the caller's file and line, thread or process, so the
    record does not look them up (the logging HOWTO's "Optimization"): a fifth of
    the cost of each line.
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    LOGGER.setLevel(level.upper())
    # aiosmtpd logs peers and raw lines at INFO/DEBUG; our own events cover it.
    # Its AUTH path also warns about its own deprecated login_data on every login.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
