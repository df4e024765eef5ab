"""``smtp-bridge`` with a state store whose commits fail now and then: the chaos harness's disk.

Run as ``python bench/chaos_daemon.py serve --config F``. With
``CHAOS_COMMIT_FAILURE`` (a probability) set, it wraps
``GroupCommitWriter.commit`` -- the seam the writer keeps for fault injection
-- so that commit raises SQLite's ``disk I/O error`` before ``COMMIT``: the
writer rolls the batch back and every caller of that batch gets
``StoreError``, exactly as on a real I/O error (nothing written, nothing
reported as written). Each injected failure is one stderr line
``chaos: injected commit failure`` (not JSON, so log readers skip it).
Nothing in ``smtp_bridge/`` changes; without the variable this is the plain
daemon.
"""

from __future__ import annotations

import os
import random
import sqlite3
import sys

from smtp_bridge import cli
from smtp_bridge.store.sqlite.writer import GroupCommitWriter

__all__ = ["install", "main"]

#: The stderr line written per injected failure (the harness counts them).
MARK = "chaos: injected commit failure"


def install(rate: float, seed: int) -> None:
    """Make ``rate`` of the writer's commits fail, from ``seed``."""
    rng = random.Random(seed)
    original = GroupCommitWriter.commit

    def commit(self: GroupCommitWriter, conn: sqlite3.Connection) -> None:
        if rng.random() < rate:
            print(MARK, file=sys.stderr, flush=True)
            raise sqlite3.OperationalError("disk I/O error (chaos: injected)")
        original(self, conn)

    GroupCommitWriter.commit = commit  # type: ignore[method-assign]


def main() -> int:
    rate = float(os.environ.get("CHAOS_COMMIT_FAILURE", "0") or 0)
    if rate > 0:
        install(rate, int(os.environ.get("CHAOS_SEED", "0")))
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
