"""PostgreSQL for tests: one throwaway cluster per session, an empty database per test.

Loaded as a pytest plugin by ``tests/conftest.py``. The cluster runs from the
binaries of Debian's ``postgresql`` package (``/usr/lib/postgresql/*/bin``),
listens on 127.0.0.1 on an ephemeral port, trusts every local connection and
is stopped at the end of the session. ``initdb`` and ``pg_ctl`` refuse to run
as root, so as root they run as the ``postgres`` user.

Without the binaries or psycopg the PostgreSQL tests skip, saying why; with
``CI=true`` in the environment they fail instead, so CI never passes by
skipping them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["PgCluster", "pg_cluster", "pg_url", "require"]


def require(reason: str) -> None:
    """Skip with ``reason`` (fail under ``CI=true``)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def _bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that has initdb and pg_ctl."""
    found = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        bindir = Path(initdb).parent
        version = bindir.parent.name
        if (bindir / "pg_ctl").is_file() and version.isdigit():
            found.append((int(version), bindir))
    return max(found)[1] if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgCluster:
    """A running throwaway cluster: ``url(db)``, ``create_database()``, ``stop()``, ``start()``."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = _free_port()
        self.host = "127.0.0.1"
        self._user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                require("running as root and there is no 'postgres' user to run initdb as")
            self._user = "postgres"
            shutil.chown(root, user="postgres")
        self.running = False
        #: Databases wiped after their test, ready for the next one.
        self._clean: list[str] = []

    def _run(self, *args: str) -> None:
        command = [*args]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}\n{log}"
            )

    def init(self) -> None:
        """initdb: trust authentication, superuser ``postgres``."""
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        )

    def start(self) -> None:
        """Start the server (again) and wait until it accepts connections."""
        options = (
            f"-c listen_addresses={self.host} -p {self.port} -k {self.root} -c fsync=on"
            " -c max_connections=200"
            # After an immediate stop, recovery first syncs the data directory:
            # one syncfs() instead of an fsync of each of its thousands of files.
            " -c recovery_init_sync_method=syncfs"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "start",
        )
        self.running = True

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server; ``immediate`` cuts every connection at once, as a crash does."""
        pg_ctl = str(self.bindir / "pg_ctl")
        self._run(pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop")
        self.running = False

    def url(self, database: str = "postgres", *, password: str | None = None) -> str:
        """A URL of ``database``; ``password`` is sent, and ignored by trust auth."""
        auth = "postgres" if password is None else f"postgres:{password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    def create_database(self) -> str:
        """An empty database: a used one wiped clean, or a new one; returns its name.

        Wiping (DROP SCHEMA public CASCADE) is cheap where every CREATE DATABASE
        copies some 300 catalog files that each later checkpoint must fsync: with
        a new database per test, restarting the cluster in an outage test took
        9 s instead of well under 1.
        """
        import psycopg

        if self._clean:
            return self._clean.pop()
        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
        return name

    def give_back(self, name: str) -> None:
        """Wipe database ``name`` for the next test (left alone if that fails)."""
        import psycopg

        if not self.running:
            return
        try:
            with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
                # Connections a failed test left open would hold locks on its tables.
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
            with psycopg.connect(self.url(name), autocommit=True, connect_timeout=10) as conn:
                conn.execute("SET lock_timeout = '5s'")
                conn.execute("DROP SCHEMA public CASCADE")
                conn.execute("CREATE SCHEMA public AUTHORIZATION pg_database_owner")
                conn.execute("GRANT USAGE ON SCHEMA public TO PUBLIC")
        except psycopg.Error:
            return
        self._clean.append(name)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """The session's PostgreSQL cluster (skips, or fails under CI, when it cannot run)."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        require(f"psycopg is not installed ({exc.name}): pip install -e '.[test]'")
    bindir = _bindir()
    if bindir is None:
        require("no PostgreSQL server in /usr/lib/postgresql/*/bin (apt install postgresql)")
    assert bindir is not None
    root = Path(tempfile.mkdtemp(prefix="smtp-bridge-pg-"))
    root.chmod(0o755)
    try:
        cluster = PgCluster(bindir, root)
        cluster.init()
        cluster.start()
        try:
            yield cluster
        finally:
            if cluster.running:
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    cluster.stop()  # throwaway: no shutdown checkpoint
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """An empty database of the session's cluster, as a ``postgresql://`` URL."""
    if not pg_cluster.running:
        pg_cluster.start()  # an earlier test stopped it and failed before starting it again
    name = pg_cluster.create_database()
    yield pg_cluster.url(name)
    pg_cluster.give_back(name)
