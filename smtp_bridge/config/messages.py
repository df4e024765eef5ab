"""pydantic's validation errors in the operator's words, each at its own key path."""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .base import ConfigModel
from .problems import Loc, _Problems
from .root import Config

__all__ = ["validation_problems"]

#: pydantic error types -> what the operator should write instead.
_EXPECTED = {
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "list_type": "expected a list",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "path_type": "expected a file path",
    "missing": "required key is missing",
    "string_too_short": "must not be empty",
}


def _pydantic_message(error: Mapping[str, Any]) -> str:
    """pydantic's message without its jargon ("Input should be", "Value error,")."""
    kind = str(error.get("type", ""))
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "too_short":
        count = ctx.get("min_length", 1)
        return f"expected at least {count} item{'' if count == 1 else 's'}"
    message = str(error.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if kind == "literal_error":
        got = error.get("input")
        return message.replace("Input should be", "expected") + f", got {got!r}"
    return message.replace("Input should be", "must be")


def _strip_annotation(annotation: Any) -> Any:
    """``Annotated[X, ...]`` and ``X | None`` -> X (the model, when a union holds one)."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if len(args) == 1:
                annotation = args[0]
            elif len(models) == 1:
                annotation = models[0]
            else:
                return annotation
        else:
            return annotation


def _known_keys(loc: Loc) -> list[str]:
    """Allowed keys of the mapping holding ``loc``'s last key, for 'unknown key' hints."""
    annotation: Any = Config
    for item in loc[:-1]:
        annotation = _strip_annotation(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(item))
            if field is None:
                return []
            annotation = field.annotation
        elif get_origin(annotation) is list and isinstance(item, int):
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) is dict and isinstance(item, str):
            annotation = get_args(annotation)[1]
        else:
            return []
    annotation = _strip_annotation(annotation)
    if not (isinstance(annotation, type) and issubclass(annotation, ConfigModel)):
        return []
    files = [f"{name}_file" for name in annotation.secret_fields]
    return sorted([*annotation.model_fields, *files])


def _unknown_key_message(loc: Loc) -> str:
    known = _known_keys(loc)
    if not known:
        return "unknown key"
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown key{hint}; expected one of: {', '.join(known)}"


def validation_problems(exc: ValidationError) -> list[tuple[Loc, str]]:
    """Every error of ``Config.model_validate``, a model validator's own ones unpacked."""
    problems: list[tuple[Loc, str]] = []
    for error in exc.errors():
        loc: Loc = tuple(error["loc"])
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, _Problems):
            problems.extend(((*loc, *sub), msg) for sub, msg in cause.problems)
        elif error.get("type") == "extra_forbidden":
            problems.append((loc, _unknown_key_message(loc)))
        else:
            problems.append((loc, _pydantic_message(error)))
    return problems
