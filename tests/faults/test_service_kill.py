"""SIGKILL of `python -m service serve --no-runners` during a burst of submissions.

Rule under test: an acknowledged submission survives a crash. After the kill
and a restart, every job whose POST got a 2xx answer exists (GET 200); the
job listing equals a fold of the log read directly with `SQLiteEventStore`;
projections rebuilt from the log equal the live ones; the database passes
`PRAGMA integrity_check` and every job stream starts with `JobSubmitted`
(nothing half-written).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp

from events.projections import JOB_STREAM_PREFIX
from events.projector import read_model_rows
from events.store import SQLiteEventStore
from service.demo import start_server
from tests.faults.common import folded_jobs, gen_job, read_log, rebuilt_rows_of_copy

# 200 concurrent submissions in `make test`; `make faults` sets 500 (the figure).
BURST = int(os.environ.get("BOOTHD_FAULT_BURST", "200"))


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)


async def list_all(session: aiohttp.ClientSession, url: str) -> dict[str, dict[str, Any]]:
    jobs: dict[str, dict[str, Any]] = {}
    cursor: str | None = None
    while True:
        params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
        async with session.get(f"{url}/v1/jobs", params=params) as resp:
            assert resp.status == 200, await resp.text()
            page = await resp.json()
        jobs.update({job["id"]: job for job in page["jobs"]})
        cursor = page["next_cursor"]
        if not cursor:
            return jobs


async def test_acknowledged_submissions_survive_sigkill_mid_burst(tmp_path: Path) -> None:
    """SIGKILL during BURST concurrent submissions: every 2xx job exists after a restart,
    the listing equals the fold of the log, rebuilt projections equal the live ones."""
    data = tmp_path / "data"
    proc, url = await start_server(data, "--no-runners")
    answered: list[tuple[int, str | None]] = []
    errors: list[BaseException] = []
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=BURST)
        ) as session:

            async def submit(n: int) -> None:
                try:
                    async with session.post(f"{url}/v1/jobs", json=gen_job(n)) as resp:
                        body = await resp.json() if resp.status < 300 else None
                        answered.append((resp.status, body["id"] if body else None))
                except (TimeoutError, aiohttp.ClientError) as exc:
                    errors.append(exc)

            tasks = [asyncio.create_task(submit(n)) for n in range(BURST)]
            async with asyncio.timeout(60):
                while len(answered) < BURST // 4:
                    await asyncio.sleep(0.001)
            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 30)
            await asyncio.gather(*tasks)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(answered) + len(errors) == BURST
    assert all(status < 500 for status, _ in answered), answered
    acked = {job_id for status, job_id in answered if 200 <= status < 300 and job_id}
    assert len(acked) >= BURST // 4
    assert errors, "the kill did not interrupt the burst"

    proc, url = await start_server(data, "--no-runners")
    try:
        async with aiohttp.ClientSession() as session:
            for job_id in acked:
                async with session.get(f"{url}/v1/jobs/{job_id}") as resp:
                    assert resp.status == 200, (job_id, await resp.text())
            listed = await list_all(session, url)
    finally:
        await stop(proc)
    assert proc.returncode == 0
    assert acked <= set(listed)

    db = data / "events.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    store = await SQLiteEventStore.open(db, "full")
    try:
        logged = await folded_jobs(store)
        firsts: dict[str, str] = {}
        for recorded in await read_log(store):
            firsts.setdefault(recorded.stream_id, recorded.event.type)
        live = await read_model_rows(store)
    finally:
        await store.close()
    assert set(logged) == set(listed)
    assert {j: s.state for j, s in logged.items()} == {j: v["state"] for j, v in listed.items()}
    job_firsts = {s: t for s, t in firsts.items() if s.startswith(JOB_STREAM_PREFIX)}
    assert set(job_firsts.values()) == {"JobSubmitted"}, job_firsts
    assert await rebuilt_rows_of_copy(db, tmp_path / "copy") == live
