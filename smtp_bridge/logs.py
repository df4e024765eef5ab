"""One log line per event, JSON by default (journald), with bound context.

Callers log ``log_event(logger, "delivered", queue_id=..., rcpt=...)``; the
formatter renders the fields. JSON escaping keeps CR, LF and terminal escapes
sent by clients from ever reaching a log line raw; the text format escapes
them too. Secrets are never passed as fields: the key names below are redacted
as a second line of defence.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging", "log_event", "LOGGER"]

LOGGER = logging.getLogger("smtp_bridge")

_REDACT = frozenset({"app_key", "password", "password_hash", "secret", "authorization"})
_FIELDS_ATTR = "bridge_fields"


def log_event(
    logger: logging.Logger, event: str, *, level: int = logging.INFO, **fields: Any
) -> None:
    """Log ``event`` with structured ``fields`` (one line, whatever the format)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={_FIELDS_ATTR: fields})


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
        line.update(_clean(getattr(record, _FIELDS_ATTR, {})))
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = record.exc_info[0].__name__
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=True, separators=(",", ":"))


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
        return text


def configure_logging(fmt: Literal["json", "text"] = "json", level: str = "info") -> None:
    """Send smtp_bridge's log lines to stderr; quiet aiosmtpd's own chatter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    LOGGER.setLevel(level.upper())
    # aiosmtpd logs peers and raw lines at INFO/DEBUG; our own events cover it.
    # Its AUTH path also warns about its own deprecated login_data on every login.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
