"""YAML read into plain data that remembers each key's line, with ``${VAR}`` expanded."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from .problems import Loc

__all__ = ["LocatedYaml"]

_ENV_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class LocatedYaml:
    """YAML turned into plain data, remembering the line of every key path."""

    def __init__(self, text: str, env: Mapping[str, str]) -> None:
        self.lines: dict[Loc, int] = {}
        self.problems: list[tuple[Loc, str]] = []
        self._env = env
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            self.data: Any = {} if node is None else self._build(node, (), loader)
        finally:
            loader.dispose()

    def _build(self, node: yaml.Node, loc: Loc, loader: yaml.SafeLoader) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            # Keys merged in with `<<: *anchor` come first and may be overridden.
            own = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
            loader.flatten_mapping(node)
            result: dict[Any, Any] = {}
            written: set[str] = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    self.problems.append((loc, "mapping keys must be strings"))
                    continue
                # The key as written: `on:` stays "on" (not True), `40007:` is "40007".
                key = str(key_node.value)
                sub = (*loc, key)
                if id(key_node) in own:
                    if key in written:
                        self.problems.append((sub, "duplicate key"))
                    written.add(key)
                if key in result:  # a later value replaces a merged one: forget its lines
                    for stale in [k for k in self.lines if k[: len(sub)] == sub]:
                        del self.lines[stale]
                self.lines[sub] = key_node.start_mark.line + 1
                result[key] = self._build(value_node, sub, loader)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self._build(v, (*loc, i), loader) for i, v in enumerate(node.value)]
        value = loader.construct_object(node)
        if isinstance(value, str) and "$" in value:
            value = self._expand(value, loc)
        return value

    def _expand(self, value: str, loc: Loc) -> str:
        def replace(found: re.Match[str]) -> str:
            if found.group(0) == "$$":
                return "$"
            name, default = found.group(1), found.group(2)
            if name in self._env and (self._env[name] != "" or default is None):
                return self._env[name]
            if default is not None:
                return default
            self.problems.append((loc, f"environment variable {name} is not set"))
            return ""

        return _ENV_RE.sub(replace, value)

    def line_of(self, loc: Loc) -> int | None:
        """The line of ``loc``, or of the nearest key above it that has one."""
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.lines:
                return self.lines[loc[:end]]
        return None
