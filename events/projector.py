"""The job read model and the projector that keeps it.

The read model is a SQLite table in the same database file as the log, so the
projector writes the changed rows and its tracking position in one
transaction: after a crash it resumes exactly where the last committed batch
ended, neither skipping nor applying an event twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sqlite3
from collections.abc import Sequence
from typing import Any

import structlog

from events.projections import JOB_STREAM_PREFIX, JobState, evolve
from events.store import SQLiteEventStore, gc_paused, set_tracking
from events.types import RecordedEvent

log = structlog.get_logger(__name__)

#: Every event type that appears in job streams.
JOB_EVENT_TYPES: tuple[str, ...] = (
    "JobSubmitted",
    "JobStarted",
    "DatasetPrepared",
    "TrainingProgressed",
    "CheckpointSaved",
    "ImageGenerated",
    "JobCancelRequested",
    "JobSucceeded",
    "JobFailed",
    "JobCanceled",
    "JobRequeued",
    "JobArtifactsDeleted",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id     TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL,
    type       TEXT NOT NULL,
    state      TEXT NOT NULL,
    priority   INTEGER NOT NULL,
    tags       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    position   INTEGER NOT NULL,
    doc        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_tenant_created ON jobs (tenant, created_at DESC, job_id DESC);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority, created_at);
CREATE TABLE IF NOT EXISTS artifacts (
    artifact_id TEXT PRIMARY KEY,
    job_id      TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    kind        TEXT NOT NULL
);
"""

TRACKING_NAME = "jobs"
#: How many job states the projector keeps in memory (least recently changed
#: first out). Between catch-up batches only the jobs whose events go on need to
#: stay, and those are the most recently changed; keeping more would make a
#: long-running service grow with every job it has seen (about 4 KB each).
CACHE_LIMIT = 256


def _row(state: JobState) -> tuple[Any, ...]:
    return (
        state.id,
        state.tenant,
        state.type,
        state.state,
        state.priority,
        json.dumps(state.tags),
        state.created_at.isoformat(),
        state.updated_at.isoformat(),
        state.position,
        state.model_dump_json(),
    )


def _artifact_rows(state: JobState) -> list[tuple[str, str, str, str]]:
    """Checkpoint and image ids of a job, so downloads find their job by id."""
    return [(c.id, state.id, state.tenant, "checkpoint") for c in state.checkpoints] + [
        (i.id, state.id, state.tenant, "image") for i in state.images
    ]


def ensure_schema(conn: sqlite3.Connection) -> None:
    # One statement at a time: executescript() would commit the caller's transaction.
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


class JobProjector:
    """Folds job events into the `jobs` table: catches up on start, then follows."""

    def __init__(self, store: SQLiteEventStore, batch_size: int = 5000) -> None:
        self.store = store
        self.batch_size = batch_size
        self.position = 0
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        # States of recently changed jobs (insertion order = least recently
        # changed first), so a catch-up over many batches does not re-read and
        # re-parse every job row per batch.
        self._cache: dict[str, JobState] = {}
        self.caught_up = asyncio.Event()

    async def start(self) -> None:
        """Create the table if needed, catch up, then follow the log in the background."""
        await self.store.write_transaction(ensure_schema)
        self.position = await self.store.get_tracking(TRACKING_NAME)
        await self.catch_up()
        self._task = asyncio.create_task(self._follow(), name="job-projector")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def catch_up(self) -> int:
        """Apply every committed event not applied yet; return the new position."""
        async with self._lock:
            return await self._catch_up()

    async def _catch_up(self) -> int:
        while True:
            events, scanned_to = await self.store.scan(
                self.position, self.batch_size, JOB_EVENT_TYPES
            )
            if scanned_to <= self.position:
                self.caught_up.set()
                return self.position
            await self._apply(events, scanned_to)

    async def wait_for(self, position: int, timeout: float = 10.0) -> None:
        """Wait until the read model reflects every event up to `position`."""
        async with asyncio.timeout(timeout):
            while self.position < position:
                await self.catch_up()
                if self.position < position:
                    await self.store.wait_for_new(self.position, timeout=0.05)

    async def sync(self, timeout: float = 2.0) -> None:
        """Read-your-writes: wait (briefly) until every event committed so far, by any
        process, is in the read model. On timeout the caller reads a slightly stale model."""
        head = self.store.fresh_head()
        if head is None:
            head = await self.store.head()
        if self.position < head:
            with contextlib.suppress(TimeoutError):
                await self.wait_for(head, timeout)

    async def _follow(self) -> None:
        while True:
            try:
                await self.catch_up()
                await self.store.wait_for_new(self.position)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("projector.failed")
                await asyncio.sleep(1.0)

    async def _apply(self, events: Sequence[RecordedEvent], up_to: int) -> None:
        """Fold `events` into the table and move the tracking position to `up_to`,
        all in one transaction."""
        start = self.position

        def body(conn: sqlite3.Connection) -> dict[str, JobState]:
            (tracked,) = conn.execute(
                "SELECT COALESCE((SELECT position FROM tracking WHERE name = ?), 0)",
                (TRACKING_NAME,),
            ).fetchone()
            if tracked != start:
                # Another projector instance moved on: nothing here is applied twice.
                raise _Moved(int(tracked))
            wanted = {e.stream_id for e in events}
            states = {k: self._cache[k] for k in wanted if k in self._cache}
            states.update(_load_states(conn, wanted - states.keys()))
            changed: dict[str, JobState] = {}
            with gc_paused():
                _fold_into(states, changed, events)
            if changed:
                conn.executemany(
                    "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [_row(s) for s in changed.values()],
                )
                conn.executemany(
                    "INSERT OR IGNORE INTO artifacts VALUES (?, ?, ?, ?)",
                    [row for s in changed.values() for row in _artifact_rows(s)],
                )
            set_tracking(conn, TRACKING_NAME, up_to)
            return changed

        try:
            changed = await self.store.write_transaction(body)
        except _Moved as moved:
            self._cache.clear()
            self.position = moved.position
            return
        self.position = up_to
        self._remember(changed)

    def _remember(self, changed: dict[str, JobState]) -> None:
        cache = self._cache
        for stream_id, state in changed.items():
            cache.pop(stream_id, None)  # re-inserted: now the most recently changed
            cache[stream_id] = state
        excess = len(cache) - CACHE_LIMIT
        if excess > 0:
            for stream_id in list(itertools.islice(cache, excess)):
                del cache[stream_id]

    @property
    def cached_jobs(self) -> int:
        """How many job states are held in memory (bounded by `CACHE_LIMIT`)."""
        return len(self._cache)


def _fold_into(
    states: dict[str, JobState], changed: dict[str, JobState], events: Sequence[RecordedEvent]
) -> None:
    """Apply `events` to `states` (by stream), noting every state that changed."""
    for recorded in events:
        if not recorded.stream_id.startswith(JOB_STREAM_PREFIX):
            continue
        new = evolve(states.get(recorded.stream_id), recorded)
        if new is not None:
            states[recorded.stream_id] = new
            changed[recorded.stream_id] = new


class _Moved(Exception):
    def __init__(self, position: int) -> None:
        self.position = position


def _load_states(conn: sqlite3.Connection, streams: set[str]) -> dict[str, JobState]:
    ids = [s[len(JOB_STREAM_PREFIX) :] for s in streams if s.startswith(JOB_STREAM_PREFIX)]
    states: dict[str, JobState] = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        rows = conn.execute(
            f"SELECT job_id, doc FROM jobs WHERE job_id IN ({','.join('?' * len(chunk))})", chunk
        ).fetchall()
        for job_id, doc in rows:
            states[JOB_STREAM_PREFIX + job_id] = JobState.model_validate_json(doc)
    return states


async def rebuild_job_read_model(store: SQLiteEventStore, batch_size: int = 20000) -> int:
    """Drop the job read model and rebuild it from the whole log; return the position."""

    def reset(conn: sqlite3.Connection) -> None:
        conn.execute("DROP TABLE IF EXISTS jobs")
        conn.execute("DROP TABLE IF EXISTS artifacts")
        conn.execute("DELETE FROM tracking WHERE name = ?", (TRACKING_NAME,))
        ensure_schema(conn)

    await store.write_transaction(reset)
    projector = JobProjector(store, batch_size=batch_size)
    return await projector.catch_up()


async def read_model_rows(store: SQLiteEventStore) -> list[tuple[Any, ...]]:
    """Every row of the read models, in a fixed order (for comparisons)."""

    def body(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
        jobs = conn.execute("SELECT * FROM jobs ORDER BY job_id").fetchall()
        artifacts = conn.execute("SELECT * FROM artifacts ORDER BY artifact_id").fetchall()
        return [*jobs, *artifacts]

    return await store.read_transaction(body)
