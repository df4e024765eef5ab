"""The ``smtp-bridge`` commands, one module per command group; cli.py parses the words.

:mod:`.serve` (``serve``, ``sandbox``), :mod:`.config_file` (``check-config``,
``schema``, ``hash-password``), :mod:`.route` (the dry run), :mod:`.send_test`,
:mod:`.queue` (``queue list|show|retry|purge``); :mod:`.common` holds what they
share: exit codes, loading the config, reporting a failure, running a coroutine.
"""

from __future__ import annotations

__all__: list[str] = []
