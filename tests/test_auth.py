"""Password hashes, the authenticator, the failure throttle and password input."""

from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from pydantic import SecretStr

from smtp_bridge.auth import (
    Account,
    Authenticator,
    Credentials,
    check_hash_format,
    hash_password,
    read_password_from,
    verify_password,
)
from smtp_bridge.auth_throttle import AuthThrottle, IPAddress

FAST = 2**10  # keeps every hash in this file around a millisecond


@pytest.fixture(scope="module")
def stored() -> str:
    return hash_password("correct horse", n=FAST)


def fields(encoded: str) -> list[str]:
    return encoded.split("$")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# -- hashing -----------------------------------------------------------------


def test_round_trip(stored: str) -> None:
    assert verify_password("correct horse", stored)
    assert verify_password(b"correct horse", stored)  # aiosmtpd hands over bytes


def test_format(stored: str) -> None:
    scheme, n, r, p, salt, key = fields(stored)
    assert (scheme, n, r, p) == ("scrypt", str(FAST), "8", "1")
    assert len(base64.b64decode(salt)) == 16
    assert len(base64.b64decode(key)) == 32
    check_hash_format(stored)


def test_default_cost() -> None:
    assert fields(hash_password("pw"))[1:4] == [str(2**14), "8", "1"]


@pytest.mark.parametrize(
    "attempt", ["correct horsE", "correct horse ", "", "correct", "x" * 1000], ids=repr
)
def test_wrong_password(stored: str, attempt: str) -> None:
    assert not verify_password(attempt, stored)


def test_non_ascii_password() -> None:
    encoded = hash_password("pässwörd ✓", n=FAST)
    assert verify_password("pässwörd ✓", encoded)
    assert verify_password("pässwörd ✓".encode(), encoded)
    assert not verify_password("passwörd ✓", encoded)


def test_salt_differs_between_hashes() -> None:
    one, two = hash_password("same", n=FAST), hash_password("same", n=FAST)
    assert fields(one)[4] != fields(two)[4]
    assert fields(one)[5] != fields(two)[5]
    assert verify_password("same", one) and verify_password("same", two)


def test_hash_never_contains_the_password() -> None:
    password = "Sup3rSecretPassword"
    encoded = hash_password(password, n=FAST)
    for form in (password, b64(password.encode()), password.encode().hex()):
        assert form not in encoded


def test_hash_password_refuses_empty_and_bad_cost() -> None:
    with pytest.raises(ValueError, match="empty"):
        hash_password("")
    with pytest.raises(ValueError, match="power of two"):
        hash_password("pw", n=1000)
    with pytest.raises(ValueError, match="MiB"):
        hash_password("pw", n=2**20)


def tampered(encoded: str, index: int, value: str) -> str:
    parts = fields(encoded)
    parts[index] = value
    return "$".join(parts)


def flip_first_byte(text: str) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[0] ^= 1
    return b64(bytes(raw))


@pytest.mark.parametrize(
    ("index", "change"),
    [
        pytest.param(5, flip_first_byte, id="key"),
        pytest.param(4, flip_first_byte, id="salt"),
        pytest.param(1, lambda _: str(FAST * 2), id="n"),
        pytest.param(2, lambda _: "4", id="r"),
        pytest.param(3, lambda _: "2", id="p"),
    ],
)
def test_tampered_hash(stored: str, index: int, change: Callable[[str], str]) -> None:
    bad = tampered(stored, index, change(fields(stored)[index]))
    check_hash_format(bad)  # still well-formed ...
    assert not verify_password("correct horse", bad)  # ... but no longer matches


MALFORMED = [
    pytest.param("", id="empty"),
    pytest.param("correct horse", id="plain-text"),
    pytest.param("$2b$12$abcdefghijklmnopqrstuvABCDEFGHIJKLMNOPQRSTUVWXYZ01234", id="bcrypt"),
    pytest.param("pbkdf2_sha256$1000$c2FsdHNhbHQ=$a2V5a2V5a2V5a2V5", id="unknown-scheme"),
    pytest.param("SCRYPT$1024$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44, id="scheme-case"),
    pytest.param("scrypt$1024$8$1$AAAAAAAAAAAAAAAAAAAAAA==", id="missing-key"),
    pytest.param("scrypt$1024$8$1$AAAA$BBBB$CCCC", id="extra-field"),
    pytest.param("scrypt$x$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44, id="n-not-number"),
    pytest.param("scrypt$-1024$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44, id="n-negative"),
    pytest.param("scrypt$1000$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44, id="n-not-pow2"),
    pytest.param("scrypt$1$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44, id="n-one"),
    pytest.param("scrypt$1024$0$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44, id="r-zero"),
    pytest.param("scrypt$1024$8$0$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44, id="p-zero"),
    pytest.param("scrypt$1024$8$1$not base64!$" + "A" * 44, id="salt-not-b64"),
    pytest.param("scrypt$1024$8$1$AAAA$" + "A" * 44, id="salt-short"),
    pytest.param("scrypt$1024$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAA", id="key-short"),
    pytest.param("scrypt$1024$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 45, id="key-bad-pad"),
    pytest.param("scrypt$١٠٢٤$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44, id="non-ascii-digits"),
]


@pytest.mark.parametrize("encoded", MALFORMED)
def test_malformed_hash_is_false_not_an_error(encoded: str) -> None:
    assert verify_password("correct horse", encoded) is False
    assert verify_password("", encoded) is False
    with pytest.raises(ValueError, match=r"scrypt|scheme|base64|bytes"):
        check_hash_format(encoded)


def test_non_string_hash_is_false() -> None:
    assert verify_password("pw", None) is False  # type: ignore[arg-type]
    assert verify_password("pw", b"scrypt$1024$8$1$AA$AA") is False  # type: ignore[arg-type]


def test_check_hash_format_messages_are_clear_and_do_not_echo_the_hash(stored: str) -> None:
    with pytest.raises(ValueError, match="unknown password hash scheme 'bcrypt'"):
        check_hash_format("bcrypt$12$whatever")
    with pytest.raises(ValueError, match="hash-password"):
        check_hash_format("hunter2")
    bad_key = tampered(stored, 5, "AAAA")
    with pytest.raises(ValueError) as info:
        check_hash_format(bad_key)
    assert "16 to 64 bytes" in str(info.value)
    assert fields(stored)[4] not in str(info.value)


def test_surrounding_whitespace_is_ignored(stored: str) -> None:
    # A hash read from a file usually ends with a newline.
    assert verify_password("correct horse", f"{stored}\n")
    check_hash_format(f"  {stored}\n")


@pytest.mark.parametrize(
    ("n", "r", "p"),
    [
        pytest.param(2**30, 8, 1, id="n-2^30"),
        pytest.param(2**62, 8, 1, id="n-2^62"),
        pytest.param(2**16, 8, 16, id="too-much-work"),
        pytest.param(2**14, 1024, 1, id="r-huge"),
        pytest.param(2**14, 8, 9999999, id="p-huge"),
        pytest.param(2**19, 8, 1, id="memory-512MiB"),
    ],
)
def test_hostile_cost_is_refused_quickly(n: int, r: int, p: int) -> None:
    encoded = f"scrypt${n}${r}${p}${b64(b'0' * 16)}${b64(b'1' * 32)}"
    start = time.perf_counter()
    assert verify_password("pw", encoded) is False
    assert time.perf_counter() - start < 0.1
    with pytest.raises(ValueError, match="scrypt"):
        check_hash_format(encoded)


def test_cost_above_openssl_default_memory_still_verifies() -> None:
    # 32 MiB+ is over OpenSSL's default maxmem: the caps leave room for
    # stronger-than-default hashes, and maxmem is raised to match.
    encoded = hash_password("pw", n=2**15, r=8, p=1)
    assert verify_password("pw", encoded)


# -- credentials and the authenticator ---------------------------------------


@dataclass
class FakeUser:
    """Shaped like ``config.AuthUser`` (SecretStr fields)."""

    password_hash: SecretStr
    app_key: SecretStr | None = None


def test_credentials_from_config(stored: str) -> None:
    creds = Credentials.from_config(
        {
            "crm": FakeUser(SecretStr(stored), SecretStr("key-crm-123")),
            "shop": FakeUser(SecretStr(stored)),
        }
    )
    assert set(creds) == {"crm", "shop"} and len(creds) == 2
    assert "crm" in creds and "nobody" not in creds
    assert creds.app_key("crm") == "key-crm-123"
    assert creds.app_key("shop") is None
    assert creds.app_key("nobody") is None
    assert creds.get("crm") == Account(stored, "key-crm-123")


def test_credentials_repr_redacts_secrets(stored: str) -> None:
    creds = Credentials({"crm": (stored, "key-crm-123"), "shop": (stored, None)})
    for text in (repr(creds), str(creds), repr(creds.get("crm")), repr(creds.get("shop"))):
        assert stored not in text
        assert fields(stored)[5] not in text
        assert "key-crm-123" not in text
    assert "crm" in repr(creds)


@pytest.fixture(scope="module")
def authenticator(stored: str) -> Authenticator:
    return Authenticator(Credentials({"crm": (stored, None), "broken": ("scrypt$oops", None)}))


@pytest.mark.parametrize(
    ("user", "password", "ok"),
    [
        ("crm", "correct horse", True),
        (b"crm", b"correct horse", True),
        ("crm", "wrong", False),
        ("CRM", "correct horse", False),
        ("nobody", "correct horse", False),
        ("", "correct horse", False),
        (b"\xff\xfe", b"correct horse", False),
        ("broken", "correct horse", False),
    ],
    ids=repr,
)
def test_authenticator(
    authenticator: Authenticator, user: str | bytes, password: str | bytes, ok: bool
) -> None:
    assert authenticator.check(user, password) is ok


@pytest.fixture
def scrypt_costs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ``n`` of every scrypt run while the test runs."""
    costs: list[int] = []
    real = hashlib.scrypt

    def counting(password: bytes, *, salt: bytes, n: int, r: int, p: int, maxmem: int = 0,
                 dklen: int = 64) -> bytes:  # fmt: skip
        costs.append(n)
        return real(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    return costs


def test_unknown_user_still_costs_one_scrypt(
    authenticator: Authenticator, scrypt_costs: list[int]
) -> None:
    for user in ("crm", "nobody", "", "broken"):
        scrypt_costs.clear()
        authenticator.check(user, "guess")
        # One scrypt at the configured hash's cost, whoever the user is, so
        # timing does not tell which user names exist.
        assert scrypt_costs == [FAST], user


def test_authenticator_without_users_uses_default_cost(scrypt_costs: list[int]) -> None:
    assert Authenticator(Credentials()).check("anyone", "pw") is False
    assert scrypt_costs == [2**14]


# -- throttle ----------------------------------------------------------------

IP = ipaddress.ip_address("192.0.2.7")
OTHER = ipaddress.ip_address("192.0.2.8")


def fail(throttle: AuthThrottle, ip: IPAddress, times: int, now: float) -> None:
    for _ in range(times):
        throttle.failure(ip, now)


def test_throttle_delay_grows_and_caps() -> None:
    throttle = AuthThrottle()
    delays = []
    for _ in range(12):
        delays.append(throttle.delay_for(IP, now=100.0))
        throttle.failure(IP, now=100.0)
    #            failures: 0    1    2    3    4    5    6    7 ...
    assert delays == [0.0, 0.0, 0.0, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0]
    assert throttle.delay_for(OTHER, now=100.0) == 0.0


def test_throttle_disconnects_after_ten_failures_in_window() -> None:
    throttle = AuthThrottle()
    for i in range(9):
        throttle.failure(IP, now=i * 60.0)  # one a minute
    assert not throttle.should_disconnect(IP, now=540.0)
    throttle.failure(IP, now=540.0)
    assert throttle.should_disconnect(IP, now=540.0)
    assert not throttle.should_disconnect(OTHER, now=540.0)
    # The first failures leave the 15-minute window one by one.
    assert throttle.should_disconnect(IP, now=899.0)
    assert not throttle.should_disconnect(IP, now=901.0)
    assert throttle.failures(IP, now=901.0) == 9


def test_throttle_slow_failures_never_add_up() -> None:
    throttle = AuthThrottle()
    for i in range(50):
        throttle.failure(IP, now=i * 1000.0)  # longer apart than the window
        assert throttle.delay_for(IP, now=i * 1000.0) == 0.0
        assert not throttle.should_disconnect(IP, now=i * 1000.0)


def test_throttle_entries_expire() -> None:
    throttle = AuthThrottle(window=900.0)
    fail(throttle, IP, 5, now=0.0)
    assert throttle.delay_for(IP, now=899.0) == 2.0
    assert throttle.delay_for(IP, now=900.0) == 0.0
    # Expired entries are dropped from memory when others are recorded.
    throttle.failure(OTHER, now=901.0)
    assert len(throttle) == 1


def test_throttle_success_resets() -> None:
    throttle = AuthThrottle()
    fail(throttle, IP, 8, now=10.0)
    fail(throttle, OTHER, 8, now=10.0)
    throttle.success(IP)
    assert throttle.delay_for(IP, now=10.0) == 0.0
    assert throttle.delay_for(OTHER, now=10.0) == 5.0
    throttle.success(ipaddress.ip_address("203.0.113.1"))  # unknown: no error


def test_throttle_memory_per_address_is_bounded() -> None:
    throttle = AuthThrottle()
    fail(throttle, IP, 1000, now=1.0)
    assert throttle.should_disconnect(IP, now=1.0)
    assert throttle.delay_for(IP, now=1.0) == 5.0
    assert throttle.failures(IP, now=1.0) <= 10


def test_throttle_evicts_oldest_beyond_the_cap() -> None:
    throttle = AuthThrottle(max_tracked=100)
    first = ipaddress.ip_address("10.0.0.1")
    fail(throttle, first, 10, now=0.0)
    for i in range(2, 1002):
        # All within the window: only the cap makes room.
        throttle.failure(ipaddress.ip_address(f"10.0.{i // 256}.{i % 256}"), now=i / 10)
        assert len(throttle) <= 100
    assert len(throttle) == 100
    assert not throttle.should_disconnect(first, now=101.0)  # evicted, not kept forever
    assert throttle.failures(ipaddress.ip_address("10.0.3.233"), now=101.0) == 1  # newest


def test_throttle_eviction_spares_recent_failers() -> None:
    throttle = AuthThrottle(max_tracked=3)
    a, b, c, d = (ipaddress.ip_address(f"198.51.100.{i}") for i in range(1, 5))
    for ip, now in ((a, 1.0), (b, 2.0), (c, 3.0), (a, 4.0), (d, 5.0)):
        throttle.failure(ip, now=now)
    assert throttle.failures(a, now=5.0) == 2  # failed again, so not the oldest
    assert throttle.failures(b, now=5.0) == 0  # evicted
    assert throttle.failures(d, now=5.0) == 1


def test_throttle_counts_ipv6_per_64_and_mapped_ipv4_as_ipv4() -> None:
    throttle = AuthThrottle()
    for i in range(10):  # an attacker rotating addresses inside its /64
        throttle.failure(ipaddress.ip_address(f"2001:db8:1:2::{i + 1:x}"), now=0.0)
    assert throttle.should_disconnect(ipaddress.ip_address("2001:db8:1:2:ffff::1"), now=0.0)
    assert not throttle.should_disconnect(ipaddress.ip_address("2001:db8:1:3::1"), now=0.0)
    assert len(throttle) == 1

    fail(throttle, ipaddress.ip_address("::ffff:192.0.2.7"), 3, now=0.0)
    assert throttle.failures(IP, now=0.0) == 3


def test_throttle_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        AuthThrottle(max_tracked=0)
    with pytest.raises(ValueError):
        AuthThrottle(window=0)


# -- reading the password for `smtp-bridge hash-password` ---------------------


def no_prompt(text: str) -> str:
    raise AssertionError("must not prompt when stdin is not a terminal")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hunter2\n", "hunter2"),
        ("hunter2", "hunter2"),
        ("hunter2\r\n", "hunter2"),
        ("  spaces kept \n", "  spaces kept "),
        ("first\nsecond\n", "first"),
    ],
    ids=repr,
)
def test_read_password_from_pipe(text: str, expected: str) -> None:
    assert read_password_from(io.StringIO(text), interactive=False, prompt=no_prompt) == expected


@pytest.mark.parametrize("text", ["", "\n", "\r\n"], ids=repr)
def test_read_password_from_pipe_empty(text: str) -> None:
    with pytest.raises(ValueError, match="no password"):
        read_password_from(io.StringIO(text), interactive=False, prompt=no_prompt)


class FakePrompt:
    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.asked: list[str] = []

    def __call__(self, text: str) -> str:
        self.asked.append(text)
        return self.answers.pop(0)


def test_read_password_interactive_prompts_twice() -> None:
    prompt = FakePrompt("s3cret", "s3cret")
    stdin = io.StringIO("not this\n")
    assert read_password_from(stdin, interactive=True, prompt=prompt) == "s3cret"
    assert prompt.asked == ["Password: ", "Repeat password: "]
    assert stdin.read() == "not this\n"  # stdin untouched


def test_read_password_interactive_mismatch() -> None:
    with pytest.raises(ValueError, match="do not match"):
        read_password_from(io.StringIO(), interactive=True, prompt=FakePrompt("one", "two"))


def test_read_password_interactive_empty() -> None:
    prompt = FakePrompt("", "")
    with pytest.raises(ValueError, match="empty"):
        read_password_from(io.StringIO(), interactive=True, prompt=prompt)
    assert prompt.asked == ["Password: "]  # no point asking again


def test_password_read_then_hashed_verifies() -> None:
    password = read_password_from(io.StringIO("piped pw\n"), interactive=False)
    assert verify_password("piped pw", hash_password(password, n=FAST))


def test_checks_in_progress_count_toward_the_lockout() -> None:
    throttle = AuthThrottle(disconnect_after=3)
    ip = ipaddress.ip_address("192.0.2.7")
    assert [throttle.begin(ip, 0.0) for _ in range(4)] == [True, True, True, False]
    assert throttle.in_progress(ip) == 3
    throttle.end(ip, False, 1.0)
    assert throttle.failures(ip, 1.0) == 3 and not throttle.begin(ip, 1.0)
    throttle.end(ip, True, 1.0)  # one of them was right: failures forgotten
    throttle.end(ip, False, 1.0)
    assert throttle.in_progress(ip) == 0 and throttle.failures(ip, 1.0) == 1
