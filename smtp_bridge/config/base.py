"""The base of every config model: frozen, no unknown keys, secrets also read from files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.config import JsonDict

from .problems import Loc, _Problems

__all__ = ["ConfigModel"]


def _schema_extra(schema: JsonDict, model: type[Any]) -> None:
    """Document the ``<field>_file`` keys that ``_read_secret_files`` accepts."""
    properties = schema.get("properties")
    fields: tuple[str, ...] = getattr(model, "secret_fields", ())
    if not fields or not isinstance(properties, dict):
        return
    required = schema.get("required")
    for name in fields:
        properties[f"{name}_file"] = {
            "type": "string",
            "description": f"read {name} from this file (e.g. systemd LoadCredential=)",
        }
        if isinstance(required, list) and name in required:
            required.remove(name)
            schema["oneOf"] = [{"required": [name]}, {"required": [f"{name}_file"]}]
    if isinstance(required, list) and not required:
        del schema["required"]


class ConfigModel(BaseModel):
    """A config section: unknown keys are errors, and ``secret_fields`` take a ``_file`` twin."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, arbitrary_types_allowed=True, json_schema_extra=_schema_extra
    )
    #: Secret fields that also accept ``<field>_file: PATH``.
    secret_fields: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, data: Any) -> Any:
        return _read_secret_files(data, cls.secret_fields) if cls.secret_fields else data


def _read_secret_files(data: Any, fields: tuple[str, ...]) -> Any:
    """Replace ``<field>_file: PATH`` by the file's content (systemd LoadCredential=)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    problems: list[tuple[Loc, str]] = []
    for name in fields:
        file_key = f"{name}_file"
        if file_key not in data:
            continue
        if data.get(name) not in (None, ""):
            problems.append(((file_key,), f"give either {name} or {file_key}, not both"))
            continue
        path = Path(str(data.pop(file_key)))
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            problems.append(((file_key,), f"cannot read {path}: {exc.strerror}"))
            continue
        except UnicodeDecodeError:
            problems.append(((file_key,), f"{path} is not UTF-8 text"))
            continue
        if not secret:
            problems.append(((file_key,), f"{path} is empty"))
            continue
        data[name] = secret
    if problems:
        raise _Problems(problems)
    return data
