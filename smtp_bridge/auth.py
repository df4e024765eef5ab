"""SMTP AUTH policy: scrypt password hashes and credential lookup.

No sockets, no disk. The aiosmtpd glue lives in ``smtp/handler.py``, the
failure throttle in ``auth_throttle.py``; ``smtp-bridge hash-password`` uses
:func:`hash_password` and :func:`read_password_from`.

scrypt costs tens of milliseconds of CPU by design, so from the event loop it
runs only through :meth:`Authenticator.verify`: on a small thread pool of its
own (:data:`HASH_THREADS`), so a burst of AUTH queues there and never stalls
other sessions.

Hash format (docs/configuration.md, ``smtp.auth.users.*.password_hash``)::

    scrypt$<n>$<r>$<p>$<salt, base64>$<key, base64>

scrypt is RFC 7914 (https://www.rfc-editor.org/rfc/rfc7914). Its cost
parameters come from the config, so they are capped (:data:`MAX_MEMORY`,
:data:`MAX_WORK`): a hostile or mistyped hash must not make one AUTH attempt
take minutes or allocate gigabytes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import getpass
import hashlib
import hmac
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TextIO

__all__ = [
    "SCHEME",
    "MAX_MEMORY",
    "MAX_WORK",
    "hash_password",
    "verify_password",
    "check_hash_format",
    "Account",
    "UserEntry",
    "Credentials",
    "Authenticator",
    "HASH_THREADS",
    "read_password_from",
]

SCHEME = "scrypt"

#: Defaults for new hashes: the values Python's docs and OWASP give for
#: interactive logins (16 MiB, ~30-50 ms on a current core).
DEFAULT_N = 2**14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32

#: scrypt needs about 128 * n * r bytes (RFC 7914 section 5): cap it at 64 MiB,
#: four times the default.
MAX_MEMORY = 64 * 1024 * 1024
#: Time grows with n * r * p: cap it at eight times the default (well under a
#: second), so a verification can never hold a worker thread for long.
MAX_WORK = 8 * DEFAULT_N * DEFAULT_R * DEFAULT_P
_MAX_R = 64
_MAX_P = 64
#: Threads that may run scrypt at once (the whole process): one core is left
#: to the event loop, so a burst of AUTH waits its turn instead of starving
#: every session; at most four, since each holds up to :data:`MAX_MEMORY`.
HASH_THREADS = max(1, min(4, (os.cpu_count() or 2) - 1))
_SALT_RANGE = (8, 64)
_KEY_RANGE = (16, 64)

_FORMAT_HELP = (
    f"expected {SCHEME}$<n>$<r>$<p>$<salt>$<key> as printed by `smtp-bridge hash-password`"
)
_DIGITS = re.compile(r"[0-9]{1,10}")


@dataclass(frozen=True, slots=True)
class _Parsed:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def __repr__(self) -> str:
        return f"_Parsed(n={self.n}, r={self.r}, p={self.p}, salt=..., key=...)"


def _check_cost(n: int, r: int, p: int) -> None:
    """Raise ValueError unless (n, r, p) are valid scrypt parameters within the caps."""
    if n < 2 or n & (n - 1):
        raise ValueError(f"scrypt n must be a power of two greater than 1, got {n}")
    if not 1 <= r <= _MAX_R:
        raise ValueError(f"scrypt r must be between 1 and {_MAX_R}, got {r}")
    if not 1 <= p <= _MAX_P:
        raise ValueError(f"scrypt p must be between 1 and {_MAX_P}, got {p}")
    if 128 * n * r > MAX_MEMORY:
        raise ValueError(
            f"scrypt n={n}, r={r} needs {128 * n * r // 2**20} MiB, "
            f"more than the {MAX_MEMORY // 2**20} MiB allowed"
        )
    if n * r * p > MAX_WORK:
        raise ValueError(
            f"scrypt cost n*r*p={n * r * p} is above the {MAX_WORK} allowed "
            "(verification would take too long)"
        )


def _b64decode(text: str, what: str, size: tuple[int, int]) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the {what} is not valid base64; {_FORMAT_HELP}") from None
    low, high = size
    if not low <= len(raw) <= high:
        raise ValueError(f"the {what} must be {low} to {high} bytes, got {len(raw)}")
    return raw


def _parse(encoded: str) -> _Parsed:
    # Messages never include the hash itself: it is a secret in the config.
    if not isinstance(encoded, str):
        raise ValueError(f"a password hash must be a string; {_FORMAT_HELP}")
    parts = encoded.strip().split("$")
    if parts[0] != SCHEME:
        scheme = parts[0] if len(parts) > 1 and parts[0].isalnum() and len(parts[0]) < 20 else ""
        named = f" {scheme!r}" if scheme else ""
        raise ValueError(f"unknown password hash scheme{named}; {_FORMAT_HELP}")
    if len(parts) != 6:
        raise ValueError(f"a {SCHEME} hash has 6 fields separated by '$'; {_FORMAT_HELP}")
    _, n_text, r_text, p_text, salt_text, key_text = parts
    for name, text in (("n", n_text), ("r", r_text), ("p", p_text)):
        if not _DIGITS.fullmatch(text):
            raise ValueError(f"scrypt {name} must be a decimal number; {_FORMAT_HELP}")
    n, r, p = int(n_text), int(r_text), int(p_text)
    _check_cost(n, r, p)
    salt = _b64decode(salt_text, "salt", _SALT_RANGE)
    key = _b64decode(key_text, "key", _KEY_RANGE)
    return _Parsed(n, r, p, salt, key)


def _derive(password: bytes, parsed: _Parsed) -> bytes:
    n, r, p = parsed.n, parsed.r, parsed.p
    # OpenSSL counts 128*r*(n+p+2) bytes; the parameters are already capped,
    # maxmem is the second line of defence (and must exceed OpenSSL's 32 MiB default).
    maxmem = 128 * r * (n + p + 2) + 1024 * 1024
    return hashlib.scrypt(
        password, salt=parsed.salt, n=n, r=r, p=p, maxmem=maxmem, dklen=len(parsed.key)
    )


def _as_bytes(password: str | bytes) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else bytes(password)


def hash_password(
    password: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P
) -> str:
    """A ``password_hash`` for the config: scrypt with a fresh 16-byte salt."""
    if not password:
        raise ValueError("the password is empty")
    _check_cost(n, r, p)
    salt = secrets.token_bytes(SALT_BYTES)
    key = _derive(_as_bytes(password), _Parsed(n, r, p, salt, b"\0" * KEY_BYTES))
    b64 = base64.b64encode
    return f"{SCHEME}${n}${r}${p}${b64(salt).decode()}${b64(key).decode()}"


def check_hash_format(encoded: str) -> None:
    """Raise ValueError, saying what is wrong, unless ``encoded`` is a usable hash."""
    _parse(encoded)


def verify_password(password: str | bytes, encoded: str) -> bool:
    """True if ``password`` matches ``encoded``; False (never an exception) otherwise."""
    try:
        parsed = _parse(encoded)
        return hmac.compare_digest(_derive(_as_bytes(password), parsed), parsed.key)
    except (ValueError, TypeError, MemoryError, OverflowError):
        return False


class _Secret(Protocol):
    def get_secret_value(self) -> str: ...


class UserEntry(Protocol):
    """What :meth:`Credentials.from_config` reads: ``config.AuthUser`` fits."""

    @property
    def password_hash(self) -> _Secret: ...

    @property
    def app_key(self) -> _Secret | None: ...


@dataclass(frozen=True, slots=True)
class Account:
    """One SMTP AUTH account: its password hash and optional own API key."""

    password_hash: str
    app_key: str | None = None

    def __repr__(self) -> str:
        key = "None" if self.app_key is None else "'***'"
        return f"Account(password_hash='***', app_key={key})"


class Credentials:
    """User name -> :class:`Account`, as configured in ``smtp.auth.users``."""

    __slots__ = ("_accounts",)

    def __init__(self, users: Mapping[str, Account | tuple[str, str | None]] | None = None) -> None:
        self._accounts: dict[str, Account] = {
            name: entry if isinstance(entry, Account) else Account(*entry)
            for name, entry in (users or {}).items()
        }

    @classmethod
    def from_config(cls, users: Mapping[str, UserEntry]) -> Credentials:
        """From ``config.smtp.auth.users`` (values holding ``SecretStr`` fields)."""
        accounts: dict[str, Account | tuple[str, str | None]] = {}
        for name, user in users.items():
            key = user.app_key.get_secret_value() if user.app_key is not None else None
            accounts[name] = Account(user.password_hash.get_secret_value(), key or None)
        return cls(accounts)

    def get(self, user: str) -> Account | None:
        return self._accounts.get(user)

    def app_key(self, user: str) -> str | None:
        account = self._accounts.get(user)
        return account.app_key if account is not None else None

    def __contains__(self, user: object) -> bool:
        return user in self._accounts

    def __iter__(self) -> Iterator[str]:
        return iter(self._accounts)

    def __len__(self) -> int:
        return len(self._accounts)

    def __repr__(self) -> str:
        # User names are not secrets; hashes and keys are never shown.
        return f"Credentials(users={sorted(self._accounts)!r})"


# Stands in for a real hash when the user is unknown (or its hash unusable), so
# the attempt costs one scrypt all the same and timing does not tell which user
# names exist. No password derives an all-zero key in practice; the result is
# discarded anyway.
_DUMMY_SALT = b"smtp-bridge-salt"


def _dummy(n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P) -> _Parsed:
    return _Parsed(n, r, p, _DUMMY_SALT, b"\0" * KEY_BYTES)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _hash_pool() -> ThreadPoolExecutor:
    """The process's scrypt threads, made on first use (and after a fork, anew)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="scrypt")
        return _pool


def _forget_pool() -> None:
    # A forked child (``serve --workers``) has none of the parent's threads.
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


class Authenticator:
    """Checks a user name and password; always runs exactly one scrypt.

    :meth:`check` blocks for one scrypt (~30-50 ms at the defaults); the event
    loop awaits :meth:`verify`, which runs it on the scrypt threads.
    """

    __slots__ = ("credentials", "_dummy")

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        # Cost the dummy like the configured hashes, so unknown users take as long.
        self._dummy = _dummy()
        for name in credentials:
            account = credentials.get(name)
            parsed = _try_parse(account.password_hash) if account is not None else None
            if parsed is not None:
                self._dummy = _dummy(parsed.n, parsed.r, parsed.p)
                break

    def check(self, user: str | bytes, password: str | bytes) -> bool:
        """True only for a configured user with the right password."""
        account: Account | None = None
        if isinstance(user, bytes):
            try:
                user = user.decode("utf-8")
            except UnicodeDecodeError:
                user = ""
        if user:
            account = self.credentials.get(user)
        parsed = _try_parse(account.password_hash) if account is not None else None
        try:
            derived = _derive(_as_bytes(password), parsed or self._dummy)
        except (ValueError, TypeError, MemoryError, OverflowError):
            return False
        if parsed is None:
            return False
        return hmac.compare_digest(derived, parsed.key)

    async def verify(self, user: str | bytes, password: str | bytes) -> bool:
        """:meth:`check` off the event loop, on at most :data:`HASH_THREADS` threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_hash_pool(), self.check, user, password)


def _try_parse(encoded: str) -> _Parsed | None:
    try:
        return _parse(encoded)
    except ValueError:
        return None


def read_password_from(
    stdin: TextIO,
    *,
    interactive: bool,
    prompt: Callable[[str], str] = getpass.getpass,
) -> str:
    """The password for ``smtp-bridge hash-password`` (docs/cli.md).

    Not a terminal: the first line of ``stdin`` (its line end removed, nothing
    else). A terminal: prompted twice without echo. ValueError if it is empty
    or the two entries differ.
    """
    if not interactive:
        line = stdin.readline()
        password = line.removesuffix("\n").removesuffix("\r")
        if not password:
            raise ValueError("no password on standard input (expected one line)")
        return password
    password = prompt("Password: ")
    if not password:
        raise ValueError("the password is empty")
    if prompt("Repeat password: ") != password:
        raise ValueError("the passwords do not match")
    return password
