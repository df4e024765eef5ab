"""The config loader (docs/configuration.md): defaults, types, env and secret files, errors.

Every error test checks what an operator sees: the file, the line and the key
path of the problem, in words that say what is expected. ``env=`` is always
passed explicitly so the real environment never leaks into a result.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import textwrap
from pathlib import Path
from typing import Any, get_args

import pytest
import trustme
from pydantic import BaseModel

from smtp_bridge import replies
from smtp_bridge.auth import hash_password
from smtp_bridge.config import (
    Config,
    ConfigError,
    ConfigIssue,
    json_schema,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from smtp_bridge.patterns import Pattern
from smtp_bridge.replies import Reply
from smtp_bridge.templating import CompiledTemplate

MINIMAL = """\
routes:
  - template_id: "E_1"
"""

# docs/configuration.md's example, verbatim except for the tls files (they must exist: the
# loader checks they can be read) and the password hash.
DESIGN_EXAMPLE = r"""
smtp:
  listen: ["127.0.0.1:2525"]        # host:port list; "[::]:25" in production
  hostname: bridge.example.com      # banner / EHLO name (default: FQDN)
  protocol: smtp                    # smtp | lmtp (LMTP answers per recipient)
  tls:                              # optional
    cert: {cert}
    key: {key}
    starttls: true                  # offer STARTTLS on the plain listeners
    implicit_listen: ["0.0.0.0:465"]
  auth:
    require_tls: true               # refuse AUTH over plaintext (except trusted nets)
    users:                          # SMTP AUTH PLAIN/LOGIN accounts
      crm:
        password_hash: "{HASH}" # made by `smtp-bridge hash-password`
        app_key: ${{CRM_APP_KEY}}     # optional: this user's own API key
  trusted_networks: ["127.0.0.0/8", "::1/128"]  # may send without AUTH
  proxy_protocol: false
  max_message_size: 10MiB
  max_recipients: 50
  max_connections: 1000
  max_connections_per_ip: 20
  timeout: 60s                      # idle time between commands; api.timeout must be shorter
  shutdown_timeout: 30s             # SIGTERM: how long in-flight sessions may finish
  bare_lf: normalize                # normalize | reject (550 5.5.2): SMTP smuggling defence

api:
  url: https://www.aotsend.com/index/api/send_email
  app_key: ${{AOTSEND_APP_KEY}}       # or app_key_file:
  encoding: form                    # form | json
  timeout: 10s
  max_concurrency: 64               # in-flight API calls
  rate_limit: 0                     # calls per second, 0 = unlimited

delivery:
  mode: direct                      # direct | hybrid | queue
  state_dir: /var/lib/smtp-bridge
  dedup_ttl: 24h
  max_age: 3d                       # queue mode: give up after this
  backoff: [30s, 2m, 10m, 30m, 1h]
  bounce_template_id: ""            # optional failure notice to the sender

admin:
  listen: 127.0.0.1:9025            # /healthz /readyz /metrics

routes:                             # first match wins
  - name: password-reset
    match:                          # all given conditions must hold
      rcpt: ["*@example.com"]       # a list means any of them
      subject: 're:reset your password'
      headers: {{X-App: crm}}
    template_id: "E_1001"
    alias: "{{{{ sender.name or 'Example' }}}}"
    reply_to: "support@example.com"
    is_random: false
    data:
      name: "{{{{ rcpt.local }}}}"
      link: "{{{{ text | regex_search('https://\\S+') }}}}"
  - name: otp
    match:
      subject: 're:code (?P<code>\d{{6}})'
    template_id: "E_1002"
    data: {{code: "{{{{ match.code }}}}"}}
  - name: block-noise
    match: {{mail_from: "cron@*"}}
    action: drop                    # relay (default) | drop | reject
  - name: default
    template_id: "E_GENERIC"
    data: {{subject: "{{{{ subject }}}}", body: "{{{{ text }}}}"}}

replies:                            # optional overrides of section 5
  "40007": "451 4.3.2 Provider balance exhausted, try again later"
"""

DESIGN_ENV = {"AOTSEND_APP_KEY": "global-key-0001", "CRM_APP_KEY": "crm-key-0002"}

# Real hashes (cheap cost): the loader checks the format, as check-config should.
HASH = hash_password("crm-password", n=2**10)
OTHER_HASH = hash_password("ops-password", n=2**10)


def _key_part(encoded: str) -> str:
    return encoded.rsplit("$", 1)[1]


def parse(text: str, env: dict[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), filename="bridge.yaml", env=env or {})


def errors(text: str, env: dict[str, str] | None = None) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        parse(text, env)
    assert caught.value.issues, "a ConfigError always lists its issues"
    return caught.value.issues


def where(issues: list[ConfigIssue]) -> list[tuple[int | None, str]]:
    return [(i.line, i.path) for i in issues]


def only(issues: list[ConfigIssue]) -> ConfigIssue:
    assert len(issues) == 1, [str(i) for i in issues]
    return issues[0]


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    # A real pair: the loader loads it (check-config refuses a key that does not fit).
    issued = trustme.CA().issue_cert("bridge.example.com")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return {"cert": str(cert), "key": str(key)}


@pytest.fixture
def design(tls_files: dict[str, str]) -> Config:
    return parse(DESIGN_EXAMPLE.format(HASH=HASH, **tls_files), DESIGN_ENV)


# ---------------------------------------------------------------- defaults


def test_design_example_parses(design: Config) -> None:
    assert [r.name for r in design.routes] == ["password-reset", "otp", "block-noise", "default"]
    assert design.app_key() == "global-key-0001"
    crm = design.smtp.auth.users["crm"]
    assert crm.password_hash.get_secret_value() == HASH
    assert crm.app_key is not None and crm.app_key.get_secret_value() == "crm-key-0002"
    assert design.smtp.tls is not None and design.smtp.tls.implicit_listen == ["0.0.0.0:465"]
    assert design.replies == {"40007": Reply.parse(DESIGN_EXAMPLE.split('"40007": "')[1][:-2])}


def test_design_example_routes_are_compiled(design: Config) -> None:
    reset, otp, noise, default = design.routes
    assert [str(p) for p in reset.match.rcpt or []] == ["*@example.com"]
    assert reset.match.headers is not None and "X-App" in reset.match.headers
    assert isinstance(reset.template_id, CompiledTemplate)
    assert reset.template_id.source == "E_1001"
    assert reset.is_random is False
    assert isinstance(reset.data["link"], CompiledTemplate)
    assert reset.data["link"].render({"text": "go to https://x.test/r?t=1 now"}) == (
        "https://x.test/r?t=1"
    )
    subject = (otp.match.subject or [])[0]
    assert isinstance(subject, Pattern)
    assert subject.search("Your CODE 123456 is here") == {"code": "123456"}
    assert noise.action == "drop" and noise.template_id is None
    assert default.match.rcpt is None and default.action == "relay"


def _without(dump: dict[str, Any], *paths: str) -> dict[str, Any]:
    for path in paths:
        *parents, last = path.split(".")
        node = dump
        for part in parents:
            node = node[part]
        node.pop(last)
    return dump


def test_every_default_equals_the_design_example(design: Config) -> None:
    """docs/configuration.md: "The values in the example are the defaults, except listen, routes,
    tls, auth.users and secrets" (and hostname, whose default is the FQDN)."""
    default = parse(MINIMAL)
    exempt = ("smtp.listen", "smtp.hostname", "smtp.tls", "smtp.auth.users", "api.app_key")
    for section in ("smtp", "api", "delivery", "admin"):
        skip = [path for path in exempt if path.startswith(f"{section}.")]
        got = _without(default.model_dump(include={section}), *skip)
        want = _without(design.model_dump(include={section}), *skip)
        assert got == want, section


def test_defaults_when_keys_are_absent() -> None:
    config = parse(MINIMAL)
    smtp, api, delivery = config.smtp, config.api, config.delivery
    assert smtp.listen == ["127.0.0.1:2525"]
    assert smtp.hostname == socket.getfqdn()
    assert smtp.protocol == "smtp"
    assert smtp.tls is None
    assert smtp.auth.require_tls is True and smtp.auth.users == {}
    assert smtp.trusted_networks == [
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    ]
    assert smtp.proxy_protocol is False
    assert smtp.max_message_size == 10 * 1024 * 1024
    assert (smtp.max_recipients, smtp.max_connections, smtp.max_connections_per_ip) == (
        50,
        1000,
        20,
    )
    assert (smtp.timeout, smtp.shutdown_timeout) == (60.0, 30.0)
    assert smtp.bare_lf == "normalize"
    assert smtp.dual_stack is True and smtp.max_commands_per_session == 10_000

    assert api.url == "https://www.aotsend.com/index/api/send_email"
    assert api.app_key is None and config.app_key() == ""
    assert api.encoding == "form"
    assert api.timeout == 10.0
    assert api.max_concurrency == 64
    assert api.rate_limit == 0
    assert api.breaker_failures == 5  # docs/replies.md
    assert api.breaker_interval == 30.0  # docs/replies.md

    assert delivery.mode == "direct"
    assert delivery.state_dir == Path("/var/lib/smtp-bridge")
    assert delivery.store is None
    assert delivery.dedup_ttl == 24 * 3600
    assert delivery.max_age == 3 * 86400
    assert delivery.backoff == [30, 120, 600, 1800, 3600]
    assert delivery.bounce_template_id == ""

    assert config.admin.listen == "127.0.0.1:9025"
    assert config.replies == {}


def test_route_defaults() -> None:
    route = parse(MINIMAL).routes[0]
    assert route.name == "route-1"
    assert route.action == "relay"
    assert route.reply is None
    assert route.to.source == "{{ rcpt.address }}"
    assert route.alias is None and route.reply_to is None and route.is_random is None
    assert route.data == {}
    assert route.allow_header_overrides is False
    assert all(value is None for _, value in route.match)


def test_admin_listen_can_be_disabled() -> None:
    assert parse("admin: {listen: null}\n" + MINIMAL).admin.listen is None


def test_one_value_where_a_list_is_expected() -> None:
    config = parse("""\
        smtp: {listen: "[::]:25", trusted_networks: 10.0.0.0/8}
        routes:
          - template_id: X
            match: {rcpt: "*@a.test", client: 192.168.0.0/16, headers: {X-App: crm}}
        """)
    assert config.smtp.listen == ["[::]:25"]
    assert config.smtp.trusted_networks == [ipaddress.ip_network("10.0.0.0/8")]
    match = config.routes[0].match
    assert [str(p) for p in match.rcpt or []] == ["*@a.test"]
    assert match.client == [ipaddress.ip_network("192.168.0.0/16")]
    assert [str(p) for p in (match.headers or {})["X-App"]] == ["crm"]


def test_numbers_are_accepted_as_template_ids() -> None:
    route = parse("routes: [{template_id: 1001}]\n").routes[0]
    assert route.template_id is not None and route.template_id.source == "1001"


# ---------------------------------------------------------------- sizes and durations


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10MiB", 10 * 1024 * 1024),
        ("512KB", 512_000),
        ("512KiB", 512 * 1024),
        ("1G", 1_000_000_000),
        ("1GiB", 1024**3),
        ("10 mb", 10_000_000),
        ("1.5KiB", 1536),
        ("100B", 100),
        ("2048", 2048),
        (2048, 2048),
    ],
    ids=str,
)
def test_parse_size(value: Any, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value",
    ["10XB", "ten", "", "MiB", "-5", "10 MiB extra", 0, -1, True, "0KB", None, [10]],
    ids=repr,
)
def test_parse_size_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30s", 30.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("3d", 259_200.0),
        ("1w", 604_800.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("90", 90.0),
        (45, 45.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
    ids=str,
)
def test_parse_duration(value: Any, expected: float) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize(
    "value",
    ["30x", "s", "", "-1s", -1, True, "1h30m", "30 seconds", "h1", None, [30]],
    ids=repr,
)
def test_parse_duration_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_sizes_and_durations_in_the_file() -> None:
    config = parse("""\
        smtp: {max_message_size: 1G, timeout: 5m, shutdown_timeout: 500ms}
        api: {timeout: 90, breaker_interval: 1m}
        delivery: {dedup_ttl: 1h, max_age: 1w, backoff: [1s, 30]}
        routes: [{template_id: X}]
        """)
    assert config.smtp.max_message_size == 1_000_000_000
    assert (config.smtp.timeout, config.smtp.shutdown_timeout) == (300.0, 0.5)
    assert (config.api.timeout, config.api.breaker_interval) == (90.0, 60.0)
    assert (config.delivery.dedup_ttl, config.delivery.max_age) == (3600.0, 604_800.0)
    assert config.delivery.backoff == [1.0, 30.0]


def test_bad_sizes_and_durations_are_located() -> None:
    issues = errors("""\
        smtp:
          max_message_size: 10XB
          timeout: soon
        delivery:
          backoff: [30s, 2x]
        routes: [{template_id: X}]
        """)
    assert where(issues) == [
        (2, "smtp.max_message_size"),
        (3, "smtp.timeout"),
        (5, "delivery.backoff[1]"),
    ]
    assert "10MiB" in issues[0].message and "'10XB'" in issues[0].message
    assert "30s" in issues[1].message and "'soon'" in issues[1].message


# ---------------------------------------------------------------- environment


def test_env_expansion() -> None:
    config = parse(
        """\
        smtp: {hostname: "${HOST}", max_recipients: "${MAX:-7}"}
        api:
          app_key: ${KEY}
          url: "${URL:-https://api.example.test/send}"
        routes:
          - template_id: "E_${TEMPLATE:-9}"
            alias: "${EMPTY:-fallback}"
        """,
        env={"HOST": "mx.example.test", "KEY": "k-123", "EMPTY": ""},
    )
    assert config.smtp.hostname == "mx.example.test"
    assert config.smtp.max_recipients == 7
    assert config.app_key() == "k-123"
    assert config.api.url == "https://api.example.test/send"
    route = config.routes[0]
    assert route.template_id is not None and route.template_id.source == "E_9"
    # ${VAR:-default} uses the default for a set-but-empty variable, as the shell does.
    assert route.alias is not None and route.alias.source == "fallback"


def test_env_value_wins_over_default() -> None:
    config = parse("api: {timeout: '${T:-10s}'}\n" + MINIMAL, env={"T": "3s"})
    assert config.api.timeout == 3.0


def test_dollar_dollar_is_a_literal_dollar() -> None:
    config = parse(
        """\
        routes:
          - template_id: "cost$$5"
            alias: "$${NOT_EXPANDED}"
            data: {price: "$$${PRICE}"}
        """,
        env={"PRICE": "12", "NOT_EXPANDED": "oops"},
    )
    route = config.routes[0]
    assert route.template_id is not None and route.template_id.source == "cost$5"
    assert route.alias is not None and route.alias.source == "${NOT_EXPANDED}"
    assert route.data["price"].source == "$12"


def test_a_lone_dollar_is_left_alone() -> None:
    route = parse("routes: [{template_id: X, match: {subject: 're:total \\$\\d+$'}}]\n").routes[0]
    assert [str(p) for p in route.match.subject or []] == ["re:total \\$\\d+$"]


def test_unset_variable_without_default_is_an_error_with_its_line() -> None:
    issues = errors(
        """\
        smtp:
          hostname: bridge.test
        api:
          app_key: ${AOTSEND_APP_KEY}
        routes:
          - template_id: "${TEMPLATE}"
        """
    )
    assert where(issues) == [(4, "api.app_key"), (6, "routes[0].template_id")]
    assert "AOTSEND_APP_KEY" in issues[0].message and "not set" in issues[0].message
    assert "TEMPLATE" in issues[1].message


def test_unset_variable_reports_no_knock_on_errors() -> None:
    issue = only(errors("smtp: {listen: '${LISTEN}'}\n" + MINIMAL))
    assert (issue.line, issue.path) == (1, "smtp.listen")
    assert "LISTEN" in issue.message


def test_explicit_env_is_used_not_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SMTP_BRIDGE_TEST_KEY", "from-process")
    text = "api: {app_key: '${SMTP_BRIDGE_TEST_KEY}'}\n" + MINIMAL
    assert only(errors(text)).path == "api.app_key"
    assert parse(text, {"SMTP_BRIDGE_TEST_KEY": "given"}).app_key() == "given"
    # env=None means the process environment.
    assert parse_config(text, env=None).app_key() == "from-process"


def test_empty_app_key_counts_as_unset() -> None:
    config = parse("api: {app_key: '${KEY:-}'}\n" + MINIMAL)
    assert config.api.app_key is None and config.app_key() == ""


# ---------------------------------------------------------------- secret files


def test_app_key_file_is_read_and_stripped(tmp_path: Path) -> None:
    secret = tmp_path / "app_key"
    secret.write_text("file-key-42\n")
    config = parse(f"api: {{app_key_file: {secret}}}\n" + MINIMAL)
    assert config.app_key() == "file-key-42"


def test_password_hash_file_and_user_app_key_file(tmp_path: Path) -> None:
    (tmp_path / "hash").write_text(HASH + "\n")
    (tmp_path / "crm_key").write_text("crm-file-key\r\n")
    config = parse(f"""\
        smtp:
          auth:
            users:
              crm:
                password_hash_file: {tmp_path / "hash"}
                app_key_file: {tmp_path / "crm_key"}
        routes: [{{template_id: X}}]
        """)
    crm = config.smtp.auth.users["crm"]
    assert crm.password_hash.get_secret_value() == HASH
    assert crm.app_key is not None and crm.app_key.get_secret_value() == "crm-file-key"


def test_secret_file_path_may_come_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "app_key").write_text("cred-key\n")
    text = "api: {app_key_file: '${CREDENTIALS_DIRECTORY}/app_key'}\n" + MINIMAL
    assert parse(text, {"CREDENTIALS_DIRECTORY": str(tmp_path)}).app_key() == "cred-key"


def test_secret_and_secret_file_together_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("x\n")
    issue = only(
        errors(f"""\
        api:
          app_key: inline
          app_key_file: {tmp_path / "k"}
        routes: [{{template_id: X}}]
        """)
    )
    assert (issue.line, issue.path) == (3, "api.app_key_file")
    assert "either app_key or app_key_file" in issue.message


def test_password_hash_and_its_file_together_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "h").write_text(HASH + "\n")
    issue = only(
        errors(f"""\
        smtp:
          auth:
            users:
              crm:
                password_hash: "{HASH}"
                password_hash_file: {tmp_path / "h"}
        routes: [{{template_id: X}}]
        """)
    )
    assert (issue.line, issue.path) == (6, "smtp.auth.users.crm.password_hash_file")


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "not-utf8"])
def test_unreadable_secret_file_is_an_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "secret"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_text("\n")
    elif kind == "not-utf8":
        path.write_bytes(b"\xff\xfe\x00")
    issue = only(errors(f"api:\n  app_key_file: {path}\n" + MINIMAL))
    assert (issue.line, issue.path) == (2, "api.app_key_file")
    assert str(path) in issue.message


def test_missing_password_hash_is_an_error() -> None:
    issue = only(errors("smtp: {auth: {users: {crm: {app_key: k}}}}\n" + MINIMAL))
    assert issue.path == "smtp.auth.users.crm.password_hash"
    assert issue.message == "required key is missing"


# ---------------------------------------------------------------- unknown keys


UNKNOWN_KEY_CASES = [
    ("top", "rotes: []\n" + MINIMAL, 1, "rotes", ["routes", "smtp", "replies"]),
    ("smtp", "smtp:\n  listen: [a:1]\n  tiemout: 5s\n" + MINIMAL, 3, "smtp.tiemout", ["timeout"]),
    (
        "smtp.tls",
        "smtp:\n  tls:\n    cert: {cert}\n    key: {key}\n    foo: 1\n" + MINIMAL,
        5,
        "smtp.tls.foo",
        ["cert", "implicit_listen", "key", "starttls"],
    ),
    (
        "smtp.auth",
        "smtp:\n  auth:\n    require: true\n" + MINIMAL,
        3,
        "smtp.auth.require",
        ["require_tls", "users"],
    ),
    (
        "smtp.auth.users.NAME",
        "smtp:\n  auth:\n    users:\n      crm:\n"
        + f"        password_hash: {HASH}\n        pasword: y\n"
        + MINIMAL,
        6,
        "smtp.auth.users.crm.pasword",
        ["password_hash", "password_hash_file", "app_key", "app_key_file"],
    ),
    ("api", "api:\n  key: x\n" + MINIMAL, 2, "api.key", ["app_key", "app_key_file", "url"]),
    (
        "delivery",
        "delivery:\n  retries: 3\n" + MINIMAL,
        2,
        "delivery.retries",
        ["backoff", "max_age", "mode"],
    ),
    ("admin", "admin:\n  port: 9025\n" + MINIMAL, 2, "admin.port", ["listen"]),
    (
        "routes[i]",
        "routes:\n  - template_id: X\n  - template_id: Y\n    template: Z\n",
        4,
        "routes[1].template",
        ["template_id", "data", "allow_header_overrides"],
    ),
    (
        "routes[i].match",
        "routes:\n  - template_id: X\n    match:\n      foo: bar\n",
        4,
        "routes[0].match.foo",
        ["body", "client", "headers", "mail_from", "rcpt", "subject", "user"],
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "path", "hints"),
    [case[1:] for case in UNKNOWN_KEY_CASES],
    ids=[case[0] for case in UNKNOWN_KEY_CASES],
)
def test_unknown_keys_are_rejected_at_every_level(
    tls_files: dict[str, str], text: str, line: int, path: str, hints: list[str]
) -> None:
    issue = only(
        errors(text.replace("{cert}", tls_files["cert"]).replace("{key}", tls_files["key"]))
    )
    assert (issue.line, issue.path) == (line, path)
    assert issue.message.startswith("unknown key")
    allowed = issue.message.split("expected one of: ")[1].split(", ")
    for hint in hints:
        assert hint in allowed


def test_unknown_key_suggests_the_closest_name() -> None:
    issue = only(errors("smtp:\n  max_recipient: 5\n" + MINIMAL))
    assert "did you mean max_recipients?" in issue.message


def test_all_unknown_keys_are_reported_at_once() -> None:
    issues = errors("""\
        smpt: {}
        api:
          tmeout: 5s
        routes:
          - template_id: X
            bogus: 1
        """)
    assert where(issues) == [(1, "smpt"), (3, "api.tmeout"), (6, "routes[0].bogus")]


# ---------------------------------------------------------------- patterns and templates


def test_bad_patterns_and_templates_are_located_exactly() -> None:
    issues = errors("""\
        routes:
          - name: first
            template_id: E_1
          - name: second
            match:
              rcpt: ["*@ok.test", "re:("]
              subject: "re:[unclosed"
              headers: {X-App: "re:(?P<bad"}
            template_id: "{{ x "
            alias: "{{ sender.name | }}"
            reply_to: "{% if %}"
            to: "{{ rcpt.address"
            data:
              name: "{{ rcpt.local }}"
              link: "{{ text | regex_search('x' }}"
              nested:
                deeper: ["ok", "{{ oops "]
        """)
    assert where(issues) == [
        (6, "routes[1].match.rcpt[1]"),
        (7, "routes[1].match.subject[0]"),
        (8, "routes[1].match.headers.X-App[0]"),
        (9, "routes[1].template_id"),
        (10, "routes[1].alias"),
        (11, "routes[1].reply_to"),
        (12, "routes[1].to"),
        (15, "routes[1].data.link"),
        (17, "routes[1].data.nested.deeper[1]"),
    ]
    assert "regular expression" in issues[0].message
    assert all("template" in i.message for i in issues[3:])


def test_unknown_filter_is_a_config_error() -> None:
    issue = only(errors("routes:\n  - template_id: X\n    data: {a: '{{ x | nosuch }}'}\n"))
    assert (issue.line, issue.path) == (3, "routes[0].data.a")
    assert "nosuch" in issue.message


def test_data_must_be_a_mapping() -> None:
    issue = only(errors("routes:\n  - template_id: X\n    data: [a, b]\n"))
    assert (issue.line, issue.path) == (3, "routes[0].data")


def test_data_keeps_non_string_values() -> None:
    route = parse("routes:\n  - template_id: X\n    data: {n: 3, flag: true, s: hi}\n").routes[0]
    assert route.data["n"] == 3 and route.data["flag"] is True
    assert isinstance(route.data["s"], CompiledTemplate)


def test_pattern_must_be_a_string() -> None:
    issue = only(errors("routes:\n  - template_id: X\n    match: {subject: [{a: 1}]}\n"))
    assert issue.path == "routes[0].match.subject[0]"


# ---------------------------------------------------------------- cross checks


@pytest.mark.parametrize("api_timeout", ["60s", "61s", "1h"])
def test_api_timeout_must_be_shorter_than_smtp_timeout(api_timeout: str) -> None:
    issue = only(errors(f"smtp:\n  timeout: 60s\napi:\n  timeout: {api_timeout}\n" + MINIMAL))
    assert (issue.line, issue.path) == (4, "api.timeout")
    assert "shorter than smtp.timeout" in issue.message


def test_default_api_timeout_against_a_short_smtp_timeout() -> None:
    issue = only(errors("smtp: {timeout: 10s}\n" + MINIMAL))
    assert issue.path == "api.timeout"


def test_api_timeout_just_below_smtp_timeout_is_fine() -> None:
    assert parse("smtp: {timeout: 60s}\napi: {timeout: 59s}\n" + MINIMAL).api.timeout == 59


def test_relay_route_needs_template_id() -> None:
    issue = only(errors("routes:\n  - name: a\n    template_id: X\n  - name: b\n    alias: y\n"))
    assert (issue.line, issue.path) == (4, "routes[1].template_id")
    assert "template_id" in issue.message and "relay" in issue.message


def test_drop_and_reject_routes_need_no_template_id() -> None:
    config = parse("routes:\n  - action: drop\n  - action: reject\n")
    assert [r.action for r in config.routes] == ["drop", "reject"]
    assert config.routes[1].reply is None  # the server answers replies.REJECTED


def test_reject_route_reply() -> None:
    route = parse("routes:\n  - action: reject\n    reply: '554 5.7.1 Go away'\n").routes[0]
    assert route.reply == Reply(554, "5.7.1", "Go away")
    assert parse("routes: [{action: reject, reply: '450 4.7.1 Later'}]\n").routes[0].reply == (
        Reply(450, "4.7.1", "Later")
    )


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        ("250 2.0.0 Ok", "4xx or 5xx"),
        ("550 nope", "not an SMTP reply"),
        ("550 4.7.1 x", "RFC 3463"),
    ],
)
def test_reject_route_reply_must_be_a_4xx_or_5xx_reply(reply: str, words: str) -> None:
    issue = only(errors(f"routes:\n  - action: reject\n    reply: '{reply}'\n"))
    assert (issue.line, issue.path) == (3, "routes[0].reply")
    assert words in issue.message


def test_reply_only_for_reject_routes() -> None:
    issue = only(errors("routes:\n  - template_id: X\n    reply: '550 5.7.1 No'\n"))
    assert (issue.line, issue.path) == (3, "routes[0].reply")


def test_duplicate_route_names() -> None:
    issues = errors("""\
        routes:
          - name: a
            template_id: X
          - name: b
            template_id: X
          - name: a
            template_id: Y
        """)
    issue = only(issues)
    assert (issue.line, issue.path) == (6, "routes[2].name")
    assert "'a'" in issue.message and "unique" in issue.message


def test_unnamed_routes_are_named_by_position() -> None:
    config = parse("""\
        routes:
          - template_id: X
          - name: special
            template_id: Y
          - template_id: Z
        """)
    assert [r.name for r in config.routes] == ["route-1", "special", "route-3"]


def test_generated_names_never_collide_with_given_ones() -> None:
    config = parse("routes:\n  - template_id: X\n  - name: route-1\n    template_id: Y\n")
    names = [r.name for r in config.routes]
    assert names[1] == "route-1" and len(set(names)) == 2


def test_route_name_must_not_be_empty() -> None:
    assert only(errors("routes: [{name: '', template_id: X}]\n")).path == "routes[0].name"


def test_routes_are_required_and_not_empty() -> None:
    assert only(errors("smtp: {}\n")).path == "routes"
    assert only(errors("routes: []\n")).message == "expected at least 1 item"


# ---------------------------------------------------------------- replies


def test_reply_overrides() -> None:
    config = parse(
        MINIMAL
        + """\
replies:
  "40007": "451 4.3.2 Provider balance exhausted, try again later"
  40003: "554 5.3.5 Template missing"
  "http:429": "421 4.7.0 Slow down"
  never_sent: "451 4.4.1 Upstream down"
"""
    )
    assert config.replies["40007"] == Reply(
        451, "4.3.2", "Provider balance exhausted, try again later"
    )
    assert config.replies["40003"].code == 554
    assert set(config.replies) == {"40007", "40003", "http:429", "never_sent"}


def test_reply_overrides_use_check_override() -> None:
    issues = errors(
        MINIMAL
        + """\
replies:
  "40005": "250 2.0.0 ok"
  "200": "451 4.3.0 no"
  "forty": "451 4.3.0 x"
  "40007": "garbage"
"""
    )
    assert where(issues) == [
        (4, "replies.40005"),
        (5, "replies.200"),
        (6, "replies.forty"),
        (7, "replies.40007"),
    ]
    for issue, key, value in [
        (issues[0], "40005", "250 2.0.0 ok"),
        (issues[1], "200", "451 4.3.0 no"),
        (issues[3], "40007", "garbage"),
    ]:
        with pytest.raises(ValueError) as expected:
            replies.check_override(key, value)
        assert issue.message == str(expected.value)
    assert "forty" in issues[2].message


# ---------------------------------------------------------------- YAML problems


def test_duplicate_yaml_keys() -> None:
    issues = errors("""\
        smtp:
          max_recipients: 5
          max_recipients: 6
        routes:
          - template_id: X
            template_id: Y
        """)
    assert where(issues) == [(3, "smtp.max_recipients"), (6, "routes[0].template_id")]
    assert all(i.message == "duplicate key" for i in issues)


def test_yaml_merge_keys_may_be_overridden() -> None:
    config = parse("""\
        routes:
          - name: a
            template_id: X
            data: &common {brand: Example, link: "{{ x }}"}
          - name: b
            template_id: Y
            data:
              <<: *common
              link: "{{ y }}"
        """)
    data = config.routes[1].data
    assert (data["brand"].source, data["link"].source) == ("Example", "{{ y }}")


def test_errors_in_an_overriding_key_point_at_it() -> None:
    issue = only(
        errors("""\
        routes:
          - name: a
            template_id: X
            data: &common {link: "{{ x }}"}
          - name: b
            template_id: Y
            data:
              <<: *common
              link: "{{ y "
        """)
    )
    assert (issue.line, issue.path) == (9, "routes[1].data.link")


def test_keys_are_taken_as_written() -> None:
    # YAML 1.1 would read `on` as true; a header named "On" must stay "On".
    config = parse("routes: [{template_id: X, match: {headers: {On: x}}}]\n")
    assert list(config.routes[0].match.headers or {}) == ["On"]


def test_yaml_syntax_error_has_a_line() -> None:
    issue = only(errors("smtp:\n  listen: [a:1\napi:\n  timeout: 5s\n" + MINIMAL))
    assert issue.line is not None and issue.line >= 2
    assert issue.message.startswith("YAML syntax error")


def test_yaml_tab_indentation() -> None:
    issue = only(errors("smtp:\n\tlisten: a:1\n" + MINIMAL))
    assert issue.line == 2 and "YAML syntax error" in issue.message


def test_yaml_unsafe_tags_are_refused() -> None:
    issue = only(errors("smtp:\n  hostname: !!python/name:os.system ''\n" + MINIMAL))
    assert issue.line == 2 and "YAML" in issue.message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"], ids=["list", "str", "int"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    issue = only(errors(text))
    assert (issue.line, issue.path) == (1, "")
    assert "mapping" in issue.message


def test_empty_file() -> None:
    issue = only(errors(""))
    assert issue.path == "routes" and issue.message == "required key is missing"


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("smtp: 5\n", "smtp"),
        ("smtp: {listen: 'no-port'}\n", "smtp.listen[0]"),
        ("smtp: {listen: ['127.0.0.1:70000']}\n", "smtp.listen[0]"),
        ("smtp: {trusted_networks: [10.0.0.300/8]}\n", "smtp.trusted_networks[0]"),
        ("smtp: {protocol: smpt}\n", "smtp.protocol"),
        ("smtp: {proxy_protocol: maybe}\n", "smtp.proxy_protocol"),
        ("smtp: {max_recipients: lots}\n", "smtp.max_recipients"),
        ("smtp: {max_connections: 0}\n", "smtp.max_connections"),
        ("smtp: {hostname: 'bad host!'}\n", "smtp.hostname"),
        ("smtp: {bare_lf: strip}\n", "smtp.bare_lf"),
        ("api: {url: ftp://x}\n", "api.url"),
        ("api: {encoding: xml}\n", "api.encoding"),
        ("api: {rate_limit: -1}\n", "api.rate_limit"),
        ("delivery: {mode: later}\n", "delivery.mode"),
        ("delivery: {backoff: []}\n", "delivery.backoff"),
        ("delivery: {store: 'mysql://u:pw@h/db'}\n", "delivery.store"),
        ("admin: {listen: nowhere}\n", "admin.listen"),
        ("routes: [{template_id: X, action: bounce}]\n", "routes[0].action"),
        ("routes: [{template_id: X, is_random: 3}]\n", "routes[0].is_random"),
        ("routes: [{template_id: X, match: {client: [not-a-net]}}]\n", "routes[0].match.client[0]"),
        ("routes: 5\n", "routes"),
        ("routes: [5]\n", "routes[0]"),
        ("replies: [a]\n", "replies"),
    ],
    ids=lambda v: v.split("\n")[0] if "\n" in v else v,
)
def test_bad_values_are_located_and_readable(text: str, path: str) -> None:
    body = text if text.startswith("routes") else text + MINIMAL
    issue = only(errors(body))
    assert (issue.line, issue.path) == (1, path)
    assert_readable(issue)


def assert_readable(issue: ConfigIssue) -> None:
    """No pydantic jargon: what an operator reads says what to write."""
    for jargon in ("pydantic", "errors.pydantic.dev", "Value error", "Input should be",
                   "instance of", "[type="):  # fmt: skip
        assert jargon not in issue.message, issue
    assert issue.message and issue.message[0].islower() or issue.message[0] in "'\"<", issue


def test_literal_errors_say_what_is_allowed() -> None:
    message = only(errors("smtp: {protocol: smpt}\n" + MINIMAL)).message
    assert message == "expected 'smtp' or 'lmtp', got 'smpt'"


def test_store_error_does_not_echo_a_password() -> None:
    message = only(errors("delivery: {store: 'mysql://u:hunter2@h/db'}\n" + MINIMAL)).message
    assert "hunter2" not in message and "postgresql://" in message


def test_store_urls() -> None:
    for url in ("postgresql://bridge@db/bridge", "sqlite:///var/lib/x.db"):
        assert parse(f"delivery: {{store: '{url}'}}\n" + MINIMAL).delivery.store == url


def test_tls_files_must_be_readable(tmp_path: Path, tls_files: dict[str, str]) -> None:
    issue = only(
        errors(f"""\
        smtp:
          tls:
            cert: {tls_files["cert"]}
            key: {tmp_path / "missing.key"}
        routes: [{{template_id: X}}]
        """)
    )
    assert (issue.line, issue.path) == (4, "smtp.tls.key")
    assert "missing.key" in issue.message


def test_tls_needs_cert_and_key(tls_files: dict[str, str]) -> None:
    issue = only(errors(f"smtp:\n  tls:\n    cert: {tls_files['cert']}\n" + MINIMAL))
    assert (issue.line, issue.path) == (2, "smtp.tls.key")
    assert issue.message == "required key is missing"


# ---------------------------------------------------------------- issues and files


def test_issue_format() -> None:
    assert str(ConfigIssue("c.yaml", 3, "smtp.timeout", "bad")) == "c.yaml:3: smtp.timeout: bad"
    assert str(ConfigIssue("c.yaml", None, "", "cannot read")) == "c.yaml: cannot read"
    error = ConfigError([ConfigIssue("c.yaml", 1, "a", "x"), ConfigIssue("c.yaml", 2, "b", "y")])
    assert str(error) == "c.yaml:1: a: x\nc.yaml:2: b: y"


def test_issues_are_sorted_by_line() -> None:
    issues = errors("""\
        routes:
          - template_id: "{{ x "
        smtp:
          timeout: soon
        api:
          foo: 1
        """)
    assert [i.line for i in issues] == sorted(i.line or 0 for i in issues)


def test_load_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text("smtp:\n  timeout: soon\n" + MINIMAL)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == f"{path}:2: smtp.timeout: " + caught.value.issues[0].message


def test_load_config_reads_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(MINIMAL)
    assert load_config(str(path), env={}).routes[0].name == "route-1"


@pytest.mark.parametrize("kind", ["missing", "directory", "not-utf8"])
def test_load_config_unreadable(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "bridge.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "not-utf8":
        path.write_bytes(b"routes: \xff\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    issue = only(caught.value.issues)
    assert issue.file == str(path) and issue.line is None
    assert issue.message


# ---------------------------------------------------------------- schema


def test_json_schema() -> None:
    schema = json.loads(json.dumps(json_schema()))
    assert set(schema["properties"]) == {
        "smtp",
        "api",
        "delivery",
        "admin",
        "routes",
        "replies",
        "quotas",
    }
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["routes"]
    for name, definition in schema["$defs"].items():
        assert definition["additionalProperties"] is False, name
    defs = schema["$defs"]
    assert "app_key_file" in defs["ApiConfig"]["properties"]
    assert {"password_hash_file", "app_key_file"} <= set(defs["AuthUser"]["properties"])
    assert "breaker_failures" in defs["ApiConfig"]["properties"]
    assert "store" in defs["DeliveryConfig"]["properties"]
    assert "name" not in defs["RouteConfig"].get("required", [])
    assert set(defs["MatchConfig"]["properties"]) == {
        "rcpt", "mail_from", "user", "client", "subject", "headers", "body"
    }  # fmt: skip
    # A single pattern is as valid as a list of them.
    rcpt = defs["MatchConfig"]["properties"]["rcpt"]
    pattern = {"type": "string", "description": "shell glob, or 're:' + Python regex"}
    assert pattern in rcpt["anyOf"]
    assert {"type": "array", "items": pattern} in rcpt["anyOf"]


# ---------------------------------------------------------------- secrets


def test_secrets_never_appear_in_repr_or_str(tmp_path: Path) -> None:
    (tmp_path / "hash").write_text(OTHER_HASH + "\n")
    config = parse(
        f"""\
        smtp:
          auth:
            users:
              crm:
                password_hash: "{HASH}"
                app_key: ${{CRM_KEY}}
              ops:
                password_hash_file: {tmp_path / "hash"}
        api:
          app_key: ${{AOTSEND_APP_KEY}}
        delivery:
          store: postgresql://bridge:DBPASS-secret@db/bridge
        routes: [{{template_id: X}}]
        """,
        env={"AOTSEND_APP_KEY": "APIKEY-secret", "CRM_KEY": "CRMKEY-secret"},
    )
    assert config.app_key() == "APIKEY-secret"
    texts = [
        repr(config),
        str(config),
        repr(config.api),
        str(config.smtp.auth),
        repr(config.delivery),
    ]
    for text in texts:
        for secret in ("APIKEY", "CRMKEY", _key_part(HASH), _key_part(OTHER_HASH), "DBPASS"):
            assert secret not in text


# ---------------------------------------------------------------- config.example.yaml

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"


def test_example_config_is_valid() -> None:
    config = load_config(EXAMPLE, env={"AOTSEND_APP_KEY": "k"})
    assert config.app_key() == "k"
    assert [r.action for r in config.routes].count("relay") >= 3
    assert {r.action for r in config.routes} == {"relay", "drop", "reject"}


def test_example_config_needs_the_app_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(EXAMPLE, env={})
    issue = only(caught.value.issues)
    assert issue.path == "api.app_key"
    assert "AOTSEND_APP_KEY" in issue.message


def test_example_config_shows_the_defaults() -> None:
    """Apart from the documented exceptions, the example's values are the defaults."""
    example = load_config(EXAMPLE, env={"AOTSEND_APP_KEY": "k"})
    default = parse(MINIMAL)
    for section in ("smtp", "api", "delivery", "admin"):
        skip = [p for p in ("smtp.hostname", "api.app_key") if p.startswith(f"{section}.")]
        got = _without(example.model_dump(include={section}), *skip)
        want = _without(default.model_dump(include={section}), *skip)
        assert got == want, section


def _all_keys(model: type[BaseModel]) -> set[str]:
    keys = set(model.model_fields) | {f"{n}_file" for n in getattr(model, "secret_fields", ())}
    for field in model.model_fields.values():
        for arg in _nested_types(field.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                keys |= _all_keys(arg)
    return keys


def _nested_types(annotation: Any) -> list[Any]:
    found = [annotation]
    for arg in get_args(annotation):
        found.extend(_nested_types(arg))
    return found


def test_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    keys = _all_keys(Config)
    assert {"breaker_failures", "app_key_file", "password_hash_file", "body"} <= keys
    missing = [k for k in sorted(keys) if not re.search(rf"^[\s#-]*{k}:", text, re.MULTILINE)]
    assert missing == []
    for value in ("never_sent", "http:429", "postgresql://", "implicit_listen"):
        assert value in text


@pytest.mark.parametrize("value", ["hunter2", "scrypt$abc", "$2b$12$bcrypthashbcrypthash"])
def test_password_hash_must_be_a_hash(value: str) -> None:
    issue = only(
        errors(
            f"smtp:\n  auth:\n    users:\n      crm:\n        password_hash: '{value}'\n" + MINIMAL
        )
    )
    assert (issue.line, issue.path) == (5, "smtp.auth.users.crm.password_hash")
    assert "hash-password" in issue.message
    assert value not in issue.message  # never echo what may be a plaintext password
