"""The webhook dispatcher, and the registry of endpoints it shares with the handlers.

The dispatcher is one more reader of the log, with its own tracking position.
It maps job events to webhook types (`JobSucceeded` → `job.succeeded`, …),
finds the targets (the tenant's global endpoints whose `events` match, and the
job's own `callback_url` filtered by its `webhook_events`), and delivers
`{"type", "timestamp", "data": <job object at that event>}` signed per the
Standard Webhooks spec.

Why it is built this way:

- **Delivery state is in the log.** Every attempt is an event in the target's
  stream (`webhook-<id>`, or `callback-<job_id>` for a job's callback):
  `WebhookDelivered`, or `WebhookDeliveryAttempted` with `next_attempt_at`
  (null when given up). The tracking position is a low-water mark: every
  delivery for events up to it is settled and recorded. On start the
  dispatcher re-reads the job events after it together with the delivery
  records after it, so a retry that was pending when the process stopped is
  scheduled again for its recorded time, and a delivery that was already made
  is not made again (beyond the at-least-once window of a request in flight).
- **Deterministic deliveries.** `webhook-id` is derived from the target and
  the event position, and the body is rendered from the job's state folded up
  to that event (with the event's own time as "now"): every retry, even after
  a restart, sends the same id and the same body. Progress throttling is a
  fold over the job stream too (at most one `job.progress` per
  `progress_interval_seconds` of event time), so a restart decides the same.
- **Nobody waits for a slow endpoint.** Each target has its own queue and
  worker task; retries are timers that put the delivery back on its target's
  queue; the reader of the log never awaits an HTTP request. Each attempt is
  bounded by `webhooks.timeout_seconds`.
- **No SSRF.** Every attempt checks the URL with `check_url` and connects
  through `PublicOnlyResolver`, redirects off; `network.allow_private_urls`
  lifts the private-range ban for LAN setups and tests.

Retries follow `webhooks.retry_schedule_seconds` (±10 % jitter); a
`Retry-After` answer is honoured (the retry waits at least that long); `410`
disables the endpoint (`WebhookEndpointDisabled`), or a job's callback.
One dispatcher per log is assumed (one service process).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import random
import secrets
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import structlog
from standardwebhooks import Webhook

from events.errors import ConcurrencyError, StoreClosedError
from events.projections import JOB_STREAM_PREFIX, JobState, evolve, job_stream
from events.projector import JOB_EVENT_TYPES
from events.settings import Settings
from events.store import ANY_VERSION, NO_STREAM, SQLiteEventStore, set_tracking
from events.types import (
    Event,
    RecordedEvent,
    TrainingProgressed,
    WebhookDefaultSecretCreated,
    WebhookDelivered,
    WebhookDeliveryAttempted,
    WebhookEndpointCreated,
    WebhookEndpointDeleted,
    WebhookEndpointDisabled,
)
from gpu_runner.fetch import FetchError, PublicOnlyResolver, check_url, public_connector
from gpu_runner.jobspec import WEBHOOK_EVENT_TYPES
from service.errors import ApiError, not_found
from service.jobview import render_job

log = structlog.get_logger(__name__)

__all__ = [
    "WEBHOOK_TYPE_OF",
    "AttemptResult",
    "Delivery",
    "Endpoint",
    "Registry",
    "WebhookDispatcher",
    "deliveries_view",
    "delivery_id_for",
    "job_at",
    "matches",
    "new_secret",
]

TRACKING_NAME = "webhooks"
ENDPOINT_STREAM_PREFIX = "webhook-"
CALLBACK_STREAM_PREFIX = "callback-"
DEFAULT_SECRET_STREAM_PREFIX = "webhook-default-"
_USER_AGENT = "boothd-webhooks/0.1"
_MAX_ENDPOINTS_PER_TENANT = 100
_JOB_CACHE_LIMIT = 10_000
# A Retry-After longer than this is treated as this: an endpoint cannot park
# a delivery in memory for weeks.
_MAX_RETRY_AFTER_SECONDS = 24 * 3600.0

#: The webhook type each job event is delivered as (others are not delivered).
WEBHOOK_TYPE_OF: dict[str, str] = {
    "JobSubmitted": "job.queued",
    "JobStarted": "job.started",
    "TrainingProgressed": "job.progress",
    "CheckpointSaved": "job.checkpoint",
    "ImageGenerated": "job.image",
    "JobSucceeded": "job.succeeded",
    "JobFailed": "job.failed",
    "JobCanceled": "job.canceled",
}
_TERMINAL_WEBHOOK_TYPES = frozenset({"job.succeeded", "job.failed", "job.canceled"})
_REGISTRY_TYPES = (
    "WebhookEndpointCreated",
    "WebhookEndpointDeleted",
    "WebhookEndpointDisabled",
    "WebhookDefaultSecretCreated",
)
_RECORD_TYPES = ("WebhookDeliveryAttempted", "WebhookDelivered")


def matches(patterns: Iterable[str], webhook_type: str) -> bool:
    """Whether a subscription (`job.*`, `job.completed`, or exact names) wants `webhook_type`."""
    for pattern in patterns:
        if pattern in ("job.*", webhook_type):
            return True
        if pattern == "job.completed" and webhook_type in _TERMINAL_WEBHOOK_TYPES:
            return True
    return False


def new_secret() -> str:
    """A signing secret in the Standard Webhooks form: `whsec_` + base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def delivery_id_for(target: str, event_position: int) -> str:
    """The `webhook-id` of the delivery of one event to one target: the same on every
    retry and after a restart, different for every (target, event)."""
    digest = hashlib.sha256(f"{target}:{event_position}".encode()).hexdigest()
    return "msg_" + digest[:32]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def _now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- #
# Registry: endpoints and default secrets, folded from the log
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Endpoint:
    """A global webhook endpoint as the log says it is now."""

    id: str
    tenant: str
    url: str
    events: list[str]
    description: str
    secret: str
    created_at: datetime
    created_position: int
    deleted: bool = False
    disabled_reason: str | None = None

    @property
    def active(self) -> bool:
        return not self.deleted and self.disabled_reason is None

    @property
    def stream_id(self) -> str:
        return ENDPOINT_STREAM_PREFIX + self.id

    def view(self) -> dict[str, Any]:
        """The endpoint as the API shows it (never the secret)."""
        return {
            "id": self.id,
            "url": self.url,
            "events": self.events,
            "description": self.description,
            "created_at": _iso(self.created_at),
            "disabled": self.disabled_reason is not None,
            "disabled_reason": self.disabled_reason,
        }


class Registry:
    """Endpoints, default secrets and disabled callbacks; `apply` is idempotent, so
    a handler can apply its own append at once (read-your-writes) and the
    dispatcher apply it again when it reads it from the log."""

    def __init__(self) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        self.default_secrets: dict[str, str] = {}
        self.disabled_callbacks: set[str] = set()

    def apply(self, stream_id: str, position: int, recorded_at: datetime, event: Event) -> None:
        if isinstance(event, WebhookEndpointCreated):
            if event.endpoint_id not in self.endpoints:
                self.endpoints[event.endpoint_id] = Endpoint(
                    id=event.endpoint_id,
                    tenant=event.tenant,
                    url=event.url,
                    events=list(event.events),
                    description=event.description,
                    secret=event.secret,
                    created_at=recorded_at,
                    created_position=position,
                )
        elif isinstance(event, WebhookEndpointDeleted):
            endpoint = self.endpoints.get(stream_id.removeprefix(ENDPOINT_STREAM_PREFIX))
            if endpoint is not None:
                endpoint.deleted = True
        elif isinstance(event, WebhookEndpointDisabled):
            if stream_id.startswith(CALLBACK_STREAM_PREFIX):
                self.disabled_callbacks.add(stream_id)
            else:
                endpoint = self.endpoints.get(stream_id.removeprefix(ENDPOINT_STREAM_PREFIX))
                if endpoint is not None and endpoint.disabled_reason is None:
                    endpoint.disabled_reason = event.reason
        elif isinstance(event, WebhookDefaultSecretCreated):
            self.default_secrets.setdefault(event.tenant, event.secret)

    def owned(self, tenant: str, endpoint_id: str) -> Endpoint:
        """The tenant's endpoint, or 404 (also for another tenant's endpoint)."""
        endpoint = self.endpoints.get(endpoint_id)
        if endpoint is None or endpoint.deleted or endpoint.tenant != tenant:
            raise not_found("webhook", endpoint_id)
        return endpoint

    def of_tenant(self, tenant: str) -> list[Endpoint]:
        return sorted(
            (e for e in self.endpoints.values() if e.tenant == tenant and not e.deleted),
            key=lambda e: e.created_position,
        )

    def targets(self, tenant: str, webhook_type: str, position: int) -> list[Endpoint]:
        """Active endpoints of `tenant` subscribed to `webhook_type` that existed
        before the event at `position`."""
        return [
            e
            for e in self.endpoints.values()
            if e.tenant == tenant
            and e.active
            and e.created_position < position
            and matches(e.events, webhook_type)
        ]


# --------------------------------------------------------------------------- #
# Deliveries
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Delivery:
    """One event to deliver to one target, with its attempts so far."""

    id: str
    target: str  # the stream its records go to: webhook-<id> or callback-<job_id>
    url: str
    secret: str
    event_position: int
    event_type: str
    job_id: str | None
    body: bytes
    attempts: int = 0


@dataclasses.dataclass(frozen=True)
class _Record:
    """The latest recorded state of a delivery (read back on start)."""

    attempts: int
    settled: bool
    next_attempt_at: datetime | None


@dataclasses.dataclass(frozen=True)
class AttemptResult:
    """What one HTTP attempt got: a status, or an error; `permanent` errors are not retried."""

    status: int | None
    error: str | None = None
    retry_after: float | None = None
    permanent: bool = False

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class _Target:
    """A target's pending deliveries, its ready queue and its one worker task."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.ready: deque[Delivery] = deque()
        self.pending: dict[str, Delivery] = {}
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.task: asyncio.Task[None] | None = None


class _JobCursor:
    """A job's state folded up to the last event handled, and the event time of
    the last `job.progress` that passed the throttle (itself a fold)."""

    __slots__ = ("last_progress_at", "state")

    def __init__(self) -> None:
        self.state: JobState | None = None
        self.last_progress_at: datetime | None = None

    def advance(self, recorded: RecordedEvent, interval: float) -> bool:
        """Fold `recorded` in; False when it is a progress event the throttle holds back."""
        self.state = evolve(self.state, recorded)
        if not isinstance(recorded.event, TrainingProgressed):
            return True
        last = self.last_progress_at
        if last is not None and (recorded.recorded_at - last).total_seconds() < interval:
            return False
        self.last_progress_at = recorded.recorded_at
        return True


def _parse_retry_after(value: str | None, now: datetime) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER_SECONDS)


class WebhookDispatcher:
    """Follows the log and delivers webhooks; also the registry the handlers use."""

    def __init__(self, store: SQLiteEventStore, settings: Settings, *, batch: int = 500) -> None:
        self.store = store
        self.settings = settings
        self.batch = batch
        self.registry = Registry()
        #: Every job event up to here has been read and its deliveries created.
        self.position = 0
        self._saved_tracking = -1
        #: Event positions of deliveries not settled yet (the tracking low-water mark).
        self._unsettled: Counter[int] = Counter()
        #: Delivery records after the tracking position, read on start; used until
        #: the first catch-up has passed `_records_until`.
        self._records: dict[str, _Record] = {}
        self._records_until = 0
        self._jobs: dict[str, _JobCursor] = {}
        self._targets: dict[str, _Target] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._secret_lock = asyncio.Lock()
        self._random = random.Random()
        self._task: asyncio.Task[None] | None = None
        self._resolver: PublicOnlyResolver | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False

    @property
    def _allow_private(self) -> bool:
        return self.settings.network.allow_private_urls

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Read the registry and the pending deliveries from the log, then follow it."""
        self._resolver = PublicOnlyResolver(allow_private=self._allow_private)
        self._session = aiohttp.ClientSession(
            connector=public_connector(self._resolver, limit=256),
            timeout=aiohttp.ClientTimeout(total=self.settings.webhooks.timeout_seconds),
            headers={"User-Agent": _USER_AGENT},
            trust_env=False,
        )
        self.position = await self.store.get_tracking(TRACKING_NAME)
        self._saved_tracking = self.position
        for recorded in await self._read_types(0, _REGISTRY_TYPES):
            self._apply_registry(recorded)
        for recorded in await self._read_types(self.position, _RECORD_TYPES):
            self._load_record(recorded)
        self._records_until = await self.store.head()
        self._task = asyncio.create_task(self._follow(), name="webhook-dispatcher")

    async def stop(self) -> None:
        """Stop reading and sending; pending retries stay recorded in the log."""
        if self._stopping:
            return
        self._stopping = True
        tasks: list[asyncio.Task[None]] = [*self._background]
        if self._task is not None:
            tasks.append(self._task)
        for target in self._targets.values():
            for timer in target.timers.values():
                timer.cancel()
            if target.task is not None:
                tasks.append(target.task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._targets.clear()
        with contextlib.suppress(Exception):
            await self._save_tracking()
        if self._session is not None:
            await self._session.close()
        if self._resolver is not None:
            await self._resolver.close()

    async def _read_types(self, after: int, types: Sequence[str]) -> list[RecordedEvent]:
        found: list[RecordedEvent] = []
        while True:
            events, scanned_to = await self.store.scan(after, 5000, types)
            found.extend(events)
            if scanned_to <= after:
                return found
            after = scanned_to

    def _load_record(self, recorded: RecordedEvent) -> None:
        event = recorded.event
        if isinstance(event, WebhookDelivered):
            self._records[event.delivery_id] = _Record(event.attempt, True, None)
        elif isinstance(event, WebhookDeliveryAttempted):
            self._records[event.delivery_id] = _Record(
                event.attempt, event.next_attempt_at is None, event.next_attempt_at
            )

    # ------------------------------------------------------------ following

    async def _follow(self) -> None:
        types = (*JOB_EVENT_TYPES, *_REGISTRY_TYPES)
        while not self._stopping:
            try:
                events, scanned_to = await self.store.scan(self.position, self.batch, types)
                for recorded in events:
                    await self._handle(recorded)
                    self.position = recorded.position
                self.position = max(self.position, scanned_to)
                if self._records and self.position >= self._records_until:
                    self._records.clear()  # the restart's catch-up is done
                await self._save_tracking()
                if not events:
                    # The timeout lets settlements made while idle move the
                    # saved tracking position along.
                    await self.store.wait_for_new(self.position, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except StoreClosedError:
                return
            except Exception:
                log.exception("webhooks.dispatcher_failed", position=self.position)
                # The failed event is handled again: folded job states may
                # already include it, so they are re-read from the log.
                self._jobs.clear()
                await asyncio.sleep(1.0)

    def _low_water(self) -> int:
        if self._unsettled:
            return min(min(self._unsettled) - 1, self.position)
        return self.position

    async def _save_tracking(self) -> None:
        low = self._low_water()
        if low != self._saved_tracking:
            await self.store.write_transaction(lambda c: set_tracking(c, TRACKING_NAME, low))
            self._saved_tracking = low

    def _apply_registry(self, recorded: RecordedEvent) -> None:
        self.registry.apply(
            recorded.stream_id, recorded.position, recorded.recorded_at, recorded.event
        )
        if isinstance(recorded.event, WebhookEndpointDeleted | WebhookEndpointDisabled):
            self._drop_target(recorded.stream_id)

    async def _job_cursor(self, recorded: RecordedEvent) -> _JobCursor:
        """The cursor of the event's job, folded up to just before `recorded`."""
        cursor = self._jobs.get(recorded.stream_id)
        if cursor is None and recorded.type == "JobSubmitted":
            cursor = _JobCursor()  # a new job: nothing earlier to read
        elif cursor is None:
            cursor = _JobCursor()
            interval = self.settings.webhooks.progress_interval_seconds
            for earlier in await self.store.read_stream(recorded.stream_id):
                if earlier.position >= recorded.position:
                    break
                cursor.advance(earlier, interval)
        if recorded.stream_id not in self._jobs:
            if len(self._jobs) >= _JOB_CACHE_LIMIT:
                self._jobs.clear()  # cheap bound: a cleared job is re-read on its next event
            self._jobs[recorded.stream_id] = cursor
        return cursor

    async def _handle(self, recorded: RecordedEvent) -> None:
        if recorded.type in _REGISTRY_TYPES:
            self._apply_registry(recorded)
            return
        if not recorded.stream_id.startswith(JOB_STREAM_PREFIX):
            return
        webhook_type = WEBHOOK_TYPE_OF.get(recorded.type)
        if webhook_type is None and recorded.stream_id not in self._jobs:
            return  # nothing to send, and no cached state to keep current
        cursor = await self._job_cursor(recorded)
        passes = cursor.advance(recorded, self.settings.webhooks.progress_interval_seconds)
        state = cursor.state
        if state is None or state.terminal:
            self._jobs.pop(recorded.stream_id, None)
        if webhook_type is None or not passes or state is None:
            return
        targets: list[tuple[str, str, str]] = [
            (e.stream_id, e.url, e.secret)
            for e in self.registry.targets(state.tenant, webhook_type, recorded.position)
        ]
        callback_url = state.config.get("callback_url")
        callback_stream = CALLBACK_STREAM_PREFIX + state.id
        if (
            callback_url
            and callback_stream not in self.registry.disabled_callbacks
            and matches(state.config.get("webhook_events") or ["job.completed"], webhook_type)
        ):
            secret = await self.default_secret(state.tenant)
            targets.append((callback_stream, str(callback_url), secret))
        if not targets:
            return
        # The event's own time as "now": the body is the same on every retry.
        body = _encode_body(
            webhook_type, recorded.recorded_at, render_job(state, now=recorded.recorded_at)
        )
        for target, url, secret in targets:
            delivery = Delivery(
                id=delivery_id_for(target, recorded.position),
                target=target,
                url=url,
                secret=secret,
                event_position=recorded.position,
                event_type=webhook_type,
                job_id=state.id,
                body=body,
            )
            self._submit(delivery)

    # ------------------------------------------------------------ scheduling

    def _submit(self, delivery: Delivery) -> None:
        record = self._records.get(delivery.id)
        if record is not None and record.settled:
            return  # delivered (or given up) before the restart
        target = self._targets.get(delivery.target)
        if target is None:
            target = self._targets[delivery.target] = _Target(delivery.target)
        if delivery.id in target.pending:
            return
        target.pending[delivery.id] = delivery
        self._unsettled[delivery.event_position] += 1
        if record is None:
            self._make_ready(target, delivery)
            return
        delivery.attempts = record.attempts
        delay = 0.0
        if record.next_attempt_at is not None:
            delay = max(0.0, (record.next_attempt_at - _now()).total_seconds())
        self._schedule(target, delivery, delay)

    def _schedule(self, target: _Target, delivery: Delivery, delay: float) -> None:
        loop = asyncio.get_running_loop()
        target.timers[delivery.id] = loop.call_later(delay, self._timer_fired, target, delivery)

    def _timer_fired(self, target: _Target, delivery: Delivery) -> None:
        target.timers.pop(delivery.id, None)
        if delivery.id in target.pending and self._targets.get(target.key) is target:
            self._make_ready(target, delivery)

    def _make_ready(self, target: _Target, delivery: Delivery) -> None:
        target.ready.append(delivery)
        if target.task is None and not self._stopping:
            target.task = asyncio.create_task(self._work(target), name=f"webhook:{target.key}")

    def _settle(self, target: _Target, delivery: Delivery) -> None:
        if target.pending.pop(delivery.id, None) is None:
            return
        self._unsettled[delivery.event_position] -= 1
        if self._unsettled[delivery.event_position] <= 0:
            del self._unsettled[delivery.event_position]

    def _drop_target(self, key: str) -> None:
        """The endpoint was deleted or disabled: its pending deliveries end here."""
        target = self._targets.pop(key, None)
        if target is None:
            return
        for timer in target.timers.values():
            timer.cancel()
        for delivery in list(target.pending.values()):
            self._settle(target, delivery)
        target.ready.clear()
        if target.task is not None and target.task is not asyncio.current_task():
            target.task.cancel()

    async def _work(self, target: _Target) -> None:
        try:
            while target.ready and not self._stopping:
                delivery = target.ready.popleft()
                if delivery.id in target.pending:
                    await self._deliver(target, delivery)
        except StoreClosedError:
            pass
        except Exception:
            log.exception("webhooks.worker_failed", target=target.key)
        finally:
            target.task = None
            if self._targets.get(target.key) is target and not self._stopping:
                if target.ready:
                    # A delivery made ready while this task was finishing.
                    target.task = asyncio.create_task(
                        self._work(target), name=f"webhook:{target.key}"
                    )
                elif not target.pending:
                    del self._targets[target.key]  # nothing left: free the slot

    async def _deliver(self, target: _Target, delivery: Delivery) -> None:
        delivery.attempts += 1
        result = await self.attempt(delivery.url, delivery.secret, delivery.id, delivery.body)
        common: dict[str, Any] = {
            "delivery_id": delivery.id,
            "event_position": delivery.event_position,
            "attempt": delivery.attempts,
            "event_type": delivery.event_type,
            "job_id": delivery.job_id,
        }
        if result.ok:
            assert result.status is not None
            await self._record(target.key, [WebhookDelivered(status=result.status, **common)])
            self._settle(target, delivery)
            log.info("webhooks.delivered", delivery_id=delivery.id, target=target.key)
            return
        if result.status == 410:
            await self._record(
                target.key,
                [
                    WebhookDeliveryAttempted(status=410, error="410 Gone", **common),
                    WebhookEndpointDisabled(reason="the endpoint answered 410 Gone"),
                ],
            )
            # Ends this delivery and every other one pending for the target.
            self._drop_target(target.key)
            log.warning("webhooks.disabled", target=target.key, reason="410 Gone")
            return
        delay = None if result.permanent else self._retry_delay(delivery.attempts, result)
        next_at = None if delay is None else _now() + timedelta(seconds=delay)
        await self._record(
            target.key,
            [
                WebhookDeliveryAttempted(
                    status=result.status, error=result.error, next_attempt_at=next_at, **common
                )
            ],
        )
        if delay is None:
            self._settle(target, delivery)
            log.warning("webhooks.given_up", delivery_id=delivery.id, target=target.key)
        else:
            self._schedule(target, delivery, delay)

    def _retry_delay(self, attempts: int, result: AttemptResult) -> float | None:
        schedule = self.settings.webhooks.retry_schedule_seconds
        if attempts > len(schedule):
            return None
        delay = schedule[attempts - 1] * self._random.uniform(0.9, 1.1)
        if result.retry_after is not None:
            # Never earlier than the endpoint asked for.
            delay = max(delay, result.retry_after)
        return delay

    async def _record(self, stream_id: str, events: Sequence[Event]) -> None:
        positions = await self.store.append(stream_id, ANY_VERSION, events)
        for event, position in zip(events, positions, strict=True):
            if isinstance(event, WebhookEndpointDisabled):
                self.registry.apply(stream_id, position, _now(), event)

    # ------------------------------------------------------------ HTTP

    async def attempt(self, url: str, secret: str, message_id: str, body: bytes) -> AttemptResult:
        """One signed POST of `body` to `url`; never raises for network trouble."""
        assert self._session is not None, "dispatcher not started"
        try:
            check_url(url, self._allow_private)
        except FetchError as exc:
            return AttemptResult(status=None, error=exc.message, permanent=True)
        now = _now().replace(microsecond=0)
        signature = Webhook(secret).sign(message_id, now, body.decode())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature,
        }
        timeout = self.settings.webhooks.timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                async with self._session.post(
                    url, data=body, headers=headers, allow_redirects=False
                ) as resp:
                    return AttemptResult(
                        status=resp.status,
                        error=None if 200 <= resp.status < 300 else f"HTTP {resp.status}",
                        retry_after=_parse_retry_after(resp.headers.get("Retry-After"), _now()),
                    )
        except TimeoutError:
            return AttemptResult(status=None, error=f"timed out after {timeout:g} s")
        except FetchError as exc:
            return AttemptResult(status=None, error=exc.message)
        except (aiohttp.ClientError, OSError) as exc:
            return AttemptResult(status=None, error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------ for handlers

    async def default_secret(self, tenant: str) -> str:
        """The tenant's default signing secret, created (as an event) on first use."""
        secret = self.registry.default_secrets.get(tenant)
        if secret is not None:
            return secret
        async with self._secret_lock:
            secret = self.registry.default_secrets.get(tenant)
            if secret is not None:
                return secret
            stream_id = DEFAULT_SECRET_STREAM_PREFIX + tenant
            event = WebhookDefaultSecretCreated(tenant=tenant, secret=new_secret())
            try:
                await self.store.append(stream_id, NO_STREAM, [event])
            except ConcurrencyError:
                # Created meanwhile (another process): the first one stands.
                existing = await self.store.read_stream(stream_id)
                first = existing[0].event
                assert isinstance(first, WebhookDefaultSecretCreated)
                event = first
            self.registry.default_secrets.setdefault(tenant, event.secret)
            return self.registry.default_secrets[tenant]

    async def create_endpoint(
        self, tenant: str, url: str, events: list[str], description: str
    ) -> Endpoint:
        if len(self.registry.of_tenant(tenant)) >= _MAX_ENDPOINTS_PER_TENANT:
            raise ApiError(
                409,
                "too_many_webhooks",
                f"at most {_MAX_ENDPOINTS_PER_TENANT} webhook endpoints per tenant",
            )
        endpoint_id = "wh_" + secrets.token_hex(12)
        event = WebhookEndpointCreated(
            endpoint_id=endpoint_id,
            tenant=tenant,
            url=url,
            events=events,
            description=description,
            secret=new_secret(),
        )
        stream_id = ENDPOINT_STREAM_PREFIX + endpoint_id
        (position,) = await self.store.append(stream_id, NO_STREAM, [event])
        self.registry.apply(stream_id, position, _now(), event)
        return self.registry.endpoints[endpoint_id]

    async def delete_endpoint(self, tenant: str, endpoint_id: str) -> None:
        endpoint = self.registry.owned(tenant, endpoint_id)
        event = WebhookEndpointDeleted()
        (position,) = await self.store.append(endpoint.stream_id, ANY_VERSION, [event])
        self.registry.apply(endpoint.stream_id, position, _now(), event)
        self._drop_target(endpoint.stream_id)

    async def send_test(self, tenant: str, endpoint_id: str) -> dict[str, Any]:
        """Send a sample `job.*` delivery to an endpoint now (one attempt, recorded)."""
        endpoint = self.registry.owned(tenant, endpoint_id)
        if endpoint.disabled_reason is not None:
            raise ApiError(409, "webhook_disabled", f"webhook {endpoint_id!r} is disabled")
        webhook_type = _sample_type(endpoint.events)
        doc = _sample_job(tenant)
        body = _encode_body(webhook_type, _now(), _as_state(doc, webhook_type))
        message_id = "msg_test_" + secrets.token_hex(12)
        result = await self.attempt(endpoint.url, endpoint.secret, message_id, body)
        common: dict[str, Any] = {
            "delivery_id": message_id,
            "event_position": 0,
            "attempt": 1,
            "event_type": webhook_type,
            "job_id": doc["id"],
        }
        record: Event
        if result.ok:
            assert result.status is not None
            record = WebhookDelivered(status=result.status, **common)
        else:
            record = WebhookDeliveryAttempted(status=result.status, error=result.error, **common)
        await self.store.append(endpoint.stream_id, ANY_VERSION, [record])
        return {
            "delivery_id": message_id,
            "type": webhook_type,
            "delivered": result.ok,
            "status": result.status,
            "error": result.error,
        }

    async def send_dry_run(self, tenant: str, job_doc: dict[str, Any]) -> None:
        """Schedule one sample delivery to a dry-run job's callback_url (not recorded:
        a dry-run job is not stored)."""
        config = job_doc.get("config") or {}
        url = config.get("callback_url") or job_doc.get("callback_url")
        if not url:
            return
        patterns = config.get("webhook_events") or ["job.completed"]
        webhook_type = _sample_type(patterns)
        secret = await self.default_secret(tenant)
        body = _encode_body(webhook_type, _now(), _as_state(job_doc, webhook_type))
        message_id = "msg_test_" + secrets.token_hex(12)

        async def send() -> None:
            result = await self.attempt(str(url), secret, message_id, body)
            log.info(
                "webhooks.dry_run_callback",
                job_id=job_doc.get("id"),
                delivered=result.ok,
                status=result.status,
                error=result.error,
            )

        task = asyncio.create_task(send(), name="webhook-dry-run")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def deliveries(self, tenant: str, endpoint_id: str, limit: int) -> list[dict[str, Any]]:
        """The endpoint's deliveries, newest first, from its stream in the log."""
        endpoint = self.registry.owned(tenant, endpoint_id)
        events = await self.store.read_stream(endpoint.stream_id)
        return deliveries_view(events)[:limit]


def deliveries_view(events: Iterable[RecordedEvent]) -> list[dict[str, Any]]:
    """Group a target stream's delivery records by delivery id, newest event first."""
    views: dict[str, dict[str, Any]] = {}
    order: dict[str, int] = {}
    for recorded in events:
        event = recorded.event
        if not isinstance(event, WebhookDelivered | WebhookDeliveryAttempted):
            continue
        view = views.setdefault(
            event.delivery_id,
            {
                "id": event.delivery_id,
                "type": event.event_type,
                "job_id": event.job_id,
                "event_position": event.event_position,
                "test": event.event_position == 0,
                "state": "pending",
                "attempts": [],
                "next_attempt_at": None,
                "last_at": None,
            },
        )
        at = _iso(recorded.recorded_at)
        if isinstance(event, WebhookDelivered):
            view["state"] = "delivered"
            view["next_attempt_at"] = None
            view["attempts"].append(
                {"attempt": event.attempt, "at": at, "status": event.status, "error": None}
            )
        else:
            view["state"] = "pending" if event.next_attempt_at is not None else "failed"
            view["next_attempt_at"] = _iso(event.next_attempt_at)
            view["attempts"].append(
                {"attempt": event.attempt, "at": at, "status": event.status, "error": event.error}
            )
        view["last_at"] = at
        # Newest event first; a test sample (no event) sorts by when it was sent.
        order.setdefault(event.delivery_id, event.event_position or recorded.position)
    return sorted(views.values(), key=lambda v: order[v["id"]], reverse=True)


def _encode_body(webhook_type: str, timestamp: datetime, data: dict[str, Any]) -> bytes:
    payload = {"type": webhook_type, "timestamp": _iso(timestamp), "data": data}
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _sample_type(patterns: Iterable[str]) -> str:
    """The webhook type a sample is sent as: `job.succeeded` when subscribed,
    else the first subscribed type."""
    patterns = list(patterns)
    if matches(patterns, "job.succeeded"):
        return "job.succeeded"
    return next((t for t in WEBHOOK_EVENT_TYPES if matches(patterns, t)), "job.succeeded")


_STATE_OF_TYPE = {
    "job.queued": "queued",
    "job.started": "running",
    "job.progress": "running",
    "job.checkpoint": "running",
    "job.image": "running",
    "job.succeeded": "succeeded",
    "job.failed": "failed",
    "job.canceled": "canceled",
}


def _as_state(doc: dict[str, Any], webhook_type: str) -> dict[str, Any]:
    """A sample job object in the state `webhook_type` implies, marked `dry_run`."""
    sample = dict(doc)
    sample["state"] = _STATE_OF_TYPE[webhook_type]
    sample["dry_run"] = True
    return sample


def _sample_job(tenant: str) -> dict[str, Any]:
    now = _now()
    state = JobState(
        id="TEST_" + secrets.token_hex(8),
        tenant=tenant,
        type="dreambooth",
        state="succeeded",
        config={"type": "dreambooth", "base_model": "tiny-sd15"},
        created_at=now,
        started_at=now,
        finished_at=now,
        updated_at=now,
    )
    return render_job(state, now=now)


async def job_at(store: SQLiteEventStore, job_id: str, position: int) -> dict[str, Any] | None:
    """The job object as it was right after the event at `position`."""
    state: JobState | None = None
    at: datetime | None = None
    for recorded in await store.read_stream(job_stream(job_id)):
        if recorded.position > position:
            break
        state = evolve(state, recorded)
        at = recorded.recorded_at
    return None if state is None else render_job(state, now=at)
