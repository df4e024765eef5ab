"""Records the console's message history without ever holding mail up.

Two hooks feed it: :func:`record_attempt` from :meth:`smtp_bridge.calls.Call.answered`
(every API attempt, sessions' and workers' alike) and :func:`record_reply` from the SMTP
handler once the client's DATA reply is known. Both only append to a buffer and
return; the buffer goes to the store in a task of its own every
:data:`FLUSH_DELAY` (one statement for many messages: with PostgreSQL a write a
message cost as much as the message's own ledger writes), or at once when
:data:`FLUSH_ROWS` rows wait, so no SMTP reply waits for it, and a write that
fails is logged and dropped: history is lost, never mail. A background task
trims what is older than ``admin.history``.

The recorder is process-wide (:func:`install`): the hooks sit in code that has no
handle on the service, and one daemon runs one recorder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

from .logs import log_event
from .store.history import History, HistoryAttempt, HistoryMessage

if TYPE_CHECKING:
    from .calls import Answer, Call
    from .delivery import IncomingMessage
    from .outcomes import ApiRequest, ApiResult
    from .policy import RecipientOutcome

__all__ = [
    "REDACTED",
    "HistoryRecorder",
    "current",
    "install",
    "record_attempt",
    "record_reply",
    "redacted_request",
    "uninstall",
]

log = logging.getLogger("smtp_bridge.history")

#: What the console shows instead of the API key.
REDACTED: Final = "***"
#: Longer string values of a request are cut: the history is not a copy of the mail.
MAX_VALUE_CHARS: Final = 500
#: How long a history row waits to be written with the others that come meanwhile.
FLUSH_DELAY: Final = 0.1
#: Rows buffered that are written at once, without waiting for the delay.
FLUSH_ROWS: Final = 500
#: How often the trimmer runs at most.
TRIM_INTERVAL: Final = 300.0

_current: HistoryRecorder | None = None


def redacted_request(request: ApiRequest, encoding: Literal["form", "json"]) -> dict[str, Any]:
    """The request's fields as sent, ``app_key`` as ``***``, long strings cut."""
    from .api import request_fields

    try:
        fields = request_fields(request, REDACTED, encoding)
    except ValueError:
        fields = {"app_key": REDACTED, "template_id": request.template_id, "to": request.to}
    cut: dict[str, Any] = _cut(fields)
    return cut


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        return value[:MAX_VALUE_CHARS] + f"… ({len(value)} chars)"
    if isinstance(value, dict):
        return {k: _cut(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cut(v) for v in value]
    return value


class HistoryRecorder:
    """Buffers history records and writes them behind the replies."""

    def __init__(
        self,
        store: History,
        *,
        retention: float,
        encoding: Callable[[], Literal["form", "json"]] = lambda: "form",
        instance: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.retention = retention
        self._encoding = encoding
        self._instance = instance if instance is not None else socket.gethostname()
        self._clock = clock
        self._messages: list[HistoryMessage] = []
        self._attempts: list[HistoryAttempt] = []
        self._timer: asyncio.TimerHandle | None = None  # the next flush, when rows wait
        self._writes: set[asyncio.Task[None]] = set()
        self._trimmer: asyncio.Task[None] | None = None
        #: Writes that failed (history lost, mail not): the console says so.
        self.failures = 0

    @property
    def enabled(self) -> bool:
        """``admin.history: 0`` keeps none."""
        return self.retention > 0

    # -- the hooks ------------------------------------------------------------------------

    def attempt(self, call: Call, result: ApiResult, answer: Answer) -> None:
        """One API call for one recipient, as its ``api_call`` line tells it (``answer``)."""
        if not self.enabled:
            return
        body = redacted_request(call.request, self._encoding())
        self._attempts.append(
            HistoryAttempt(
                queue_id=call.queue_id,
                rcpt=call.rcpt,
                at=self._clock(),
                route=call.route,
                template_id=call.request.template_id,
                api_message=result.message[:200],
                request=json.dumps(body, ensure_ascii=False),
                **answer,
            )
        )
        self._schedule()

    def reply(
        self, message: IncomingMessage, outcomes: Sequence[RecipientOutcome], reply: str
    ) -> None:
        """The message and the reply its client got; recipients decided without an API
        call in the session (spooled, no route, dropped, already delivered) get a row
        saying so."""
        if not self.enabled:
            return
        now = self._clock()
        parsed = message.parsed
        self._messages.append(
            HistoryMessage(
                queue_id=message.queue_id,
                received_at=now,
                mail_from=message.mail_from,
                rcpts=tuple(message.rcpts),
                subject=parsed.subject[:500],
                message_id=parsed.message_id[:500],
                client=message.client.ip,
                user=message.user,
                size=len(message.raw),
                reply=reply,
                instance=self._instance,
            )
        )
        for outcome in outcomes:
            if outcome.attempts:
                continue  # its attempt() rows tell it
            self._attempts.append(
                HistoryAttempt(
                    queue_id=message.queue_id,
                    rcpt=outcome.rcpt,
                    at=now,
                    route=outcome.route,
                    template_id=outcome.template_id,
                    api_code=outcome.api_code,
                    # Spooled: a worker's attempts follow as rows of their own.
                    state="queued" if outcome.spooled else outcome.state.value,
                    reply=str(outcome.reply),
                )
            )
        self._schedule()

    # -- writing ----------------------------------------------------------------------------

    def _schedule(self) -> None:
        full = len(self._messages) + len(self._attempts) >= FLUSH_ROWS
        if self._timer is not None and not full:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a test calling a hook directly): keep it for flush()
        if full:
            self._flush()
        else:
            self._timer = loop.call_later(FLUSH_DELAY, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        messages, self._messages = self._messages, []
        attempts, self._attempts = self._attempts, []
        if not messages and not attempts:
            return
        task = asyncio.get_running_loop().create_task(self._write(messages, attempts))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(
        self, messages: Sequence[HistoryMessage], attempts: Sequence[HistoryAttempt]
    ) -> None:
        try:
            await self.store.record_history(messages, attempts)
        except Exception as exc:  # history is never worth failing mail for
            self.failures += 1
            log_event(
                log,
                "history_write_failed",
                level=logging.WARNING,
                messages=len(messages),
                attempts=len(attempts),
                error=type(exc).__name__,
            )

    async def flush(self) -> None:
        """Write what is buffered and wait for every write in flight."""
        self._flush()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    # -- trimming -----------------------------------------------------------------------------

    async def trim(self) -> int:
        """Forget what is older than the retention (everything when it is 0)."""
        cutoff = self._clock() - self.retention if self.enabled else float("inf")
        removed = await self.store.trim_history(cutoff)
        if removed:
            log_event(log, "history_trimmed", rows=removed)
        return removed

    def start(self) -> None:
        """Trim now and then every few minutes, in the background."""
        self._trimmer = asyncio.get_running_loop().create_task(self._trim_loop())

    async def _trim_loop(self) -> None:
        while True:
            try:
                await self.trim()
            except Exception as exc:
                log_event(
                    log, "history_trim_failed", level=logging.WARNING, error=type(exc).__name__
                )
            # A tenth of the retention (a short one in tests), at most every 5 minutes;
            # with history off, the first trim emptied what an earlier run kept.
            await asyncio.sleep(min(TRIM_INTERVAL, max(self.retention / 10, 1.0)))

    async def close(self) -> None:
        """Stop trimming; write what is buffered."""
        if self._trimmer is not None:
            self._trimmer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._trimmer
            self._trimmer = None
        await self.flush()


# -- the process-wide hooks ---------------------------------------------------------------


def install(recorder: HistoryRecorder) -> None:
    """Make ``recorder`` the one the hooks feed."""
    global _current
    _current = recorder


def uninstall(recorder: HistoryRecorder) -> None:
    """Stop feeding ``recorder`` (if it is still the current one)."""
    global _current
    if _current is recorder:
        _current = None


def current() -> HistoryRecorder | None:
    """The installed recorder, if any."""
    return _current


def record_attempt(call: Call, result: ApiResult, answer: Answer) -> None:
    """Hook for :meth:`~smtp_bridge.calls.Call.answered`: never raises."""
    if _current is None:
        return
    try:
        _current.attempt(call, result, answer)
    except Exception:  # a history bug must not break delivery
        log.exception("history: cannot record an attempt")


def record_reply(
    message: IncomingMessage, outcomes: Sequence[RecipientOutcome], reply: str
) -> None:
    """Hook for the SMTP handler's DATA reply: never raises."""
    if _current is None:
        return
    try:
        _current.reply(message, outcomes, reply)
    except Exception:
        log.exception("history: cannot record a message")
