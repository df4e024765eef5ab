"""The cyclic garbage collector kept off the daemon's long-lived objects."""

from __future__ import annotations

import gc

__all__ = ["settle_heap"]

#: Collections of the youngest generation: every 20,000 allocations, not 700.
_GC_THRESHOLD = (20_000, 50, 100)


def settle_heap() -> None:
    """Keep the cyclic GC off the daemon's long-lived objects (modules, config).

    ``serve`` calls this once the config is loaded: what is alive then goes to
    the permanent generation (``gc.freeze``), so the collections that mail
    traffic triggers no longer walk it (bench/README: p99 60 -> 36 ms, 2-4% less
    CPU a message). A reload settles the heap again, so an old config's cycles
    are collected; a process that never called this (tests) is left alone.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLD)
