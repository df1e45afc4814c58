"""The runner subprocess consumes the real log: claims, trains, generates, cancels.

The service is not involved here: jobs are appended to the log directly, as the
HTTP handlers do after validation (the API tests cover that part).
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from events.projections import job_stream
from events.store import ANY_VERSION, SQLiteEventStore
from events.types import JobCancelRequested
from tests.runner.helpers import start_runner, submit, upload_dataset, wait_state

TRAIN = {
    "instance_prompt": "photo of sks dog",
    "steps": 4,
    "resolution": 64,
    "dataset_id": "ds_test",
    "lora_rank": 4,
    "lora_alpha": 4,
    "save_checkpoints_at": [2],
}
GEN = {"prompt": "photo of sks dog", "steps": 2, "seed": 7, "width": 64, "height": 64}


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[SQLiteEventStore, Path]]:
    data = tmp_path / "data"
    data.mkdir()
    store = await SQLiteEventStore.open(data / "events.db")
    await upload_dataset(store, data, "ds_test")
    proc = await start_runner(data)
    yield store, data
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    await store.close()


async def test_dreambooth_image_gen_trains_then_generates(
    env: tuple[SQLiteEventStore, Path],
) -> None:
    """A train-then-generate job: dataset prepared, progress, intermediate and final LoRA
    checkpoints (sha256 matching the file), images from the trained LoRA, then success."""
    store, data = env
    body = {"type": "dreambooth_image_gen", "train": TRAIN, "generate": [GEN]}
    await submit(store, "job_a", body)
    state = await wait_state(store, "job_a", {"succeeded", "failed", "canceled"}, timeout=240)
    assert state.state == "succeeded", state.failure
    assert state.dataset_images == 3
    assert state.progress.step == 4 and state.progress.total_steps == 4
    steps = sorted({c.step for c in state.checkpoints})
    assert steps == [2, 4]
    for ckp in state.checkpoints:
        path = data / ckp.path
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == ckp.sha256
    assert len(state.images) == 1 and state.images[0].seed == 7
    assert (data / state.images[0].path).read_bytes()[:4] == b"\x89PNG"


async def test_image_gen_same_seed_same_bytes_and_cancel(
    env: tuple[SQLiteEventStore, Path],
) -> None:
    """Two image_gen jobs with the same parameters give identical bytes; a job canceled
    while queued behind nothing still ends canceled, and a long job cancels mid-run."""
    store, data = env
    await submit(store, "job_g1", {"type": "image_gen", "generate": [GEN]})
    await submit(store, "job_g2", {"type": "image_gen", "generate": [GEN]})
    one = await wait_state(store, "job_g1", {"succeeded", "failed"}, timeout=180)
    two = await wait_state(store, "job_g2", {"succeeded", "failed"}, timeout=180)
    assert one.state == two.state == "succeeded", (one.failure, two.failure)
    assert (data / one.images[0].path).read_bytes() == (data / two.images[0].path).read_bytes()

    long_train = dict(TRAIN, steps=5000, save_checkpoints_at=[])
    await submit(store, "job_long", {"type": "dreambooth", "train": long_train})
    running = await wait_state(store, "job_long", {"running"}, timeout=120)
    assert running.state == "running"
    # wait for the first progress so the cancel lands mid-training
    async with asyncio.timeout(120):
        while (await wait_state(store, "job_long", {"running", "failed"})).progress.step == 0:
            await asyncio.sleep(0.2)
    await store.append(job_stream("job_long"), ANY_VERSION, [JobCancelRequested()])
    canceled = await wait_state(store, "job_long", {"canceled", "failed", "succeeded"}, 120)
    assert canceled.state == "canceled"
    assert not canceled.checkpoints
    leftovers = list((data / "jobs" / "job_long").rglob("*.tmp*"))
    assert leftovers == []
