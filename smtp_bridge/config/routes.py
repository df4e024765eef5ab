"""The ``routes`` and ``quotas`` entries: what they match, and what a route does."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.config import JsonDict

from ..templating import compile_template
from .base import ConfigModel
from .problems import Loc, _Problems
from .values import NetworkList, PatternList, RateT, ReplyT, TemplateT

__all__ = ["MatchConfig", "QuotaConfig", "QuotaMatch", "RouteConfig"]


class MatchConfig(ConfigModel):
    rcpt: PatternList | None = None
    mail_from: PatternList | None = None
    user: PatternList | None = None
    client: NetworkList | None = None
    subject: PatternList | None = None
    headers: dict[str, PatternList] | None = None
    body: PatternList | None = None

    @property
    def has_content_conditions(self) -> bool:
        """True when the route can only be decided once the message is read."""
        return bool(self.subject or self.headers or self.body)


def _route_schema(schema: JsonDict, model: type[Any]) -> None:
    # Unnamed routes are named by position (Config._name_routes).
    required = schema.get("required")
    if isinstance(required, list) and "name" in required:
        required.remove("name")
        if not required:
            del schema["required"]


class RouteConfig(ConfigModel):
    model_config = ConfigDict(json_schema_extra=_route_schema)

    name: str = Field(min_length=1)
    match: MatchConfig = Field(default_factory=MatchConfig)
    action: Literal["relay", "drop", "reject"] = "relay"
    reply: ReplyT | None = None
    template_id: TemplateT | None = None
    to: TemplateT = Field(default_factory=lambda: compile_template("{{ rcpt.address }}"))
    alias: TemplateT | None = None
    reply_to: TemplateT | None = None
    is_random: bool | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    allow_header_overrides: bool = False

    @model_validator(mode="after")
    def _action_fields(self) -> RouteConfig:
        problems: list[tuple[Loc, str]] = []
        if self.action == "relay" and self.template_id is None:
            problems.append(
                (
                    ("template_id",),
                    "required key is missing: a relay route (the default action) needs template_id",
                )
            )
        if self.reply is not None:
            if self.action != "reject":
                problems.append((("reply",), "reply is only for action: reject"))
            elif self.reply.is_success:
                problems.append((("reply",), "the reply of a reject route must be 4xx or 5xx"))
        if problems:
            raise _Problems(problems)
        return self


class QuotaMatch(ConfigModel):
    """A quota's conditions: the envelope's only, since it is checked at RCPT."""

    rcpt: PatternList | None = None
    mail_from: PatternList | None = None
    user: PatternList | None = None
    client: NetworkList | None = None


class QuotaConfig(ConfigModel):
    """``quotas:`` entry: recipients per window, counted per key, for matching envelopes."""

    # Named in the 451 reply and a metric label: plain characters only.
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    match: QuotaMatch = Field(default_factory=QuotaMatch)
    per: Literal["client", "user", "mail_from", "route"]
    recipients: RateT
