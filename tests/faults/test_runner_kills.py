"""SIGKILL of the runner subprocess at random moments of a LoRA training job.

Rule under test: a runner killed at any moment loses no work and no events.
For each seed (`BOOTHD_FAULT_SEEDS`, default 2) a `dreambooth` LoRA job is
killed 1–2 times, at moments drawn from `random.Random(seed)` (a delay after
`JobStarted`, or after some progress step). The job then ends either
`succeeded`, with a final LoRA whose sha256 equals that of an uninterrupted
reference run of the same config and seed, or — only when `max_attempts`
kills landed on it — `failed` with a reason naming every attempt. Its stream
has versions 1..n with no gap, increasing positions, exactly one terminal
event (the last one), a `JobRequeued` before every `JobStarted` after the
first, attempts numbered 1..k, and unique `CheckpointSaved` ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from events.projections import CheckpointView, JobState, fold, job_stream
from events.settings import parse_settings
from events.store import SQLiteEventStore
from events.types import CheckpointSaved, JobStarted, RecordedEvent
from gpu_runner.checkpoints import sha256_file
from service.supervisor import RunnerSupervisor
from tests.runner.helpers import submit, upload_dataset, wait_state

pytestmark = pytest.mark.asyncio(loop_scope="module")

SEEDS = int(os.environ.get("BOOTHD_FAULT_SEEDS", "2"))
MAX_ATTEMPTS = 3
STEPS = 20
TRAIN = {
    "instance_prompt": "photo of sks dog", "steps": STEPS, "resolution": 64,
    "dataset_id": "ds_kill", "lora_rank": 4, "lora_alpha": 4, "save_checkpoints_at": [],
}
TERMINAL = {"JobSucceeded", "JobFailed", "JobCanceled"}


@dataclass
class Rig:
    data: Path
    store: SQLiteEventStore
    supervisor: RunnerSupervisor
    reference_sha: str


def final_lora(state: JobState) -> CheckpointView | None:
    for c in state.checkpoints:
        if c.final and c.variant == "diffusers":
            return c
    return None


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    """One store and supervisor for the module; the reference job runs first, untouched."""
    data = tmp_path_factory.mktemp("kills") / "data"
    settings = parse_settings(
        {
            "storage": {"data_dir": str(data), "durability": "normal"},
            # One torch thread: on a busy 2-core machine two threads per runner thrash.
            "runner": {"torch_threads": 1},
            "jobs": {"max_attempts": MAX_ATTEMPTS, "state_every_steps": 2},
        }
    )
    store = await SQLiteEventStore.open(data / "events.db", "normal")
    await upload_dataset(store, data, "ds_kill")
    supervisor = RunnerSupervisor(settings, store, restart_delay=0.1)
    await supervisor.start()
    try:
        await submit(store, "job_reference", {"type": "dreambooth", "train": TRAIN})
        ref = await wait_state(store, "job_reference", {"succeeded", "failed", "canceled"}, 180)
        assert ref.state == "succeeded", ref.failure
        assert len(ref.attempts) == 1
        checkpoint = final_lora(ref)
        assert checkpoint is not None
        yield Rig(data, store, supervisor, checkpoint.sha256)
    finally:
        await supervisor.stop()
        await store.close()


async def _started_count(store: SQLiteEventStore, job_id: str) -> tuple[int, str | None, bool]:
    """(JobStarted events so far, the last one's runner id, whether the job is terminal)."""
    events = await store.read_stream(job_stream(job_id))
    starts = [e.event for e in events if isinstance(e.event, JobStarted)]
    done = any(e.type in TERMINAL for e in events)
    return len(starts), (starts[-1].runner_id if starts else None), done


async def _wait_attempt(store: SQLiteEventStore, job_id: str, n: int) -> tuple[str | None, bool]:
    """Wait until attempt `n` started (its runner id) or the job ended (None, True)."""
    async with asyncio.timeout(180):
        while True:
            count, runner, done = await _started_count(store, job_id)
            if done:
                return None, True
            if count >= n:
                return runner, False
            await store.wait_for_new(await store.head(), timeout=0.5)


async def _wait_step(store: SQLiteEventStore, job_id: str, step: int) -> None:
    """Wait until the current attempt reported `step` (or the job ended / was requeued)."""
    async with asyncio.timeout(180):
        while True:
            state = fold(await store.read_stream(job_stream(job_id)))
            assert state is not None
            if state.state != "running" or state.progress.step >= step:
                return
            await store.wait_for_new(await store.head(), timeout=0.5)


def check_stream(events: list[RecordedEvent]) -> None:
    """No lost, duplicated or out-of-order events in one job's stream."""
    assert [e.version for e in events] == list(range(1, len(events) + 1))
    positions = [e.position for e in events]
    assert positions == sorted(set(positions)), "positions not strictly increasing"
    assert events[0].type == "JobSubmitted"
    terminal = [i for i, e in enumerate(events) if e.type in TERMINAL]
    assert len(terminal) == 1, [e.type for e in events]
    assert terminal[0] == len(events) - 1, "events after the terminal event"
    starts = [i for i, e in enumerate(events) if e.type == "JobStarted"]
    assert starts, "never started"
    for previous, current in itertools.pairwise(starts):
        between = [e.type for e in events[previous + 1 : current]]
        assert between.count("JobRequeued") == 1, between
        assert between[-1] == "JobRequeued", between
    attempts = [e.event.attempt for e in events if isinstance(e.event, JobStarted)]
    assert attempts == list(range(1, len(attempts) + 1))
    requeues = [i for i, e in enumerate(events) if e.type == "JobRequeued"]
    assert all(any(s > r for s in starts) for r in requeues), "requeued but never restarted"
    ids = [e.event.checkpoint_id for e in events if isinstance(e.event, CheckpointSaved)]
    assert len(ids) == len(set(ids)), ids


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", range(SEEDS))
async def test_random_sigkills_resume_to_reference_weights(rig: Rig, seed: int) -> None:
    """Killed 1–2 times at seeded random moments, the job still ends with the reference
    LoRA (or fails naming every attempt once max_attempts kills landed) and a clean stream."""
    rng = random.Random(seed)
    job_id = f"job_kill{seed}"
    await submit(rig.store, job_id, {"type": "dreambooth", "train": TRAIN})
    kills = rng.choice([1, 2])
    landed = 0
    for attempt in range(1, kills + 1):
        runner_id, done = await _wait_attempt(rig.store, job_id, attempt)
        if done:
            break
        if rng.random() < 0.4:
            await asyncio.sleep(rng.uniform(0.0, 4.0))  # often before the first step
        else:
            await _wait_step(rig.store, job_id, rng.randint(1, STEPS - 1))
            await asyncio.sleep(rng.uniform(0.0, 0.5))
        slot = rig.supervisor.slots[0]
        # No await between the check and the kill: the slot's process is the one
        # that claimed this attempt.
        if slot.runner_id == runner_id and slot.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGKILL)
                landed += 1

    state = await wait_state(rig.store, job_id, {"succeeded", "failed", "canceled"}, 300)
    events = await rig.store.read_stream(job_stream(job_id))
    check_stream(events)
    if state.state == "succeeded":
        checkpoint = final_lora(state)
        assert checkpoint is not None
        assert checkpoint.sha256 == rig.reference_sha, f"seed {seed}: weights differ"
        assert sha256_file(rig.data / checkpoint.path) == rig.reference_sha
        assert not (rig.data / "jobs" / job_id / "state").exists()
        assert len(state.attempts) <= landed + 1
    else:
        # A kill that landed after the terminal event does not count: only a job
        # that took max_attempts kills may fail, and it must name every attempt.
        assert state.state == "failed" and state.failure is not None, state.state
        assert landed >= MAX_ATTEMPTS, f"seed {seed}: failed after {landed} kills"
        assert state.failure.code == "runner_died"
        for n in range(1, MAX_ATTEMPTS + 1):
            assert f"attempt {n}:" in state.failure.message, state.failure.message
