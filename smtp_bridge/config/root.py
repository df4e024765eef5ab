"""The whole file as one model: its sections, and the checks that span more than one."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from pydantic import Field, field_validator, model_validator

from ..replies import Reply, check_override
from .base import ConfigModel
from .problems import Loc, _Problems
from .routes import QuotaConfig, RouteConfig
from .sections import AdminConfig, ApiConfig, DeliveryConfig, SmtpConfig
from .values import ReplyT

__all__ = ["Config", "json_schema"]


class Config(ConfigModel):
    smtp: SmtpConfig = Field(default_factory=SmtpConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    routes: list[RouteConfig] = Field(min_length=1)
    replies: dict[str, ReplyT] = Field(default_factory=dict)
    quotas: list[QuotaConfig] = Field(default_factory=list)

    @field_validator("routes", mode="before")
    @classmethod
    def _name_routes(cls, value: Any) -> Any:
        """Name unnamed routes ``route-<position>``, never reusing a name already given."""
        if not isinstance(value, list):
            return value
        taken = {r.get("name") for r in value if isinstance(r, dict)}
        named: list[Any] = []
        for i, route in enumerate(value):
            if isinstance(route, dict) and "name" not in route:
                name, n = f"route-{i + 1}", 1
                while name in taken:
                    n += 1
                    name = f"route-{i + 1}-{n}"
                taken.add(name)
                route = {"name": name, **route}
            named.append(route)
        return named

    @field_validator("replies", mode="before")
    @classmethod
    def _check_replies(cls, value: Any) -> Any:
        """Every override through ``replies.check_override``: no 2xx for a failure key."""
        if not isinstance(value, Mapping):
            return value
        checked: dict[str, Reply] = {}
        problems: list[tuple[Loc, str]] = []
        for key, reply in value.items():
            try:
                checked[str(key)] = check_override(str(key), str(reply))
            except ValueError as exc:
                problems.append(((str(key),), str(exc)))
        if problems:
            raise _Problems(problems)
        return checked

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        problems: list[tuple[Loc, str]] = []
        problems.extend(_duplicate_names("routes", "route", (r.name for r in self.routes)))
        problems.extend(_duplicate_names("quotas", "quota", (q.name for q in self.quotas)))
        if self.api.timeout >= self.smtp.timeout:
            message = (
                f"must be shorter than smtp.timeout ({_seconds(self.smtp.timeout)}), "
                "so the API answers before the SMTP client gives up"
            )
            problems.append((("api", "timeout"), message))
        delivery = self.delivery
        if delivery.mode == "queue" and delivery.in_flow_delay >= self.smtp.timeout:
            message = (
                f"must be shorter than smtp.timeout ({_seconds(self.smtp.timeout)}), "
                "so the client hears 250 before the session times out (0 turns it off)"
            )
            problems.append((("delivery", "in_flow_delay"), message))
        if problems:
            raise _Problems(problems)
        return self

    def app_key(self) -> str:
        """The global API key ('' when unset)."""
        return self.api.app_key.get_secret_value() if self.api.app_key else ""


def _duplicate_names(section: str, kind: str, names: Iterable[str]) -> Iterator[tuple[Loc, str]]:
    """Each entry of ``section`` named like an earlier one (names label logs and metrics)."""
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            yield (section, i, "name"), f"duplicate {kind} name {name!r}: names must be unique"
        seen.add(name)


def _seconds(value: float) -> str:
    return f"{value:g}s"


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file, for editors (``smtp-bridge schema``)."""
    schema = Config.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "smtp-bridge configuration"
    return schema
