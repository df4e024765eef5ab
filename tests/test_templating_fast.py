"""A template that is one variable (or one variable ``or`` a constant) renders
exactly as Jinja renders it (issue 15).

``CompiledTemplate.render`` skips Jinja for ``{{ subject }}`` and
``{{ rcpt.local }}``-like templates. Each case renders both ways, through the
fast path and through the compiled Jinja template itself (the sandboxed
environment the bridge uses: autoescape off, default Undefined), and must give
the same string or raise the same exception type, whatever the context holds:
None, numbers, Markup, strings with control characters, the bridge's own
Address, HeaderMap and ClientInfo, objects without the attribute, private
attributes the sandbox refuses, names the context lacks.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markupsafe import Markup

from smtp_bridge.message import EMPTY_ADDRESS, Address, HeaderMap, parse_message
from smtp_bridge.templating import ClientInfo, build_context, compile_template


def both(source: str, context: dict[str, Any]) -> tuple[Any, Any]:
    """(fast render, Jinja render), each a string or the exception type raised."""
    compiled = compile_template(source)
    assert compiled.template is not None

    def attempt(render: Any) -> Any:
        try:
            return render(context)
        except Exception as exc:
            return type(exc)

    return attempt(compiled.render), attempt(compiled.template.render)


class Odd:
    """An object with a __str__ of its own and a private attribute."""

    visible = "seen"
    _hidden = "secret"

    def __str__(self) -> str:
        return "<odd & 'quoted'>"


ONE_VARIABLE = [
    "{{ subject }}", "{{subject}}", "{{ subject }}\n", "{{- subject -}}", "{# note #}{{ subject }}",
    "{{ rcpt.local }}", "{{ rcpt.domain }}", "{{ sender.name }}", "{{ sender.address }}",
    "{{ client.ip }}", "{{ client.port }}", "{{ headers.subject }}", "{{ headers.nosuch }}",
    "{{ value }}", "{{ value.visible }}", "{{ value._hidden }}", "{{ value.nosuch }}",
    "{{ value.nosuch.deeper }}", "{{ value.__class__ }}", "{{ value.upper }}", "{{ value.real }}",
    "{{ missing }}", "{{ missing.attr }}", "{{ range }}", "{{ loop }}", "{{ to }}",
    "{{ sender.name or 'Billing' }}", "{{ value or 'x' }}", "{{ value.visible or 'none' }}",
    "{{ value or none }}", "{{ value or 0 }}", "{{ value or '' }}", "{{- value or 'y' -}}",
    "{{ missing or 'x' }}", "{{ value.nosuch or 'd' }}", "{{ value._hidden or 'd' }}",
    "{{ value.__class__ or 'd' }}", "{{ headers.nosuch or 'h' }}",
]  # fmt: skip

VALUES = [
    None, "", "plain", "a\x00b\x1b[31m\r\nc", "<b>&amp;</b>", Markup("<i>x</i>"), 0, 1.5, True,
    [1, "x"], {"visible": "from a dict"}, Odd(), EMPTY_ADDRESS,
    Address("a@b.c", "A", "a", "b.c"), HeaderMap([("Subject", "s"), ("X", "1")]),
]  # fmt: skip


def context_with(value: Any) -> dict[str, Any]:
    raw = b'From: "Eve\x00" <e@example.com>\r\nSubject: Hi {{ 7*7 }} \x07\r\n\r\nbody\r\n'
    context = build_context(
        parse_message(raw),
        mail_from="app@example.com",
        rcpt="bob@example.org",
        client=ClientInfo("192.0.2.1", 2525),
    )
    context["value"] = value
    return context


def test_these_templates_take_the_fast_path() -> None:
    for source in ONE_VARIABLE:
        assert compile_template(source).lookup is not None, source
    others = ("{{ a }}{{ b }}", " {{ a }}", "{{ a['b'] }}", "{{ a|upper }}", "{{ self }}",
              "{{ none }}", "{{ a() }}", "{% if a %}{{ a }}{% endif %}", "{{ a.b() }}",
              "{{ a or b }}", "{{ 'x' or a }}", "{{ a or b or 'c' }}", "{{ a and 'x' }}",
              "{{ (a or 'x')|upper }}", "{{ a or 'x' }}{{ b }}")  # fmt: skip
    for source in others:
        assert compile_template(source).lookup is None, source


@pytest.mark.parametrize("source", ONE_VARIABLE)
@pytest.mark.parametrize("value", VALUES, ids=[type(v).__name__ for v in VALUES])
def test_fast_render_equals_jinja(source: str, value: Any) -> None:
    fast, jinja = both(source, context_with(value))
    assert fast == jinja


def test_message_content_is_never_evaluated() -> None:
    fast, jinja = both("{{ subject }}", context_with(None))
    assert fast == jinja == "Hi {{ 7*7 }} \x07"


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(ONE_VARIABLE),
    st.none()
    | st.text()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.builds(Markup, st.text())
    | st.lists(st.text(max_size=5), max_size=3)
    | st.dictionaries(st.sampled_from(["visible", "local", "x"]), st.text(max_size=5)),
)
def test_fast_render_equals_jinja_on_generated_values(source: str, value: Any) -> None:
    fast, jinja = both(source, context_with(value))
    assert fast == jinja
