"""Queue workers: claim due spooled recipients, deliver, retry with backoff, dead-letter.

Retries are data (STYLE 9): :meth:`Spool.claim_due` counts the attempt and
leases the recipient (``delivery.claim_lease``) in one commit before the call is
made; then a :class:`~smtp_bridge.spool_attempt.SpoolAttempt` plans it with the
current config, sends it through the same :class:`~smtp_bridge.gate.ApiGate` as
SMTP sessions (breaker, the key's pace after HTTP 429s, rate limit, reply table)
and writes its end: delivered, the next try, or a dead letter. A recipient whose
attempt never finished (``kill -9``, power loss) is picked up again: when its
lease expires, or at once by the next daemon that recovers the spool's claims
(:meth:`Spool.recover_claims`).

While the breaker of the default API key is open the workers claim nothing;
when its pause is over they claim one recipient, the probe, and resume
once it is delivered. New work wakes them at once (:meth:`QueueWorker.wake`);
they also look at the spool every ``idle_poll`` seconds for changes made by
another process (``smtp-bridge queue retry``).

Each finished attempt, whatever its end, gives a token back to the
``in_flow_delay`` gate (:mod:`smtp_bridge.flow`) that queue-mode sessions take
one from per message; while the workers pause or stop, nobody waits for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

from .config import Config
from .errors import StoreError
from .flow import InFlow
from .gate import ApiGate
from .logs import log_event
from .metrics import Metrics
from .policy import session_lease
from .spool_attempt import AttemptDeps, SpoolAttempt, WorkerRuntime
from .store import MessageRecord, RecipientRecord, StateStore

__all__ = ["QueueWorker"]

log = logging.getLogger("smtp_bridge.worker")

#: Seconds between refreshes of the spool gauges.
STATS_INTERVAL = 2.0
#: Seconds between looks for what sessions that died left in flight.
RESOLVE_INTERVAL = 30.0
#: Seconds between purges of records older than ``delivery.dedup_ttl``.
PURGE_INTERVAL = 600.0


class QueueWorker:
    """Delivers the spool. ``start()`` once; ``stop(grace)`` at shutdown.

    ``runtime`` returns the current runtime (it changes on reload); ``clock`` is
    wall time, as stored in the spool.
    """

    def __init__(
        self,
        gate: ApiGate,
        store: StateStore,
        runtime: Callable[[], WorkerRuntime],
        *,
        mode: str,
        flow: InFlow,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        idle_poll: float = 1.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.mode = mode
        self.store = store
        self.gate = gate
        self.metrics = metrics
        self.clock = clock
        self.idle_poll = idle_poll
        self._runtime = runtime
        self._attempt_deps = AttemptDeps(
            gate,
            store,
            runtime,
            metrics,
            clock,
            rand,
            stopping=lambda: self._stopping,
            wake=self.wake,
        )
        self._wake = asyncio.Event()
        self.gate.on_closed.append(self.wake)  # a session's probe may close the breaker
        self.flow = flow
        self._tasks: dict[asyncio.Task[None], tuple[str, str]] = {}
        self._probe: asyncio.Task[None] | None = None
        self._stopping = False
        self._main: asyncio.Task[None] | None = None
        self._stats_at = float("-inf")
        self._purged_at = float("-inf")
        self._resolved_at = float("-inf")
        #: Attempts finished (recorded, handed back or failed) since start.
        self.attempts_done = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        if self._main is None:
            # The store was just opened and its stale rows settled (service.py):
            # the next look is one interval from now.
            self._resolved_at = self.clock()
            self._main = asyncio.get_running_loop().create_task(self._loop())
            self.flow.attach(self._delivering, self._capacity(self._runtime().config))

    def _delivering(self) -> bool:
        """Attempts are running or about to: not stopping, the default key's breaker closed."""
        return not self._stopping and self.gate.closed(self._runtime().config.app_key())

    def wake(self) -> None:
        """New work in the spool (or a slot free): look now, not at the next poll.

        Not while the breaker pauses the workers: a look would claim nothing, and
        the loop looks again when the pause ends. With the API down, a look a
        spooled message cost 2-3% of queue mode's accept CPU (bench/README.md).
        """
        if self.gate.retry_in(self._runtime().config.app_key()) > 0:
            return
        self._wake.set()

    @property
    def in_flight(self) -> int:
        """Attempts running now."""
        return len(self._tasks)

    async def wait_attempts(self, count: int) -> None:
        """Wait until ``count`` attempts in all have finished since start.

        For tests and tools that must know a spooled recipient's attempt is
        recorded, without sleeping.
        """
        if self.attempts_done >= count:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((count, future))
        try:
            await future
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove((count, future))

    async def stop(self, grace: float) -> None:
        """Claim nothing more; let attempts in flight finish within ``grace`` seconds.

        Attempts still running then are cancelled: one that had sent its call is
        recorded UNKNOWN (sent again after restart, logged as a possible
        duplicate), one that had not is handed back untouched. Everything not
        delivered stays in the spool.
        """
        self._stopping = True
        self.flow.detach()  # no attempt will give a token back: no session waits for one
        self._wake.set()
        if self._main is not None:
            await self._main
        tasks = list(self._tasks)
        if tasks:
            log_event(log, "worker_draining", in_flight=len(tasks), grace=grace)
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log_event(log, "worker_interrupted", level=logging.WARNING, attempts=len(pending))
                await asyncio.wait(pending)

    # -- the loop -------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                timeout = await self._step()
            except StoreError as exc:
                log_event(log, "worker_store_error", level=logging.ERROR, error=str(exc))
                timeout = self.idle_poll
            except Exception:
                log.exception("worker step failed")
                timeout = self.idle_poll
            if self._stopping:
                break
            if timeout is None:
                await asyncio.sleep(0)  # let the attempts just started run
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _step(self) -> float | None:
        """Claim what is due; return how long to wait before the next look (None: now)."""
        runtime = self._runtime()
        config = runtime.config
        self.gate.configure(config.api)
        now = self.clock()
        # Mail admitted but not in the spool by ``now`` may be work this step's
        # claim misses (not yet committed, or due after ``now``): see top_up.
        finished = self.flow.finished
        await self._housekeeping(now)
        capacity = self._capacity(config)
        self.flow.resize(capacity)
        free = capacity - len(self._tasks)
        if free <= 0:
            return self.idle_poll  # a finishing attempt wakes the loop
        default_key = config.app_key()
        if not self.gate.closed(default_key):
            self.flow.release_all()  # paused: the spool takes the mail at full speed
        paused_for = self.gate.retry_in(default_key)
        if paused_for > 0:
            return max(paused_for, 0.01)  # breaker open: the workers pause (docs/replies.md)
        if not self.gate.closed(default_key):
            if self._probe is not None and not self._probe.done():
                return self.idle_poll  # the probe's end wakes the loop
            limit = 1  # half-open: one recipient is the probe
        else:
            limit = free
        claimed = await self.store.claim_due(now=now, limit=limit, lease=self._lease(config))
        running = set(self._tasks.values())
        for message, record in claimed:
            if (record.queue_id, record.rcpt.lower()) in running:
                continue  # its lease ran out under a live attempt, which decides
            task = self._spawn(message, record)
            if limit == 1 and not self.gate.closed(default_key):
                self._probe = task
        if claimed and len(claimed) == limit:
            return None  # there may be more due
        if self.gate.closed(default_key):
            # Nothing more is due and slots are idle: that much can be accepted
            # at once (tokens lost to mail another process delivered come back).
            self.flow.top_up(capacity - len(self._tasks), finished)
        due = await self.store.next_due()
        if due is None:
            return self.idle_poll
        return min(max(due - self.clock(), 0.01), self.idle_poll)

    def _capacity(self, config: Config) -> int:
        # In queue mode the workers make every call; otherwise leave half of
        # the API slots to SMTP sessions, which have a client waiting.
        slots = config.api.max_concurrency
        return slots if self.mode == "queue" else max(1, slots // 2)

    def _lease(self, config: Config) -> float:
        # Renewed every third of itself while the attempt runs (SpoolAttempt._keep_claim).
        return config.delivery.claim_lease

    async def _housekeeping(self, now: float) -> None:
        if now - self._stats_at >= STATS_INTERVAL:
            self._stats_at = now
            await self.refresh_gauges()
        if now - self._resolved_at >= RESOLVE_INTERVAL:
            self._resolved_at = now
            config = self._runtime().config
            settled = await self.store.resolve_stale(older_than=2 * session_lease(config))
            if settled:
                log_event(log, "stale_settled", level=logging.WARNING, rows=settled)
        if now - self._purged_at >= PURGE_INTERVAL:
            self._purged_at = now
            removed = await self.store.purge_expired()
            if removed:
                log_event(log, "purged", rows=removed)

    async def refresh_gauges(self) -> None:
        """queue_depth, queue_oldest_age, dead_letters and breaker_open, from the store."""
        depth, oldest = await self.store.spool_stats()
        dead = await self.store.dead_letters()
        age = max(0.0, self.clock() - oldest) if oldest is not None else 0.0
        self.metrics.queue_depth.set(depth)
        self.metrics.queue_oldest_age.set(age)
        self.metrics.dead_letters.set(dead)
        self.metrics.breaker_open.set(1 if self.gate.is_open() else 0)

    def _spawn(self, message: MessageRecord, record: RecipientRecord) -> asyncio.Task[None]:
        key = (record.queue_id, record.rcpt.lower())
        attempt = SpoolAttempt(self._attempt_deps, message, record)
        task = asyncio.get_running_loop().create_task(attempt.run())
        self._tasks[task] = key
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self.flow.give()  # any end: recorded, handed back, failed to write, cancelled
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery attempt failed", exc_info=task.exception())
        self.attempts_done += 1
        for count, future in self._waiters:
            if self.attempts_done >= count and not future.done():
                future.set_result(None)
