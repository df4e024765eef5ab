"""The config file's commands: ``check-config`` validates it, ``schema`` describes it,
``hash-password`` makes a ``password_hash`` to put in it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..config import DEFAULT_CONFIG_PATH, json_schema
from .common import EXIT_CONFIG, EXIT_OK, config_arg, fail, load_or_report

__all__ = ["cmd_check_config", "cmd_hash_password", "cmd_schema"]


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    print(f"ok: {config_arg(args.config) or DEFAULT_CONFIG_PATH}: {len(config.routes)} routes")
    for route in config.routes:
        print(f"  {_describe_route(route)}")
    if config.api.app_key is None:
        print("  warning: api.app_key is not set (only `serve --sandbox` works)")
    return EXIT_OK


def _describe_route(route: Any) -> str:
    conditions = []
    for name, value in route.match:
        if value is None:
            continue
        if name == "headers":
            text = ", ".join(f"{k}={'|'.join(map(str, v))}" for k, v in value.items())
        else:
            text = "|".join(map(str, value))
        conditions.append(f"{name}={text}")
    where = " ".join(conditions) or "(any)"
    if route.action == "relay":
        what = f"template={route.template_id}"
    elif route.action == "reject":
        what = f"reject {route.reply or '(550 5.7.1)'}"
    else:
        what = "drop"
    return f"{route.name}: {where} -> {what}"


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


def cmd_hash_password(args: argparse.Namespace) -> int:
    from ..auth import hash_password, read_password_from

    try:
        password = read_password_from(sys.stdin, interactive=sys.stdin.isatty())
    except ValueError as exc:
        return fail(str(exc))
    print(hash_password(password))
    return EXIT_OK
