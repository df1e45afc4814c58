"""Retention: the files of jobs finished more than `[retention] hours` ago are deleted.

The job itself stays (the log is never pruned) and shows `data_removed: true`;
each deletion is recorded as `JobArtifactsDeleted(reason="retention")`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import structlog
from aiohttp import web

from events.projections import job_stream
from events.store import ANY_VERSION
from events.types import JobArtifactsDeleted
from service import readmodel
from service.keys import PROJECTOR, SETTINGS, STORE
from service.paths import remove_job_files

log = structlog.get_logger(__name__)


async def sweep(app: web.Application, now: datetime | None = None) -> list[str]:
    """Delete the files of every expired job once; return their ids."""
    settings = app[SETTINGS]
    store = app[STORE]
    await app[PROJECTOR].sync()
    cutoff = (now or datetime.now(UTC)) - timedelta(hours=settings.retention.hours)
    expired = await store.read_transaction(
        lambda c: readmodel.expired_jobs(c, cutoff.isoformat())
    )
    removed = []
    for state in expired:
        paths = [c.path for c in state.checkpoints] + [i.path for i in state.images]
        await asyncio.to_thread(remove_job_files, settings.storage.data_dir, state.id, paths)
        deleted = JobArtifactsDeleted(reason="retention")
        await store.append(job_stream(state.id), ANY_VERSION, [deleted])
        log.info("retention.deleted", job_id=state.id, finished=state.updated_at.isoformat())
        removed.append(state.id)
    return removed


async def _loop(app: web.Application) -> None:
    interval = app[SETTINGS].retention.sweep_interval_seconds
    while True:
        try:
            await sweep(app)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("retention.sweep_failed")
        await asyncio.sleep(interval)


async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
    """Runs the sweep now and then every `[retention] sweep_interval_seconds`."""
    task = asyncio.create_task(_loop(app), name="retention")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
