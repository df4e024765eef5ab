"""Prometheus metrics, one registry per service (``smtp_bridge_*``).

A registry per :class:`Metrics` instance, not the global one, so several
bridges in one process (tests) never share counters. Under ``serve --workers N``
the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` for its workers: each writes
its values there (prometheus-client's multiprocess mode) and :meth:`Metrics.render`
adds up every worker's, so one scrape of the admin port sees the whole daemon.
Counters are summed; gauges say how they combine (``multiprocess_mode``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from . import __version__
from .outcomes import ApiResult, ResultKind

__all__ = ["MULTIPROCESS_ENV", "Metrics", "api_code_label", "forget_process"]

#: prometheus-client's switch for multiprocess mode: the directory of the values.
MULTIPROCESS_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"


def forget_process(directory: str, pid: int) -> None:
    """A worker died: its live gauges stop counting (its counters stay in the sums)."""
    if directory and Path(directory).is_dir():
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


# The *_created series double every counter's output and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]


def api_code_label(result: ApiResult) -> str:
    """A bounded label for one API outcome: '200', '40005', 'http_429', 'never_sent'..."""
    if result.kind is ResultKind.API and result.code is not None:
        return str(result.code) if 0 <= result.code < 10**6 else "other"
    if result.kind is ResultKind.HTTP and result.http_status is not None:
        return f"http_{result.http_status}"
    return result.kind.value


class Metrics:
    """Every metric the bridge exports; attributes are prometheus-client objects."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions = Counter(
            "smtp_bridge_sessions", "SMTP connections by result", ["result"], registry=r
        )
        self.sessions_open = Gauge(
            "smtp_bridge_sessions_open",
            "SMTP connections open now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.messages = Counter(
            "smtp_bridge_messages",
            "Recipients of received messages by route and outcome",
            ["route", "outcome"],
            registry=r,
        )
        self.replies = Counter(
            "smtp_bridge_data_replies", "Replies to DATA by reply class", ["code"], registry=r
        )
        self.api_calls = Counter(
            "smtp_bridge_api_calls", "AOTsend API calls by answer code", ["code"], registry=r
        )
        self.api_latency = Histogram(
            "smtp_bridge_api_latency_seconds",
            "AOTsend API call latency",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        # The spool's figures come from the store: every worker reads the same.
        self.queue_depth = Gauge(
            "smtp_bridge_queue_depth",
            "Recipients waiting in the spool",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.queue_oldest_age = Gauge(
            "smtp_bridge_queue_oldest_age_seconds",
            "Age of the oldest spooled recipient",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.dead_letters = Gauge(
            "smtp_bridge_dead_letters",
            "Recipients given up on (dead letters)",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.breaker_open = Gauge(
            "smtp_bridge_breaker_open",
            "1 while the API circuit breaker of any key is open or probing (in any worker)",
            registry=r,
            multiprocess_mode="livemax",
        )
        # The key label is "default" (api.app_key) or "sha256:" + 12 hex digits of
        # the key's digest: never the key itself. Each worker has its share of
        # api.max_concurrency and its own pace: the sum is the daemon's.
        self.api_concurrency = Gauge(
            "smtp_bridge_api_concurrency_limit",
            "API calls an API key may have in flight now (lowered by HTTP 429, AIMD)",
            ["key"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.config_reloads = Counter(
            "smtp_bridge_config_reloads", "Config reloads by result", ["result"], registry=r
        )
        self.config_last_reload_ok = Gauge(
            "smtp_bridge_config_last_reload_successful",
            "1 when the last config reload (SIGHUP) was taken, 0 when refused",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.config_last_reload_ok.set(1)
        self.rcpt_rejected = Counter(
            "smtp_bridge_rcpt_rejected",
            "Recipients refused at RCPT TO, by reason",
            ["reason"],
            registry=r,
        )
        self.quota_exceeded = Counter(
            "smtp_bridge_quota_exceeded",
            "Recipients refused at RCPT (451 4.7.1) because a quota was used up, by quota",
            ["quota"],
            registry=r,
        )
        self.auth_checks = Counter(
            "smtp_bridge_auth_checks",
            "SMTP AUTH attempts by result: ok, failed (a password was hashed) or"
            " locked_out (refused before hashing)",
            ["result"],
            registry=r,
        )
        self.info = Gauge(
            "smtp_bridge_build_info",
            "Always 1; the version as a label",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.info.labels(version=__version__).set(1)

    def observe_api(self, result: ApiResult) -> None:
        self.api_calls.labels(code=api_code_label(result)).inc()
        self.api_latency.observe(result.latency)

    def render(self) -> bytes:
        """The Prometheus text exposition: this registry's, or every worker's added up."""
        directory = os.environ.get(MULTIPROCESS_ENV)
        if directory and Path(directory).is_dir():
            combined = CollectorRegistry()
            multiprocess.MultiProcessCollector(combined, directory)  # type: ignore[no-untyped-call]
            return generate_latest(combined)
        return generate_latest(self.registry)
