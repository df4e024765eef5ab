"""Typed, frozen configuration (docs/configuration.md) and its loader.

``load_config`` reads YAML, expands ``${VAR}`` / ``${VAR:-default}``, reads
``*_file`` secrets, validates with pydantic, compiles patterns and templates,
and reports *every* problem at once as ``file:line: key.path: what is wrong``.

One module a job: ``values`` (durations, sizes, addresses... and their schema),
``base`` (the model base, ``*_file`` secrets), ``sections`` (smtp, api,
delivery, admin), ``routes`` (routes, quotas), ``root`` (the whole file and its
cross-section checks), ``located`` (YAML with lines and ``${VAR}``),
``messages`` (pydantic's errors in plain words), ``loader`` (text -> Config).
"""

from __future__ import annotations

from ..errors import ConfigError, ConfigIssue
from .loader import DEFAULT_CONFIG_PATH, load_config, parse_config
from .root import Config, json_schema
from .routes import MatchConfig, QuotaConfig, QuotaMatch, RouteConfig
from .sections import (
    AdminConfig,
    ApiConfig,
    AuthConfig,
    AuthUser,
    DeliveryConfig,
    SmtpConfig,
    TlsConfig,
)
from .values import Rate, parse_duration, parse_size, split_host_port

__all__ = [
    "AdminConfig",
    "ApiConfig",
    "AuthConfig",
    "AuthUser",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "DEFAULT_CONFIG_PATH",
    "DeliveryConfig",
    "MatchConfig",
    "QuotaConfig",
    "QuotaMatch",
    "Rate",
    "RouteConfig",
    "SmtpConfig",
    "TlsConfig",
    "json_schema",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "split_host_port",
]
