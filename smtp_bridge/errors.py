"""The exceptions smtp-bridge raises: the whole tree, defined here.

A leaf module (the standard library only): every other module imports its
exceptions from here, never the other way round, so importing the tree loads
nothing else (httpx's ``_exceptions.py`` is the model)::

    Exception
    +-- BridgeError              the base: ``except BridgeError`` catches them all
        +-- ConfigError          config/        a config file is wrong; .issues lists
        |                                       every problem (ConfigIssue: file:line: key: what)
        +-- StoreError           store/         the state store failed (disk full, read-only,
        |                                       database down); .path; the reply is 451 4.3.0
        +-- StartupError         service.py     the daemon cannot start (port in use,
        |                                       open-file limit too low): exit code 2
        +-- TlsError             tls.py         smtp.tls's certificate and key cannot be
        |   (also ValueError)                   loaded (also a config error, at smtp.tls.cert)
        +-- TemplateRenderError  templating.py  a route's template failed for one
        |                                       recipient: 451 4.3.5; .field, .reason
        +-- HeaderOverrideError  templating.py  a malformed opt-in X-Template-* header:
        |                                       554 5.6.0 (the client's data is at fault)
        +-- NoRecipients         dryrun.py      a dry run (``route``, the console) has no
            (also ValueError)                   --rcpt and no To/Cc address to try

IO failures of the API are not exceptions: ``ApiClient.send`` always returns an
``ApiResult`` and ``replies.reply_for`` turns it into the SMTP reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BridgeError",
    "ConfigError",
    "ConfigIssue",
    "HeaderOverrideError",
    "NoRecipients",
    "StartupError",
    "StoreError",
    "TemplateRenderError",
    "TlsError",
]


class BridgeError(Exception):
    """Every exception smtp-bridge defines."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file, located as precisely as the YAML allows."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(BridgeError):
    """All problems found in one config file; ``str()`` lists one per line."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues


class StoreError(BridgeError):
    """A state-store failure (cannot open or reach, disk full, read-only, locked, closed).

    The message names the store (a file, or a database URL without its password)
    and the engine's error, never message content.
    """

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class StartupError(BridgeError):
    """The daemon could not start (port in use, open-file limit too low...): exit code 2.

    A state store that cannot be opened is not one: the daemon starts and answers
    451 4.3.0 until the store opens (store/deferred.py).
    """


class TlsError(BridgeError, ValueError):
    """The certificate or key cannot be used; the message says why (no secrets)."""


class TemplateRenderError(BridgeError):
    """A route's template failed to render; the reply is 451 4.3.5 (docs/replies.md)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class HeaderOverrideError(BridgeError):
    """An opt-in X-Template-* header is malformed: the client's data is at fault."""


class NoRecipients(BridgeError, ValueError):
    """Neither ``--rcpt`` nor a To/Cc address in the message (a dry run)."""
