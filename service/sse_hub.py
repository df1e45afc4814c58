"""The SSE hub: one reader of the log feeding every SSE subscriber's bounded queue.

Hundreds of SSE connections cost one store query per batch of new events, not
one per connection per event: the hub reads each batch once, encodes each
event's message once, and pushes the same bytes to the queue of every
subscriber of that job or tenant. It never waits for a subscriber; a
subscriber whose queue is full is dropped from the hub (and catches up from
the store, see `service.sse`). `service.sse` explains the replay/live hand-over
that `EventHub.register` makes exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections import deque
from collections.abc import Iterable
from datetime import datetime
from functools import partial
from typing import Any, Literal

import structlog

from events.errors import StoreClosedError
from events.projections import JOB_STREAM_PREFIX
from events.projector import JOB_EVENT_TYPES
from events.store import SQLiteEventStore
from events.types import RecordedEvent

log = structlog.get_logger(__name__)

__all__ = ["EventHub", "Subscriber", "encode_message", "job_id_of"]

_TENANT_CACHE_LIMIT = 50_000


# --------------------------------------------------------------------------- #
# Messages
# --------------------------------------------------------------------------- #


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def job_id_of(stream_id: str) -> str | None:
    """The job id of a job stream (None for other streams)."""
    if stream_id.startswith(JOB_STREAM_PREFIX):
        return stream_id[len(JOB_STREAM_PREFIX) :]
    return None


def encode_message(recorded: RecordedEvent) -> bytes:
    """One SSE message for `recorded`: `id`, `event` and one `data` line of JSON."""
    data: dict[str, Any] = recorded.event.model_dump(mode="json")
    data["job_id"] = job_id_of(recorded.stream_id)
    data["position"] = recorded.position
    data["recorded_at"] = _iso(recorded.recorded_at)
    # Compact JSON has no newline, so one `data:` line carries it whole.
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"id: {recorded.position}\nevent: {recorded.type}\ndata: {body}\n\n".encode()


# --------------------------------------------------------------------------- #
# The hub
# --------------------------------------------------------------------------- #

#: What a subscriber queue holds: (position, event type, encoded message).
_Item = tuple[int, str, bytes]
_CloseReason = Literal["overflow", "shutdown"]


class Subscriber:
    """One connection's bounded queue of messages, filled by the hub."""

    __slots__ = ("_wake", "closed", "items", "limit", "start", "stream_id", "tenant", "types")

    def __init__(
        self,
        limit: int,
        *,
        stream_id: str | None = None,
        tenant: str | None = None,
        types: frozenset[str] | None = None,
    ) -> None:
        self.limit = limit
        self.stream_id = stream_id
        self.tenant = tenant
        self.types = types
        self.items: deque[_Item] = deque()
        self.closed: _CloseReason | None = None
        #: The hub position when this subscriber registered: every matching
        #: event after it is queued.
        self.start = 0
        self._wake = asyncio.Event()

    def push(self, item: _Item) -> bool:
        """Queue `item`; False (and the subscriber is closed) when the queue is full."""
        if len(self.items) >= self.limit:
            self.close("overflow")
            return False
        self.items.append(item)
        self._wake.set()
        return True

    def reset(self) -> None:
        """Make the subscriber ready to register (again)."""
        self.items.clear()
        self.closed = None
        self._wake.clear()

    def close(self, reason: _CloseReason) -> None:
        if self.closed is None:
            self.closed = reason
            # The queued messages are dropped: the client resumes from the store.
            self.items.clear()
        self._wake.set()

    async def wait(self, timeout: float) -> bool:
        """Wait for an item (or closing) up to `timeout` seconds; False on timeout."""
        if self.items or self.closed:
            return True
        self._wake.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            return False
        return True


class EventHub:
    """The single reader of the log that feeds every SSE subscriber.

    It follows the job events of the log from the head at `start()`, resolves
    each job stream's tenant once (from the `JobSubmitted` it sees, or one
    indexed query per batch for older jobs; cached), and pushes each event's
    message to the queues of the subscribers of that job or tenant. It never
    awaits a subscriber: a full queue closes that subscriber.
    """

    def __init__(self, store: SQLiteEventStore, *, batch: int = 500) -> None:
        self.store = store
        self.batch = batch
        #: Every job event up to here has been dispatched.
        self.position = 0
        self._by_stream: dict[str, set[Subscriber]] = {}
        self._by_tenant: dict[str, set[Subscriber]] = {}
        self._tenants: dict[str, str | None] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start following the log from its current head."""
        self.position = await self.store.head()
        self._task = asyncio.create_task(self._follow(), name="sse-hub")

    async def stop(self) -> None:
        """Stop reading and close every subscriber."""
        self._closed = True
        self.close_all("shutdown")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def close_all(self, reason: _CloseReason) -> None:
        for subs in (*self._by_stream.values(), *self._by_tenant.values()):
            for sub in list(subs):
                sub.close(reason)
        self._by_stream.clear()
        self._by_tenant.clear()

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._by_stream.values()) + sum(
            len(s) for s in self._by_tenant.values()
        )

    # ------------------------------------------------------------ subscribers

    def register(self, sub: Subscriber) -> None:
        """Add `sub`; from now on it gets every matching event after `self.position`.

        Synchronous on purpose: nothing can be dispatched between reading the
        position and joining the index.
        """
        sub.start = self.position
        if self._closed:
            sub.close("shutdown")
            return
        if sub.stream_id is not None:
            self._by_stream.setdefault(sub.stream_id, set()).add(sub)
        elif sub.tenant is not None:
            self._by_tenant.setdefault(sub.tenant, set()).add(sub)

    def unregister(self, sub: Subscriber) -> None:
        for index, key in ((self._by_stream, sub.stream_id), (self._by_tenant, sub.tenant)):
            if key is None:
                continue
            subs = index.get(key)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del index[key]

    # ------------------------------------------------------------ tenants

    def _learn(self, recorded: RecordedEvent) -> None:
        tenant = getattr(recorded.event, "tenant", None)
        if recorded.type == "JobSubmitted" and isinstance(tenant, str):
            self._remember(recorded.stream_id, tenant)

    def _remember(self, stream_id: str, tenant: str | None) -> None:
        if len(self._tenants) >= _TENANT_CACHE_LIMIT:
            # Cheap bound: clearing costs one query per active job to refill.
            self._tenants.clear()
        self._tenants[stream_id] = tenant

    async def tenants_of(self, streams: Iterable[str]) -> dict[str, str | None]:
        """The tenant of each job stream (None when it has no `JobSubmitted`).

        Read from the log itself (the stream's first event), not the jobs read
        model, so an event is never held back because the projector lags.
        """
        wanted = set(streams)
        missing = sorted(s for s in wanted if s not in self._tenants)
        if missing:
            found = await self.store.read_transaction(partial(_first_tenants, streams=missing))
            for stream_id in missing:
                self._remember(stream_id, found.get(stream_id))
        return {s: self._tenants.get(s) for s in wanted}

    # ------------------------------------------------------------ reading

    async def _follow(self) -> None:
        while not self._closed:
            try:
                events, scanned_to = await self.store.scan(
                    self.position, self.batch, JOB_EVENT_TYPES
                )
                if events:
                    await self._dispatch(events)
                if scanned_to > self.position:
                    self.position = scanned_to
                    continue
                await self.store.wait_for_new(self.position)
            except asyncio.CancelledError:
                raise
            except StoreClosedError:
                return
            except Exception:
                log.exception("sse.hub_failed")
                await asyncio.sleep(1.0)

    async def _dispatch(self, events: list[RecordedEvent]) -> None:
        for recorded in events:
            self._learn(recorded)
        if self._by_tenant:
            # The only await of a batch, and before any of it is dispatched:
            # a subscriber registering meanwhile still sees `position` unchanged.
            unknown = {e.stream_id for e in events if e.stream_id not in self._tenants}
            if unknown:
                await self.tenants_of(unknown)
        for recorded in events:
            self._dispatch_one(recorded)
            self.position = recorded.position

    def _dispatch_one(self, recorded: RecordedEvent) -> None:
        by_stream = self._by_stream.get(recorded.stream_id)
        tenant = self._tenants.get(recorded.stream_id)
        by_tenant = self._by_tenant.get(tenant) if tenant is not None else None
        if not by_stream and not by_tenant:
            return
        item: _Item | None = None
        for subs in (by_stream, by_tenant):
            if not subs:
                continue
            for sub in list(subs):
                if sub.types is not None and recorded.type not in sub.types:
                    continue
                if item is None:
                    # Encoded once, shared by every subscriber.
                    item = (recorded.position, recorded.type, encode_message(recorded))
                if not sub.push(item):
                    self.unregister(sub)


def _first_tenants(conn: sqlite3.Connection, streams: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for i in range(0, len(streams), 500):
        chunk = streams[i : i + 500]
        rows = conn.execute(
            f"SELECT stream_id, data FROM events WHERE version = 1 AND type = 'JobSubmitted' "
            f"AND stream_id IN ({','.join('?' * len(chunk))})",
            chunk,
        ).fetchall()
        for stream_id, data in rows:
            tenant = json.loads(data).get("tenant")
            if isinstance(tenant, str):
                found[stream_id] = tenant
    return found
