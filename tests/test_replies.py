"""The the reply table (docs/replies.md), reply parsing and operator overrides."""

from __future__ import annotations

import pytest

from smtp_bridge import replies
from smtp_bridge.outcomes import ApiResult, ResultKind
from smtp_bridge.replies import Reply, reply_for


def api(code: int) -> ApiResult:
    return ApiResult(kind=ResultKind.API, code=code, message="x")


def http(status: int, retry_after: float | None = None) -> ApiResult:
    return ApiResult(kind=ResultKind.HTTP, http_status=status, retry_after=retry_after)


NEVER = ApiResult(kind=ResultKind.NEVER_SENT, message="connection refused")
UNKNOWN = ApiResult(kind=ResultKind.UNKNOWN, message="timed out after sending")
BAD_BODY = ApiResult(kind=ResultKind.BAD_BODY, http_status=200)

# (id, result, expected code, expected enhanced status) -- one row per docs/replies.md row.
TABLE = [
    ("200-delivered", api(200), 250, "2.0.0"),
    ("40001-key-empty", api(40001), 451, "4.3.5"),
    ("40002-auth-failed", api(40002), 451, "4.3.5"),
    ("40003-template", api(40003), 451, "4.3.5"),
    ("40004-rcpt-empty", api(40004), 451, "4.3.0"),
    ("40005-rcpt-format", api(40005), 550, "5.1.3"),
    # 40006 is resent without reply_to by the caller; reaching the table it keeps the mail.
    ("40006-after-resend", api(40006), 451, "4.3.0"),
    ("40007-balance", api(40007), 451, "4.3.2"),
    ("40008-data-format", api(40008), 554, "5.6.0"),
    ("other-code-40009", api(40009), 451, "4.3.0"),
    ("other-code-500", api(500), 451, "4.3.0"),
    ("api-without-code", ApiResult(kind=ResultKind.API), 451, "4.3.0"),
    ("never-sent", NEVER, 451, "4.4.1"),
    ("outcome-unknown", UNKNOWN, 451, "4.4.2"),
    ("http-429", http(429, 30.0), 451, "4.4.5"),
    ("http-502", http(502), 451, "4.4.1"),
    ("http-503", http(503), 451, "4.4.1"),
    ("http-504", http(504), 451, "4.4.1"),
    ("http-401", http(401), 451, "4.3.5"),
    ("http-403", http(403), 451, "4.3.5"),
    ("http-404", http(404), 451, "4.3.5"),
    ("http-413", http(413), 552, "5.3.4"),
    ("http-500-other", http(500), 451, "4.3.0"),
    ("http-400-other", http(400), 451, "4.3.0"),
    ("http-302-other", http(302), 451, "4.3.0"),
    ("http-without-status", ApiResult(kind=ResultKind.HTTP), 451, "4.3.0"),
    ("non-json-body", BAD_BODY, 451, "4.3.0"),
]


@pytest.mark.parametrize(
    ("result", "code", "status"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_design_table(result: ApiResult, code: int, status: str) -> None:
    reply = reply_for(result)
    assert (reply.code, reply.status) == (code, status)
    assert str(reply).startswith(f"{code} {status} ")


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (api(200), replies.OK),
        (api(40001), replies.CONFIG_ERROR),
        (api(40002), replies.CONFIG_ERROR),
        (api(40003), replies.CONFIG_ERROR),
        (api(40004), replies.INTERNAL),
        (api(40005), replies.BAD_RECIPIENT),
        (api(40006), replies.REPLY_TO_REJECTED),
        (api(40007), replies.BALANCE),
        (api(40008), replies.DATA_FORMAT),
        (api(12345), replies.UNKNOWN_CODE),
        (NEVER, replies.NEVER_SENT),
        (UNKNOWN, replies.OUTCOME_UNKNOWN),
        (http(429), replies.THROTTLED),
        (http(503), replies.UPSTREAM_UNAVAILABLE),
        (http(401), replies.HTTP_CONFIG_ERROR),
        (http(413), replies.TOO_LARGE),
        (http(418), replies.UNKNOWN_CODE),
        (BAD_BODY, replies.UNKNOWN_CODE),
    ],
    ids=lambda v: str(v) if isinstance(v, Reply) else None,
)
def test_table_returns_the_named_constants(result: ApiResult, expected: Reply) -> None:
    assert reply_for(result) is expected


def test_ok_is_exactly_250_2_0_0_ok() -> None:
    assert str(replies.OK) == "250 2.0.0 Ok"


@pytest.mark.parametrize(
    ("name", "code", "status"),
    [
        ("OK", 250, "2.0.0"),
        ("DROPPED", 250, "2.0.0"),
        ("CONFIG_ERROR", 451, "4.3.5"),
        ("HTTP_CONFIG_ERROR", 451, "4.3.5"),
        ("INTERNAL", 451, "4.3.0"),
        ("UNKNOWN_CODE", 451, "4.3.0"),
        ("REPLY_TO_REJECTED", 451, "4.3.0"),
        ("BAD_RECIPIENT", 550, "5.1.3"),
        ("BALANCE", 451, "4.3.2"),
        ("DATA_FORMAT", 554, "5.6.0"),
        ("NEVER_SENT", 451, "4.4.1"),
        ("OUTCOME_UNKNOWN", 451, "4.4.2"),
        ("THROTTLED", 451, "4.4.5"),
        ("UPSTREAM_UNAVAILABLE", 451, "4.4.1"),
        ("TOO_LARGE", 552, "5.3.4"),
        ("NO_ROUTE_DATA", 550, "5.7.1"),
        ("TEMPLATE_FAILED", 451, "4.3.5"),
        ("REJECTED", 550, "5.7.1"),
        ("RCPT_BAD_SYNTAX", 553, "5.1.3"),
        ("RCPT_NO_ROUTE", 550, "5.1.1"),
        ("TOO_MANY_RECIPIENTS", 452, "4.5.3"),
        ("AUTH_REQUIRED", 530, "5.7.0"),
        ("BARE_LF", 550, "5.5.2"),
        ("SERVICE_UNAVAILABLE_SHUTDOWN", 421, "4.3.2"),
        ("TOO_MANY_CONNECTIONS", 421, "4.7.0"),
    ],
)
def test_named_constants(name: str, code: int, status: str) -> None:
    reply = getattr(replies, name)
    assert (reply.code, reply.status) == (code, status)
    # Every constant is a valid reply line by the module's own parser.
    assert Reply.parse(str(reply)) == reply
    assert name in replies.__all__


def test_reply_texts_hold_no_detail_beyond_fixed_phrases() -> None:
    for name in replies.__all__:
        value = getattr(replies, name)
        if isinstance(value, Reply):
            assert len(str(value)) < 120, name
            assert "Exception" not in value.text and "Error:" not in value.text


def test_classification_properties() -> None:
    assert replies.OK.is_success and not replies.OK.is_transient and not replies.OK.is_permanent
    assert replies.BALANCE.is_transient and not replies.BALANCE.is_permanent
    assert replies.TOO_MANY_CONNECTIONS.is_transient
    assert replies.BAD_RECIPIENT.is_permanent and not replies.BAD_RECIPIENT.is_success


def test_with_id() -> None:
    line = replies.OUTCOME_UNKNOWN.with_id("01HXQ7")
    assert line.startswith("451 4.4.2 ")
    assert line.endswith(" id=01HXQ7")
    assert replies.OK.with_id("abc") == "250 2.0.0 Ok id=abc"


# --- Reply.parse ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "451 4.3.2 Provider balance exhausted, try again later",
            Reply(451, "4.3.2", "Provider balance exhausted, try again later"),
        ),
        ("550 5.7.1 No", Reply(550, "5.7.1", "No")),
        ("250 2.0.0 Ok", replies.OK),
        ("  421 4.7.0 Busy\n", Reply(421, "4.7.0", "Busy")),  # YAML block scalars end in \n
        ("554 5.100.999 Odd but valid", Reply(554, "5.100.999", "Odd but valid")),
    ],
    ids=["balance", "short", "ok", "surrounding-space", "three-digit-parts"],
)
def test_parse(line: str, expected: Reply) -> None:
    assert Reply.parse(line) == expected


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("", "not an SMTP reply"),
        ("451", "not an SMTP reply"),
        ("451 Provider balance", "not an SMTP reply"),
        ("351 3.0.0 Go ahead", "not an SMTP reply"),
        ("651 6.0.0 Nope", "not an SMTP reply"),
        ("45 4.3.2 Short code", "not an SMTP reply"),
        ("4511 4.3.2 Long code", "not an SMTP reply"),
        ("461 4.3.2 Second digit above 5", "not an SMTP reply"),
        ("451 5.3.2 Class mismatch", "does not match"),
        ("550 4.1.1 Class mismatch", "does not match"),
        ("451 4.03.2 Leading zero", "not an SMTP reply"),
        ("451 4.3.1000 Detail too long", "not an SMTP reply"),
        ("451 4.3.2", "must not be empty"),
        ("451 4.3.2    ", "must not be empty"),
        ("451 4.3.2 two\r\nlines", "one line"),
        ("451 4.3.2 two\nlines", "one line"),
        ("451 4.3.2 caf\u00e9", "printable ASCII"),
        ("451 4.3.2 bell\x07", "printable ASCII"),
        ("451 4.3.2 " + "x" * 401, "at most 400"),
    ],
    ids=[
        "empty",
        "code-only",
        "no-status",
        "3xx",
        "6xx",
        "two-digit-code",
        "four-digit-code",
        "second-digit",
        "class-5-for-4xx",
        "class-4-for-5xx",
        "leading-zero",
        "detail-too-long",
        "no-text",
        "blank-text",
        "crlf",
        "lf",
        "non-ascii",
        "control-char",
        "too-long",
    ],
)
def test_parse_rejects(line: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Reply.parse(line)


# --- overrides -----------------------------------------------------------------------


def test_override_replaces_the_default_for_its_key() -> None:
    balance = Reply.parse("451 4.3.2 Provider balance exhausted, try again later")
    throttled = Reply.parse("421 4.4.5 Slow down")
    overrides = {"40007": balance, "http:429": throttled}
    assert reply_for(api(40007), overrides) is balance
    assert reply_for(http(429), overrides) is throttled
    # Other keys keep their defaults.
    assert reply_for(api(40008), overrides) is replies.DATA_FORMAT
    assert reply_for(http(503), overrides) is replies.UPSTREAM_UNAVAILABLE
    # An API code key does not apply to the HTTP status of the same number, nor back.
    assert reply_for(http(413), {"413": balance}) is replies.TOO_LARGE
    assert reply_for(api(429), {"http:429": throttled}) is replies.UNKNOWN_CODE


def test_override_for_kinds_without_code() -> None:
    custom = Reply.parse("451 4.4.1 Provider down, we will be back")
    assert reply_for(NEVER, {"never_sent": custom}) is custom
    assert reply_for(UNKNOWN, {"never_sent": custom}) is replies.OUTCOME_UNKNOWN


def test_override_can_change_class_among_failures() -> None:
    permanent = Reply.parse("554 5.3.2 Out of credit")
    assert reply_for(api(40007), {"40007": permanent}) is permanent
    assert replies.is_permanent(api(40007), {"40007": permanent})


def test_override_never_turns_a_failure_into_a_success() -> None:
    # check_override refuses this at load; reply_for guards anyway.
    lying = Reply(250, "2.0.0", "Ok")
    assert reply_for(api(40005), {"40005": lying}) is replies.BAD_RECIPIENT
    failing = Reply(451, "4.3.0", "Nope")
    assert reply_for(api(200), {"200": failing}) is replies.OK


def test_override_key() -> None:
    assert replies.override_key(api(40007)) == "40007"
    assert replies.override_key(http(429)) == "http:429"
    assert replies.override_key(NEVER) == "never_sent"
    assert replies.override_key(UNKNOWN) == "unknown"
    assert replies.override_key(BAD_BODY) == "bad_body"
    assert replies.override_key(ApiResult(kind=ResultKind.API)) is None


def test_parse_overrides_like_design_example() -> None:
    parsed = replies.parse_overrides(
        {"40007": "451 4.3.2 Provider balance exhausted, try again later"}
    )
    assert parsed == {"40007": Reply(451, "4.3.2", "Provider balance exhausted, try again later")}
    assert replies.parse_overrides({"200": "250 2.0.0 Sent via AOTsend"})["200"].is_success


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("40007", "451 5.3.2 mismatch", "does not match"),
        ("40007", "not a reply", "not an SMTP reply"),
        ("40007", "250 2.0.0 Ok", "must be a 4xx or 5xx"),
        ("http:503", "250 2.0.0 Ok", "must be a 4xx or 5xx"),
        ("200", "451 4.3.0 nope", "must be a 2xx"),
        ("balance", "451 4.3.2 x", "unknown reply override key"),
        ("http:42", "451 4.3.2 x", "unknown reply override key"),
        ("http:200", "451 4.3.2 x", "never applies"),
        ("-1", "451 4.3.2 x", "unknown reply override key"),
    ],
    ids=[
        "class-mismatch",
        "garbage",
        "failure-as-2xx",
        "http-failure-as-2xx",
        "success-as-4xx",
        "unknown-key",
        "short-http-key",
        "http-200",
        "negative",
    ],
)
def test_bad_overrides(key: str, value: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as info:
        replies.parse_overrides({key: value})
    assert str(info.value).startswith(f"replies.{key}: ")


# --- breaker inputs ------------------------------------------------------------------

BREAKER = [
    ("40001", api(40001), True, False),
    ("40002", api(40002), True, False),
    ("40003", api(40003), False, False),
    ("40007", api(40007), True, False),
    ("40005", api(40005), False, False),
    ("200", api(200), False, False),
    ("http-429", http(429), False, False),  # slows the key down (aimd), opens nothing
    ("http-500", http(500), False, True),
    ("http-503", http(503), False, True),
    ("http-404", http(404), False, False),
    ("never-sent", NEVER, False, True),
    ("unknown", UNKNOWN, False, True),
    ("bad-body", BAD_BODY, False, False),
]


@pytest.mark.parametrize(
    ("result", "opens", "transport"), [r[1:] for r in BREAKER], ids=[r[0] for r in BREAKER]
)
def test_breaker_inputs(result: ApiResult, opens: bool, transport: bool) -> None:
    assert replies.opens_breaker(result) is opens
    assert replies.is_transport_failure(result) is transport
    assert replies.is_throttled(result) is (result.http_status == 429)


@pytest.mark.parametrize(
    ("result", "permanent"),
    [
        (api(40005), True),
        (api(40008), True),
        (http(413), True),
        (api(40007), False),
        (NEVER, False),
        (api(200), False),
    ],
    ids=["40005", "40008", "http-413", "40007", "never-sent", "200"],
)
def test_is_permanent(result: ApiResult, permanent: bool) -> None:
    assert replies.is_permanent(result) is permanent
