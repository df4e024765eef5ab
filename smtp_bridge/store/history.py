"""The console's message history: a role of its own beside the ledger and the spool.

What the operator asks most is "what happened to the mail app X sent at 10:42?".
The history answers it from the state store, so every instance sharing a
PostgreSQL store shows one view. It keeps a message's envelope, subject, route,
outcomes, API answers, the request as sent (``app_key`` as ``***``) and the
client's SMTP reply, never the body, for ``admin.history``.

Rules every backend keeps:

* **Writes never hold mail up.** Callers do not await :meth:`History.record_history`
  before answering the client (:mod:`smtp_bridge.history` buffers and sends it
  behind the reply); a failed write loses history, never mail.
* **A message row is replaced whole.** Recording the same ``queue_id`` again keeps
  the last row; attempts are only ever added.
* **Search is case-insensitive substring** on sender, recipients and subject, and
  exact on queue id and Message-ID (with or without its angle brackets).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

__all__ = [
    "HISTORY_ATTEMPT_COLUMNS",
    "HISTORY_MESSAGE_COLUMNS",
    "ActivityBucket",
    "History",
    "HistoryAttempt",
    "HistoryEntry",
    "HistoryMessage",
    "activity_buckets",
    "attempt_row",
    "history_entries",
    "like_anywhere",
    "message_from_row",
    "message_row",
]


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    """One accepted message as the console shows it: the envelope, never the body."""

    queue_id: str
    received_at: float
    mail_from: str
    rcpts: tuple[str, ...]
    subject: str = ""
    message_id: str = ""
    client: str = ""
    user: str = ""
    size: int = 0
    #: The SMTP reply the client got to DATA.
    reply: str = ""
    #: Which instance took it (the host name): several share one store.
    instance: str = ""


@dataclass(frozen=True, slots=True)
class HistoryAttempt:
    """One API call for one recipient (or a decision without a call: no route, dedup)."""

    queue_id: str
    rcpt: str
    at: float
    route: str = ""
    template_id: str = ""
    #: ``ResultKind`` value: ok, api_error, not_sent, unknown, http_error... ("" without a call)
    result: str = ""
    api_code: int | None = None
    http_status: int | None = None
    #: The API's own message text (its ``msg``), short.
    api_message: str = ""
    latency_ms: float = 0.0
    #: ``RecipientState`` after this attempt, or ``queued`` (spooled at DATA, no call yet).
    state: str = ""
    #: The SMTP reply this outcome makes.
    reply: str = ""
    #: The request as sent, JSON, with ``app_key`` as ``***``.
    request: str = ""


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """A message and each recipient's latest attempt: a line of the console's list."""

    message: HistoryMessage
    latest: dict[str, HistoryAttempt] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ActivityBucket:
    """One slice of the console's plot."""

    start: float
    messages: int = 0
    delivered: int = 0
    failed: int = 0


@runtime_checkable
class History(Protocol):
    """What the console reads and :mod:`smtp_bridge.history` writes."""

    async def record_history(
        self, messages: Sequence[HistoryMessage], attempts: Sequence[HistoryAttempt]
    ) -> None:
        """In one transaction: upsert ``messages`` by queue id, append ``attempts``."""
        ...

    async def search_history(
        self, query: str = "", *, limit: int = 50, before: float | None = None
    ) -> list[HistoryEntry]:
        """Messages newest first (``received_at < before`` when given), matching ``query``
        (every message when empty), each with its recipients' latest attempts."""
        ...

    async def history_message(
        self, queue_id: str
    ) -> tuple[HistoryMessage | None, list[HistoryAttempt]]:
        """One message (None if unknown) and all its attempts, oldest first."""
        ...

    async def history_activity(self, since: float, bucket: float) -> list[ActivityBucket]:
        """Messages received and attempts made since ``since``, in ``bucket``-second
        slices (only the non-empty ones, oldest first): of the attempts that called the
        API (``result`` not empty), ``delivered`` counts those whose state is delivered,
        ``failed`` the others."""
        ...

    async def trim_history(self, before: float) -> int:
        """Forget messages received and attempts made before ``before``; rows removed."""
        ...


# -- the row shapes and helpers every backend shares ------------------------------

#: The columns of ``history_messages`` and ``history_attempts``, in the order of
#: :func:`message_row` and :func:`attempt_row` (``"user"`` quoted for PostgreSQL).
HISTORY_MESSAGE_COLUMNS: Final = (
    'queue_id, received_at, mail_from, rcpts, subject, message_id, client, "user", size, reply,'
    " instance"
)
HISTORY_ATTEMPT_COLUMNS: Final = (
    "queue_id, rcpt, at, route, template_id, result, api_code, http_status, api_message, "
    "latency_ms, state, reply, request"
)


def message_row(m: HistoryMessage) -> tuple[Any, ...]:
    """``m`` as the history_messages columns (recipients newline-joined)."""
    rcpts = "\n".join(m.rcpts)
    return (m.queue_id, m.received_at, m.mail_from, rcpts, m.subject, m.message_id,
            m.client, m.user, m.size, m.reply, m.instance)  # fmt: skip


def attempt_row(a: HistoryAttempt) -> tuple[Any, ...]:
    """``a`` as the history_attempts columns (their order is the dataclass's)."""
    return (a.queue_id, a.rcpt, a.at, a.route, a.template_id, a.result, a.api_code,
            a.http_status, a.api_message, a.latency_ms, a.state, a.reply, a.request)  # fmt: skip


def message_from_row(row: Sequence[Any]) -> HistoryMessage:
    """A HistoryMessage from the history_messages columns."""
    (queue_id, received_at, mail_from, rcpts, subject, message_id, client, user, size, reply,
     instance) = row  # fmt: skip
    return HistoryMessage(
        queue_id=queue_id,
        received_at=received_at,
        mail_from=mail_from,
        rcpts=tuple(rcpts.split("\n")) if rcpts else (),
        subject=subject,
        message_id=message_id,
        client=client,
        user=user,
        size=size,
        reply=reply,
        instance=instance,
    )


def like_anywhere(text: str) -> str:
    """A LIKE pattern (ESCAPE '\\') for ``text`` anywhere, its wildcards taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def history_entries(
    messages: Sequence[HistoryMessage], attempts: Iterable[HistoryAttempt]
) -> list[HistoryEntry]:
    """Each message with its recipients' latest attempts (of ``attempts`` oldest
    first per message, the later wins)."""
    latest: dict[str, dict[str, HistoryAttempt]] = {m.queue_id: {} for m in messages}
    for attempt in attempts:
        latest[attempt.queue_id][attempt.rcpt] = attempt
    return [HistoryEntry(m, latest[m.queue_id]) for m in messages]


def activity_buckets(
    messages: Iterable[Sequence[Any]],
    attempts: Iterable[Sequence[Any]],
    since: float,
    bucket: float,
) -> list[ActivityBucket]:
    """The non-empty buckets, oldest first, from rows of (slot, messages received)
    and (slot, attempts delivered, attempts that called the API)."""
    found: dict[int, list[int]] = {}
    for slot, count in messages:
        found.setdefault(int(slot), [0, 0, 0])[0] = int(count)
    for slot, delivered, total in attempts:
        counts = found.setdefault(int(slot), [0, 0, 0])
        counts[1] = int(delivered)
        counts[2] = int(total) - int(delivered)
    return [ActivityBucket(since + slot * bucket, *found[slot]) for slot in sorted(found)]
