"""The SQLite schema: its version and the migrations that reach it."""

from __future__ import annotations

from typing import Final

from ..dialect import Dialect

__all__ = [
    "DIALECT",
    "MIGRATIONS",
    "SCHEMA_VERSION",
]

#: ``PRAGMA user_version`` of the schema this module writes; ``MIGRATIONS[i]``
#: takes a database from version ``i`` to ``i + 1``.
SCHEMA_VERSION: Final = 5
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE IF NOT EXISTS messages (
            queue_id TEXT PRIMARY KEY,
            message_key TEXT NOT NULL,
            mail_from TEXT NOT NULL,
            client TEXT NOT NULL,
            user TEXT NOT NULL,
            subject TEXT NOT NULL,
            size INTEGER NOT NULL,
            received_at REAL NOT NULL,
            mode TEXT NOT NULL,
            content BLOB NULL
        )""",
        "CREATE INDEX IF NOT EXISTS messages_received ON messages (received_at)",
        """CREATE TABLE IF NOT EXISTS recipients (
            queue_id TEXT NOT NULL,
            rcpt TEXT NOT NULL,
            state TEXT NOT NULL,
            route TEXT NOT NULL DEFAULT '',
            template_id TEXT NOT NULL DEFAULT '',
            api_code INTEGER NULL,
            reply TEXT NOT NULL DEFAULT '',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt REAL NULL,
            claimed_until REAL NULL,
            updated_at REAL NOT NULL,
            error TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (queue_id, rcpt)
        )""",
        "CREATE INDEX IF NOT EXISTS recipients_due ON recipients (state, next_attempt)",
        "CREATE INDEX IF NOT EXISTS recipients_updated ON recipients (updated_at)",
        """CREATE TABLE IF NOT EXISTS dedup (
            message_key TEXT NOT NULL,
            rcpt TEXT NOT NULL,
            queue_id TEXT NOT NULL,
            state TEXT NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (message_key, rcpt)
        )""",
        "CREATE INDEX IF NOT EXISTS dedup_updated ON dedup (updated_at)",
        # Small key/value table; also the target of the /readyz write probe.
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)",
    ),
    (
        # When the recipient entered the spool (or `queue retry` put it back):
        # delivery.max_age counts from here.
        "ALTER TABLE recipients ADD COLUMN spooled_at REAL NULL",
        # The claimer token of the process holding the claim (take_ownership).
        "ALTER TABLE recipients ADD COLUMN claimed_by TEXT NULL",
    ),
    (
        # The ledger guards who may attempt a (message, recipient): QUEUED and
        # SENDING rows besides DELIVERED and UNKNOWN; SENDING holds until its lease.
        "ALTER TABLE dedup ADD COLUMN lease_until REAL NULL",
        # The process (owners/ token) whose session holds a SENDING guard: when it
        # died, the next start settles the guard at once instead of after its lease.
        "ALTER TABLE dedup ADD COLUMN owner TEXT NULL",
        "CREATE INDEX IF NOT EXISTS dedup_state ON dedup (state, lease_until)",
        "CREATE INDEX IF NOT EXISTS dedup_holder ON dedup (queue_id)",
        # A reused Message-ID with other content is a new message, logged.
        "ALTER TABLE messages ADD COLUMN message_id TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX IF NOT EXISTS messages_message_id ON messages (message_id)"
        " WHERE message_id != ''",
    ),
    (
        # The console's history (store/history.py): envelope and outcomes, never the body.
        """CREATE TABLE IF NOT EXISTS history_messages (
            queue_id TEXT PRIMARY KEY,
            received_at REAL NOT NULL,
            mail_from TEXT NOT NULL,
            rcpts TEXT NOT NULL,
            subject TEXT NOT NULL,
            message_id TEXT NOT NULL,
            client TEXT NOT NULL,
            user TEXT NOT NULL,
            size INTEGER NOT NULL,
            reply TEXT NOT NULL,
            instance TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS history_messages_received ON history_messages (received_at)",
        """CREATE TABLE IF NOT EXISTS history_attempts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            queue_id TEXT NOT NULL,
            rcpt TEXT NOT NULL,
            at REAL NOT NULL,
            route TEXT NOT NULL,
            template_id TEXT NOT NULL,
            result TEXT NOT NULL,
            api_code INTEGER NULL,
            http_status INTEGER NULL,
            api_message TEXT NOT NULL,
            latency_ms REAL NOT NULL,
            state TEXT NOT NULL,
            reply TEXT NOT NULL,
            request TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS history_attempts_message ON history_attempts (queue_id, at)",
        "CREATE INDEX IF NOT EXISTS history_attempts_at ON history_attempts (at)",
    ),
    (
        # `quotas:` counters (Quotas.take_quota): one fixed window per (quota, key).
        """CREATE TABLE IF NOT EXISTS quota_counters (
            name TEXT NOT NULL,
            key TEXT NOT NULL,
            window_start REAL NOT NULL,
            window_end REAL NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (name, key)
        )""",
        "CREATE INDEX IF NOT EXISTS quota_counters_end ON quota_counters (window_end)",
    ),
)
assert len(MIGRATIONS) == SCHEMA_VERSION

#: How SQLite spells the statements both backends share. LIKE is case-insensitive
#: for ASCII in SQLite; lower() covers the rest.
DIALECT: Final = Dialect(mark="?", arrays=False, ilike="lower({column}) LIKE lower({mark})")
