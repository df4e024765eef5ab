"""Once means once, the short version of ``bench/chaos.py`` (issue 11).

Each case runs the real daemon (``bench/chaos_daemon.py serve``: a store whose
commits fail now and then) against the flaky in-process sandbox, with SMTP
clients that resend some messages, for a few seconds; the kill cases SIGKILL
it once and restart it on the same state_dir. The drain waits on the
sandbox's count and the daemon's log lines, bounded. Asserted: nothing
accepted is lost, every duplicate the API took is logged as a
``possible_duplicate``, and without kills (and without answers the API loses)
there is no duplicate at all.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
chaos: Any = importlib.import_module("chaos")

MODES = ["direct", "hybrid", "queue"]


def check(result: Any) -> None:
    print("\n" + result.report())
    assert result.accepted > 0, result.report()
    assert result.lost == [], result.report()
    assert result.still_spooled == [], result.report()
    assert result.unlogged == [], result.report()
    assert result.unexplained == [], result.report()


async def run_modes(tmp_path: Path, **options: Any) -> list[Any]:
    """One run per mode, the three at once (each its own daemon, sandbox and clients).

    At once because a session cut by a kill holds its guard for its whole lease
    (at least ``GUARD_MARGIN``, 10 s) before a resend may take it over: run one
    after the other, the kill cases alone would take over 40 s.
    """
    runs = [
        chaos.run_mode(chaos.Options(mode=mode, workdir=tmp_path / mode, **options))
        for mode in MODES
    ]
    return list(await asyncio.gather(*runs))


async def test_no_kills_no_loss_no_duplicate(tmp_path: Path) -> None:
    # No answer lost by the API: then not one (message, recipient) may reach it twice,
    # whatever the resends, the 503s, resets and hangs, and the failing commits.
    results = await run_modes(
        tmp_path, seconds=2.5, kills=0, seed=11, clients=4, lost_answers=0.0,
        commit_failure=0.05, drain=15.0,
    )  # fmt: skip
    for result in results:
        check(result)
        assert result.duplicated == {}, result.report()
        assert result.counters.get("injected_commit_failures", 0) > 0  # the store did fail
        copies = result.load.get("resent_back_to_back", 0) + result.load.get(
            "resent_during_call", 0
        )
        assert copies > 0, result.report()


async def test_a_kill_loses_nothing_and_logs_every_duplicate(tmp_path: Path) -> None:
    results = await run_modes(
        tmp_path, seconds=3.0, kills=1, seed=12, clients=4, lost_answers=0.01,
        commit_failure=0.03, drain=25.0,
    )  # fmt: skip
    for result in results:
        check(result)
        assert result.kills == 1
        # Duplicates only for calls in flight at the kill: at most api.max_concurrency
        # (16) in the workers, and the 4 clients' sessions.
        assert len(result.duplicated) - len(result.by_answer_lost) <= 16 + 4, result.report()
