"""Retention: finished jobs older than `[retention] hours` lose their files, not their record."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from service.retention import sweep
from tests.service.conftest import ClientFactory
from tests.service.helpers import data_dir, finish_job, gen_job, store, submit


async def test_old_finished_jobs_lose_files_and_show_data_removed(
    make_client: ClientFactory,
) -> None:
    """A sweep after `hours` deletes a finished job's folder, records JobArtifactsDeleted
    (reason retention) once, and leaves queued jobs and recent jobs alone; downloads are 410."""
    client = await make_client(retention={"hours": 1.0, "sweep_interval_seconds": 3600})
    old = await submit(client, gen_job())
    ids = await finish_job(client, old["id"], image=b"\x89PNG fake", tag="old")
    queued = await submit(client, gen_job())
    folder = data_dir(client) / "jobs" / old["id"]
    assert folder.exists()

    assert await sweep(client.app) == []  # finished just now: kept
    later = datetime.now(UTC) + timedelta(hours=2)
    assert await sweep(client.app, now=later) == [old["id"]]
    assert not folder.exists()
    assert await sweep(client.app, now=later) == []  # recorded once

    resp = await client.get(f"/v1/jobs/{old['id']}")
    job = await resp.json()
    assert job["data_removed"] is True and job["state"] == "succeeded"
    resp = await client.get(f"/v1/checkpoints/{ids['checkpoint']}/download")
    assert resp.status == 410
    assert (await resp.json())["error"]["code"] == "data_removed"
    resp = await client.get(f"/v1/jobs/{queued['id']}")
    assert (await resp.json())["state"] == "queued"
    events = await store(client).read_stream(f"job-{old['id']}")
    deleted = [e.event for e in events if e.type == "JobArtifactsDeleted"]
    assert [d.reason for d in deleted] == ["retention"]  # type: ignore[union-attr]
