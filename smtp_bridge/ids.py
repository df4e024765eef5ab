"""The queue id: one generator for the SMTP sessions and for delivery's own notices."""

from __future__ import annotations

import secrets
import time

__all__ = ["new_queue_id"]


def new_queue_id() -> str:
    """A short, time-ordered, unguessable id: what operators grep for."""
    return f"{int(time.time() * 1000):011X}{secrets.token_hex(3).upper()}"
