"""Host-local claimer registration: which processes on this host hold spool claims.

Every daemon process that claims from a SQLite spool registers a file under
``<database>.owners/`` named by a random token and ``flock``-ed until it stops.
The kernel drops a dead process's lock (``kill -9`` included), so a token whose
file is missing or can be locked belongs to a process that stopped mid-attempt.
PostgreSQL has no such files: its claims are leases on the database's clock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Final

__all__ = ["dead_owners", "register_owner"]

_TOKEN_RE: Final = re.compile(r"[0-9a-f]{16}")


def register_owner(owners: Path) -> tuple[str, int]:
    """A new claimer token with its file locked; the file appears under its name locked.

    Locked before it is renamed into place, so another process never mistakes a
    claimer that is just starting for a dead one.
    """
    owners.mkdir(mode=0o700, exist_ok=True)
    token = secrets.token_hex(8)
    temporary = owners / f".{token}.new"
    fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(temporary, owners / token)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return token, fd


def dead_owners(owners: Path, tokens: Iterable[str], mine: str | None) -> list[str]:
    """Of ``tokens`` (and the files left in ``owners``), those whose process is gone."""
    with contextlib.suppress(OSError):
        tokens = {*tokens, *(p.name for p in owners.iterdir())}
    dead: list[str] = []
    for token in sorted(set(tokens)):
        if token == mine or not _TOKEN_RE.fullmatch(token):
            continue
        path = owners / token
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            dead.append(token)  # its process stopped cleanly, or another recovery ran
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # locked: that process is alive
        else:
            dead.append(token)
            with contextlib.suppress(OSError):
                path.unlink()
        finally:
            os.close(fd)
    return dead
