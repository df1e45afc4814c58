"""The job files' file system fills up in the middle of a LoRA training.

`<data>/jobs` is a small tmpfs (the event log, `events.db`, stays on the
ordinary disk), mostly taken by a filler file, leaving room for the prepared
dataset, the checkpoint at step 2 and the resumable state saved with it, but
not for the final checkpoint. Rule under test: running out of space fails the
job cleanly — `failure.code == "disk_full"` — and harms nothing else: the
checkpoint published before the disk filled is intact (its files' sha256
match its `CheckpointSaved` events), no half-written checkpoint folder is
left, the whole log still reads and folds, and the same supervisor keeps
serving: once space is freed (the filler deleted), an `image_gen` job whose
images land on that file system succeeds.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from events.settings import parse_settings
from events.store import SQLiteEventStore
from gpu_runner.checkpoints import sha256_file
from service.supervisor import RunnerSupervisor
from tests.faults.common import folded_jobs
from tests.runner.helpers import submit, upload_dataset, wait_state

KIB = 1024
FS_SIZE = 16 * 1024 * KIB
#: Free space left beside the filler: the prepared dataset (~16 KiB), one
#: rank-32 LoRA checkpoint (diffusers + kohya, ~920 KiB) and the resumable
#: state saved with it (weights + Adam moments, ~1.4 MiB), plus slack — less
#: than a second checkpoint needs on top of that.
FREE = 3000 * KIB
TRAIN = {
    "instance_prompt": "photo of sks dog", "steps": 6, "resolution": 64,
    "dataset_id": "ds_full", "lora_rank": 32, "lora_alpha": 32, "save_checkpoints_at": [2],
}
GEN = {"prompt": "photo of sks dog", "steps": 2, "seed": 1, "width": 64, "height": 64}


@dataclass
class Rig:
    data: Path
    jobs: Path
    store: SQLiteEventStore
    supervisor: RunnerSupervisor


def _mount_tmpfs(path: Path, size: int) -> str | None:
    """Mount a `size`-byte tmpfs on `path`; the error text when that is impossible."""
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size // KIB}k,mode=0755", "tmpfs", str(path)],
            capture_output=True, text=True,
        )
    except OSError as exc:  # no mount(8) at all
        return str(exc)
    return None if done.returncode == 0 else done.stderr.strip() or f"exit {done.returncode}"


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    data = tmp_path / "data"
    jobs = data / "jobs"
    jobs.mkdir(parents=True)
    problem = _mount_tmpfs(jobs, FS_SIZE)
    if problem is not None:
        # Fail, not skip: a skipped fault test would pass CI while proving nothing.
        # CI runs as root here; elsewhere run it where tmpfs can be mounted.
        pytest.fail(f"cannot mount a tmpfs (needs root / CAP_SYS_ADMIN): {problem}")
    store: SQLiteEventStore | None = None
    supervisor: RunnerSupervisor | None = None
    try:
        settings = parse_settings(
            {
                "storage": {"data_dir": str(data), "durability": "normal"},
                "runner": {"torch_threads": 1},
            }
        )
        store = await SQLiteEventStore.open(data / "events.db", "normal")
        await upload_dataset(store, data, "ds_full")
        supervisor = RunnerSupervisor(settings, store, restart_delay=0.1)
        await supervisor.start()
        yield Rig(data, jobs, store, supervisor)
    finally:
        if supervisor is not None:
            await supervisor.stop()
        if store is not None:
            await store.close()
        _umount(jobs)


def _free(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _fill(jobs: Path, leave: int) -> Path:
    """Write real (non-sparse) bytes until only about `leave` bytes stay free."""
    filler = jobs / "filler.bin"
    remaining = _free(jobs) - leave
    chunk = b"\xa5" * (64 * KIB)
    with open(filler, "wb") as f:
        while remaining > 0:
            f.write(chunk[: min(len(chunk), remaining)])
            remaining -= len(chunk)
    return filler


async def test_disk_full_mid_training_fails_job_and_service_recovers(rig: Rig) -> None:
    """ENOSPC while writing the final checkpoint: the job fails with `disk_full`, the
    step-2 checkpoint stays intact and published, the log still folds, and after space is
    freed the next job (writing to the same file system) succeeds."""
    filler = _fill(rig.jobs, FREE)
    assert abs(_free(rig.jobs) - FREE) < 128 * KIB

    await submit(rig.store, "job_full", {"type": "dreambooth", "train": TRAIN})
    state = await wait_state(rig.store, "job_full", {"succeeded", "failed", "canceled"}, 180)
    free_after = _free(rig.jobs)
    assert state.state == "failed", f"{state.state}; {free_after} bytes free"
    assert state.failure is not None
    assert state.failure.code == "disk_full", state.failure
    assert len(state.attempts) == 1  # a full disk is the job's failure, not a runner death

    # Only the checkpoint of step 2 was published; its files are what the events say.
    assert state.checkpoints, "the step-2 checkpoint should have fitted"
    assert {c.step for c in state.checkpoints} == {2}
    assert not any(c.final for c in state.checkpoints)
    for checkpoint in state.checkpoints:
        path = rig.data / checkpoint.path
        assert path.is_file(), checkpoint.path
        assert path.stat().st_size == checkpoint.size_bytes
        assert sha256_file(path) == checkpoint.sha256, checkpoint.path
    out = rig.jobs / "job_full" / "checkpoints"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"], "half-written folder left"

    # The log is whole: every stream folds, the failed job among them.
    jobs = await folded_jobs(rig.store)
    assert jobs["job_full"].state == "failed"

    # The runner survived (no restart) and serves the next job once space is back.
    filler.unlink()
    await submit(rig.store, "job_after", {"type": "image_gen", "generate": [GEN]})
    after = await wait_state(rig.store, "job_after", {"succeeded", "failed", "canceled"}, 180)
    assert after.state == "succeeded", after.failure
    assert rig.supervisor.slots[0].restarts == 0
    image = after.images[0]
    assert (rig.data / image.path).resolve().is_relative_to(rig.jobs)
    assert sha256_file(rig.data / image.path) == image.sha256
