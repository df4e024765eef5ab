"""SMTP AUTH policy: scrypt password hashes, credential lookup, failure throttling.

No sockets, no disk, no clock (callers pass ``now``). The aiosmtpd glue
lives in ``smtp/handler.py``; ``smtp-bridge hash-password`` uses :func:`hash_password`
and :func:`read_password_from`.

scrypt costs tens of milliseconds of CPU by design, so from the event loop it
runs only through :meth:`Authenticator.verify`: on a small thread pool of its
own (:data:`HASH_THREADS`), so a burst of AUTH queues there and never stalls
other sessions. :class:`AuthThrottle` counts the checks in progress with the
failures (:meth:`AuthThrottle.begin`), so parallel connections from one
address get no more guesses than one connection does.

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
import ipaddress
import os
import re
import secrets
import threading
from collections import OrderedDict, deque
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
    "AuthThrottle",
    "HASH_THREADS",
    "read_password_from",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

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


def _throttle_key(ip: IPAddress, ipv6_prefix: int) -> _Network:
    # An IPv6 client usually holds a whole /64: counting single addresses would
    # let it rotate past the limit and flush the table.
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ipaddress.IPv4Network((ip.ipv4_mapped, 32))
        return ipaddress.IPv6Network((ip, ipv6_prefix), strict=False)
    return ipaddress.IPv4Network((ip, 32))


class AuthThrottle:
    """Failed AUTH attempts per client address, with injected time (``now``, seconds).

    After ``free_failures`` failures within ``window`` seconds, each further
    attempt waits ``base_delay * 2**(failures - free_failures)`` (at most
    ``max_delay``); at ``disconnect_after`` failures the client is dropped.
    Failures older than ``window`` are forgotten. At most ``max_tracked``
    addresses are kept; the least recently failed is evicted first. IPv6
    clients count per ``ipv6_prefix`` network, IPv4 per address.

    Checks in progress count as failures until they end (:meth:`begin`,
    :meth:`end`): twenty parallel connections get the ``disconnect_after``
    guesses one connection gets, not twenty more while the first hashes run.
    """

    def __init__(
        self,
        *,
        free_failures: int = 3,
        base_delay: float = 0.5,
        max_delay: float = 5.0,
        disconnect_after: int = 10,
        window: float = 15 * 60,
        max_tracked: int = 10_000,
        ipv6_prefix: int = 64,
    ) -> None:
        if disconnect_after < 1 or max_tracked < 1 or window <= 0:
            raise ValueError("disconnect_after, max_tracked and window must be positive")
        self.free_failures = free_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.disconnect_after = disconnect_after
        self.window = window
        self.max_tracked = max_tracked
        self.ipv6_prefix = ipv6_prefix
        # Beyond this many failures neither the delay nor the verdict changes,
        # so no more timestamps are kept: memory per address is bounded.
        self._keep = max(disconnect_after, free_failures + 1 + _doublings(base_delay, max_delay))
        # key -> failure times, oldest first; ordered by most recent failure.
        self._failures: OrderedDict[_Network, deque[float]] = OrderedDict()
        # key -> checks begun and not yet ended (bounded by the connections open).
        self._pending: dict[_Network, int] = {}

    def __len__(self) -> int:
        return len(self._failures)

    def failure(self, ip: IPAddress, now: float) -> None:
        """Record one failed attempt from ``ip``."""
        key = _throttle_key(ip, self.ipv6_prefix)
        times = self._failures.get(key)
        if times is None:
            times = self._failures[key] = deque(maxlen=self._keep)
        else:
            self._failures.move_to_end(key)
        times.append(now)
        self._expire(now)
        while len(self._failures) > self.max_tracked:
            self._failures.popitem(last=False)

    def success(self, ip: IPAddress) -> None:
        """Forget the failures of ``ip``: it has logged in."""
        self._failures.pop(_throttle_key(ip, self.ipv6_prefix), None)

    def begin(self, ip: IPAddress, now: float) -> bool:
        """Reserve one password check for ``ip``; False (nothing reserved) when it is
        locked out, counting the checks of ``ip`` still in progress as failures.

        Every True must be followed by one :meth:`end`.
        """
        if self.should_disconnect(ip, now):
            return False
        key = _throttle_key(ip, self.ipv6_prefix)
        self._pending[key] = self._pending.get(key, 0) + 1
        return True

    def end(self, ip: IPAddress, ok: bool, now: float) -> None:
        """Settle a check :meth:`begin` reserved: a success or a failure."""
        key = _throttle_key(ip, self.ipv6_prefix)
        left = self._pending.get(key, 0) - 1
        if left > 0:
            self._pending[key] = left
        else:
            self._pending.pop(key, None)
        if ok:
            self.success(ip)
        else:
            self.failure(ip, now)

    def in_progress(self, ip: IPAddress) -> int:
        """Checks of ``ip`` begun and not yet ended."""
        return self._pending.get(_throttle_key(ip, self.ipv6_prefix), 0)

    def failures(self, ip: IPAddress, now: float) -> int:
        """Failures of ``ip`` within the window plus its checks in progress (capped
        at the count that matters)."""
        key = _throttle_key(ip, self.ipv6_prefix)
        pending = self._pending.get(key, 0)
        times = self._failures.get(key)
        if not times:
            return pending
        cutoff = now - self.window
        return pending + sum(1 for t in times if t > cutoff)

    def delay_for(self, ip: IPAddress, now: float) -> float:
        """Seconds to wait before answering the next attempt from ``ip``."""
        count = self.failures(ip, now)
        if count < self.free_failures:
            return 0.0
        return float(min(self.max_delay, self.base_delay * 2 ** (count - self.free_failures)))

    def should_disconnect(self, ip: IPAddress, now: float) -> bool:
        """True once ``ip`` has failed ``disconnect_after`` times within the window."""
        return self.failures(ip, now) >= self.disconnect_after

    def _expire(self, now: float) -> None:
        # Oldest-failed first, so stop at the first entry still inside the window.
        cutoff = now - self.window
        while self._failures:
            key, times = next(iter(self._failures.items()))
            if times[-1] > cutoff:
                break
            del self._failures[key]


def _doublings(base: float, cap: float) -> int:
    """How many doublings take ``base`` to ``cap`` (so more failures change nothing)."""
    steps = 0
    while base > 0 and base < cap and steps < 64:
        base *= 2
        steps += 1
    return steps


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
