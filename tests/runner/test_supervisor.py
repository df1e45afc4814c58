"""The service's runner supervisor: crash detection, restart, graceful stop.

Jobs are appended to the log directly (as the HTTP handlers do after validation).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from events.settings import Settings, parse_settings
from events.store import SQLiteEventStore
from service.supervisor import RunnerSupervisor
from tests.runner.helpers import submit, upload_dataset, wait_state

LONG = {
    "instance_prompt": "photo of sks dog", "steps": 5000, "resolution": 64,
    "dataset_id": "ds_test", "lora_rank": 4, "lora_alpha": 4,
}
GEN = {"prompt": "photo of sks dog", "steps": 2, "seed": 1, "width": 64, "height": 64}


async def _running_step(
    store: SQLiteEventStore, job_id: str, past: int = 0, poll: float = 0.2
) -> None:
    """Wait until the job's reported training step is above `past`."""
    async with asyncio.timeout(120):
        while (await wait_state(store, job_id, {"running", "failed"})).progress.step <= past:
            await asyncio.sleep(poll)


async def _supervised(
    tmp_path: Path, settings: dict[str, object] | None = None
) -> tuple[Path, SQLiteEventStore, RunnerSupervisor, Settings]:
    """A data folder with the test dataset and a started supervisor (one runner)."""
    data = tmp_path / "data"
    parsed = parse_settings({"storage": {"data_dir": str(data)}, **(settings or {})})
    store = await SQLiteEventStore.open(data / "events.db")
    await upload_dataset(store, data, "ds_test")
    supervisor = RunnerSupervisor(parsed, store, restart_delay=0.1)
    await supervisor.start()
    return data, store, supervisor, parsed


async def test_sigkill_mid_job_fails_it_and_next_job_runs(tmp_path: Path) -> None:
    """With max_attempts = 1, a runner killed mid-job: the job fails with runner_died,
    the exit code and a hint; a new runner starts and the next job succeeds."""
    _, store, supervisor, _ = await _supervised(tmp_path, {"jobs": {"max_attempts": 1}})
    try:
        await submit(store, "job_k", {"type": "dreambooth", "train": LONG})
        await _running_step(store, "job_k")
        pid = supervisor.slots[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        failed = await wait_state(store, "job_k", {"failed", "succeeded", "canceled"}, 60)
        assert failed.state == "failed" and failed.failure is not None
        assert failed.failure.code == "runner_died"
        assert failed.failure.exit_code == -signal.SIGKILL
        assert "out of memory" in failed.failure.message
        await submit(store, "job_next", {"type": "image_gen", "generate": [GEN]})
        done = await wait_state(store, "job_next", {"succeeded", "failed"}, 180)
        assert done.state == "succeeded", done.failure
        assert supervisor.slots[0].restarts == 1
        assert supervisor.slots[0].pid != pid
    finally:
        await supervisor.stop()
        await store.close()


async def test_graceful_stop_requeues_and_restart_resumes_queue(tmp_path: Path) -> None:
    """Stopping the supervisor lets the runner stop at a step boundary and requeue its job;
    queued jobs stay queued; a new supervisor runs them."""
    _, store, supervisor, settings = await _supervised(tmp_path)
    await submit(store, "job_s", {"type": "dreambooth", "train": LONG})
    await _running_step(store, "job_s")
    await submit(store, "job_q", {"type": "image_gen", "generate": [GEN]})
    await supervisor.stop()
    assert supervisor.slots[0].last_exit_code == 0
    requeued = await wait_state(store, "job_s", {"queued"}, 5)
    assert requeued.state == "queued" and len(requeued.attempts) == 1
    queued = await wait_state(store, "job_q", {"queued"}, 5)
    assert queued.state == "queued"

    second = RunnerSupervisor(settings, store, restart_delay=0.1)
    await second.start()
    try:
        # job_s (older, same priority) is claimed first as attempt 2
        again = await wait_state(store, "job_s", {"running"}, 120)
        assert len(again.attempts) == 2
    finally:
        await second.stop()
        await store.close()


async def test_killed_runner_requeues_until_max_attempts(tmp_path: Path) -> None:
    """With max_attempts = 2: the first SIGKILL puts the job back in the queue and a new
    runner starts it as attempt 2; the second fails it, naming both causes."""
    _, store, supervisor, _ = await _supervised(tmp_path, {"jobs": {"max_attempts": 2}})
    try:
        await submit(store, "job_r", {"type": "dreambooth", "train": LONG})
        await _running_step(store, "job_r")
        first_pid = supervisor.slots[0].pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        async with asyncio.timeout(120):
            while True:
                state = await wait_state(store, "job_r", {"running", "failed", "queued"})
                if len(state.attempts) == 2 and state.state == "running":
                    break
                await asyncio.sleep(0.2)
        assert state.attempts[0].interrupted is not None
        assert "SIGKILL" in state.attempts[0].interrupted
        await _running_step(store, "job_r")
        second_pid = supervisor.slots[0].pid
        assert second_pid is not None and second_pid != first_pid
        os.kill(second_pid, signal.SIGKILL)
        failed = await wait_state(store, "job_r", {"failed", "succeeded", "canceled"}, 60)
        assert failed.state == "failed" and failed.failure is not None
        assert failed.failure.code == "runner_died"
        assert "attempt 1" in failed.failure.message and "attempt 2" in failed.failure.message
    finally:
        await supervisor.stop()
        await store.close()


async def test_killed_training_resumes_to_bit_identical_weights(tmp_path: Path) -> None:
    """SIGKILL mid-training: the job is requeued, the next attempt resumes from the last
    saved state (not step 0) and its final LoRA file is byte-identical to that of an
    uninterrupted job with the same config and seed."""
    data, store, supervisor, _ = await _supervised(
        tmp_path, {"jobs": {"max_attempts": 3, "state_every_steps": 2}}
    )
    train = dict(LONG, steps=40, save_checkpoints_at=[])
    try:
        await submit(store, "job_resumed", {"type": "dreambooth", "train": train})
        await _running_step(store, "job_resumed", past=5, poll=0.05)
        pid = supervisor.slots[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        resumed = await wait_state(store, "job_resumed", {"succeeded", "failed"}, 180)
        assert resumed.state == "succeeded", resumed.failure
        assert len(resumed.attempts) == 2
        events = await store.read_stream("job-job_resumed")
        second_start = max(i for i, e in enumerate(events) if e.type == "JobStarted")
        first_progress = next(
            e.event for e in events[second_start:] if e.type == "TrainingProgressed"
        )
        assert first_progress.step > 2  # type: ignore[union-attr]  # resumed, not restarted

        await submit(store, "job_straight", {"type": "dreambooth", "train": train})
        straight = await wait_state(store, "job_straight", {"succeeded", "failed"}, 180)
        assert straight.state == "succeeded", straight.failure

        def final_lora(state: object) -> str:
            return next(
                c.sha256 for c in state.checkpoints  # type: ignore[attr-defined]
                if c.final and c.variant == "diffusers"
            )

        assert final_lora(resumed) == final_lora(straight)
        assert not (data / "jobs" / "job_resumed" / "state").exists()
    finally:
        await supervisor.stop()
        await store.close()
