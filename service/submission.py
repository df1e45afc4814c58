"""Everything checked before a job is accepted, beyond the `JobSpec` model itself.

A job that passes here is one the runner can start: the base model exists,
every model a `generate` entry names is the tenant's own and usable, the
dataset is the tenant's, the limits of config.toml hold, and at least one
configured runner device can train it as asked. Anything else is refused now
with the field at fault, rather than failing minutes later in the runner.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from events.settings import Settings
from events.store import SQLiteEventStore
from events.types import DatasetUploaded
from gpu_runner.errors import GenerationError, ModelError
from gpu_runner.generate import GenerateParams
from gpu_runner.jobspec import JobSpec
from gpu_runner.models import BUILTIN_TINY_MODELS, resolve_model
from gpu_runner.training import TrainConfig, TrainingError, check_device_support, total_steps
from service import readmodel
from service.errors import ApiError
from service.middleware import validation_error

#: Prefixes of `generate[].model` that name a trained model instead of a base model.
JOB_MODEL_PREFIX = "job:"
CHECKPOINT_MODEL_PREFIX = "checkpoint:"
DATASET_STREAM_PREFIX = "dataset-"


def dataset_stream(dataset_id: str) -> str:
    """The stream id of an uploaded dataset."""
    return DATASET_STREAM_PREFIX + dataset_id


@dataclass(frozen=True)
class CheckedJob:
    """A validated job request, defaults filled in."""

    spec: JobSpec
    family: str


async def model_family(name: str, settings: Settings, field: str) -> str:
    """The family of base model `name`; 422 naming `field` when there is no such model.

    Built-in tiny models not created yet are not created here (the runner
    does that on first use; this process never loads models).
    """
    data_dir = settings.storage.data_dir
    configured = name in settings.models
    # "owner/name" is a hub repository id: resolve_model refuses it unless
    # downloads are allowed, with its own error code.
    hub_id = "/" in name
    on_disk = not hub_id and (data_dir / "models" / name).is_dir()
    if not configured and not on_disk:
        if name in BUILTIN_TINY_MODELS:
            return BUILTIN_TINY_MODELS[name]
        if not hub_id:
            known = sorted(set(settings.models) | set(BUILTIN_TINY_MODELS))
            raise ApiError(
                422,
                "unknown_model",
                f"model {name!r} is not configured, not in the data folder and not built in "
                f"(known: {', '.join(known)})",
                field,
            )
    try:
        # Reading a model's files (or, with downloads allowed, a hub index)
        # blocks: off the event loop.
        ref = await asyncio.to_thread(resolve_model, name, settings, data_dir)
    except ModelError as exc:
        code = "unknown_model" if exc.code == "model_not_found" else exc.code
        raise ApiError(422, code, exc.message, field) from None
    return ref.family


async def find_dataset(store: SQLiteEventStore, dataset_id: str, tenant: str) -> DatasetUploaded:
    """The tenant's uploaded dataset; 422 `unknown_dataset` otherwise."""
    events = await store.read_stream(dataset_stream(dataset_id))
    first = events[0].event if events else None
    if not isinstance(first, DatasetUploaded) or first.tenant != tenant:
        raise ApiError(
            422, "unknown_dataset", f"dataset {dataset_id!r} not found", "train.dataset_id"
        )
    return first


async def _generate_model_family(
    params: GenerateParams,
    index: int,
    *,
    base_family: str,
    tenant: str,
    settings: Settings,
    store: SQLiteEventStore,
) -> str:
    """The family a `generate` entry will run on, checking the model it names."""
    field = f"generate.{index}.model"
    name = params.model
    if name is None:
        return base_family
    if name.startswith(JOB_MODEL_PREFIX):
        job_id = name.removeprefix(JOB_MODEL_PREFIX)
        job = await store.read_transaction(lambda c: readmodel.get_job(c, job_id, tenant))
        if job is None or job.type not in ("dreambooth", "dreambooth_image_gen"):
            raise ApiError(422, "unknown_model", f"no training job {job_id!r}", field)
        if job.data_removed:
            raise ApiError(
                422, "model_unavailable", f"job {job_id!r}: its files were deleted", field
            )
        if job.state != "succeeded":
            raise ApiError(
                422,
                "model_unavailable",
                f"job {job_id!r} is {job.state}; its model can be used once it has succeeded",
                field,
            )
        base = job.config.get("base_model") or settings.jobs.default_base_model
        return await model_family(str(base), settings, field)
    if name.startswith(CHECKPOINT_MODEL_PREFIX):
        checkpoint_id = name.removeprefix(CHECKPOINT_MODEL_PREFIX)
        job = await store.read_transaction(
            lambda c: readmodel.find_artifact(c, checkpoint_id, "checkpoint", tenant)
        )
        if job is None:
            raise ApiError(422, "unknown_model", f"no checkpoint {checkpoint_id!r}", field)
        if job.data_removed:
            raise ApiError(
                422, "model_unavailable", f"checkpoint {checkpoint_id!r} was deleted", field
            )
        base = job.config.get("base_model") or settings.jobs.default_base_model
        return await model_family(str(base), settings, field)
    return await model_family(name, settings, field)


def _check_device(train: TrainConfig, devices: list[str]) -> None:
    """Pass when at least one runner device can train `train`; else the first refusal."""
    first: TrainingError | None = None
    for device in devices:
        try:
            check_device_support(train, device)
            return
        except TrainingError as exc:
            first = first or exc
    assert first is not None
    raise ApiError(422, first.code, first.message, first.field)


async def check_job(
    body: Any, *, tenant: str, settings: Settings, store: SQLiteEventStore
) -> CheckedJob:
    """Validate a `POST /v1/jobs` body completely; raise `ApiError`/`ValidationError`."""
    spec = JobSpec.model_validate(body)
    base_model = spec.base_model or settings.jobs.default_base_model
    family = await model_family(base_model, settings, "base_model")

    context: dict[str, Any] = {"family": family}
    num_images: int | None = None
    if spec.train is not None and spec.train.dataset_id is not None:
        dataset = await find_dataset(store, spec.train.dataset_id, tenant)
        num_images = dataset.images
        context["num_images"] = num_images
    # Second pass with what is now known: the family's and the dataset's limits.
    try:
        spec = JobSpec.model_validate(body, context=context)
    except ValidationError as exc:
        raise validation_error(exc) from None
    spec = spec.model_copy(update={"base_model": base_model})

    limits = settings.limits
    if spec.train is not None:
        train = spec.train
        steps = train.steps
        if steps is None and num_images is not None:
            steps = total_steps(train, num_images)
        if steps is not None and steps > limits.max_steps:
            name = "train.steps" if train.steps is not None else "train.epochs"
            raise ApiError(
                422,
                "limit_exceeded",
                f"{name}: {steps} training steps; this server allows at most {limits.max_steps}",
                name,
            )
    for index, params in enumerate(spec.generate):
        if params.num_images > limits.max_num_images:
            raise ApiError(
                422,
                "limit_exceeded",
                f"generate.{index}.num_images: at most {limits.max_num_images} per entry",
                f"generate.{index}.num_images",
            )
        gen_family = await _generate_model_family(
            params, index, base_family=family, tenant=tenant, settings=settings, store=store
        )
        try:
            params.validate_for_family(gen_family)
        except GenerationError as exc:  # a size or scheduler this family cannot use
            word = exc.message.split(" ", 1)[0]
            field = f"generate.{index}" + (
                f".{word}" if word in ("width", "height", "scheduler") else ""
            )
            raise ApiError(422, exc.code, f"{field}: {exc.message}", field) from None
    if spec.train is not None:
        # check_device_support imports torch (once per process): off the loop.
        await asyncio.to_thread(_check_device, spec.train, list(settings.runner.devices))
    return CheckedJob(spec=spec, family=family)
