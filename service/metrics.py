"""Prometheus metrics: HTTP requests counted as they are answered, the rest read from the log.

Each app has its own `CollectorRegistry` (several apps live in one test
process; the global registry would refuse the second). Request counts are
kept in memory. Everything else is derived from data that already exists —
the `jobs` read model (jobs by state, queue depth), the supervisor's runner
status, and the event log (webhook deliveries, training steps, artifacts) —
so the figures agree with the API and survive a restart. The log is scanned
incrementally from the last position seen, so a scrape costs only the events
appended since the previous one.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from events.store import SQLiteEventStore

#: Content type of the exposition format that `Metrics.render` produces.
CONTENT_TYPE = CONTENT_TYPE_LATEST

_JOB_STATES = ("queued", "running", "succeeded", "failed", "canceled")
_TERMINAL_TYPES = ("JobSucceeded", "JobFailed", "JobCanceled")
_SCANNED_TYPES = (
    "TrainingProgressed",
    "CheckpointSaved",
    "ImageGenerated",
    "WebhookDelivered",
    "WebhookDeliveryAttempted",
    "WebhookEndpointDisabled",
    *_TERMINAL_TYPES,
)
_SCAN_BATCH = 5000


@dataclass
class LogCounters:
    """Counters folded from the event log, and the position they cover."""

    position: int = 0
    training_steps: int = 0
    checkpoints: int = 0
    images: int = 0
    webhook_outcomes: dict[str, int] = field(
        default_factory=lambda: {"delivered": 0, "retry_scheduled": 0, "given_up": 0}
    )
    endpoints_disabled: int = 0
    # Last reported step of each job still training, so each step counts once.
    last_step: dict[str, int] = field(default_factory=dict)

    def apply(self, stream_id: str, etype: str, step: int | None, next_attempt: Any) -> None:
        """Fold one scanned row (see `_scan`) into the counters."""
        if etype == "TrainingProgressed" and step is not None:
            delta = step - self.last_step.get(stream_id, 0)
            # A retried attempt starts again below the last step: the redone
            # steps are work done, counted again from where it restarted.
            if delta > 0:
                self.training_steps += delta
            self.last_step[stream_id] = step
        elif etype == "CheckpointSaved":
            self.checkpoints += 1
        elif etype == "ImageGenerated":
            self.images += 1
        elif etype == "WebhookDelivered":
            self.webhook_outcomes["delivered"] += 1
        elif etype == "WebhookDeliveryAttempted":
            outcome = "retry_scheduled" if next_attempt is not None else "given_up"
            self.webhook_outcomes[outcome] += 1
        elif etype == "WebhookEndpointDisabled":
            self.endpoints_disabled += 1
        elif etype in _TERMINAL_TYPES:
            self.last_step.pop(stream_id, None)


@dataclass
class Snapshot:
    """What a scrape shows besides the request counters."""

    jobs_by_state: dict[str, int] = field(default_factory=dict)
    runners: list[dict[str, Any]] = field(default_factory=list)


def _scan(
    conn: sqlite3.Connection, after: int
) -> tuple[list[tuple[int, str, str, int | None, Any]], int]:
    marks = ",".join("?" * len(_SCANNED_TYPES))
    rows = conn.execute(
        "SELECT position, stream_id, type, json_extract(data, '$.step'), "
        "json_extract(data, '$.next_attempt_at') FROM events "
        f"WHERE position > ? AND type IN ({marks}) ORDER BY position LIMIT ?",
        (after, *_SCANNED_TYPES, _SCAN_BATCH),
    ).fetchall()
    (head,) = conn.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()
    covered = rows[-1][0] if len(rows) == _SCAN_BATCH else int(head)
    return rows, covered


def _jobs_by_state(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())


class _DerivedCollector(Collector):
    """Exposes the last refreshed `LogCounters` and `Snapshot`."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        counters = self._metrics.counters
        snapshot = self._metrics.snapshot
        jobs = GaugeMetricFamily("boothd_jobs", "Jobs by state", labels=["state"])
        for state in _JOB_STATES:
            jobs.add_metric([state], snapshot.jobs_by_state.get(state, 0))
        yield jobs
        yield GaugeMetricFamily(
            "boothd_queue_depth",
            "Jobs waiting for a runner",
            snapshot.jobs_by_state.get("queued", 0),
        )
        up = GaugeMetricFamily(
            "boothd_runner_up", "1 when the runner process is up", labels=["runner", "device"]
        )
        for runner in snapshot.runners:
            up.add_metric(
                [
                    str(runner.get("runner_id", runner.get("id", "?"))),
                    str(runner.get("device", "")),
                ],
                1.0 if runner_is_up(runner) else 0.0,
            )
        yield up
        yield GaugeMetricFamily(
            "boothd_event_log_position", "Position of the newest event seen", counters.position
        )
        yield CounterMetricFamily(
            "boothd_training_steps", "Training steps completed", counters.training_steps
        )
        yield CounterMetricFamily(
            "boothd_checkpoints_saved", "Checkpoint artifacts written", counters.checkpoints
        )
        yield CounterMetricFamily("boothd_images_generated", "Images generated", counters.images)
        hooks = CounterMetricFamily(
            "boothd_webhook_deliveries", "Webhook delivery attempts by outcome", labels=["outcome"]
        )
        for outcome, count in sorted(counters.webhook_outcomes.items()):
            hooks.add_metric([outcome], count)
        yield hooks
        yield CounterMetricFamily(
            "boothd_webhook_endpoints_disabled",
            "Webhook endpoints disabled (410 Gone)",
            counters.endpoints_disabled,
        )


#: Runner `state` values that count as up (the supervisor may instead say `alive`).
RUNNER_UP_STATES = frozenset({"starting", "running", "ready", "idle", "busy"})


def runner_is_up(runner: dict[str, Any]) -> bool:
    """Whether a supervisor status entry describes a live runner."""
    if "alive" in runner:
        return bool(runner["alive"])
    return runner.get("state") in RUNNER_UP_STATES


class Metrics:
    """The app's metrics registry and the state its derived metrics are read from."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "boothd_http_requests",
            "HTTP requests answered, by route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "boothd_http_request_duration_seconds",
            "Time to answer an HTTP request (until the handler returned)",
            ["route"],
            registry=self.registry,
        )
        self.counters = LogCounters()
        self.snapshot = Snapshot()
        self._lock = asyncio.Lock()
        self.registry.register(_DerivedCollector(self))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    async def refresh(self, store: SQLiteEventStore, runners: Sequence[dict[str, Any]]) -> None:
        """Bring the derived figures up to date (call before `render`)."""
        async with self._lock:
            while True:
                rows, covered = await store.read_transaction(
                    lambda c: _scan(c, self.counters.position)
                )
                for _, stream_id, etype, step, next_attempt in rows:
                    self.counters.apply(stream_id, etype, step, next_attempt)
                if covered <= self.counters.position:
                    break
                self.counters.position = covered
            self.snapshot = Snapshot(
                jobs_by_state=await store.read_transaction(_jobs_by_state),
                runners=list(runners),
            )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
