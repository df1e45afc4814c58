"""The contract every EventStore implementation keeps (run against each backend)."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import sys
from pathlib import Path

import pytest

from events.errors import ConcurrencyError, EventDecodeError
from events.store import ANY_VERSION, NO_STREAM, EventStore, SQLiteEventStore
from events.types import JobCancelRequested, JobStarted, TrainingProgressed
from tests.events.conftest import StoreFactory


def progress(step: int) -> TrainingProgressed:
    return TrainingProgressed(step=step, total_steps=100, loss=0.5, learning_rate=1e-4)


async def test_append_returns_gap_free_positions_in_order(store: EventStore) -> None:
    """Positions are global, consecutive and in append order across streams."""
    a = await store.append("job-a", NO_STREAM, [progress(1), progress(2)])
    b = await store.append("job-b", NO_STREAM, [progress(1)])
    c = await store.append("job-a", 2, [progress(3)])
    assert a == [1, 2] and b == [3] and c == [4]
    everything = await store.read_all()
    assert [e.position for e in everything] == [1, 2, 3, 4]
    assert [(e.stream_id, e.version) for e in everything] == [
        ("job-a", 1),
        ("job-a", 2),
        ("job-b", 1),
        ("job-a", 3),
    ]
    stream = await store.read_stream("job-a")
    assert [e.event for e in stream] == [progress(1), progress(2), progress(3)]
    assert await store.head() == 4


async def test_version_conflict_raises_and_appends_nothing(store: EventStore) -> None:
    """A stale expected version raises ConcurrencyError and the batch is not written."""
    await store.append("job-a", NO_STREAM, [progress(1)])
    with pytest.raises(ConcurrencyError) as info:
        await store.append("job-a", NO_STREAM, [progress(2), progress(3)])
    assert info.value.actual == 1 and info.value.expected == 0
    with pytest.raises(ConcurrencyError):
        await store.append("job-a", 5, [progress(2)])
    assert [e.version for e in await store.read_stream("job-a")] == [1]
    assert await store.head() == 1


async def test_any_version_appends_at_the_end(store: EventStore) -> None:
    """ANY_VERSION appends after whatever the stream holds."""
    await store.append("job-a", NO_STREAM, [progress(1)])
    await store.append("job-a", ANY_VERSION, [JobCancelRequested()])
    assert [e.version for e in await store.read_stream("job-a")] == [1, 2]


async def test_read_all_after_and_limit_and_types(store: EventStore) -> None:
    """read_all pages by position and filters by type."""
    for i in range(10):
        await store.append(f"job-{i}", NO_STREAM, [progress(i), JobCancelRequested()])
    page = await store.read_all(after=5, limit=3)
    assert [e.position for e in page] == [6, 7, 8]
    only = await store.read_all(types=["JobCancelRequested"])
    assert [e.position for e in only] == list(range(2, 21, 2))


async def test_racing_tasks_exactly_one_wins(store: EventStore) -> None:
    """Tasks claiming the same stream version: exactly one succeeds."""
    await store.append("job-a", NO_STREAM, [progress(0)])

    async def claim(i: int) -> bool:
        try:
            await store.append("job-a", 1, [JobStarted(runner_id=f"r{i}", device="cpu")])
            return True
        except ConcurrencyError:
            return False

    results = await asyncio.gather(*(claim(i) for i in range(20)))
    assert sum(results) == 1
    assert len(await store.read_stream("job-a")) == 2


def _claim_in_process(db: str, runner: str, start: object, results: object) -> None:
    async def main() -> None:
        store = await SQLiteEventStore.open(Path(db))
        try:
            start.wait()  # type: ignore[attr-defined]
            try:
                await store.append("job-a", 1, [JobStarted(runner_id=runner, device="cpu")])
                results.put(runner)  # type: ignore[attr-defined]
            except ConcurrencyError:
                results.put("lost")  # type: ignore[attr-defined]
        finally:
            await store.close()

    asyncio.run(main())


async def test_racing_processes_exactly_one_wins(tmp_path: Path) -> None:
    """Two OS processes claiming the same version of the same stream: exactly one wins."""
    db = tmp_path / "events.db"
    store = await SQLiteEventStore.open(db)
    await store.append("job-a", NO_STREAM, [progress(0)])
    ctx = multiprocessing.get_context("spawn")
    for _ in range(3):
        start, results = ctx.Event(), ctx.Queue()
        procs = [
            ctx.Process(target=_claim_in_process, args=(str(db), f"r{i}", start, results))
            for i in range(2)
        ]
        for p in procs:
            p.start()
        await asyncio.sleep(0.5)
        start.set()
        for p in procs:
            await asyncio.to_thread(p.join, 60)
            assert p.exitcode == 0
        outcomes = sorted(results.get(timeout=5) for _ in procs)
        starts = [e for e in await store.read_stream("job-a") if e.type == "JobStarted"]
        assert len(starts) == 1
        assert outcomes == sorted(["lost", starts[0].event.runner_id])  # type: ignore[union-attr]
        # reset for the next round: a fresh stream
        await store.close()
        db.unlink()
        for extra in tmp_path.glob("events.db-*"):
            extra.unlink()
        store = await SQLiteEventStore.open(db)
        await store.append("job-a", NO_STREAM, [progress(0)])
    await store.close()


async def test_group_commit_under_100_concurrent_appenders(store: EventStore) -> None:
    """100 concurrent appenders each get their own result; some streams conflict on purpose."""

    async def appender(i: int) -> list[int] | str:
        stream = f"job-{i % 50}"  # two appenders per stream, both expecting a new stream
        try:
            return await store.append(stream, NO_STREAM, [progress(i), progress(i + 1)])
        except ConcurrencyError:
            return "conflict"

    results = await asyncio.gather(*(appender(i) for i in range(100)))
    won = [r for r in results if r != "conflict"]
    assert len(won) == 50 and results.count("conflict") == 50
    positions = sorted(p for r in won for p in r)  # type: ignore[union-attr]
    assert positions == list(range(1, 101))
    for r in won:
        assert r[1] == r[0] + 1  # type: ignore[index]  # a batch is contiguous
    for i in range(50):
        assert [e.version for e in await store.read_stream(f"job-{i}")] == [1, 2]


async def test_reopen_after_close_keeps_everything(store_factory: StoreFactory) -> None:
    """Events and versions survive close and reopen; appends continue the sequence."""
    first = await store_factory()
    await first.append("job-a", NO_STREAM, [progress(1), progress(2)])
    await first.close()
    second = await store_factory()
    assert [e.event for e in await second.read_stream("job-a")] == [progress(1), progress(2)]
    assert await second.append("job-a", 2, [progress(3)]) == [3]


async def test_unknown_and_corrupt_rows_name_their_position(tmp_path: Path) -> None:
    """A row of an unknown type or with undecodable data raises an error naming the position."""
    db = tmp_path / "events.db"
    store = await SQLiteEventStore.open(db)
    await store.append("job-a", NO_STREAM, [progress(1)])
    with sqlite3.connect(db) as raw:
        raw.execute(
            "INSERT INTO events VALUES "
            "(2, 'job-a', 2, 'NoSuchEvent', '{}', '2026-01-01T00:00:00+00:00')"
        )
        raw.execute(
            "INSERT INTO events VALUES (3, 'job-a', 3, 'TrainingProgressed', '{\"step\": \"x\"}', "
            "'2026-01-01T00:00:00+00:00')"
        )
    with pytest.raises(EventDecodeError, match=r"position 2.*unknown event type"):
        await store.read_all()
    with pytest.raises(EventDecodeError, match="position 3"):
        await store.read_all(after=2)
    await store.close()


async def test_subscribe_replays_then_follows_live(store: EventStore) -> None:
    """subscribe() yields the backlog, then events committed later, in order."""
    await store.append("job-a", NO_STREAM, [progress(1)])
    seen: list[int] = []

    async def consume() -> None:
        async for recorded in store.subscribe(after=0):
            seen.append(recorded.position)
            if len(seen) == 3:
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    await store.append("job-a", 1, [progress(2)])
    await store.append("job-b", NO_STREAM, [progress(1)])
    await asyncio.wait_for(task, 5)
    assert seen == [1, 2, 3]


async def test_subscribe_with_types_skips_others(store: EventStore) -> None:
    """A typed subscription sees only those types and does not stall on others."""
    seen: list[str] = []

    async def consume() -> None:
        async for recorded in store.subscribe(types=["JobCancelRequested"]):
            seen.append(recorded.stream_id)
            if len(seen) == 2:
                return

    task = asyncio.create_task(consume())
    await store.append("job-a", NO_STREAM, [progress(1)])
    await asyncio.sleep(0.05)
    await store.append("job-a", 1, [JobCancelRequested()])
    await store.append("job-b", NO_STREAM, [progress(1), JobCancelRequested()])
    await asyncio.wait_for(task, 5)
    assert seen == ["job-a", "job-b"]


async def test_wait_for_new_times_out_and_wakes(store: EventStore) -> None:
    """wait_for_new returns the head at timeout, and wakes on a commit."""
    assert await store.wait_for_new(0, timeout=0.05) == 0
    waiter = asyncio.create_task(store.wait_for_new(0, timeout=10))
    await asyncio.sleep(0.02)
    await store.append("job-a", NO_STREAM, [progress(1)])
    assert await asyncio.wait_for(waiter, 5) == 1


async def test_another_process_commit_wakes_a_waiter(tmp_path: Path) -> None:
    """A commit made by another process wakes a waiter without waiting for a poll tick."""
    db = tmp_path / "events.db"
    store = await SQLiteEventStore.open(db)
    waiter = asyncio.create_task(store.wait_for_new(0, timeout=30))
    await asyncio.sleep(0.1)
    code = (
        "import asyncio, sys; from pathlib import Path\n"
        "from events.store import SQLiteEventStore\n"
        "from events.types import JobCancelRequested\n"
        "async def main():\n"
        f"    s = await SQLiteEventStore.open(Path({str(db)!r}))\n"
        "    await s.append('job-x', 0, [JobCancelRequested()])\n"
        "    await s.close()\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
    assert await proc.wait() == 0
    assert await asyncio.wait_for(waiter, 5) == 1
    await store.close()
