"""Generation benchmark: an `image_gen` job end to end beside a direct pipeline call.

Job latency is submit (JobSubmitted committed) → ImageGenerated committed, with
the real runner subprocess consuming the real log — the same path the HTTP
handler's append starts. The direct call is `pipe(...)` on the same tiny SD 1.x
model with the same parameters, in this process. "Cold" is the first job of a
fresh runner (pipeline not cached yet) and the first direct call (including the
load); "warm" are the following ones.

Last line: {"warm_overhead_ratio": job warm ÷ direct warm, "cold_over_warm": job cold ÷ job warm}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from events.projections import job_stream  # noqa: E402
from events.store import NO_STREAM, SQLiteEventStore  # noqa: E402
from events.types import JobSubmitted  # noqa: E402
from gpu_runner.jobspec import JobSpec  # noqa: E402

PARAMS = {"prompt": "photo of sks dog", "steps": 20, "seed": 3, "width": 64, "height": 64,
          "guidance_scale": 7.5}


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def job_latency(store: SQLiteEventStore, job_id: str) -> float:
    spec = JobSpec.model_validate({"type": "image_gen", "base_model": "tiny-sd15",
                                   "generate": [PARAMS]})
    start = time.perf_counter()
    await store.append(job_stream(job_id), NO_STREAM, [JobSubmitted(
        job_id=job_id, tenant="bench", job_type="image_gen", config=spec.model_dump(mode="json"))])
    after = 0
    while True:
        for recorded in await store.read_stream(job_stream(job_id), after):
            after = recorded.version
            if recorded.type == "ImageGenerated":
                return time.perf_counter() - start
            if recorded.type in ("JobFailed", "JobCanceled"):
                raise RuntimeError(f"bench job ended {recorded.event!r}")
        await store.wait_for_new(await store.head(), timeout=1.0)


def direct_latencies(model: Path, runs: int) -> tuple[float, list[float]]:
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(2)
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def call() -> None:
        pipe(PARAMS["prompt"], num_inference_steps=PARAMS["steps"], width=64, height=64,
             guidance_scale=PARAMS["guidance_scale"],
             generator=torch.Generator("cpu").manual_seed(PARAMS["seed"]))

    call()
    cold = time.perf_counter() - start
    warm = []
    for _ in range(runs):
        t = time.perf_counter()
        call()
        warm.append(time.perf_counter() - t)
    return cold, warm


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    runs = 4 if args.quick else 12
    with tempfile.TemporaryDirectory(prefix="boothd-bench-gen-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        store = await SQLiteEventStore.open(data / "events.db")
        env = dict(os.environ, PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error")
        with open(Path(tmp) / "runner.log", "wb") as log_file:
            runner = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gpu_runner", "--data-dir", str(data), "--device", "cpu",
                "--runner-id", "bench", env=env, stderr=log_file,
                stdout=asyncio.subprocess.DEVNULL)
        # wait until the runner is up (RunnerStarted), so import time is not counted
        while not await store.read_stream("runner-bench"):
            await store.wait_for_new(await store.head(), timeout=1.0)
        cold_job = await job_latency(store, "job_cold")  # creates tiny-sd15 and loads it
        emit(measure="job_cold_s", value=round(cold_job, 3))
        warm_jobs = [await job_latency(store, f"job_warm{i}") for i in range(runs)]
        emit(measure="job_warm_s", median=round(statistics.median(warm_jobs), 4))
        runner.terminate()
        await runner.wait()
        await store.close()
        cold_direct, warm_direct = await asyncio.to_thread(
            direct_latencies, data / "models" / "tiny-sd15", runs)
        emit(measure="direct_cold_s", value=round(cold_direct, 3))
        emit(measure="direct_warm_s", median=round(statistics.median(warm_direct), 4))
    emit(
        warm_overhead_ratio=round(statistics.median(warm_jobs) / statistics.median(warm_direct), 3),
        cold_over_warm=round(cold_job / statistics.median(warm_jobs), 2),
        runs=runs,
        quick=args.quick,
    )


if __name__ == "__main__":
    asyncio.run(main())
