"""The event store: an append-only log in SQLite (WAL), behind a small interface.

`EventStore` is the interface (append, read, subscribe, tracking) that the
service, the runner and the projector use; `SQLiteEventStore` is the
implementation on aiosqlite. A PostgreSQL implementation for several machines
would implement the same protocol and pass the same contract tests
(tests/events/test_store_contract.py).

Group commit: appends are queued and one writer commits everything queued in
one transaction, with one savepoint-free version check per stream, so many
concurrent appends share one fsync. Each caller still gets its own positions
or its own `ConcurrencyError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import aiosqlite
import structlog
from pydantic import ValidationError

from events.errors import ConcurrencyError, EventDecodeError, StoreClosedError
from events.notify import CommitListener, CommitNudger
from events.types import EVENT_CLASSES, Event, RecordedEvent

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: `expected_version` meaning "append at the end, whatever the version is".
ANY_VERSION: None = None
#: `expected_version` of a stream that must not exist yet.
NO_STREAM = 0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    position    INTEGER PRIMARY KEY,
    stream_id   TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    type        TEXT    NOT NULL,
    data        TEXT    NOT NULL,
    recorded_at TEXT    NOT NULL,
    UNIQUE (stream_id, version)
);
CREATE TABLE IF NOT EXISTS tracking (
    name     TEXT PRIMARY KEY,
    position INTEGER NOT NULL
);
"""

_MAX_GROUP = 512

_STREAM_VERSION = "SELECT MAX(version) FROM events WHERE stream_id = ?"
_HEAD = "SELECT COALESCE(MAX(position), 0) FROM events"
_VERSION_AND_HEAD = f"SELECT ({_STREAM_VERSION}), ({_HEAD})"
_INSERT = (
    "INSERT INTO events (position, stream_id, version, type, data, recorded_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
# How often a waiter re-checks the database even without a wake-up: a safety
# net against a lost datagram, not the way new events are noticed.
_SAFETY_RECHECK_SECONDS = 1.0


class EventStore(Protocol):
    """What every event-store implementation provides."""

    async def append(
        self, stream_id: str, expected_version: int | None, events: Sequence[Event]
    ) -> list[int]:
        """Append `events` to `stream_id` atomically; return their positions.

        `expected_version` is the stream's current version (0 for a new
        stream) or `ANY_VERSION`; a mismatch raises `ConcurrencyError` and
        appends nothing.
        """
        ...

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        """Every event of one stream after `after_version`, in order."""
        ...

    async def read_all(
        self, after: int = 0, limit: int = 1000, types: Sequence[str] | None = None
    ) -> list[RecordedEvent]:
        """Events of all streams with position > `after`, in position order."""
        ...

    async def head(self) -> int:
        """The position of the newest event (0 when the log is empty)."""
        ...

    async def wait_for_new(self, after: int, timeout: float | None = None) -> int:
        """Wait until the head passes `after` (or `timeout`); return the head."""
        ...

    def subscribe(
        self, after: int = 0, types: Sequence[str] | None = None, batch: int = 500
    ) -> AsyncIterator[RecordedEvent]:
        """Every event after `after`, then new ones as they are committed."""
        ...

    async def scan(
        self, after: int, limit: int, types: Sequence[str] | None
    ) -> tuple[list[RecordedEvent], int]:
        """Like `read_all`, also returning the position the scan covered, so a
        reader filtering by type can move past events it does not want."""
        ...

    async def get_tracking(self, name: str) -> int:
        """A reader's saved position (0 when it has none)."""
        ...

    async def close(self) -> None: ...


@dataclass
class _PendingAppend:
    stream_id: str
    expected: int | None
    rows: list[tuple[str, str]]  # (type, data json)
    future: asyncio.Future[list[int] | ConcurrencyError] = field(repr=False)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _encode(event: Event) -> tuple[str, str]:
    return event.type, event.model_dump_json()


def decode_row(
    position: int, stream_id: str, version: int, etype: str, data: str, recorded_at: str
) -> RecordedEvent:
    """Turn one stored row into a typed `RecordedEvent` (or raise `EventDecodeError`)."""
    cls = EVENT_CLASSES.get(etype)
    if cls is None:
        raise EventDecodeError(position, etype, "unknown event type")
    try:
        # The validator itself: `model_validate_json`'s wrapper costs a tenth of a
        # decode, and decoding is most of a replay.
        event = cls.__pydantic_validator__.validate_json(data)
    except ValidationError as exc:
        raise EventDecodeError(position, etype, f"data does not decode: {exc}") from None
    return RecordedEvent(
        position,
        stream_id,
        version,
        datetime.fromisoformat(recorded_at),
        event,
    )


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a bounded batch of work.

    Decoding and folding events create many small tracked objects (pydantic
    models, tuples) and nothing cyclic; letting the collector run every few
    hundred allocations more than doubled replay time. Callers pause it only
    around one page of events, and only if it was running.
    """
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def decode_rows(rows: Sequence[tuple[Any, ...]]) -> list[RecordedEvent]:
    """Decode a page of rows (see `gc_paused`)."""
    with gc_paused():
        return [decode_row(*row) for row in rows]


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


def run_write_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run `fn` inside BEGIN IMMEDIATE … COMMIT, retrying while another process
    holds the write lock (SQLite busy/locked never reaches the caller as long
    as the lock is eventually released)."""
    delay = 0.002
    deadline = time.monotonic() + 60.0
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_locked(exc) and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
                continue
            raise
        try:
            result = fn(conn)
            conn.execute("COMMIT")
            return result
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise


class SQLiteEventStore:
    """`EventStore` on one SQLite file in WAL mode, through aiosqlite."""

    def __init__(self, path: Path, durability: Literal["full", "normal"] = "full") -> None:
        self.path = Path(path)
        self.durability = durability
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._pending: list[_PendingAppend] = []
        self._wake_writer = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        self._known_head = 0
        # Whether another process may have committed since head() last looked
        # (set by every cross-process wake-up; True until a listener exists).
        self._maybe_behind = True
        self._waiters: set[asyncio.Future[None]] = set()
        self._nudger = CommitNudger(self._notify_dir)
        self._listener: CommitListener | None = None
        self._closed = False

    @property
    def _notify_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".notify")

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls, path: Path, durability: Literal["full", "normal"] = "full"
    ) -> SQLiteEventStore:
        """Open (creating when missing) the store at `path`."""
        store = cls(path, durability)
        await store._open()
        return store

    def _configure(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.durability.upper()}")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA foreign_keys=ON")

    async def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE).
        self._writer = await aiosqlite.connect(self.path, isolation_level=None)
        await self._on_thread(self._writer, self._configure)
        await self._on_thread(self._writer, lambda c: c.executescript(_SCHEMA))
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self._on_thread(self._reader, self._configure)
        self._known_head = await self.head()
        self._writer_task = asyncio.create_task(self._write_loop(), name="event-store-writer")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake_writer.set()
        if self._writer_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
        if self._listener is not None:
            self._listener.close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._nudger.close()

    # ------------------------------------------------------------ plumbing

    @staticmethod
    async def _on_thread(conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(raw_connection)` as one job on the connection's own thread.

        aiosqlite otherwise costs a thread hop per statement; a whole append or
        read done in one hop is what keeps it close to raw sqlite3 speed
        (DESIGN.md). `_execute` is aiosqlite's queue entry point; the exact
        aiosqlite version is pinned in constraints.txt.
        """
        raw: Callable[[], sqlite3.Connection] = lambda: conn._conn  # noqa: E731
        return await conn._execute(lambda: fn(raw()))

    def _require_open(self) -> None:
        if self._closed:
            raise StoreClosedError("event store is closed")

    # ------------------------------------------------------------ appends

    async def append(
        self, stream_id: str, expected_version: int | None, events: Sequence[Event]
    ) -> list[int]:
        self._require_open()
        if not events:
            return []
        if expected_version is not None and expected_version < 0:
            raise ValueError("expected_version must be >= 0 or ANY_VERSION")
        future: asyncio.Future[list[int] | ConcurrencyError] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending.append(
            _PendingAppend(stream_id, expected_version, [_encode(e) for e in events], future)
        )
        self._wake_writer.set()
        outcome = await asyncio.shield(future)
        if isinstance(outcome, ConcurrencyError):
            raise outcome
        return outcome

    async def _write_loop(self) -> None:
        assert self._writer is not None
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while self._pending:
                group = self._pending[:_MAX_GROUP]
                del self._pending[:_MAX_GROUP]
                try:
                    outcomes, head = await self._on_thread(
                        self._writer, functools.partial(self._commit_group, group=group)
                    )
                except BaseException as exc:  # the whole group failed: tell each caller
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(
                                exc if isinstance(exc, Exception) else RuntimeError(str(exc))
                            )
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    log.error("event_store.group_commit_failed", error=str(exc))
                    continue
                for item, outcome in zip(group, outcomes, strict=True):
                    if not item.future.done():
                        item.future.set_result(outcome)
                if head > self._known_head:
                    self._known_head = head
                    self._wake_waiters()
            if self._closed:
                return

    def _commit_group(
        self, conn: sqlite3.Connection, group: list[_PendingAppend]
    ) -> tuple[list[list[int] | ConcurrencyError], int]:
        """Runs on the writer thread: one transaction for the whole group."""

        def body(c: sqlite3.Connection) -> tuple[list[list[int] | ConcurrencyError], int]:
            # One MAX per stream: SQLite answers `MAX(version) WHERE stream_id = ?` from
            # the (stream_id, version) index in O(log n); a GROUP BY over an IN list
            # would scan the whole stream. A group of one stream (every append that
            # does not overlap another) asks for its version and the head in one
            # statement, one statement fewer per single append.
            current: dict[str, int] = {}
            streams = {item.stream_id for item in group}
            if len(streams) == 1:
                (stream_id,) = streams
                version, head = c.execute(_VERSION_AND_HEAD, (stream_id,)).fetchone()
                if version is not None:
                    current[stream_id] = int(version)
            else:
                for stream_id in streams:
                    (version,) = c.execute(_STREAM_VERSION, (stream_id,)).fetchone()
                    if version is not None:
                        current[stream_id] = int(version)
                (head,) = c.execute(_HEAD).fetchone()
            now = _now_iso()
            rows: list[tuple[int, str, int, str, str, str]] = []
            outcomes: list[list[int] | ConcurrencyError] = []
            for item in group:
                version = current.get(item.stream_id, 0)
                if item.expected is not None and item.expected != version:
                    outcomes.append(ConcurrencyError(item.stream_id, item.expected, version))
                    continue
                positions = []
                for etype, data in item.rows:
                    head += 1
                    version += 1
                    rows.append((head, item.stream_id, version, etype, data, now))
                    positions.append(head)
                current[item.stream_id] = version
                outcomes.append(positions)
            if len(rows) == 1:
                c.execute(_INSERT, rows[0])
            elif rows:
                c.executemany(_INSERT, rows)
            return outcomes, head

        result = run_write_transaction(conn, body)
        if result[1] > 0:
            self._nudger.nudge()
        return result

    async def write_transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in one write transaction on the writer's thread (read models
        and their tracking positions are written this way, atomically)."""
        self._require_open()
        assert self._writer is not None
        return await self._on_thread(self._writer, lambda c: run_write_transaction(c, fn))

    async def read_transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the reader connection's thread (a consistent snapshot)."""
        self._require_open()
        assert self._reader is not None

        def body(c: sqlite3.Connection) -> T:
            c.execute("BEGIN")
            try:
                return fn(c)
            finally:
                c.execute("COMMIT")

        return await self._on_thread(self._reader, body)

    # ------------------------------------------------------------ reads

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        def body(c: sqlite3.Connection) -> list[RecordedEvent]:
            rows = c.execute(
                "SELECT position, stream_id, version, type, data, recorded_at FROM events "
                "WHERE stream_id = ? AND version > ? ORDER BY version",
                (stream_id, after_version),
            ).fetchall()
            return decode_rows(rows)

        return await self.read_transaction(body)

    async def read_all(
        self, after: int = 0, limit: int = 1000, types: Sequence[str] | None = None
    ) -> list[RecordedEvent]:
        events, _ = await self.scan(after, limit, types)
        return events

    async def head(self) -> int:
        def body(c: sqlite3.Connection) -> int:
            (value,) = c.execute(_HEAD).fetchone()
            return int(value)

        assert self._reader is not None
        if self._listener is not None:
            # Cleared before reading: a wake-up arriving meanwhile sets it again.
            self._maybe_behind = False
        head = await self._on_thread(self._reader, body)
        self._known_head = max(self._known_head, head)
        return head

    def fresh_head(self) -> int | None:
        """The head as known without a query, or None when another process may have
        committed since it was last read (then call `head()`)."""
        return None if self._maybe_behind else self._known_head

    def _remote_commit(self) -> None:
        self._maybe_behind = True
        self._wake_waiters()

    async def stream_version(self, stream_id: str) -> int:
        """The current version of a stream (0 when it does not exist)."""

        def body(c: sqlite3.Connection) -> int:
            (value,) = c.execute(
                "SELECT COALESCE(MAX(version), 0) FROM events WHERE stream_id = ?", (stream_id,)
            ).fetchone()
            return int(value)

        return await self.read_transaction(body)

    # ------------------------------------------------------------ waiting

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _ensure_listener(self) -> None:
        if self._listener is None:
            self._listener = CommitListener(self._notify_dir, self._remote_commit)
            self._listener.start()
            self._nudger.set_own_token(self._listener.token)

    async def wait_for_new(self, after: int, timeout: float | None = None) -> int:
        self._require_open()
        self._ensure_listener()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._known_head > after:
                return self._known_head
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            # Re-read after registering: a commit by another process between the
            # check above and now would otherwise be missed until the next one.
            head = await self.head()
            if head > after or self._closed:
                self._waiters.discard(waiter)
                return head
            wait_for = _SAFETY_RECHECK_SECONDS
            if deadline is not None:
                wait_for = min(wait_for, deadline - time.monotonic())
                if wait_for <= 0:
                    self._waiters.discard(waiter)
                    return head
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, wait_for)
            self._waiters.discard(waiter)
            if self._closed:
                return self._known_head
            await self.head()

    async def subscribe(
        self, after: int = 0, types: Sequence[str] | None = None, batch: int = 500
    ) -> AsyncIterator[RecordedEvent]:
        position = after
        while not self._closed:
            events, scanned_to = await self.scan(position, batch, types)
            for recorded in events:
                yield recorded
            if scanned_to > position:
                position = scanned_to
                continue
            await self.wait_for_new(position)

    async def scan(
        self, after: int, limit: int, types: Sequence[str] | None
    ) -> tuple[list[RecordedEvent], int]:
        """Matching events after `after`, and the position the scan covered
        (so events of other types are skipped, not re-read on every wake-up)."""

        def body(c: sqlite3.Connection) -> tuple[list[RecordedEvent], int]:
            (head,) = c.execute(_HEAD).fetchone()
            sql = (
                "SELECT position, stream_id, version, type, data, recorded_at FROM events "
                "WHERE position > ?"
            )
            params: list[Any] = [after]
            if types:
                sql += f" AND type IN ({','.join('?' * len(types))})"
                params.extend(types)
            sql += " ORDER BY position LIMIT ?"
            params.append(limit)
            events = decode_rows(c.execute(sql, params).fetchall())
            scanned_to = events[-1].position if len(events) == limit else int(head)
            return events, scanned_to

        return await self.read_transaction(body)

    # ------------------------------------------------------------ tracking

    async def get_tracking(self, name: str) -> int:
        def body(c: sqlite3.Connection) -> int:
            row = c.execute("SELECT position FROM tracking WHERE name = ?", (name,)).fetchone()
            return 0 if row is None else int(row[0])

        return await self.read_transaction(body)


def set_tracking(conn: sqlite3.Connection, name: str, position: int) -> None:
    """Record a reader's position; call inside `write_transaction` with its update."""
    conn.execute(
        "INSERT INTO tracking (name, position) VALUES (?, ?) "
        "ON CONFLICT(name) DO UPDATE SET position = excluded.position",
        (name, position),
    )
