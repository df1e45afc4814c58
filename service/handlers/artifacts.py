"""Downloads: `GET /v1/checkpoints/{id}/download` and `GET /v1/images/{id}`.

The artifact is found through the read model's `artifacts` table (scoped to
the tenant: another tenant's id is 404); its path, recorded in the log
relative to the data folder, is resolved and must stay inside it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog
from aiohttp import web

from events.projections import JobState
from service import readmodel
from service.downloads import ArtifactFileResponse, zip_folder
from service.errors import ApiError, not_found
from service.handlers.common import tenant_of
from service.keys import SETTINGS, STORE
from service.openapi import Operation, operation
from service.paths import inside_data_dir, job_dir

log = structlog.get_logger(__name__)

_IMAGE_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg", "jpg": "image/jpeg"}
_IMAGE_SUFFIXES = {"png": ".png", "webp": ".webp", "jpeg": ".jpg", "jpg": ".jpg"}
# One zip build per checkpoint at a time; concurrent first downloads share it.
_ZIP_LOCKS: dict[str, asyncio.Lock] = {}


async def _artifact_job(request: web.Request, artifact_id: str, kind: str) -> JobState:
    tenant = tenant_of(request)
    state = await request.app[STORE].read_transaction(
        lambda c: readmodel.find_artifact(c, artifact_id, kind, tenant)
    )
    if state is None:
        raise not_found(kind, artifact_id)
    if state.data_removed:
        raise ApiError(410, "data_removed", f"the files of job {state.id!r} were deleted")
    return state


def _existing_path(request: web.Request, relative: str, artifact_id: str) -> Path:
    data_dir = request.app[SETTINGS].storage.data_dir
    path = inside_data_dir(data_dir, relative)
    if path is None:
        log.error("artifact.path_outside_data_dir", artifact_id=artifact_id, path=relative)
        raise not_found("artifact", artifact_id)
    if not path.exists():
        raise ApiError(410, "data_removed", f"the file of {artifact_id!r} is no longer on disk")
    return path


async def _zip_of(request: web.Request, state: JobState, checkpoint_id: str, folder: Path) -> Path:
    folder_of_job = job_dir(request.app[SETTINGS].storage.data_dir, state.id)
    if folder_of_job is None:
        raise not_found("checkpoint", checkpoint_id)
    dest = folder_of_job / ".downloads" / f"{checkpoint_id}.zip"
    lock = _ZIP_LOCKS.setdefault(checkpoint_id, asyncio.Lock())
    async with lock:
        if not dest.exists():
            await asyncio.to_thread(zip_folder, folder, dest)
    _ZIP_LOCKS.pop(checkpoint_id, None)
    return dest


@operation(
    Operation(
        summary="Download a checkpoint",
        responses={200: "application/octet-stream", 206: "application/octet-stream", 304: None},
        tags=("artifacts",),
    )
)
async def download_checkpoint(request: web.Request) -> web.StreamResponse:
    """The checkpoint file with `Content-Length`, `ETag` (its sha256) and range
    support. A full model in the diffusers format (a folder) comes as a zip.
    """
    checkpoint_id = request.match_info["id"]
    state = await _artifact_job(request, checkpoint_id, "checkpoint")
    checkpoint = next(c for c in state.checkpoints if c.id == checkpoint_id)
    path = _existing_path(request, checkpoint.path, checkpoint_id)
    etag = checkpoint.sha256
    filename = f"{checkpoint_id}{path.suffix}"
    if path.is_dir():
        path = await _zip_of(request, state, checkpoint_id, path)
        # Another representation of the same content: its own validator.
        etag = f"{checkpoint.sha256}.zip"
        filename = f"{checkpoint_id}.zip"
    response = ArtifactFileResponse(
        path, etag, content_type="application/octet-stream", filename=filename
    )
    return response.evaluate(request) or response


@operation(
    Operation(
        summary="Download an image",
        responses={200: "image/*", 206: "image/*", 304: None},
        tags=("artifacts",),
    )
)
async def get_image(request: web.Request) -> web.StreamResponse:
    """The generated image, with `ETag` (its sha256) and range support."""
    image_id = request.match_info["id"]
    state = await _artifact_job(request, image_id, "image")
    image = next(i for i in state.images if i.id == image_id)
    path = _existing_path(request, image.path, image_id)
    if not path.is_file():
        raise ApiError(410, "data_removed", f"the file of {image_id!r} is no longer on disk")
    fmt = image.format.lower()
    response = ArtifactFileResponse(
        path,
        image.sha256,
        content_type=_IMAGE_TYPES.get(fmt, "application/octet-stream"),
        filename=f"{image_id}{_IMAGE_SUFFIXES.get(fmt, path.suffix)}",
        inline=True,
    )
    return response.evaluate(request) or response
