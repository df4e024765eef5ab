"""Config text or file -> a validated ``Config``, or a ConfigError listing every problem."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import ConfigError, ConfigIssue
from .located import LocatedYaml
from .messages import validation_problems
from .problems import Loc, dotted
from .root import Config
from .values import compile_quietly

__all__ = ["DEFAULT_CONFIG_PATH", "load_config", "parse_config"]

DEFAULT_CONFIG_PATH = Path("/etc/smtp-bridge/config.yaml")


def parse_config(
    text: str, *, filename: str = "<config>", env: Mapping[str, str] | None = None
) -> Config:
    """Validate config text; raises ConfigError listing every problem found."""
    try:
        located = LocatedYaml(text, os.environ if env is None else env)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or "invalid YAML"
        message = f"YAML syntax error: {problem}"
        raise ConfigError([ConfigIssue(filename, line, "", message)]) from None

    def issue(loc: Loc, message: str) -> ConfigIssue:
        return ConfigIssue(filename, located.line_of(loc), dotted(loc), message)

    issues = [issue(loc, msg) for loc, msg in located.problems]
    if not isinstance(located.data, dict):
        issues.append(
            ConfigIssue(
                filename,
                1,
                "",
                "the top level must be a mapping of sections "
                "(smtp, api, delivery, admin, routes, replies)",
            )
        )
        raise ConfigError(issues)
    # A value whose ${VAR} is unset is already reported; its knock-on errors are noise.
    reported = {loc for loc, _ in located.problems}

    compiled_data, data_problems = _compile_route_data(located.data)
    issues.extend(issue(loc, msg) for loc, msg in data_problems)
    config: Config | None = None
    try:
        config = Config.model_validate(located.data)
    except ValidationError as exc:
        issues.extend(
            issue(loc, msg)
            for loc, msg in validation_problems(exc)
            if not any(loc[: len(r)] == r for r in reported)
        )
    if issues or config is None:
        issues.sort(key=lambda i: (i.line or 0, i.path))
        raise ConfigError(issues)
    routes = [
        route.model_copy(update={"data": compiled_data.get(i, {})})
        for i, route in enumerate(config.routes)
    ]
    return config.model_copy(update={"routes": routes})


def _compile_route_data(raw: dict[str, Any]) -> tuple[dict[int, Any], list[tuple[Loc, str]]]:
    """Compile the string leaves of every route's ``data`` with exact locations."""
    compiled: dict[int, Any] = {}
    problems: list[tuple[Loc, str]] = []

    def walk(value: Any, loc: Loc) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*loc, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*loc, i)) for i, v in enumerate(value)]
        if isinstance(value, str):
            try:
                return compile_quietly(value)
            except ValueError as exc:
                problems.append((loc, str(exc)))
        return value

    routes = raw.get("routes")
    if isinstance(routes, list):
        for i, route in enumerate(routes):
            if isinstance(route, dict) and "data" in route:
                if not isinstance(route["data"], dict):
                    problems.append((("routes", i, "data"), "expected a mapping of variables"))
                    route["data"] = {}
                    continue
                compiled[i] = walk(route["data"], ("routes", i, "data"))
    return compiled, problems


def load_config(path: Path | str, *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raises ConfigError (also for an unreadable file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        issue = ConfigIssue(str(path), None, "", f"cannot read: {exc.strerror}")
        raise ConfigError([issue]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue(str(path), None, "", "not UTF-8 text")]) from None
    return parse_config(text, filename=str(path), env=env)
