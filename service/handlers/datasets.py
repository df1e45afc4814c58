"""`POST /v1/datasets`: upload training images (one zip, or several image files)."""

from __future__ import annotations

import asyncio
import secrets

import structlog
from aiohttp import web

from events.store import NO_STREAM
from events.types import DatasetUploaded, Rejection
from service.handlers.common import respond, tenant_of
from service.keys import SETTINGS, STORE
from service.openapi import Operation, operation
from service.paths import datasets_dir, staging_dir
from service.schemas import DatasetCreated, DatasetUploadForm, RejectionOut
from service.submission import dataset_stream
from service.uploads import build_dataset, discard, publish, receive_upload

log = structlog.get_logger(__name__)


def new_dataset_id() -> str:
    return "ds_" + secrets.token_hex(10)


@operation(
    Operation(
        summary="Upload a dataset",
        body=DatasetUploadForm,
        body_media_type="multipart/form-data",
        responses={201: DatasetCreated},
        tags=("datasets",),
    )
)
async def upload_dataset(request: web.Request) -> web.Response:
    """One zip (field `file`, captions as `NAME.txt` inside) or several images
    (field `images`). Unusable files are listed in `rejected`; an upload with
    no usable image, too many images, or a hostile archive is refused and
    leaves nothing behind. Bodies above `limits.max_upload_bytes` are refused
    with 413 as soon as the limit is passed.
    """
    settings = request.app[SETTINGS]
    limits = settings.limits
    data_dir = settings.storage.data_dir
    dataset_id = new_dataset_id()
    staging = staging_dir(data_dir) / f"upload-{dataset_id}"
    await asyncio.to_thread(staging.mkdir, parents=True)
    final = datasets_dir(data_dir) / dataset_id
    published = False
    try:
        received = await receive_upload(request, staging, limits.max_upload_bytes)
        built = await asyncio.to_thread(build_dataset, received, staging, limits)
        await asyncio.to_thread(publish, built.folder, final)
        published = True
        rejected = [Rejection(name=r.name, reason=r.reason) for r in built.rejected]
        await request.app[STORE].append(
            dataset_stream(dataset_id),
            NO_STREAM,
            [
                DatasetUploaded(
                    dataset_id=dataset_id,
                    tenant=tenant_of(request),
                    images=built.images,
                    rejected=rejected,
                    bytes=built.bytes,
                    path=final.relative_to(data_dir).as_posix(),
                )
            ],
        )
    except BaseException:
        if published:
            await asyncio.to_thread(discard, final)
        raise
    finally:
        await asyncio.to_thread(discard, staging)
    log.info("dataset.uploaded", dataset_id=dataset_id, images=built.images)
    return respond(
        DatasetCreated(
            id=dataset_id,
            images=built.images,
            rejected=[RejectionOut(name=r.name, reason=r.reason) for r in rejected],
            bytes=built.bytes,
        ),
        201,
    )
