"""The PostgreSQL schema: its migrations, and applying them safely at open.

Several instances may start at once on an empty database: each applies the
migrations under one transaction-scoped advisory lock, so the first creates the
tables and the others find them made. Text keys use the "C" collation so rows
sort as SQLite's do (by code point) whatever the database's locale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from ..dialect import Dialect
from ..records import StoreError

if TYPE_CHECKING:
    from psycopg import AsyncConnection

__all__ = [
    "DIALECT",
    "GUARDS_HELD",
    "MIGRATIONS",
    "MIGRATION_LOCK",
    "SCHEMA_VERSION",
    "migrate",
]

#: The key of the advisory lock the migrations run under ("smtpbrdg" in ASCII).
MIGRATION_LOCK: Final = 0x736D_7470_6272_6467

#: The SQLSTATE of ``smtp_bridge_guards_held()`` (a class of our own).
GUARDS_HELD: Final = "SB001"

#: ``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE messages (
            queue_id text COLLATE "C" PRIMARY KEY,
            message_key text COLLATE "C" NOT NULL,
            mail_from text NOT NULL,
            client text NOT NULL,
            "user" text NOT NULL,
            subject text NOT NULL,
            size bigint NOT NULL,
            received_at double precision NOT NULL,
            mode text NOT NULL,
            content bytea NULL,
            message_id text NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX messages_received ON messages (received_at)",
        # A reused Message-ID with other content is a new message, logged.
        "CREATE INDEX messages_message_id ON messages (message_id) WHERE message_id <> ''",
        """CREATE TABLE recipients (
            queue_id text COLLATE "C" NOT NULL,
            rcpt text COLLATE "C" NOT NULL,
            state text NOT NULL,
            route text NOT NULL DEFAULT '',
            template_id text NOT NULL DEFAULT '',
            api_code integer NULL,
            reply text NOT NULL DEFAULT '',
            attempts integer NOT NULL DEFAULT 0,
            next_attempt double precision NULL,
            claimed_until double precision NULL,
            claimed_by text NULL,
            updated_at double precision NOT NULL,
            error text NOT NULL DEFAULT '',
            spooled_at double precision NULL,
            PRIMARY KEY (queue_id, rcpt)
        )""",
        "CREATE INDEX recipients_due ON recipients (state, next_attempt)",
        "CREATE INDEX recipients_updated ON recipients (updated_at)",
        """CREATE TABLE dedup (
            message_key text COLLATE "C" NOT NULL,
            rcpt text COLLATE "C" NOT NULL,
            queue_id text COLLATE "C" NOT NULL,
            state text NOT NULL,
            updated_at double precision NOT NULL,
            lease_until double precision NULL,
            owner text NULL,
            PRIMARY KEY (message_key, rcpt)
        )""",
        "CREATE INDEX dedup_updated ON dedup (updated_at)",
        "CREATE INDEX dedup_state ON dedup (state, lease_until)",
        "CREATE INDEX dedup_holder ON dedup (queue_id)",
        # Small key/value table; also the target of the /readyz write probe.
        "CREATE TABLE meta (key text PRIMARY KEY, value text NULL)",
    ),
    (
        # `quotas:` counters (Quotas.take_quota): one fixed window per (quota, key).
        """CREATE TABLE quota_counters (
            name text COLLATE "C" NOT NULL,
            key text COLLATE "C" NOT NULL,
            window_start double precision NOT NULL,
            window_end double precision NOT NULL,
            count integer NOT NULL,
            PRIMARY KEY (name, key)
        )""",
        "CREATE INDEX quota_counters_end ON quota_counters (window_end)",
    ),
    (
        # The console's history (store/history.py): envelope and outcomes, never the body.
        """CREATE TABLE history_messages (
            queue_id text COLLATE "C" PRIMARY KEY,
            received_at double precision NOT NULL,
            mail_from text NOT NULL,
            rcpts text NOT NULL,
            subject text NOT NULL,
            message_id text NOT NULL,
            client text NOT NULL,
            "user" text NOT NULL,
            size bigint NOT NULL,
            reply text NOT NULL,
            instance text NOT NULL
        )""",
        "CREATE INDEX history_messages_received ON history_messages (received_at)",
        """CREATE TABLE history_attempts (
            id bigserial PRIMARY KEY,
            queue_id text COLLATE "C" NOT NULL,
            rcpt text COLLATE "C" NOT NULL,
            at double precision NOT NULL,
            route text NOT NULL,
            template_id text NOT NULL,
            result text NOT NULL,
            api_code integer NULL,
            http_status integer NULL,
            api_message text NOT NULL,
            latency_ms double precision NOT NULL,
            state text NOT NULL,
            reply text NOT NULL,
            request text NOT NULL
        )""",
        "CREATE INDEX history_attempts_message ON history_attempts (queue_id, at)",
        "CREATE INDEX history_attempts_at ON history_attempts (at)",
    ),
    (
        # open_message's one statement for a new message stops with this error when
        # a guard it wants has a row, so nothing of it is kept (store/postgres/ledger.py).
        f"""CREATE FUNCTION smtp_bridge_guards_held() RETURNS text LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'a guard of this message has a row'
                USING ERRCODE = '{GUARDS_HELD}';
        END $$""",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

#: How PostgreSQL spells the statements both backends share.
DIALECT: Final = Dialect(mark="%s", arrays=True, ilike="{column} ILIKE {mark}")


async def migrate(conn: AsyncConnection[Any], name: str) -> int:
    """Bring the database of ``conn`` to :data:`SCHEMA_VERSION` in one transaction.

    Returns the version found. A database newer than this code is refused: an
    older smtp-bridge must not write rows it does not understand.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        cursor = await conn.execute("SELECT max(version) FROM schema_version")
        row = await cursor.fetchone()
        version = int(row[0]) if row is not None and row[0] is not None else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"cannot open state store {name}: schema version {version} is newer"
                f" than this smtp-bridge supports ({SCHEMA_VERSION})"
            )
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                await conn.execute(statement)
        if version != SCHEMA_VERSION:
            await conn.execute("DELETE FROM schema_version")
            await conn.execute(
                "INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,)
            )
    return version
