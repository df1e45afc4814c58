"""Shared helpers for tests that run the real runner subprocess."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from PIL import Image

from events.projections import JobState, fold, job_stream
from events.store import NO_STREAM, SQLiteEventStore
from events.types import DatasetUploaded, JobSubmitted
from gpu_runner.jobspec import JobSpec

ROOT = Path(__file__).resolve().parents[2]


def make_images(folder: Path, n: int = 3, size: int = 64) -> list[Path]:
    """Small, distinct RGB images (a gradient and a coloured square each)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (size, size), (40 * i % 255, 120, 200 - 30 * i))
        for x in range(size // 4, size // 2):
            for y in range(size // 4, size // 2):
                img.putpixel((x, y), (255, 255 - 60 * i, 0))
        path = folder / f"img{i}.png"
        img.save(path)
        paths.append(path)
    return paths


async def upload_dataset(
    store: SQLiteEventStore, data_dir: Path, dataset_id: str, tenant: str = "default", n: int = 3
) -> None:
    """Store images the way POST /v1/datasets does (stand-in for the HTTP upload)."""
    folder = data_dir / "datasets" / dataset_id
    make_images(folder, n)
    await store.append(
        f"dataset-{dataset_id}",
        NO_STREAM,
        [
            DatasetUploaded(
                dataset_id=dataset_id, tenant=tenant, images=n, bytes=0,
                path=str(folder.relative_to(data_dir)),
            )
        ],
    )


async def submit(
    store: SQLiteEventStore, job_id: str, body: dict[str, object], tenant: str = "default"
) -> None:
    """Append JobSubmitted as POST /v1/jobs does after validation."""
    spec = JobSpec.model_validate(body)
    if spec.base_model is None:
        spec = spec.model_copy(update={"base_model": "tiny-sd15"})
    await store.append(
        job_stream(job_id),
        NO_STREAM,
        [
            JobSubmitted(
                job_id=job_id, tenant=tenant, job_type=spec.type,
                config=spec.model_dump(mode="json"), priority=spec.priority,
            )
        ],
    )


async def wait_state(
    store: SQLiteEventStore, job_id: str, states: set[str], timeout: float = 120
) -> JobState:
    """Fold the job's stream until it reaches one of `states`."""
    async with asyncio.timeout(timeout):
        while True:
            state = fold(await store.read_stream(job_stream(job_id)))
            if state is not None and state.state in states:
                return state
            await store.wait_for_new(await store.head(), timeout=1.0)


async def start_runner(data_dir: Path, runner_id: str = "test") -> asyncio.subprocess.Process:
    """Start `python -m gpu_runner` on `data_dir`; its log goes to `<data_dir>/../runner.log`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(data_dir.parent / "runner.log", "ab") as log_file:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gpu_runner", "--data-dir", str(data_dir), "--device", "cpu",
            "--runner-id", runner_id, env=env, stdout=asyncio.subprocess.DEVNULL,
            stderr=log_file,
        )
