"""Event-store benchmark: boothd's store against raw sqlite3 measured in the same run.

Prints one JSON line per measurement; the last line is one JSON object with
append_single_ratio, append_concurrent_ratio, replay_ratio, rebuild_1m_seconds,
wakeup_p99_ms_inprocess, wakeup_p99_ms_crossprocess.

    python bench/event_store.py            # full run (about 1-2 minutes)
    python bench/event_store.py --quick    # smaller counts, under 60 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from events.projections import job_stream
from events.projector import rebuild_job_read_model
from events.store import ANY_VERSION, SQLiteEventStore
from events.types import (
    CheckpointSaved,
    JobStarted,
    JobSubmitted,
    JobSucceeded,
    TrainingProgressed,
)


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def progress(i: int) -> TrainingProgressed:
    return TrainingProgressed(step=i, total_steps=1000, loss=0.123456, learning_rate=1e-4)


def raw_connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS events (position INTEGER PRIMARY KEY, stream_id TEXT NOT NULL,"
        " version INTEGER NOT NULL, type TEXT NOT NULL, data TEXT NOT NULL,"
        " recorded_at TEXT NOT NULL, UNIQUE (stream_id, version))"
    )
    return conn


def raw_single_rate(conn: sqlite3.Connection, start: int, n: int) -> float:
    """Raw sqlite3: one-row transactions (BEGIN; INSERT; COMMIT), same pragmas and row shape."""
    data = progress(1).model_dump_json()
    begin = time.perf_counter()
    for i in range(start + 1, start + n + 1):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
            (i, "job-raw", i, "TrainingProgressed", data, datetime.now(UTC).isoformat()),
        )
        conn.execute("COMMIT")
    return n / (time.perf_counter() - begin)


def raw_replay_rate(db: Path) -> tuple[float, int]:
    conn = sqlite3.connect(db)
    start = time.perf_counter()
    count = 0
    after = 0
    while True:
        rows = conn.execute(
            "SELECT position, stream_id, version, type, data, recorded_at FROM events "
            "WHERE position > ? ORDER BY position LIMIT 1000",
            (after,),
        ).fetchall()
        if not rows:
            break
        for row in rows:
            json.loads(row[4])
        count += len(rows)
        after = rows[-1][0]
    rate = count / (time.perf_counter() - start)
    conn.close()
    return rate, count


async def store_single_rate(store: SQLiteEventStore, start: int, n: int) -> float:
    event = progress(1)
    begin = time.perf_counter()
    for i in range(start, start + n):
        await store.append("job-single", i, [event])
    return n / (time.perf_counter() - begin)


async def single_rounds(folder: Path, n: int, rounds: int) -> tuple[float, float, float]:
    """Raw one-row commits and single appends, alternating in `rounds` rounds of `n`.

    The disk's fsync rate drifts by a factor of two or more within minutes on
    this machine; measuring the two side by side, round after round, and
    taking the median of the per-round ratios keeps that drift out of the
    ratio. Returns (median raw rate, median store rate, median ratio).
    """
    conn = raw_connect(folder / "raw.db")
    store = await SQLiteEventStore.open(folder / "single.db")
    raws, stores, ratios = [], [], []
    try:
        for r in range(rounds):
            raw = raw_single_rate(conn, r * n, n)
            single = await store_single_rate(store, r * n, n)
            raws.append(raw)
            stores.append(single)
            ratios.append(single / raw)
            emit(
                measure="single_round",
                round=r + 1,
                raw_commits_per_s=round(raw),
                store_appends_per_s=round(single),
                ratio=round(single / raw, 3),
            )
    finally:
        conn.close()
        await store.close()
    return statistics.median(raws), statistics.median(stores), statistics.median(ratios)


async def store_concurrent_rate(folder: Path, appenders: int, per_appender: int) -> float:
    store = await SQLiteEventStore.open(folder / "concurrent.db")
    event = progress(1)

    async def appender(k: int) -> None:
        for i in range(per_appender):
            await store.append(f"job-{k}", i, [event])

    start = time.perf_counter()
    await asyncio.gather(*(appender(k) for k in range(appenders)))
    rate = appenders * per_appender / (time.perf_counter() - start)
    await store.close()
    return rate


async def store_replay_rate(db: Path) -> tuple[float, int]:
    store = await SQLiteEventStore.open(db)
    start = time.perf_counter()
    count = 0
    after = 0
    while True:
        events = await store.read_all(after, 1000)
        if not events:
            break
        count += len(events)
        after = events[-1].position
    rate = count / (time.perf_counter() - start)
    await store.close()
    return rate, count


def fill_job_log(db: Path, total: int, progress_per_job: int = 45) -> int:
    """Write a realistic job log straight into the store's table (fast bulk load):
    per job: submitted, started, progress…, checkpoint, succeeded."""
    conn = raw_connect(db)
    conn.execute("PRAGMA synchronous=OFF")
    now = datetime.now(UTC).isoformat()
    position = 0
    job = 0
    rows: list[tuple[object, ...]] = []
    conn.execute("BEGIN")
    while position < total:
        job += 1
        job_id = f"j{job:08d}"
        stream = job_stream(job_id)
        events = [
            JobSubmitted(
                job_id=job_id,
                tenant="bench",
                job_type="dreambooth",
                config={"train": {"steps": 1000, "instance_prompt": "photo of sks dog"}},
                tags=["bench"],
            ),
            JobStarted(runner_id="r1", device="cpu"),
            *(progress(i) for i in range(progress_per_job)),
            CheckpointSaved(
                checkpoint_id=f"ckp_{job}",
                kind="lora",
                step=1000,
                format="safetensors",
                path=f"jobs/{job_id}/lora.safetensors",
                size_bytes=123456,
                sha256="0" * 64,
                final=True,
            ),
            JobSucceeded(),
        ]
        for version, event in enumerate(events, start=1):
            if position >= total:
                break
            position += 1
            rows.append((position, stream, version, event.type, event.model_dump_json(), now))
        if len(rows) >= 50_000:
            conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)", rows)
            rows.clear()
    conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)", rows)
    conn.execute("COMMIT")
    conn.close()
    return position


async def rebuild_seconds(db: Path) -> float:
    store = await SQLiteEventStore.open(db)
    start = time.perf_counter()
    await rebuild_job_read_model(store)
    seconds = time.perf_counter() - start
    await store.close()
    return seconds


async def wakeup_inprocess(folder: Path, samples: int) -> list[float]:
    """Append → an in-process waiter woken (includes the commit's fsync)."""
    store = await SQLiteEventStore.open(folder / "wake.db")
    latencies = []
    for i in range(samples):
        woke: list[float] = []

        async def waiter(after: int = i, woke: list[float] = woke) -> None:
            await store.wait_for_new(after, timeout=5)
            woke.append(time.perf_counter())

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.002)
        start = time.perf_counter()
        await store.append("job-wake", ANY_VERSION, [progress(i)])
        await task
        latencies.append((woke[0] - start) * 1000)
    await store.close()
    return latencies


_CHILD = """
import asyncio, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from events.store import SQLiteEventStore

async def main() -> None:
    store = await SQLiteEventStore.open(Path({db!r}))
    last = 0
    await store.wait_for_new(0, timeout=0.01)  # registers the listener
    print("ready", flush=True)
    while last < {samples}:
        head = await store.wait_for_new(last, timeout=10)
        print(head, time.perf_counter(), flush=True)
        last = head
    await store.close()

asyncio.run(main())
"""


async def wakeup_crossprocess(folder: Path, samples: int) -> list[float]:
    """Append in this process → a waiter in another process woken."""
    db = folder / "cross.db"
    store = await SQLiteEventStore.open(db)
    root = str(Path(__file__).resolve().parent.parent)
    child = subprocess.Popen(  # noqa: ASYNC220 - a long-lived child read line by line
        [sys.executable, "-c", _CHILD.format(root=root, db=str(db), samples=samples)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    latencies = []
    for i in range(samples):
        start = time.perf_counter()
        await store.append("job-cross", i, [progress(i)])
        line = await asyncio.to_thread(child.stdout.readline)
        _, woke = line.split()
        latencies.append((float(woke) - start) * 1000)
        await asyncio.sleep(0.01)
    child.wait(timeout=10)
    await store.close()
    return latencies


def p99(values: list[float]) -> float:
    return round(statistics.quantiles(values, n=100)[98], 3)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller counts (under 60 s)")
    args = parser.parse_args()
    quick = args.quick
    single_n = 1000 if quick else 3000
    per_appender = 40 if quick else 150
    rebuild_n = 200_000 if quick else 1_000_000
    wake_samples = 100 if quick else 300

    with tempfile.TemporaryDirectory(prefix="boothd-bench-") as tmp:
        folder = Path(tmp)
        raw_single, single, single_ratio = await single_rounds(folder, single_n // 5, 5)
        emit(measure="raw_one_row_commits_per_s", value=round(raw_single))
        emit(measure="store_single_appends_per_s", value=round(single))
        concurrent = await store_concurrent_rate(folder, 64, per_appender)
        emit(measure="store_concurrent_64_appends_per_s", value=round(concurrent))

        log_db = folder / "log.db"
        written = fill_job_log(log_db, rebuild_n)
        emit(measure="log_events_written", value=written)
        raw_replay, n_raw = raw_replay_rate(log_db)
        emit(measure="raw_replay_rows_per_s", value=round(raw_replay), rows=n_raw)
        replay, n_typed = await store_replay_rate(log_db)
        emit(measure="typed_replay_events_per_s", value=round(replay), events=n_typed)
        rebuild = await rebuild_seconds(log_db)
        rebuild_1m = rebuild * 1_000_000 / written
        emit(
            measure="rebuild_seconds",
            value=round(rebuild, 2),
            events=written,
            scaled_to_1m=round(rebuild_1m, 2),
        )

        wake_in = await wakeup_inprocess(folder, wake_samples)
        emit(
            measure="wakeup_ms_inprocess",
            p50=round(statistics.median(wake_in), 3),
            p99=p99(wake_in),
        )
        wake_x = await wakeup_crossprocess(folder, wake_samples)
        emit(
            measure="wakeup_ms_crossprocess",
            p50=round(statistics.median(wake_x), 3),
            p99=p99(wake_x),
        )

    emit(
        append_single_ratio=round(single_ratio, 3),
        append_concurrent_ratio=round(concurrent / raw_single, 3),
        replay_ratio=round(replay / raw_replay, 3),
        rebuild_1m_seconds=round(rebuild_1m, 2),
        rebuild_measured_events=written,
        wakeup_p99_ms_inprocess=p99(wake_in),
        wakeup_p99_ms_crossprocess=p99(wake_x),
        quick=quick,
        cpus=os.cpu_count(),
    )


if __name__ == "__main__":
    asyncio.run(main())
