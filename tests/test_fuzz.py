"""Hostile clients: random and malformed commands, addresses and MIME at a
running daemon (hypothesis), and client text in log lines.

The fuzzed daemon runs on its own event loop in a thread (uvloop, as in
production) so hypothesis can drive it with plain blocking sockets, many
sessions against one daemon. Afterwards it must still deliver a normal
message, and nothing may have been logged as an internal error.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import json
import logging
import re
import smtplib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtp_bridge.auth import hash_password
from smtp_bridge.auth_throttle import AuthThrottle
from smtp_bridge.logs import LOGGER, JsonFormatter, TextFormatter
from smtp_bridge.sandbox import Sandbox
from smtp_bridge.service import BridgeService

WAIT = 15.0
EXAMPLES = int(__import__("os").environ.get("FUZZ_EXAMPLES", "800"))

PASSWORD_HASH = hash_password("fuzz-password", n=2**10)

FUZZ_CONFIG = f"""
smtp:
  max_message_size: 64KiB
  auth:
    require_tls: false
    users:
      fuzz: {{password_hash: "{PASSWORD_HASH}"}}
routes:
  - name: overrides
    match: {{headers: {{X-Template-Id: "*"}}}}
    template_id: E_OVERRIDE
    allow_header_overrides: true
    data: {{subject: "{{{{ subject }}}}"}}
  - name: otp
    match: {{subject: 're:code (?P<code>\\d{{6}})'}}
    template_id: E_OTP
    data: {{code: "{{{{ match.code }}}}"}}
  - name: no-marketing
    match: {{rcpt: "marketing@*"}}
    action: reject
  - name: default
    template_id: E_GENERIC
    alias: "{{{{ sender.name }}}}"
    data:
      subject: "{{{{ subject }}}}"
      body: "{{{{ text | first_line }}}}"
      html: "{{{{ html[:50] }}}}"
      to: "{{{{ to | map(attribute='address') | join(',') }}}}"
      attachments: "{{{{ attachments | length }}}}"
      user: "{{{{ user }}}}"
"""


# ---------------------------------------------------------------- the daemon in a thread


class ThreadedBridge:
    """The daemon and the sandbox on their own loop in a thread."""

    def __init__(self, tmp_path: Path, body: str) -> None:
        self.tmp_path, self.body = tmp_path, body
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fuzzed-bridge", daemon=True)

    def __enter__(self) -> ThreadedBridge:
        self._thread.start()
        assert self._ready.wait(WAIT), "the daemon did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the daemon did not stop"

    def _run(self) -> None:
        try:
            import uvloop
        except ImportError:  # pragma: no cover
            asyncio.run(self._main())
        else:
            uvloop.run(self._main())

    async def _main(self) -> None:
        try:
            async with Sandbox() as sandbox:
                service = BridgeService(make_config(self.tmp_path, sandbox.url, self.body))
                await service.startup()
                assert service.handler is not None
                # Guessing passwords is part of the fuzz: no tarpit, no lockout.
                service.handler.throttle = AuthThrottle(
                    base_delay=0.0, max_delay=0.0, disconnect_after=10**9
                )
                self.loop, self.service, self.sandbox = asyncio.get_running_loop(), service, sandbox
                self.host, self.port = service.listeners.addresses[0]
                self._stop = asyncio.Event()
                self._ready.set()
                try:
                    await self._stop.wait()
                finally:
                    service.stop()
                    await service.shutdown()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise


class ErrorRecords(logging.Handler):
    """Every record at ERROR or above, from any logger (asyncio's, aiosmtpd's too)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def fuzzed(tmp_path: Path) -> Iterator[tuple[ThreadedBridge, ErrorRecords]]:
    errors = ErrorRecords()
    root = logging.getLogger()
    root.addHandler(errors)
    try:
        with ThreadedBridge(tmp_path, FUZZ_CONFIG) as bridge:
            yield bridge, errors
    finally:
        root.removeHandler(errors)


# ---------------------------------------------------------------- strategies

_no_line_end = st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n")
junk_text = st.text(_no_line_end, max_size=60)
junk_bytes = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))

local_parts = st.one_of(
    st.from_regex(r"[a-z0-9._%+=-]{1,20}", fullmatch=True),
    st.sampled_from(['"quoted local"', "a..b", ".a", "marketing", "x" * 64, "y" * 65, ""]),
    junk_text,
)
domains = st.one_of(
    st.from_regex(r"[a-z0-9-]{1,15}(\.[a-z]{2,6}){1,2}", fullmatch=True),
    st.sampled_from(
        ["[127.0.0.1]", "[IPv6:::1]", "例え.jp", "-bad-.com", "a" * 70 + ".com", "", "[", "[1.2"]
    ),
    junk_text,
)
address_forms = st.sampled_from(
    [
        "<{l}@{d}>",
        "{l}@{d}",
        "<{l}@{d}",
        "<<{l}@{d}>>",
        "<{l}@{d}> SIZE=100",
        "<{l}@{d}> BODY=8BITMIME SMTPUTF8",
        "<{l}@{d}> BODY=BINARYMIME",
        "<{l}@{d}> FOO=bar",
        "<{l}@{d}> SIZE=999999999999999999",
        "<>",
        "<@relay.example:{l}@{d}>",
        "Name <{l}@{d}>",
    ]
)
addresses = st.builds(
    lambda form, local, domain: form.format(l=local, d=domain), address_forms, local_parts, domains
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


auth_args = st.one_of(
    st.builds(lambda u, p: "PLAIN " + _b64(b"\0" + u + b"\0" + p), junk_bytes, junk_bytes),
    st.just("PLAIN " + _b64(b"\0fuzz\0fuzz-password")),
    st.sampled_from(["PLAIN", "LOGIN", "PLAIN =", "PLAIN ***", "CRAM-MD5", "LOGIN a b c", ""]),
    st.builds(lambda b: "LOGIN " + _b64(b), junk_bytes),
)

verbs = st.sampled_from(
    [
        "HELO",
        "EHLO",
        "LHLO",
        "RSET",
        "NOOP",
        "VRFY",
        "EXPN",
        "HELP",
        "QUIT",
        "BDAT",
        "ETRN",
        "STARTTLS",
        "DATA",
        "XCLIENT",
        "TURN",
        "mail",
        "rcpt",
        "ehlo",
    ]
)

# A command: the bytes of one line (without CRLF), or a message to send after DATA.
commands = st.one_of(
    st.builds(lambda v, a: f"{v} {a}".encode(errors="surrogateescape"), verbs, junk_text),
    st.builds(lambda v: v.encode(), verbs),
    st.builds(lambda a: f"MAIL FROM:{a}".encode(), addresses),
    st.builds(lambda a: f"RCPT TO:{a}".encode(), addresses),
    st.builds(lambda a: f"VRFY {a}".encode(), addresses),
    st.builds(lambda a: f"AUTH {a}".encode(), auth_args),
    st.builds(lambda b: b"VRFY " + b, junk_bytes),
    st.builds(lambda b: b"MAIL FROM:<" + b + b">", junk_bytes),
    junk_bytes,
    st.just(b"X" * 600),
)

header_names = st.one_of(
    st.sampled_from(
        [
            "Subject",
            "From",
            "To",
            "Cc",
            "Bcc",
            "Reply-To",
            "Content-Type",
            "MIME-Version",
            "Content-Transfer-Encoding",
            "Content-Disposition",
            "Message-ID",
            "Date",
            "X-Template-Id",
            "X-Template-Data",
            "X-Alias",
            "X-Reply-To",
            "Idempotency-Key",
        ]
    ),
    st.from_regex(r"[!-9;-~]{1,20}", fullmatch=True),
)
encoded_words = st.builds(
    lambda charset, kind, payload: f"=?{charset}?{kind}?{payload}?=",
    st.sampled_from(["utf-8", "iso-8859-1", "bogus", "utf-16", ""]),
    st.sampled_from(["B", "Q", "b", "x"]),
    st.one_of(st.builds(lambda b: _b64(b), st.binary(max_size=30)), junk_text),
)
header_values = st.one_of(
    junk_text,
    encoded_words,
    st.sampled_from(
        [
            'multipart/mixed; boundary="b1"',
            "multipart/alternative; boundary=",
            "text/html",
            "text/plain; charset=bogus",
            "base64",
            "quoted-printable",
            "x-uuencode",
            '{"subject": "override"}',
            "[1, 2]",
            "{{ 7*7 }}",
            "{% raw %}",
            "E_X",
            "Shop <shop@example.com>",
            "a@b, c@d, <broken",
            "undisclosed-recipients:;",
            'attachment; filename="=?utf-8?q?r=C3=A9sum=C3=A9.pdf?="',
            "code 123456",
        ]
    ),
)
part_bodies = st.one_of(
    junk_text,
    st.builds(lambda b: _b64(b), st.binary(max_size=120)),
    st.just("=3D=XX=\r\nsoft=\r\nbreak"),
    st.just("<html><body><p>Hi<script>x</script><a href='https://x'>link</a></body>"),
)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """A message, well-formed or not: random headers, MIME structure and bytes."""
    lines = [f"{draw(header_names)}: {draw(header_values)}" for _ in range(draw(st.integers(0, 8)))]
    if draw(st.booleans()):
        lines.append('Content-Type: multipart/mixed; boundary="b1"')
        lines.append("")
        for _ in range(draw(st.integers(0, 3))):
            lines += ["--b1", f"Content-Type: {draw(header_values)}"]
            if draw(st.booleans()):
                lines.append(f"Content-Transfer-Encoding: {draw(header_values)}")
            lines += ["", draw(part_bodies)]
        if draw(st.booleans()):
            lines.append("--b1--")
    else:
        lines += ["", draw(part_bodies)]
    text = "\r\n".join(lines)
    raw = text.encode("utf-8", "surrogateescape")
    if draw(st.booleans()):
        raw += draw(st.binary(max_size=40))  # 8-bit junk, bare CR/LF, NULs
    # Transparency (RFC 5321 4.5.2): a line starting with "." gets a second one.
    raw = b"\r\n".join(
        b"." + line if line.startswith(b".") else line for line in raw.split(b"\r\n")
    )
    return raw + b"\r\n.\r\n"


sessions = st.lists(st.one_of(commands, messages()), max_size=10)


# ---------------------------------------------------------------- the client

_REPLY_LINE = re.compile(rb"[2-5][0-9][0-9]([ -].*)?\r\n", re.DOTALL)
_LEAKS = (b"Traceback", b"Error: (", b"Exception", b"object at 0x")


def _read_reply(stream: io.BufferedReader) -> list[bytes] | None:
    """One reply (all its lines), or None when the server closed the connection."""
    lines: list[bytes] = []
    while True:
        try:
            line = stream.readline(4096)
        except ConnectionResetError:  # closed with our unread bytes pending: a reset
            line = b""
        if not line:
            return lines or None
        assert _REPLY_LINE.fullmatch(line), (line, lines)
        assert not any(leak in line for leak in _LEAKS), line
        lines.append(line)
        if line[3:4] != b"-":
            return lines


_serial = itertools.count()


def drive(host: str, port: int, script: list[bytes]) -> None:
    """Play ``script`` at the bridge; every reply must be a well-formed SMTP reply.

    A message step right after a ``354`` is the content of that DATA; anywhere
    else its lines go out as commands (junk, as a smuggler would send them).
    """
    steps = list(script)
    with socket.create_connection((host, port), timeout=WAIT) as sock:
        stream = sock.makefile("rb")
        reply = _read_reply(stream)
        assert reply is not None and reply[0].startswith(b"220 "), reply
        while steps:
            step = steps.pop(0)
            is_message = step.endswith(b"\r\n.\r\n")
            try:
                sock.sendall(step if is_message else step + b"\r\n")
            except OSError:  # closed by the server (421, flood limits): fine
                return
            reply = _read_reply(stream)
            if reply is None:
                return
            code = reply[-1][:3]
            if code == b"354":  # DATA accepted: the next message step is the content
                if steps and steps[0].endswith(b"\r\n.\r\n"):
                    content = steps.pop(0)
                else:
                    content = b"Message-ID: <%d@fuzz>\r\n\r\nbody\r\n.\r\n" % next(_serial)
                sock.sendall(content)
                if _read_reply(stream) is None:
                    return
            elif code == b"334":  # an AUTH challenge: abort it (RFC 4954 4)
                sock.sendall(b"*\r\n")
                if _read_reply(stream) is None:
                    return
            elif code in (b"221", b"421"):
                with contextlib.suppress(ConnectionResetError):
                    assert stream.read() == b"", "the server must close after 221/421"
                return


def send_normal_message(host: str, port: int) -> tuple[int, bytes]:
    with smtplib.SMTP(host, port, timeout=WAIT) as client:
        client.ehlo("app.test")
        client.mail("app@example.com")
        client.rcpt("bob@example.org")
        return client.data(b"From: app@example.com\r\nSubject: after the fuzz\r\n\r\nStill up.\r\n")


# ---------------------------------------------------------------- the tests


def test_random_sessions_never_break_the_daemon(fuzzed) -> None:
    bridge, errors = fuzzed

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(script=sessions, with_message=st.booleans())
    def one_session(script: list[bytes], with_message: bool) -> None:
        if with_message:  # reach DATA often: a transaction, then the fuzzed content
            script = [b"EHLO fuzz.test", b"MAIL FROM:<app@example.com>",
                      b"RCPT TO:<bob@example.org>", b"DATA", *script]  # fmt: skip
        drive(bridge.host, bridge.port, script)

    one_session()
    code, text = send_normal_message(bridge.host, bridge.port)
    assert code == 250, text
    assert text.startswith(b"2.0.0 Ok id=")
    assert [r.getMessage() for r in errors.records] == []
    # Every session is over: nothing leaked in the connection counts.
    assert bridge.service.tracker.per_ip.total() <= 1


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"MAIL FROM:a@", b"553 5.1.3 "),
        (b"MAIL FROM:a@[", b"553 5.1.3 "),
        (b"VRFY b@", b"502 "),
        (b"VRFY <<\xff\xfe>", b"502 "),
    ],
    ids=["empty-domain", "open-literal", "vrfy-empty-domain", "vrfy-not-utf8"],
)
async def test_inputs_the_fuzzer_found_are_answered(
    bridge, log_lines, line: bytes, expected: bytes
) -> None:
    """Each of these was an internal error (451 and a traceback) in aiosmtpd."""
    async with bridge() as b:
        reader, writer = await asyncio.open_connection(b.host, b.port)
        try:
            await reader.readline()
            writer.write(b"EHLO fuzz.test\r\n")
            while not (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"250 "):
                pass
            writer.write(line + b"\r\n")
            reply = await asyncio.wait_for(reader.readline(), WAIT)
        finally:
            writer.close()
    assert reply.startswith(expected), reply
    assert [entry for entry in log_lines() if entry["level"] == "error"] == []


# ---------------------------------------------------------------- client text in logs

ESC = "\x1b[2J\x1b[31m"
HOSTILE_SUBJECT = b"=?utf-8?q?Hi=0D=0Aevent=3Dfake_line=1B[2J=E2=80=A8end?="


@pytest.fixture
def both_formats() -> Iterator[Callable[[], tuple[str, str]]]:
    json_out, text_out = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(json_out), logging.StreamHandler(text_out)]
    handlers[0].setFormatter(JsonFormatter())
    handlers[1].setFormatter(TextFormatter())
    previous = LOGGER.level
    LOGGER.setLevel(logging.DEBUG)
    for handler in handlers:
        LOGGER.addHandler(handler)
    try:
        yield lambda: (json_out.getvalue(), text_out.getvalue())
    finally:
        for handler in handlers:
            LOGGER.removeHandler(handler)
        LOGGER.setLevel(previous)


async def test_client_text_never_reaches_a_log_line_raw(bridge, both_formats) -> None:
    auth = f"""
smtp:
  auth:
    require_tls: false
    users:
      fuzz: {{password_hash: "{PASSWORD_HASH}"}}
routes:
  - name: default
    template_id: E_GENERIC
    data: {{subject: "{{{{ subject }}}}"}}
"""
    async with bridge(auth) as b:
        reader, writer = await asyncio.open_connection(b.host, b.port)

        async def cmd(line: bytes) -> bytes:
            """Send one line; return the whole reply (up to its last line)."""
            writer.write(line + b"\r\n")
            reply = last = await asyncio.wait_for(reader.readline(), WAIT)
            while last[3:4] == b"-":
                last = await asyncio.wait_for(reader.readline(), WAIT)
                reply += last
            return reply

        await reader.readline()
        # A bare CR and terminal escapes inside the HELO name.
        await cmd(f"EHLO evil\r{ESC}host.test".encode())
        # The AUTH user name is client bytes, logged on failure.
        user = f"bob\r\nts=0 level=info event=auth_ok{ESC}".encode()
        assert (await cmd(b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0x"))).startswith(
            b"535 "
        )
        # Unicode line and paragraph separators in an address.
        assert (await cmd("MAIL FROM:<a\u2028b\u2029c@example.com>".encode())).startswith(b"5")
        assert (await cmd(b"MAIL FROM:<app@example.com>")).startswith(b"250 ")
        assert (await cmd(b"RCPT TO:<bob@example.org>")).startswith(b"250 ")
        assert (await cmd(b"DATA")).startswith(b"354 ")
        message = b"Subject: " + HOSTILE_SUBJECT + b"\r\n\r\nbody\r\n."
        assert (await cmd(message)).startswith(b"250 ")
        writer.close()
    json_text, plain_text = both_formats()
    for output in (json_text, plain_text):
        assert "\x1b" not in output and "\r" not in output
        assert "\u2028" not in output and "\u2029" not in output
    # JSON: one object per line, with the client's text escaped inside it.
    records = [json.loads(line) for line in json_text.splitlines()]
    events = {r["event"]: r for r in records}
    assert events["helo"]["helo"] == f"evil\r{ESC}host.test"
    assert events["auth_failed"]["user"] == user.decode()
    # The parser turns the subject's line breaks into spaces; the ESC is left to the log.
    assert "event=fake line\x1b[2J" in events["message"]["subject"]
    # Text: every line is one event line (time level event ...), escapes visible.
    lines = plain_text.splitlines()
    assert len(lines) == len(records)
    assert all(re.match(r"\d\d:\d\d:\d\d (debug|info|warning|error) \S+", line) for line in lines)
    assert any("helo=evil\\r\\x1b[2J\\x1b[31mhost.test" in line for line in lines)
    assert any("user=bob\\r\\nts=0 level=info event=auth_ok\\x1b" in line for line in lines)
    assert any("event=fake line\\x1b[2J" in line for line in lines)
