"""File descriptors: the daemon's RLIMIT_NOFILE covers smtp.max_connections, or it
refuses to start (issue 13: a 1024 soft limit ran out under a flood)."""

from __future__ import annotations

import asyncio
import re
import resource
from collections.abc import Callable
from pathlib import Path

from test_daemon import Daemon, assert_no_traceback, bridge_command, daemon_env, write_config
from test_systemd import SERVICE_UNIT, unit_entries

from smtp_bridge.config import load_config
from smtp_bridge.fdlimit import fd_plan
from smtp_bridge.sandbox import Sandbox


def _limited(soft: int, hard: int) -> Callable[[], None]:
    def setup() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return setup


async def _start(config: Path, soft: int, hard: int) -> Daemon:
    proc = await asyncio.create_subprocess_exec(
        *bridge_command(), "serve", "--config", str(config),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=daemon_env(), preexec_fn=_limited(soft, hard),
    )  # fmt: skip
    return Daemon(proc)


def _soft_limit(pid: int) -> int:
    text = Path(f"/proc/{pid}/limits").read_text()
    found = re.search(r"^Max open files\s+(\d+)\s+(\d+)", text, re.M)
    assert found, text
    return int(found.group(1))


def _config(tmp_path: Path, sandbox: Sandbox, connections: int) -> Path:
    path = write_config(
        tmp_path / "config.yaml",
        state_dir=tmp_path / "state",
        api=f"url: {sandbox.url}\napp_key: fd-test-key",
    )
    listen = '  listen: ["127.0.0.1:0"]\n'
    text = path.read_text()
    assert listen in text
    path.write_text(text.replace(listen, f"{listen}  max_connections: {connections}\n"))
    return path


async def test_a_low_soft_limit_is_raised_to_the_hard_one(tmp_path: Path, sandbox: Sandbox) -> None:
    config = _config(tmp_path, sandbox, 1000)
    need = fd_plan(load_config(config)).total
    assert 1024 < need < 4096  # systemd's default soft limit falls short
    daemon = await _start(config, 1024, 4096)
    try:
        await daemon.port()
        _, raised = await daemon.wait_event("fd_limit_raised")
        assert raised["old"] == 1024 and raised["new"] == 4096 and raised["need"] == need
        assert _soft_limit(daemon.proc.pid) == 4096
        assert await daemon.terminate() == 0
    finally:
        await daemon.close()
    assert_no_traceback(daemon.stderr)


async def test_a_hard_limit_below_the_need_refuses_to_start(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    config = _config(tmp_path, sandbox, 1000)
    daemon = await _start(config, 1024, 1024)
    try:
        assert await daemon.wait() == 2
    finally:
        await daemon.close()
    need = fd_plan(load_config(config)).total
    assert "listening" not in daemon.stderr
    assert re.search(rf"limit \(RLIMIT_NOFILE\) is 1024 \(hard limit 1024\), below the {need}",
                     daemon.stderr), daemon.stderr  # fmt: skip
    assert "LimitNOFILE=" in daemon.stderr and "smtp.max_connections 1000" in daemon.stderr
    assert_no_traceback(daemon.stderr)


async def test_a_config_that_fits_starts_under_the_same_limit(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    config = _config(tmp_path, sandbox, 500)
    daemon = await _start(config, 1024, 1024)
    try:
        await daemon.port()
        assert await daemon.terminate() == 0
    finally:
        await daemon.close()
    assert not [e for e in daemon.events if e.get("event") == "fd_limit_raised"]


def test_the_unit_sets_a_limit_the_default_config_fits() -> None:
    unit = unit_entries(SERVICE_UNIT)
    limit = int(unit["LimitNOFILE"][-1])
    assert limit >= 65536
