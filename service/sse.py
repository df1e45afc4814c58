"""Server-sent events: `GET /v1/jobs/{id}/events` and `GET /v1/events`.

Each message is `id: <position>`, `event: <event type>`, `data: <event JSON>`
(the event's fields plus `job_id`, `position` and `recorded_at`). A client that
reconnects with `Last-Event-ID` (header, or `?last_event_id=` for clients that
cannot set headers) gets every later event exactly once, then the live tail.

How a connection is served, and why:

- **Replay, then live, with no gap and no duplicate.** The connection first
  replays from the store (the source of truth) until it has covered the
  head. Only then does it register with the hub; registering is synchronous,
  so it atomically records the hub's position `P`: every matching event after
  `P` will be queued for it. It then reads the small gap between what it
  replayed and `P` from the store, and from there on takes events from its
  queue, skipping any position it has already sent. Every position is sent in
  order and at most once.
- **One reader for all subscribers.** The `EventHub` is the only reader of the
  log for SSE: it reads each new batch once, encodes each event's message once
  and hands the same bytes to every matching subscriber's queue. Hundreds of
  subscribers therefore cost one query per batch, not one per subscriber per
  event, and a subscriber holds only references to shared bytes.
- **Slow consumers cost only themselves.** A subscriber's queue holds at most
  `SseOptions.queue_limit` messages and the hub never waits for a subscriber.
  When a queue is full the hub drops that subscriber; its connection then
  catches up from the store (bounded batches) and registers again, so a burst
  or a lagging reader never grows memory nor slows anyone else. A client that
  stops reading altogether is disconnected: a write that cannot complete
  within `SseOptions.write_timeout` seconds (socket buffers full) closes the
  connection at once. The client reconnects with `Last-Event-ID` and loses
  nothing, since the store still has every event.
- **Ends.** A job stream ends after the job's terminal event (at once if the
  client has already seen it). Every stream ends when `app[SHUTTING_DOWN]` is
  set. `/v1/events` without `Last-Event-ID` starts at the events committed
  after the connection is made (replaying the tenant's whole history would be
  unbounded); a job stream without it starts at the job's first event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from functools import partial

import structlog
from aiohttp import web

from events.projections import job_stream
from events.projector import JOB_EVENT_TYPES
from events.store import decode_rows
from events.types import JOB_TERMINAL_TYPES, RecordedEvent
from service.errors import ApiError, not_found
from service.keys import SHUTTING_DOWN, STORE, TENANT
from service.sse_hub import EventHub, Subscriber, encode_message

log = structlog.get_logger(__name__)

__all__ = [
    "SSE_HUB",
    "SSE_OPTIONS",
    "EventHub",
    "SseOptions",
    "all_events",
    "encode_message",
    "job_events",
    "sse_ctx",
    "sse_routes",
]

PING = b": ping\n\n"
# Queued messages are joined into writes of about this size, and replayed
# events into writes of this many: a burst costs a few writes, not one per event.
_WRITE_CHUNK = 64 * 1024
_REPLAY_WRITE_EVENTS = 64


@dataclasses.dataclass(frozen=True, slots=True)
class SseOptions:
    """Tunables of the SSE endpoints (an app-level setting: tests lower them).

    `ping_interval`: seconds between `: ping` comments on an idle stream (keeps
    proxies from timing the connection out). `queue_limit`: messages a
    subscriber may have waiting before the hub drops it (it then catches up
    from the store).
    `write_timeout`: seconds one write may wait for the client to read before
    the connection is closed. `replay_batch`: events read from the store per
    query while replaying.
    """

    ping_interval: float = 15.0
    queue_limit: int = 256
    write_timeout: float = 10.0
    replay_batch: int = 500


#: Set before startup to change the defaults of `SseOptions`.
SSE_OPTIONS = web.AppKey("sse_options", SseOptions)
SSE_HUB = web.AppKey("sse_hub", EventHub)


async def sse_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: start the hub (after the store is open), stop it on cleanup.

    The hub also ends every stream as soon as `app[SHUTTING_DOWN]` is set, so
    graceful shutdown does not wait for long-lived connections.
    """
    options = app.get(SSE_OPTIONS) or SseOptions()
    hub = EventHub(app[STORE], batch=options.replay_batch)
    app[SSE_HUB] = hub
    await hub.start()
    watcher: asyncio.Task[None] | None = None
    shutting_down = app.get(SHUTTING_DOWN)
    if shutting_down is not None:

        async def close_on_shutdown(event: asyncio.Event) -> None:
            await event.wait()
            hub.close_all("shutdown")

        watcher = asyncio.create_task(close_on_shutdown(shutting_down), name="sse-shutdown")
    try:
        yield
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await hub.stop()


# --------------------------------------------------------------------------- #
# Store reads for replay
# --------------------------------------------------------------------------- #

_COLUMNS = "position, stream_id, version, type, data, recorded_at"
#: One replay read after a position, at most `limit` rows scanned.
_Replay = Callable[[int, int], Awaitable["_ReplayBatch"]]


@dataclasses.dataclass(frozen=True, slots=True)
class _ReplayBatch:
    """Matching events, the position the read covered, and whether it reached the head."""

    events: list[RecordedEvent]
    covered: int
    at_head: bool


def _read_job(conn: sqlite3.Connection, stream_id: str, after: int, limit: int) -> _ReplayBatch:
    (head,) = conn.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM events WHERE stream_id = ? AND position > ? "
        "ORDER BY version LIMIT ?",
        (stream_id, after, limit),
    ).fetchall()
    events = decode_rows(rows)
    if len(events) == limit:
        return _ReplayBatch(events, events[-1].position, at_head=False)
    return _ReplayBatch(events, int(head), at_head=True)


@dataclasses.dataclass(frozen=True, slots=True)
class _JobInfo:
    tenant: str
    terminal_position: int | None


def _job_info(conn: sqlite3.Connection, stream_id: str) -> _JobInfo | None:
    row = conn.execute(
        "SELECT data FROM events WHERE stream_id = ? AND version = 1 AND type = 'JobSubmitted'",
        (stream_id,),
    ).fetchone()
    if row is None:
        return None
    tenant = json.loads(row[0]).get("tenant")
    marks = ",".join("?" * len(JOB_TERMINAL_TYPES))
    (terminal,) = conn.execute(
        f"SELECT MIN(position) FROM events WHERE stream_id = ? AND type IN ({marks})",
        (stream_id, *sorted(JOB_TERMINAL_TYPES)),
    ).fetchone()
    return _JobInfo(tenant=str(tenant), terminal_position=terminal)


# --------------------------------------------------------------------------- #
# Handlers
# --------------------------------------------------------------------------- #


def _last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID")
    field = "Last-Event-ID"
    if raw is None:
        raw = request.query.get("last_event_id")
        field = "last_event_id"
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    # Positions are SQLite integers: anything beyond cannot name an event.
    if value < 0 or value > 2**63 - 1:
        raise ApiError(
            400, "invalid_last_event_id", "Last-Event-ID must be an event position", field
        )
    return value


def _hub(app: web.Application) -> EventHub:
    hub = app.get(SSE_HUB)
    if hub is None:
        raise RuntimeError("SSE hub missing: add service.sse.sse_ctx to app.cleanup_ctx")
    return hub


def _options(app: web.Application) -> SseOptions:
    return app.get(SSE_OPTIONS) or SseOptions()


class _Stream:
    """One SSE response: replay, hand-over to the hub, live tail, pings."""

    def __init__(
        self,
        request: web.Request,
        subscriber: Subscriber,
        replay: _Replay,
        cursor: int,
        ends_stream: Collection[str] = (),
    ) -> None:
        self.request = request
        self.sub = subscriber
        self.replay = replay
        #: Every matching event up to here has been sent (or was before the start).
        self.cursor = cursor
        self.ends_stream = ends_stream
        self.options = _options(request.app)
        self.hub = _hub(request.app)
        self.shutting_down = request.app.get(SHUTTING_DOWN)
        self.response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        self.finished = False

    def _stopping(self) -> bool:
        return self.shutting_down is not None and self.shutting_down.is_set()

    async def _write(self, data: bytes) -> None:
        """Write with a deadline: a client that does not read is cut off."""
        async with asyncio.timeout(self.options.write_timeout):
            await self.response.write(data)

    async def _send_queued(self) -> None:
        """Send what is queued in one write (up to `_WRITE_CHUNK` bytes): a burst
        costs one write per chunk instead of one per event."""
        parts: list[bytes] = []
        size = 0
        items = self.sub.items
        while items and size < _WRITE_CHUNK and not self.finished:
            position, etype, message = items.popleft()
            if position <= self.cursor:
                continue  # already sent (replay and queue overlap at the hand-over)
            parts.append(message)
            size += len(message)
            self.cursor = position
            self.finished = etype in self.ends_stream
        if parts:
            await self._write(b"".join(parts))

    async def _replay_until(self, target: int | None) -> None:
        """Send from the store until the read covered `target` (None: the head)."""
        while not self.finished and not self._stopping():
            batch = await self.replay(self.cursor, self.options.replay_batch)
            parts: list[bytes] = []
            for recorded in batch.events:
                if recorded.position <= self.cursor:
                    continue
                parts.append(encode_message(recorded))
                if recorded.type in self.ends_stream:
                    self.finished = True
                    break
            for start in range(0, len(parts), _REPLAY_WRITE_EVENTS):
                await self._write(b"".join(parts[start : start + _REPLAY_WRITE_EVENTS]))
            if self.finished:
                return
            moved = batch.covered > self.cursor
            self.cursor = max(self.cursor, batch.covered)
            if target is None and batch.at_head:
                return
            if target is not None and (self.cursor >= target or not moved):
                return

    async def run(self) -> web.StreamResponse:
        await self.response.prepare(self.request)
        try:
            await self._serve()
        except (TimeoutError, ConnectionError) as exc:
            # Too slow (write deadline) or gone: drop the connection without
            # waiting on its buffers; the client resumes with Last-Event-ID.
            log.info("sse.disconnected", reason=type(exc).__name__, cursor=self.cursor)
            self._abort()
        finally:
            self.hub.unregister(self.sub)
        return self.response

    def _abort(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    async def _serve(self) -> None:
        while True:
            await self._replay_until(None)
            if self.finished or self._stopping():
                return
            self.sub.reset()
            self.hub.register(self.sub)
            # Events between what the replay covered and the hub's position at
            # registration were dispatched before this subscriber joined.
            if self.sub.start > self.cursor:
                await self._replay_until(self.sub.start)
            if not await self._tail():
                return
            # The queue overflowed (a burst larger than the queue, or a client
            # reading slower than events arrive): the hub has dropped this
            # subscriber, so catch up from the store and join again.
            log.debug("sse.lagged", cursor=self.cursor)

    async def _tail(self) -> bool:
        """Send queued events until the stream ends (False) or the queue overflowed (True)."""
        while not self.finished:
            transport = self.request.transport
            if transport is None or transport.is_closing() or self._stopping():
                return False
            if self.sub.closed == "shutdown":
                return False
            if self.sub.closed == "overflow":
                return True
            if self.sub.items:
                await self._send_queued()
            elif not await self.sub.wait(self.options.ping_interval):
                await self._write(PING)
        return False


async def job_events(request: web.Request) -> web.StreamResponse:
    """GET /v1/jobs/{id}/events: the job's events as SSE; ends after its terminal event."""
    job_id = request.match_info["id"]
    store = request.app[STORE]
    stream_id = job_stream(job_id)
    info = await store.read_transaction(partial(_job_info, stream_id=stream_id))
    if info is None or info.tenant != request[TENANT]:
        raise not_found("job", job_id)
    after = _last_event_id(request) or 0
    options = _options(request.app)

    async def replay(cursor: int, limit: int) -> _ReplayBatch:
        return await store.read_transaction(
            partial(_read_job, stream_id=stream_id, after=cursor, limit=limit)
        )

    stream = _Stream(
        request,
        Subscriber(options.queue_limit, stream_id=stream_id),
        replay,
        after,
        ends_stream=JOB_TERMINAL_TYPES,
    )
    if info.terminal_position is not None and info.terminal_position <= after:
        # The client has already seen the end: an empty stream, closed at once.
        stream.finished = True
    return await stream.run()


def _parse_types(request: web.Request) -> frozenset[str] | None:
    raw = request.query.get("types", "")
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if not names:
        return None
    unknown = [n for n in names if n not in JOB_EVENT_TYPES]
    if unknown:
        raise ApiError(
            400,
            "invalid_event_type",
            f"unknown event type {unknown[0]!r}; valid: {', '.join(JOB_EVENT_TYPES)}",
            "types",
        )
    return frozenset(names)


async def all_events(request: web.Request) -> web.StreamResponse:
    """GET /v1/events?types=A,B: every job event of the caller's tenant as SSE."""
    tenant: str = request[TENANT]
    types = _parse_types(request)
    store = request.app[STORE]
    hub = _hub(request.app)
    last = _last_event_id(request)
    after = await store.head() if last is None else last
    options = _options(request.app)
    scan_types = tuple(sorted(types)) if types is not None else JOB_EVENT_TYPES

    async def replay(cursor: int, limit: int) -> _ReplayBatch:
        events, covered = await store.scan(cursor, limit, scan_types)
        tenants = await hub.tenants_of({e.stream_id for e in events})
        mine = [e for e in events if tenants.get(e.stream_id) == tenant]
        return _ReplayBatch(mine, covered, at_head=len(events) < limit)

    sub = Subscriber(options.queue_limit, tenant=tenant, types=types)
    return await _Stream(request, sub, replay, after).run()


def sse_routes() -> list[web.RouteDef]:
    """The SSE routes, for `setup_routes` (the hub comes from `sse_ctx`)."""
    return [
        web.get("/v1/jobs/{id}/events", job_events),
        web.get("/v1/events", all_events),
    ]
