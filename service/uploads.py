"""Dataset uploads: a multipart body streamed to disk under a size cap, then checked.

`receive_upload` writes the parts to a staging folder while counting bytes,
and stops with 413 the moment the cap is passed — before the rest of the
body is read. `build_dataset` (blocking; run it in a thread) extracts a zip
with `safe_extract_zip`, checks every image with `validate_image`, and leaves
a folder holding only usable images and their captions. The caller renames
that folder into place, so a dataset is published whole or not at all.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from events.settings import LimitSettings
from gpu_runner.dataset import (
    CAPTION_SUFFIX,
    IMAGE_SUFFIXES,
    DatasetError,
    Rejected,
    safe_extract_zip,
    validate_image,
)
from service.errors import ApiError

ZIP_FIELD = "file"
IMAGES_FIELD = "images"
# aiohttp's part reader looks one read ahead for the boundary, so a part's
# bytes are counted about one read after they arrive: small reads keep the
# 413 close to the cap.
_CHUNK = 64 * 1024
# Bytes gathered before one write on a worker thread: fewer thread hops.
_WRITE_BUFFER = 1024 * 1024
_MAX_NAME = 200

# DatasetError codes as HTTP answers: an archive that is not a zip is the
# wrong media type; the rest are well-formed uploads whose content is refused.
_DATASET_STATUS = {"invalid_zip": 415}


@dataclass
class Received:
    """What `receive_upload` stored in the staging folder."""

    zip_path: Path | None = None
    images: list[Path] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    bytes: int = 0


@dataclass(frozen=True)
class BuiltDataset:
    """A checked dataset folder, ready to be renamed into place."""

    folder: Path
    images: int
    rejected: list[Rejected]
    bytes: int


def too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"upload is larger than the limit of {limit:,} bytes")


def _safe_name(raw: str | None) -> str | None:
    """The base name of a client's file name, or None when it cannot be used as one."""
    if not raw:
        return None
    name = unicodedata.normalize("NFC", raw.replace("\\", "/").rsplit("/", 1)[-1]).strip()
    if (
        not name
        or name.startswith(".")
        or len(name) > _MAX_NAME
        or any(not c.isprintable() for c in name)
    ):
        return None
    return name


class _CappedWriter:
    """Counts bytes across every part of one upload; 413 past the cap."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0

    def _count(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.total > self.limit:
            raise too_large(self.limit)

    async def skip(self, part: BodyPartReader) -> None:
        """Read past a part that is not stored (it still counts against the cap)."""
        while chunk := await part.read_chunk(_CHUNK):
            self._count(chunk)

    async def save(self, part: BodyPartReader, dest: Path) -> int:
        """Stream one part to `dest`; its size."""
        fp: IO[bytes] = await asyncio.to_thread(open, dest, "xb")
        size = 0
        buffer = bytearray()
        try:
            while chunk := await part.read_chunk(_CHUNK):
                size += len(chunk)
                self._count(chunk)
                buffer += chunk
                if len(buffer) >= _WRITE_BUFFER:
                    await asyncio.to_thread(fp.write, bytes(buffer))
                    buffer.clear()
            if buffer:
                await asyncio.to_thread(fp.write, bytes(buffer))
        finally:
            await asyncio.to_thread(fp.close)
        return size


async def receive_upload(request: web.Request, staging: Path, limit: int) -> Received:
    """Stream a `POST /v1/datasets` body into `staging`; a malformed multipart body
    (no boundary, no starting boundary, broken part headers) is 400 `invalid_upload`."""
    try:
        return await _receive_upload(request, staging, limit)
    except (ValueError, HttpProcessingError) as exc:  # the multipart reader on a malformed body
        raise ApiError(400, "invalid_upload", f"malformed multipart body: {exc}") from None


async def _receive_upload(request: web.Request, staging: Path, limit: int) -> Received:
    """Stream a `POST /v1/datasets` body into `staging` (an empty folder).

    Raises `ApiError`: 415 when the body is not multipart, 413 past `limit`
    bytes (checked from Content-Length first, then while reading), 422 for
    a form that is not one zip (`file`) or some images (`images`).
    """
    if request.content_type != "multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            "send multipart/form-data with one zip (field 'file') or images (field 'images')",
        )
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    reader = await request.multipart()
    writer = _CappedWriter(limit)
    received = Received()
    image_dir = staging / "images"
    seen: set[str] = set()
    index = 0
    while (part := await reader.next()) is not None:
        if isinstance(part, MultipartReader):
            raise ApiError(422, "invalid_upload", "nested multipart bodies are not accepted")
        if part.name == ZIP_FIELD:
            if received.zip_path is not None:
                raise ApiError(422, "invalid_upload", "send one zip file", ZIP_FIELD)
            received.zip_path = staging / "upload.zip"
            await writer.save(part, received.zip_path)
        elif part.name == IMAGES_FIELD:
            index += 1
            original = part.filename or f"image-{index}"
            name = _safe_name(part.filename)
            suffix = Path(name or "").suffix.lower()
            problem = None
            if name is None:
                problem = "unusable file name"
            elif suffix not in IMAGE_SUFFIXES and suffix != CAPTION_SUFFIX:
                problem = f"unsupported file extension {suffix or '(none)'!r}"
            elif name.casefold() in seen:
                problem = "duplicate file name"
            if problem is not None:
                received.rejected.append(Rejected(original, problem))
                await writer.skip(part)
                continue
            assert name is not None
            seen.add(name.casefold())
            await asyncio.to_thread(image_dir.mkdir, exist_ok=True)
            dest = image_dir / name
            await writer.save(part, dest)
            received.images.append(dest)
        else:
            raise ApiError(
                422,
                "invalid_upload",
                f"unexpected form field {part.name!r}; use 'file' (a zip) or 'images'",
                part.name,
            )
    if received.zip_path is not None and (received.images or received.rejected):
        raise ApiError(422, "invalid_upload", "send either one zip or images, not both", ZIP_FIELD)
    if received.zip_path is None and not received.images and not received.rejected:
        raise ApiError(
            422, "no_files", "the form holds no zip ('file') and no images ('images')", ZIP_FIELD
        )
    received.bytes = writer.total
    return received


def _dataset_error(exc: DatasetError) -> ApiError:
    extra = (
        {"rejected": [{"name": r.name, "reason": r.reason} for r in exc.rejected]}
        if exc.rejected
        else None
    )
    return ApiError(_DATASET_STATUS.get(exc.code, 422), exc.code, exc.message, extra=extra)


def _keep_usable(
    root: Path,
    files: list[Path],
    limits: LimitSettings,
    rejected: list[Rejected],
    display: Callable[[Path], str],
) -> tuple[int, int]:
    """Delete unusable images and orphan captions under `root`; (images, bytes) kept."""
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    kept: set[tuple[Path, str]] = set()
    count = 0
    size = 0
    for path in images:
        info = validate_image(path, limits.max_image_pixels)
        if isinstance(info, str):
            rejected.append(Rejected(display(path), info))
            path.unlink()
        else:
            kept.add((path.parent, path.stem))
            count += 1
            size += path.stat().st_size
    for path in files:
        if path.suffix.lower() != CAPTION_SUFFIX:
            continue
        if (path.parent, path.stem) in kept:
            size += path.stat().st_size
        else:
            rejected.append(Rejected(display(path), "caption without a matching image"))
            path.unlink()
    return count, size


def build_dataset(received: Received, staging: Path, limits: LimitSettings) -> BuiltDataset:
    """Extract and check an upload in `staging`; raise `ApiError` when nothing usable
    remains or there are too many images. Blocking: run it in a thread."""
    rejected = list(received.rejected)
    if received.zip_path is not None:
        root = staging / "extracted"
        try:
            result = safe_extract_zip(received.zip_path, root, limits)
        except DatasetError as exc:
            raise _dataset_error(exc) from None
        received.zip_path.unlink()
        rejected.extend(result.rejected)
        files = result.files

        def display(path: Path) -> str:
            return path.relative_to(root).as_posix()

    else:
        root = staging / "images"
        files = sorted(received.images)

        def display(path: Path) -> str:
            return path.name

    count, size = _keep_usable(root, files, limits, rejected, display)
    if count == 0:
        raise _dataset_error(
            DatasetError("no_valid_images", "the upload holds no usable image", rejected)
        )
    if count > limits.max_images_per_dataset:
        raise _dataset_error(
            DatasetError(
                "too_many_images",
                f"{count} usable images; the limit is {limits.max_images_per_dataset}",
            )
        )
    return BuiltDataset(folder=root, images=count, rejected=rejected, bytes=size)


def publish(folder: Path, final: Path) -> None:
    """Rename a built dataset folder into place (atomic: same filesystem)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(folder, final)


def discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
