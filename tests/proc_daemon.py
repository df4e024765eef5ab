"""``smtp-bridge serve`` as a subprocess read from threads, for tests that are not async
(the browser tests: Playwright's sync API runs its own loop)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
from typing import Any

WAIT = 15.0


class Daemon:
    """``smtp-bridge serve --sandbox`` in a subprocess; its stdout and log lines collected."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        env = dict(env if env is not None else os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smtp_bridge", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        self.out: queue.Queue[str] = queue.Queue()
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_out, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.put(line.decode(errors="replace").rstrip("\n"))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.stderr.append(line)
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    self.events.put(json.loads(line))

    def line(self, prefix: str) -> str:
        """The next stdout line starting with ``prefix``."""
        while True:
            try:
                line = self.out.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError("\n".join(self.stderr)) from None
            if line.startswith(prefix):
                return line

    def event(self, name: str) -> dict[str, Any]:
        """The next log event ``name``."""
        while True:
            try:
                event = self.events.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(f"no {name!r}:\n" + "\n".join(self.stderr)) from None
            if event.get("event") == name:
                return event

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for reader in self._readers:
            reader.join(WAIT)  # they end at the pipes' EOF
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
