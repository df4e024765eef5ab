"""The daemon's side of systemd: sd_notify(3), the watchdog, socket activation
(sd_listen_fds(3)) and the signals systemd stops and reloads it with.

``serve`` (service.py) and the supervisor of ``serve --workers`` (supervisor.py)
both speak it: READY=1 once listening, STATUS= lines, WATCHDOG=1 while the event
loop runs, RELOADING=1 around a SIGHUP reload and STOPPING=1 on SIGTERM. Outside
systemd every call here is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable

from .errors import StartupError

__all__ = [
    "ADMIN_FD_NAME",
    "SD_LISTEN_FDS_START",
    "handle_signals",
    "listen_fds",
    "notify_reloading",
    "sd_notify",
    "start_watchdog",
    "unhandle_signals",
    "watchdog_interval",
    "watchdog_usec",
]

#: sd_listen_fds(3): passed sockets start at this descriptor.
SD_LISTEN_FDS_START = 3
#: ``FileDescriptorName=`` of a passed socket meant for the admin endpoint.
ADMIN_FD_NAME = "admin"
#: What stops the daemon: systemd's SIGTERM, and Ctrl-C in a terminal.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def sd_notify(state: str) -> None:
    """Tell systemd about our state (sd_notify(3)); a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())


def notify_reloading() -> None:
    """RELOADING=1 with the CLOCK_MONOTONIC microseconds systemd >= 253 asks for;
    READY=1 says the reload is over."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    sd_notify(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading config")


def watchdog_usec() -> int:
    """systemd's ``$WATCHDOG_USEC``, or 0 when the watchdog is off or meant for
    another process (``$WATCHDOG_PID``)."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return 0
    try:
        value = int(usec)
    except ValueError:
        return 0
    return max(value, 0)


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None when
    the watchdog is not ours to feed."""
    usec = watchdog_usec()
    return usec / 2 / 1_000_000 if usec else None


def start_watchdog() -> asyncio.Task[None] | None:
    """A task that pings WATCHDOG=1 every :func:`watchdog_interval`, or None when
    the watchdog is not ours to feed. Cancel it to stop."""
    interval = watchdog_interval()
    if interval is None:
        return None

    async def ping() -> None:
        # From the event loop on purpose: a stuck loop stops pinging, and
        # systemd restarts the daemon (WatchdogSec=).
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    return asyncio.get_running_loop().create_task(ping())


def listen_fds() -> list[tuple[str, socket.socket]]:
    """Sockets passed by systemd socket activation, as (FileDescriptorName, socket).

    Empty unless ``$LISTEN_PID`` is this process. The variables are removed
    from the environment, so nothing started later takes the sockets for its own.
    """
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    names = os.environ.pop("LISTEN_FDNAMES", "")
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    labels = names.split(":") if names else []
    passed: list[tuple[str, socket.socket]] = []
    for i in range(int(count)):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise StartupError(f"socket activation: descriptor {fd}: {exc.strerror}") from None
        if sock.type != socket.SOCK_STREAM:
            raise StartupError(f"socket activation: descriptor {fd} is not a stream socket")
        passed.append((labels[i] if i < len(labels) else "", sock))
    return passed


def handle_signals(
    loop: asyncio.AbstractEventLoop, *, stop: Callable[[], None], reload: Callable[[], None]
) -> None:
    """SIGTERM and SIGINT call ``stop``, SIGHUP calls ``reload`` (``ExecReload=``)."""
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, reload)


def unhandle_signals(loop: asyncio.AbstractEventLoop) -> None:
    """Undo :func:`handle_signals`."""
    for sig in (*_STOP_SIGNALS, signal.SIGHUP):
        loop.remove_signal_handler(sig)
