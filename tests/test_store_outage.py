"""The daemon starts on a state store it cannot open, answers 451 4.3.0, says so in
/readyz, and recovers by itself once the store can be opened (issue 13)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_daemon import (
    WAIT,
    Daemon,
    assert_no_traceback,
    daemon_env,
    make_message,
    send,
    write_config,
)

from smtp_bridge.config import load_config
from smtp_bridge.sandbox import Sandbox
from smtp_bridge.store import open_store


def _config(tmp_path: Path, sandbox: Sandbox, state_dir: Path) -> Path:
    path = write_config(
        tmp_path / "config.yaml",
        state_dir=state_dir,
        api=f"url: {sandbox.url}\napp_key: outage-test-key",
    )
    path.write_text(path.read_text().replace("listen: null", 'listen: "127.0.0.1:0"'))
    return path


async def _readyz(address: str) -> tuple[int, dict[str, object]]:
    async with httpx.AsyncClient(timeout=WAIT) as client:
        response = await client.get(f"http://{address}/readyz")
    return response.status_code, response.json()


async def _outage_and_recovery(
    tmp_path: Path, sandbox: Sandbox, state_dir: Path, fix: object
) -> None:
    config = _config(tmp_path, sandbox, state_dir)
    daemon = await Daemon.start("serve", "--config", str(config), env=daemon_env())
    try:
        port = await daemon.port()  # started, and greets, although the store is down
        _, down = await daemon.wait_event("store_unavailable")
        assert down["level"] == "error" and str(state_dir) in down["store"]
        _, admin = await daemon.wait_event("admin_listening")
        status, body = await _readyz(admin["address"])
        assert status == 503 and body["failed"] == ["store"], body
        code, text = await send(port, message=make_message("While the disk is down"))
        assert (code, text.split()[0]) == (451, "4.3.0"), text
        assert sandbox.sent() == []  # nothing went out without its ledger row

        assert callable(fix)
        fix()
        await daemon.wait_event("store_opened")
        status, body = await _readyz(admin["address"])
        assert status == 200, body
        code, text = await send(port, message=make_message("After the repair"))
        assert code == 250, text
        assert [r["to"] for r in sandbox.sent()] == ["bob@example.org"]
        assert await daemon.terminate() == 0
    finally:
        await daemon.close()
    assert_no_traceback(daemon.stderr)
    for line in daemon.lines:  # every line JSON, the store errors included
        json.loads(line)


async def test_starts_on_a_store_that_cannot_be_created_then_recovers(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    # A regular file where the state directory's parent should be: mkdir and
    # open fail with ENOTDIR, even for root (chmod would not stop root).
    blocker = tmp_path / "disk"
    blocker.write_text("not a directory\n")

    def repair() -> None:
        blocker.unlink()
        blocker.mkdir()

    await _outage_and_recovery(tmp_path, sandbox, blocker / "state", repair)


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted read-only (writes fail even for root); skipped without mount rights."""
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=4m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if shutil.which("mount") is None or done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace')}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _remount(mount: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], check=True)


@pytest.mark.parametrize("existing", [False, True], ids=["new-store", "existing-store"])
async def test_starts_on_a_read_only_disk_then_recovers_when_remounted(
    tmp_path: Path, sandbox: Sandbox, read_only_mount: Path, existing: bool
) -> None:
    state_dir = read_only_mount / "state"
    if existing:  # the store of an earlier run, then the disk went read-only
        _remount(read_only_mount, "rw")
        config = load_config(_config(tmp_path, sandbox, state_dir))
        store = await open_store(config.delivery)
        await store.close()
        _remount(read_only_mount, "ro")
    await _outage_and_recovery(
        tmp_path, sandbox, state_dir, lambda: _remount(read_only_mount, "rw")
    )


async def test_in_process_store_proxy_refuses_until_open(tmp_path: Path) -> None:
    from smtp_bridge.store import StateStore, StoreError
    from smtp_bridge.store.deferred import DeferredStore

    opened: list[bool] = []
    attempts = asyncio.Event()

    async def opener() -> StateStore:
        attempts.set()
        raise StoreError("disk full")

    store = DeferredStore(opener, name="test", dedup_ttl=60.0, on_open=lambda: opened.append(True))
    assert isinstance(store, StateStore)
    assert not await store.start()
    with pytest.raises(StoreError, match="not open: disk full"):
        await store.counts()
    assert not await store.check_writable() and not opened
    await store.close()
