"""`GET /v1/models`: what `base_model` and `generate[].model` may name."""

from __future__ import annotations

import asyncio

from aiohttp import web

from events.settings import Settings
from gpu_runner.errors import ModelError
from gpu_runner.models import BUILTIN_TINY_MODELS, ref_from_path, resolve_model
from service import readmodel
from service.handlers.common import respond, tenant_of
from service.keys import SETTINGS, STORE
from service.openapi import Operation, operation
from service.schemas import ModelList, ModelOut
from service.submission import CHECKPOINT_MODEL_PREFIX, JOB_MODEL_PREFIX


def _base_models(settings: Settings) -> list[ModelOut]:
    """Configured models, folders in `<data>/models`, then the built-in tiny names
    (blocking: reads model files to tell their family)."""
    data_dir = settings.storage.data_dir
    models: dict[str, ModelOut] = {}
    for name in sorted(settings.models):
        try:
            family: str | None = resolve_model(name, settings, data_dir).family
            detail = None
        except ModelError as exc:
            family, detail = settings.models[name].family, exc.message
        models[name] = ModelOut(
            name=name,
            kind="base",
            family=family,
            source="config",
            available=detail is None,
            detail=detail,
        )
    folder = data_dir / "models"
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    for path in entries:
        if path.name in models or path.name.startswith(".") or not path.is_dir():
            continue
        try:
            family, detail = ref_from_path(path.name, path).family, None
        except ModelError as exc:
            family, detail = BUILTIN_TINY_MODELS.get(path.name), exc.message
        models[path.name] = ModelOut(
            name=path.name,
            kind="base",
            family=family,
            source="data",
            available=detail is None,
            detail=detail,
        )
    for name, family in BUILTIN_TINY_MODELS.items():
        # Built on first use by the runner, so always usable.
        models.setdefault(
            name, ModelOut(name=name, kind="base", family=family, source="builtin", available=True)
        )
    return list(models.values())


def _family_of(base: str, bases: dict[str, ModelOut]) -> str | None:
    found = bases.get(base)
    return found.family if found is not None else None


@operation(Operation(summary="List usable models", responses={200: ModelList}, tags=("models",)))
async def list_models(request: web.Request) -> web.Response:
    """Base models (config, data folder, built in) and the tenant's trained models:
    `job:<id>` for each succeeded training job (its final model) and
    `checkpoint:<id>` for each checkpoint it saved.
    """
    settings = request.app[SETTINGS]
    tenant = tenant_of(request)
    bases = await asyncio.to_thread(_base_models, settings)
    by_name = {m.name: m for m in bases}
    jobs = await request.app[STORE].read_transaction(lambda c: readmodel.trained_jobs(c, tenant))
    trained: list[ModelOut] = []
    for job in jobs:
        base = str(job.config.get("base_model") or settings.jobs.default_base_model)
        family = _family_of(base, by_name)
        trained.append(
            ModelOut(
                name=f"{JOB_MODEL_PREFIX}{job.id}",
                kind="job",
                family=family,
                source=job.id,
                available=True,
                job_id=job.id,
                created_at=job.created_at,
            )
        )
        for checkpoint in job.checkpoints:
            trained.append(
                ModelOut(
                    name=f"{CHECKPOINT_MODEL_PREFIX}{checkpoint.id}",
                    kind="checkpoint",
                    family=family,
                    source=job.id,
                    available=True,
                    job_id=job.id,
                    checkpoint_kind=checkpoint.kind,
                    step=checkpoint.step,
                    created_at=job.created_at,
                )
            )
    return respond(ModelList(models=[*bases, *trained]))
