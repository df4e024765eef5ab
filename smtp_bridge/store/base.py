"""The state store's interface: one small protocol per role, and the rules every backend keeps.

Callers depend on the role they use, never on a backend class: delivery (direct,
hybrid and queue sessions) on :class:`Ledger`, the spool workers on
:class:`Spool`, ``smtp-bridge queue`` on :class:`QueueAdmin`, ``/readyz`` on
:class:`Health`, the RCPT check of ``quotas:`` on :class:`Quotas`.
:class:`StateStore` is all of them plus ``close()``; a backend
(``sqlite``, ``postgres``) implements it, and ``tests/test_store_conformance.py``
holds each to the rules below.

The rules (they used to live only inside the SQL):

* **One transaction per call.** Every write method commits all it does in one
  transaction, or nothing: a caller that got no exception has its write on
  durable storage; one that got :class:`StoreError` must assume nothing was
  written (and never answer ``250`` on it).
* **Delivered is never downgraded.** The dedup ledger remembers DELIVERED and
  UNKNOWN per (message key, lower-cased recipient) for ``dedup_ttl``; once a pair
  is DELIVERED, a later UNKNOWN for it (a duplicate send whose answer was lost)
  does not replace it within the TTL.
* **Attempts never decrease.** A claim counts the attempt in the claim's own
  commit, before the call is made; a later write keeps the larger of the stored
  and the given count. Only :meth:`Spool.release_claim` (the attempt was never
  made) takes the count back.
* **A claim is a lease.** :meth:`Spool.claim_due` holds a recipient for
  ``lease`` seconds on the store's clock; :meth:`Spool.renew_claim` extends it
  while the attempt runs. After the lease, another claimer may take it. A final
  write with ``claim=True`` applies only while the claim is still the writer's
  own, so a claimer whose lease ran out cannot overwrite the one that took over.
* **One party attempts a (message, recipient) at a time.** The ledger holds a
  guard per (message key, lower-cased recipient): QUEUED by the spooled row
  that will send it, SENDING by the session or worker whose call is in flight
  (a lease on the store's clock), DELIVERED, or UNKNOWN (sent, answer lost).
  Taking a guard and writing the row it protects happen in one transaction
  (:meth:`Ledger.open_message`, :meth:`Ledger.add_message`,
  :meth:`Spool.claim_due`), so two copies, sessions, processes or instances
  never both hold it. A SENDING guard whose lease ran out, and an UNKNOWN one,
  may be taken by the next copy, which must log a possible duplicate naming
  the previous holder (:attr:`Guard.possibly_sent`).
* **Every call is on record before it is sent.** The guard says SENDING in a
  committed transaction before the API call leaves; its outcome's write moves it
  on (DELIVERED; QUEUED when the recipient waits in the spool; released when
  nothing was sent or it failed for good).
* **Keys.** A dedup key starting with ``sha:`` (content only: no
  Idempotency-Key, no Message-ID) is remembered for ``anonymous_ttl``, others
  for ``dedup_ttl``.
* **A quota never lets more through than its limit.** :meth:`Quotas.take_quota`
  reads and bumps its counter in one transaction, so instances sharing a store
  (PostgreSQL) share the count, and concurrent takers never both get the last unit.
* **Content lives as long as someone may send it.** A spooled message keeps its
  content until every recipient is delivered, dropped or failed; dead letters
  keep it so ``queue retry`` can resend.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol, runtime_checkable

from ..outcomes import RecipientState
from .records import Admission, Guard, MessageRecord, Notice, RecipientRecord, SpoolStats

__all__ = ["Health", "Ledger", "QueueAdmin", "Quotas", "Spool", "StateStore"]


class Ledger(Protocol):
    """What delivery writes and reads around its API calls."""

    @property
    def dedup_ttl(self) -> float:
        """Seconds a delivered/unknown (message, recipient) pair is remembered."""
        ...

    async def previous_outcomes(
        self, message_key: str, rcpts: Iterable[str]
    ) -> dict[str, RecipientState]:
        """For a client retry: lower-cased rcpt -> DELIVERED, or UNKNOWN (sent with the
        answer lost, or SENDING by a holder whose lease ran out), within the key's TTL.

        Recipients with nothing to say (none, QUEUED, live SENDING) are absent.
        """
        ...

    async def open_message(
        self, message: MessageRecord, rcpts: Sequence[str], *, lease: float
    ) -> Admission:
        """Before the calls of direct and hybrid mode, in one commit: the message, its
        recipients (RETRYING, nothing sent yet), and the guards of the recipients it
        may send (SENDING for ``lease`` seconds); the others' guards say who has them.

        The commit is also the proof that the store takes writes before anything is sent.
        """
        ...

    async def acquire(
        self, message_key: str, rcpts: Sequence[str], *, queue_id: str, lease: float
    ) -> dict[str, Guard]:
        """Ask again, after waiting, for guards another copy held (SENDING for ``lease``)."""
        ...

    async def record_outcomes(
        self,
        queue_id: str,
        recipients: Sequence[RecipientRecord],
        *,
        message_key: str,
        spool: bytes | None = None,
        mode: str = "hybrid",
    ) -> None:
        """After the calls: every recipient's row in one commit, as :meth:`update_recipient`.

        ``spool``: the message's content, put in the spool in the same commit (hybrid
        mode's transient recipients, due at their ``next_attempt``), before the
        ``250``. A message that does not exist is a StoreError.
        """
        ...

    async def add_message(
        self, message: MessageRecord, recipients: Sequence[RecipientRecord]
    ) -> Admission:
        """Record a message and its recipients in one transaction (queue mode's spool).

        Spooled recipients (RETRYING or UNKNOWN with a ``next_attempt``) take their
        guard as QUEUED; one whose guard another copy holds is written DUPLICATE
        (``error`` names the holder) and not spooled, and content no recipient
        waits for is not kept. Others are written as :meth:`update_recipient`
        does. A ``queue_id`` that exists already is a StoreError.
        """
        ...

    async def update_recipient(
        self,
        record: RecipientRecord,
        *,
        message_key: str,
        notice: Notice | None = None,
        claim: bool = False,
    ) -> bool:
        """Set one recipient row (inserting it if missing) and release its claim.

        DELIVERED or UNKNOWN also writes the dedup row in the same transaction
        (never downgrading DELIVERED). ``attempts`` keeps the larger count;
        ``spooled_at`` None keeps the stored value. ``notice`` (a failure notice to
        the sender) is spooled in the same transaction, so a dead letter never goes
        without its notice. Once every recipient of a spooled message is delivered,
        dropped or failed, its content is dropped.

        ``claim``: the write settles this store's claim on the row; it applies only
        if the claim is still ours (returns False and writes nothing otherwise).
        """
        ...


class Spool(Protocol):
    """What the spool workers use: claims, their leases, and housekeeping."""

    async def claim_due(
        self, *, now: float, limit: int, lease: float
    ) -> list[tuple[MessageRecord, RecipientRecord]]:
        """Claim up to ``limit`` spooled recipients due at ``now`` for ``lease`` seconds.

        Due means RETRYING or UNKNOWN, with spooled content, ``next_attempt <= now``
        and no live claim. Each claimed row gets its lease and ``attempts + 1`` in
        the same transaction, before the attempt is made; the returned records show
        the incremented count. Claimers on several hosts never get the same row.
        """
        ...

    async def renew_claim(self, queue_id: str, rcpt: str, *, lease: float) -> bool:
        """Extend our claim on a recipient by ``lease`` seconds from now; False if lost."""
        ...

    async def release_claim(self, queue_id: str, rcpt: str, *, next_attempt: float) -> None:
        """Hand a claimed recipient back unattempted (the breaker said no, or shutdown).

        The attempt counted by :meth:`claim_due` is taken back.
        """
        ...

    async def recover_claims(self) -> int:
        """At start: claims of claimers known to have died become UNKNOWN and due now.

        The call may have gone out, so the next attempt logs a possible duplicate.
        Backends that cannot tell a dead claimer from a live one leave it to the
        lease. Returns how many recipients were released.
        """
        ...

    async def resolve_stale(self, *, older_than: float) -> int:
        """Settle what sessions that died left behind (at start, and now and then).

        A session's SENDING guard whose lease ran out becomes UNKNOWN, and so does its
        recipient row (the call may have been sent); a session's recipient rows left
        RETRYING without spooled content for ``older_than`` seconds become FAILED
        (that copy sent nothing and its client was never answered). Never shown as
        retrying forever. Returns the rows settled.
        """
        ...

    async def next_due(self) -> float | None:
        """When the next spooled recipient becomes claimable, or None if none waits."""
        ...

    async def purge_expired(self, now: float | None = None) -> int:
        """Forget what is older than ``dedup_ttl``; return the number of rows removed.

        Dead letters with content stay until ``queue retry`` or ``queue purge``.
        """
        ...

    async def spool_stats(self) -> SpoolStats:
        """Recipients waiting in the spool and the oldest one's ``spooled_at``."""
        ...

    async def dead_letters(self) -> int:
        """How many recipients are dead letters (the ``dead_letters`` gauge)."""
        ...

    def on_spooled(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) when any instance spools work.

        For several instances on one store: a message spooled (or retried) by
        one wakes the workers of all at once instead of at their next poll.
        Backends with one host only (SQLite) may never call it: the process
        wakes its own workers. A wake-up is a hint, never the only trigger.
        """
        ...


class QueueAdmin(Protocol):
    """The operations of ``smtp-bridge queue`` (and the console)."""

    async def get_message(
        self, queue_id: str
    ) -> tuple[MessageRecord, list[RecipientRecord]] | None:
        """The message ``queue_id`` with its recipients (by address), or None."""
        ...

    async def list_queue(
        self, *, dead: bool = False, limit: int = 1000
    ) -> list[tuple[MessageRecord, RecipientRecord]]:
        """Spooled recipients waiting for delivery (or dead letters), oldest first.

        The message records come without content; ``content`` is ``b""`` when the
        message still has it (a dead letter that can be retried), else None.
        """
        ...

    async def list_recipients(
        self, *, states: Collection[RecipientState] | None = None, limit: int = 100
    ) -> list[RecipientRecord]:
        """Recipient records, most recently updated first, optionally only in ``states``."""
        ...

    async def retry(self, queue_id: str | None = None) -> tuple[int, int]:
        """Dead letters (of ``queue_id``, or all) back into the spool, due now.

        Waiting recipients of ``queue_id`` become due now as well. Returns (recipients
        put back or hurried, dead letters that cannot be resent: no content).
        """
        ...

    async def purge(self, queue_id: str | None = None, *, dead: bool = False) -> int:
        """Delete message ``queue_id``, or (``dead``) every dead letter.

        Returns the number of recipient rows deleted; the dedup memory is kept.
        """
        ...

    async def counts(self) -> dict[str, int]:
        """Recipients per state (every state present, zero when none)."""
        ...


class Quotas(Protocol):
    """What the RCPT check of ``quotas:`` uses: shared, atomic counters."""

    async def take_quota(
        self, name: str, key: str, *, window: float, limit: int, now: float | None = None
    ) -> bool:
        """Count one recipient against quota ``name`` for ``key``; False (nothing
        counted) when ``limit`` recipients were counted in the current window already.

        One transaction. A fixed window per (name, key): it starts at the first
        recipient counted (``now``, default the store's clock) and lasts ``window``
        seconds; the first take at or after its end starts a new window with a
        count of 1. Within a window the count is raised only while it is below
        ``limit``. Counters whose window has ended may be dropped by
        :meth:`Spool.purge_expired`.
        """
        ...


class Health(Protocol):
    """What ``/readyz`` asks."""

    async def check_writable(self) -> bool:
        """A cheap write probe: True when a transaction commits."""
        ...


@runtime_checkable
class StateStore(Ledger, Spool, QueueAdmin, Quotas, Health, Protocol):
    """A whole backend: every role, a name for messages, and ``close()``."""

    @property
    def name(self) -> str:
        """What to call the store in logs and errors (a path, or a URL without password)."""
        ...

    async def close(self) -> None:
        """Finish queued writes and release every connection."""
        ...
