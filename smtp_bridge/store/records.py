"""The rows every state-store backend reads and writes, and its one error type."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from ..errors import StoreError
from ..outcomes import RecipientState

__all__ = [
    "ANONYMOUS_KEY_PREFIX",
    "Admission",
    "CLAIMABLE_STATES",
    "CONTENT_DONE_STATES",
    "DEDUP_STATES",
    "FINAL_STATES",
    "Guard",
    "GuardRequest",
    "GuardState",
    "MessageRecord",
    "Notice",
    "RecipientRecord",
    "SpoolStats",
    "StoreError",
]

#: Recipients in these states will never be attempted again.
FINAL_STATES: Final = frozenset(
    {
        RecipientState.DELIVERED,
        RecipientState.FAILED,
        RecipientState.DEAD,
        RecipientState.DROPPED,
        RecipientState.DUPLICATE,
    }
)
#: States remembered per (message key, recipient) so a client retry does not resend
#: (docs/guarantees.md, "No duplicates on client retry").
DEDUP_STATES: Final = frozenset({RecipientState.DELIVERED, RecipientState.UNKNOWN})
#: States a queue worker picks up (given spooled content and a due ``next_attempt``).
CLAIMABLE_STATES: Final = (RecipientState.RETRYING.value, RecipientState.UNKNOWN.value)
#: Final states after which a message's content is no longer needed. DEAD is not
#: one: a dead letter keeps its content so `smtp-bridge queue retry` can resend it.
CONTENT_DONE_STATES: Final = (
    RecipientState.DELIVERED.value,
    RecipientState.DROPPED.value,
    RecipientState.FAILED.value,
    RecipientState.DUPLICATE.value,
)
#: Dedup keys of messages known only by their content (no Idempotency-Key, no
#: Message-ID): remembered for ``anonymous_ttl``, not ``dedup_ttl``.
ANONYMOUS_KEY_PREFIX: Final = "sha:"


class GuardState(enum.StrEnum):
    """What the ledger holds for one (message key, recipient): who may attempt it."""

    #: Waiting in the spool under ``holder``; its worker's claim decides.
    QUEUED = "queued"
    #: A call is (or may be) in flight by ``holder`` until ``until``; after that the
    #: holder is presumed dead and its call possibly sent.
    SENDING = "sending"
    #: Delivered by ``holder``: never sent again within the TTL.
    DELIVERED = "delivered"
    #: Sent by ``holder``, answer lost: the next attempt is a possible duplicate.
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Guard:
    """The ledger's answer for one recipient when a copy asks to attempt it.

    ``acquired``: this copy now holds it (its call, or its spool row, is the one).
    ``state``/``holder``/``until``: what the ledger held before (None: nothing).
    ``possibly_sent``: the previous holder's call may have gone out (UNKNOWN, or a
    SENDING whose lease ran out): an attempt now must be logged as a possible
    duplicate, naming ``holder``.
    """

    acquired: bool
    state: GuardState | None = None
    holder: str = ""
    until: float | None = None

    @property
    def possibly_sent(self) -> bool:
        return self.acquired and self.state in (GuardState.UNKNOWN, GuardState.SENDING)


@dataclass(frozen=True, slots=True)
class GuardRequest:
    """A copy asking the ledger for guards: every backend's ``acquire`` takes one.

    ``holder``: the copy's queue id. ``state``: SENDING (its call goes out now,
    until ``until``) or QUEUED (it waits in the spool). ``ttl``: the dedup window
    of the message's key. ``owner``: the process or instance holding SENDING.
    """

    holder: str
    state: GuardState
    now: float
    ttl: float
    until: float | None = None
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """One accepted message; ``content`` is set only when it is spooled (queue/hybrid)."""

    queue_id: str
    message_key: str
    mail_from: str
    client: str
    user: str
    subject: str
    size: int
    received_at: float
    mode: str
    content: bytes | None = None
    #: The Message-ID header ("" when none), to tell a reused one from a retry.
    message_id: str = ""


@dataclass(frozen=True, slots=True)
class RecipientRecord:
    """The recorded outcome of one envelope recipient of one message.

    ``updated_at`` 0.0 means "now" (the store's clock) when written.
    """

    queue_id: str
    rcpt: str
    state: RecipientState
    route: str = ""
    template_id: str = ""
    api_code: int | None = None
    reply: str = ""
    attempts: int = 0
    next_attempt: float | None = None
    updated_at: float = 0.0
    error: str = ""
    #: When it entered the spool (None: never spooled; kept as is when updating).
    spooled_at: float | None = None


class SpoolStats(NamedTuple):
    """Recipients waiting in the spool, and when the oldest of them was spooled."""

    depth: int
    oldest: float | None


class Admission(NamedTuple):
    """What the ledger said when a message was put on record."""

    #: Lower-cased rcpt -> its guard (see :class:`Guard`).
    guards: dict[str, Guard]
    #: The queue id of an earlier message with the same Message-ID and other
    #: content within ``dedup_ttl`` ("" if none): a reused Message-ID.
    message_id_reused_by: str = ""


#: A message and its recipients to spool along with another write (a failure notice).
Notice = tuple[MessageRecord, Sequence[RecipientRecord]]
