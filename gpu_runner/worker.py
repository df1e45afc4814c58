"""The runner's job loop: claim queued jobs from the log, run them, append the outcome.

Torch work runs on one worker thread; the event loop stays free to append
events and to notice `JobCancelRequested`. Hooks called from the worker
thread append through the loop and wait for the commit, so the events of a
job are in the order things happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

from events.errors import ConcurrencyError
from events.projections import JobState, fold, job_stream
from events.settings import Settings
from events.store import ANY_VERSION, SQLiteEventStore
from events.types import (
    CheckpointSaved,
    DatasetPrepared,
    DatasetUploaded,
    Event,
    ImageGenerated,
    JobCanceled,
    JobFailed,
    JobRequeued,
    JobStarted,
    JobSucceeded,
    Rejection,
    RunnerStarted,
    TrainingProgressed,
)
from gpu_runner.errors import Canceled, RunnerError
from gpu_runner.jobspec import JobSpec
from gpu_runner.queue import QueueView

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: `JobRequeued.reason` when the runner was asked to stop (not the job's fault).
GRACEFUL_STOP_REASON = "runner stopped before the job finished"

#: Progress events at most this often (the last step is always reported).
PROGRESS_INTERVAL_SECONDS = 0.5


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` is, or wraps, ENOSPC. safetensors' Rust writer raises
    `SafetensorError("... No space left on device (os error 28)")` and torch.save a
    RuntimeError: neither is an OSError, so the text is checked as well."""
    current: BaseException | None = exc
    for _ in range(10):  # the cause/context chain, bounded
        if current is None:
            return False
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        text = str(current)
        if "No space left on device" in text or "os error 28" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


def runner_stream(runner_id: str) -> str:
    return f"runner-{runner_id}"


def relative(path: Path, data_dir: Path) -> str:
    """A path inside the data folder, as stored in events."""
    return str(path.resolve().relative_to(data_dir.resolve()))


@dataclass
class JobContext:
    """What a running job needs; lives for one job."""

    job_id: str
    tenant: str
    spec: JobSpec
    version: int
    job_dir: Path
    cancel: threading.Event = field(default_factory=threading.Event)
    checkpoints: int = 0
    images: int = 0
    final_checkpoint: CheckpointSaved | None = None
    #: A previous attempt already finished training (its final checkpoint is recorded).
    trained: bool = False


class Runner:
    """One runner process: one device, one job at a time."""

    def __init__(self, settings: Settings, device: str, runner_id: str) -> None:
        self.settings = settings
        self.data_dir = settings.storage.data_dir.resolve()
        self.device = device
        self.runner_id = runner_id
        self.store: SQLiteEventStore | None = None
        self.queue = QueueView()
        self.stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._current: JobContext | None = None
        self._cache: Any = None  # PipelineCache, created on the first job (imports torch)

    # ------------------------------------------------------------ plumbing

    def _append_from_thread(self, job: JobContext, events: list[Event]) -> None:
        """Append from the worker thread and wait for the commit."""
        assert self._loop is not None
        self._run_in_loop(self._append(job, events))

    def _run_in_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _append(self, job: JobContext, events: list[Event]) -> None:
        assert self.store is not None
        # The runner owns the stream while the job runs, but the service may
        # append JobCancelRequested meanwhile: append at the end.
        positions = await self.store.append(job_stream(job.job_id), ANY_VERSION, events)
        job.version += len(positions)

    # ------------------------------------------------------------ main loop

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._request_stop)
        self.store = await SQLiteEventStore.open(
            self.data_dir / "events.db", self.settings.storage.durability
        )
        try:
            await self.store.append(
                runner_stream(self.runner_id),
                ANY_VERSION,
                [RunnerStarted(runner_id=self.runner_id, device=self.device, pid=os.getpid())],
            )
            log.info("runner.started", runner_id=self.runner_id, device=self.device)
            while not self.stopping.is_set():
                await self._refresh_queue()
                job = await self._claim_next()
                if job is None:
                    await self._wait_for_work()
                    continue
                await self._run_job(job)
        finally:
            await self.store.close()
        log.info("runner.stopped", runner_id=self.runner_id)
        return 0

    def _request_stop(self) -> None:
        log.info("runner.stop_requested")
        self.stopping.set()
        if self._current is not None:
            self._current.cancel.set()

    async def _wait_for_work(self) -> None:
        assert self.store is not None
        wait = asyncio.create_task(self.store.wait_for_new(self.queue.position, timeout=5.0))
        stop = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({wait, stop}, return_when=asyncio.FIRST_COMPLETED)
        for task in (wait, stop):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _refresh_queue(self) -> None:
        assert self.store is not None
        await self.queue.refresh(self.store)

    async def _claim_next(self) -> JobContext | None:
        """Claim the best queued job by appending JobStarted at its stream version."""
        assert self.store is not None
        for job_id in self.queue.next_candidates():
            events = await self.store.read_stream(job_stream(job_id))
            state = fold(events)
            if state is None or state.state != "queued":
                continue
            version = events[-1].version
            attempt = len(state.attempts) + 1
            try:
                await self.store.append(
                    job_stream(job_id),
                    version,
                    [JobStarted(runner_id=self.runner_id, device=self.device, attempt=attempt)],
                )
            except ConcurrencyError:
                log.info("runner.claim_lost", job_id=job_id)
                continue
            try:
                spec = JobSpec.model_validate(state.config)
            except Exception as exc:  # a config that no longer validates (old version)
                await self.store.append(
                    job_stream(job_id),
                    ANY_VERSION,
                    [JobFailed(code="invalid_job", message=f"job config is invalid: {exc}")],
                )
                continue
            job_dir = self.data_dir / "jobs" / job_id
            job_dir.mkdir(parents=True, exist_ok=True)
            # A new attempt continues the numbering of ids and skips work that an
            # earlier attempt finished and recorded.
            return JobContext(
                job_id,
                state.tenant,
                spec,
                version + 1,
                job_dir,
                checkpoints=len(state.checkpoints),
                images=len(state.images),
                trained=any(c.final for c in state.checkpoints),
            )
        return None

    async def _run_job(self, job: JobContext) -> None:
        assert self.store is not None
        self._current = job
        log.info("job.started", job_id=job.job_id, type=job.spec.type)
        watcher = asyncio.create_task(self._watch_cancel(job))
        outcome: Event
        try:
            await asyncio.to_thread(self._execute, job)
            outcome = JobSucceeded()
        except Canceled:
            if self.stopping.is_set() and not await self._cancel_was_requested(job):
                outcome = JobRequeued(reason=GRACEFUL_STOP_REASON)
            else:
                outcome = JobCanceled()
        except RunnerError as exc:
            outcome = JobFailed(code=exc.code, message=exc.message)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                outcome = JobFailed(code="disk_full", message=f"no space left on device: {exc}")
            else:
                log.exception("job.os_error", job_id=job.job_id)
                outcome = JobFailed(code="io_error", message=str(exc))
        except Exception as exc:
            if is_disk_full(exc):  # ENOSPC wrapped by a library (safetensors, torch.save)
                log.warning("job.disk_full", job_id=job.job_id, error=str(exc))
                outcome = JobFailed(code="disk_full", message=f"no space left on device: {exc}")
            else:
                log.exception("job.crashed", job_id=job.job_id)
                outcome = JobFailed(code="internal_error", message=f"{type(exc).__name__}: {exc}")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self._current = None
        await self.store.append(job_stream(job.job_id), ANY_VERSION, [outcome])
        log.info("job.finished", job_id=job.job_id, outcome=outcome.type)

    async def _cancel_was_requested(self, job: JobContext) -> bool:
        assert self.store is not None
        state = fold(await self.store.read_stream(job_stream(job.job_id)))
        return bool(state and state.cancel_requested)

    async def _watch_cancel(self, job: JobContext) -> None:
        """Set the job's cancel flag as soon as JobCancelRequested is committed."""
        assert self.store is not None
        stream = job_stream(job.job_id)
        after = 0
        while not job.cancel.is_set():
            # The head before the read: a commit landing after the read wakes the
            # wait below at once instead of waiting for the next commit.
            head = await self.store.head()
            for recorded in await self.store.read_stream(stream, after):
                after = recorded.version
                if recorded.type == "JobCancelRequested":
                    job.cancel.set()
                    return
            await self.store.wait_for_new(head, timeout=5.0)

    # ------------------------------------------------------------ the work (worker thread)

    def _should_cancel(self, job: JobContext) -> Callable[[], bool]:
        return job.cancel.is_set

    def _pipelines(self) -> Any:
        if self._cache is None:
            from gpu_runner.models import PipelineCache

            self._cache = PipelineCache(self.settings.runner.pipeline_cache_mb)
        return self._cache

    def _execute(self, job: JobContext) -> None:
        spec = job.spec
        if spec.train is not None and not job.trained:
            self._train(job)
        # Images are recorded a whole generate entry at a time: entries covered by
        # the images an earlier attempt recorded are done.
        already = job.images
        for index, params in enumerate(spec.generate):
            if already >= params.num_images:
                already -= params.num_images
                continue
            self._generate(job, index, params)

    def _train(self, job: JobContext) -> None:
        from gpu_runner.models import resolve_model
        from gpu_runner.training import (
            TrainHooks,
            TrainImage,
            check_device_support,
            load_state_step,
            train,
        )

        spec = job.spec
        config = spec.train
        assert config is not None
        check_device_support(config, self.device)
        ref = resolve_model(spec.base_model, self.settings, self.data_dir)
        if ref.single_file and ref.config is None:
            raise RunnerError("model_config_missing", f"model {ref.name!r} needs a config folder")
        images = self._prepare_dataset(job)
        class_images: list[TrainImage] = []
        if config.with_prior_preservation:
            class_images = self._class_images(job, ref)

        last_report = [0.0]

        def on_progress(step: int, total: int, loss: float, lr: float) -> None:
            now = time.monotonic()
            if step < total and now - last_report[0] < PROGRESS_INTERVAL_SECONDS:
                return
            last_report[0] = now
            self._append_from_thread(
                job,
                [
                    TrainingProgressed(
                        step=step, total_steps=total, loss=float(loss), learning_rate=float(lr)
                    )
                ],
            )

        def on_checkpoint(file: Any) -> None:
            job.checkpoints += 1
            event = CheckpointSaved(
                checkpoint_id=f"ckp_{job.job_id.removeprefix('job_')}_{job.checkpoints}",
                kind=file.kind,
                step=file.step,
                format=file.format,
                variant=file.variant,
                path=relative(file.path, self.data_dir),
                size_bytes=file.size_bytes,
                sha256=file.sha256,
                final=file.final,
            )
            if file.final and file.variant in ("diffusers", "single_file"):
                job.final_checkpoint = event
            self._append_from_thread(job, [event])

        hooks = TrainHooks(
            on_progress=on_progress,
            should_cancel=self._should_cancel(job),
            on_checkpoint=on_checkpoint,
        )
        out_dir = job.job_dir / "checkpoints"
        state_dir = job.job_dir / "state"
        resumed_from = load_state_step(state_dir)
        if resumed_from is not None:
            log.info("job.resuming", job_id=job.job_id, step=resumed_from)
        train(
            ref.path,
            ref.family,
            config,
            [TrainImage(path=i.path, caption=i.caption) for i in images],
            class_images,
            out_dir,
            self.device,
            hooks,
            single_file_config=ref.config if ref.single_file else None,
            state_dir=state_dir,
            state_every_steps=self.settings.jobs.state_every_steps,
        )
        # The final checkpoint is the result; the resumable state is no longer needed.
        shutil.rmtree(state_dir, ignore_errors=True)

    def _prepare_dataset(self, job: JobContext) -> list[Any]:
        from gpu_runner.dataset import DatasetError, prepare_dataset

        config = job.spec.train
        assert config is not None
        limits = self.settings.limits
        source_dir = job.job_dir / "source"
        files = self._dataset_files(job, source_dir)
        out_dir = job.job_dir / "dataset"
        if out_dir.exists():  # a new attempt starts from a clean folder
            shutil.rmtree(out_dir)
        try:
            prepared = prepare_dataset(
                files,
                out_dir,
                config.resolution,
                config.crop,
                config.seed,
                config.instance_prompt,
                config.concept_name,
                limits.max_images_per_dataset,
                limits.max_image_pixels,
            )
        except DatasetError as exc:
            reasons = "; ".join(f"{r.name}: {r.reason}" for r in exc.rejected[:10])
            detail = f" ({reasons})" if reasons else ""
            raise RunnerError(exc.code, exc.message + detail) from None
        self._append_from_thread(
            job,
            [
                DatasetPrepared(
                    images=len(prepared.images),
                    rejected=[Rejection(name=r.name, reason=r.reason) for r in prepared.rejected],
                    path=relative(out_dir, self.data_dir),
                )
            ],
        )
        return list(prepared.images)

    def _dataset_files(self, job: JobContext, source_dir: Path) -> list[Path]:
        config = job.spec.train
        assert config is not None
        if config.dataset_id is not None:
            return self._run_in_loop(self._uploaded_files(job, config.dataset_id))
        from gpu_runner.dataset import safe_extract_zip
        from gpu_runner.fetch import fetch_to_file

        network = self.settings.network
        if source_dir.exists():
            shutil.rmtree(source_dir)
        source_dir.mkdir(parents=True)
        if config.data_url is not None:
            download = self._run_in_loop(
                fetch_to_file(
                    config.data_url,
                    source_dir / "data.zip",
                    network.max_download_bytes,
                    network.download_timeout_seconds,
                    network.allow_private_urls,
                )
            )
            extracted = safe_extract_zip(download.path, source_dir / "files", self.settings.limits)
            return extracted.files
        files = []
        for i, url in enumerate(config.image_urls or []):
            result = self._run_in_loop(
                fetch_to_file(
                    url,
                    source_dir / f"image_{i:04d}",
                    network.max_download_bytes,
                    network.download_timeout_seconds,
                    network.allow_private_urls,
                )
            )
            files.append(result.path)
        return files

    async def _uploaded_files(self, job: JobContext, dataset_id: str) -> list[Path]:
        assert self.store is not None
        for recorded in await self.store.read_stream(f"dataset-{dataset_id}"):
            event = recorded.event
            if isinstance(event, DatasetUploaded) and event.tenant == job.tenant:
                folder = (self.data_dir / event.path).resolve()
                if not folder.is_relative_to(self.data_dir) or not folder.is_dir():
                    break
                return sorted(p for p in folder.rglob("*") if p.is_file())
        raise RunnerError("unknown_dataset", f"dataset {dataset_id!r} not found")

    def _class_images(self, job: JobContext, ref: Any) -> list[Any]:
        import hashlib

        import torch

        from gpu_runner.training import TrainImage, generate_class_images

        config = job.spec.train
        assert config is not None and config.class_prompt is not None
        key = hashlib.sha256(
            f"{ref.name}\0{ref.path}\0{config.class_prompt}\0{config.resolution}".encode()
        ).hexdigest()[:24]
        cache_dir = self.data_dir / "class_images" / key
        existing = sorted(cache_dir.glob("*.png")) if cache_dir.is_dir() else []
        if len(existing) >= config.num_class_images:
            return [
                TrainImage(path=p, caption=config.class_prompt)
                for p in existing[: config.num_class_images]
            ]
        pipe = self._pipelines().get(ref, self.device, torch.float32)
        return list(
            generate_class_images(
                pipe,
                config.class_prompt,
                config.num_class_images,
                cache_dir,
                config.seed,
                resolution=config.resolution,
                should_cancel=self._should_cancel(job),
            )
        )

    def _generate(self, job: JobContext, index: int, params: Any) -> None:
        import torch

        from gpu_runner.generate import generate_images
        from gpu_runner.models import ref_from_path, resolve_model

        lora_path: Path | None = None
        model = params.model
        base_name = job.spec.base_model
        if model is None and job.spec.type == "dreambooth_image_gen":
            model = f"job:{job.job_id}"
        checkpoint: CheckpointSaved | None = None
        if model is not None and model.startswith("job:"):
            checkpoint, base_name = self._run_in_loop(self._job_checkpoint(job, model[4:]))
        elif model is not None and model.startswith("checkpoint:"):
            checkpoint, base_name = self._run_in_loop(self._checkpoint(job, model[11:]))
        elif model is not None:
            base_name = model
        base = resolve_model(base_name, self.settings, self.data_dir)
        ref = base
        if checkpoint is not None:
            path = (self.data_dir / checkpoint.path).resolve()
            if not path.is_relative_to(self.data_dir) or not path.exists():
                raise RunnerError(
                    "checkpoint_missing", f"checkpoint {checkpoint.checkpoint_id!r} has no files"
                )
            if checkpoint.kind == "lora":
                lora_path = path
            else:
                ref = ref_from_path(
                    checkpoint.checkpoint_id,
                    path,
                    config=base.path if path.is_file() else None,
                    family=base.family,
                )
        params.validate_for_family(ref.family)
        pipe = self._pipelines().get(ref, self.device, torch.float32)
        out_dir = job.job_dir / "images"
        images = generate_images(
            pipe,
            ref.family,
            params,
            out_dir,
            lora_path,
            self._should_cancel(job),
            index_offset=job.images,
        )
        events: list[Event] = []
        for image in images:
            job.images += 1
            events.append(
                ImageGenerated(
                    image_id=f"img_{job.job_id.removeprefix('job_')}_{job.images}",
                    prompt=params.prompt,
                    seed=image.seed,
                    width=image.width,
                    height=image.height,
                    format=params.output_format,
                    path=relative(image.path, self.data_dir),
                    sha256=image.sha256,
                    size_bytes=image.size_bytes,
                )
            )
        if events:
            self._append_from_thread(job, events)

    async def _job_checkpoint(
        self, job: JobContext, other_id: str
    ) -> tuple[CheckpointSaved, str | None]:
        """The final checkpoint of a (succeeded, same-tenant) training job."""
        if other_id == job.job_id and job.final_checkpoint is not None:
            return job.final_checkpoint, job.spec.base_model
        state, events = await self._job_state(other_id)
        if state is None or state.tenant != job.tenant:
            raise RunnerError("unknown_model", f"job {other_id!r} not found")
        finals = [
            e.event
            for e in events
            if isinstance(e.event, CheckpointSaved)
            and e.event.final
            and e.event.variant in ("diffusers", "single_file")
        ]
        if not finals:
            raise RunnerError("unknown_model", f"job {other_id!r} has no final checkpoint")
        return finals[-1], state.config.get("base_model")

    async def _checkpoint(self, job: JobContext, checkpoint_id: str) -> tuple[CheckpointSaved, Any]:
        # Checkpoint ids embed their job's id: ckp_<job suffix>_<n>.
        body = checkpoint_id.removeprefix("ckp_")
        owner = "job_" + body.rsplit("_", 1)[0]
        state, events = await self._job_state(owner)
        if state is not None and state.tenant == job.tenant:
            for recorded in events:
                event = recorded.event
                if isinstance(event, CheckpointSaved) and event.checkpoint_id == checkpoint_id:
                    return event, state.config.get("base_model")
        raise RunnerError("unknown_model", f"checkpoint {checkpoint_id!r} not found")

    async def _job_state(self, job_id: str) -> tuple[JobState | None, list[Any]]:
        assert self.store is not None
        events = await self.store.read_stream(job_stream(job_id))
        return fold(events), events


def new_runner_id(device: str) -> str:
    return f"{device}-{os.getpid()}-{secrets.token_hex(3)}"


async def main_async(settings: Settings, device: str, runner_id: str) -> int:
    runner = Runner(settings, device, runner_id)
    return await runner.run()

