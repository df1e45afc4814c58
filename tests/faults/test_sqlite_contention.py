"""SQLite busy/locked under contention, through the real app over loopback HTTP.

Rules under test: a write lock held by another process only delays
submissions (every one is eventually answered 201, never 500), and a burst of
concurrent submissions leaves exactly the acknowledged jobs in the log, with
live projections equal to projections rebuilt from the log.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from events.projector import read_model_rows
from events.settings import parse_settings
from service.app import create_app
from service.keys import PROJECTOR, SETTINGS, STORE
from tests.faults.common import AUTH, KEY, folded_jobs, gen_job, rebuilt_rows_of_copy

Client = TestClient[web.Request, web.Application]

HOLD_SECONDS = 2.0
#: Another process: take the write lock, say so, hold it, commit.
LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
conn.close()
"""


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[Client]], tmp_path: Path
) -> Client:
    settings = parse_settings(
        {
            "storage": {"data_dir": str(tmp_path / "data"), "durability": "normal"},
            "auth": {"keys": [{"key": KEY, "tenant": "t1"}]},
        }
    )
    return await aiohttp_client(create_app(settings, start_runners=False))


async def _post(client: Client, n: int) -> tuple[int, dict[str, Any]]:
    async with client.post("/v1/jobs", json=gen_job(n), headers=AUTH) as resp:
        return resp.status, await resp.json()


async def test_submissions_wait_out_another_process_holding_the_write_lock(
    client: Client,
) -> None:
    """While another process holds BEGIN IMMEDIATE for 2 s, 30 concurrent submissions
    are all answered 201 (none 500, none lost), after the lock is released."""
    db = client.app[SETTINGS].storage.data_dir / "events.db"
    locker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LOCKER, str(db), str(HOLD_SECONDS),
        stdout=asyncio.subprocess.PIPE,
    )
    assert locker.stdout is not None
    assert (await asyncio.wait_for(locker.stdout.readline(), 30)).strip() == b"locked"
    started = time.monotonic()
    results = await asyncio.gather(*(_post(client, n) for n in range(30)))
    elapsed = time.monotonic() - started
    assert await asyncio.wait_for(locker.wait(), 30) == 0
    assert [status for status, _ in results] == [201] * 30, results
    assert elapsed >= HOLD_SECONDS * 0.5, "the lock was not contended"
    for _, job in results:
        async with client.get(f"/v1/jobs/{job['id']}", headers=AUTH) as resp:
            assert resp.status == 200


async def test_burst_of_200_submissions_each_2xx_is_stored_and_projections_rebuild_equal(
    client: Client, tmp_path: Path
) -> None:
    """200 concurrent POST /v1/jobs: every 2xx answer is a stored job (GET 200, in the
    log), no answer is 5xx, and the live read model equals one rebuilt from the log."""
    results = await asyncio.gather(*(_post(client, n) for n in range(200)))
    statuses = [status for status, _ in results]
    assert all(s < 500 for s in statuses), statuses
    accepted = {job["id"] for status, job in results if 200 <= status < 300}
    assert len(accepted) == statuses.count(201) == 200
    store = client.app[STORE]
    await client.app[PROJECTOR].wait_for(await store.head())
    logged = await folded_jobs(store)
    assert set(logged) == accepted
    async with client.get("/v1/jobs?limit=100", headers=AUTH) as resp:
        assert resp.status == 200
    for job_id in list(accepted)[:20]:
        async with client.get(f"/v1/jobs/{job_id}", headers=AUTH) as resp:
            assert resp.status == 200
    live = await read_model_rows(store)
    db = client.app[SETTINGS].storage.data_dir / "events.db"
    rebuilt = await rebuilt_rows_of_copy(db, tmp_path / "copy")
    assert live == rebuilt
    assert len([row for row in live if str(row[0]).startswith("job_")]) >= 200
