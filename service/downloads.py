"""Serving artifact files: aiohttp's `FileResponse` with the artifact's sha256 as ETag.

`FileResponse` does the hard parts (sendfile, `Range`, `Content-Length`) but
derives its ETag from the file's mtime and size and evaluates conditional
headers against that. An artifact is immutable and its sha256 is already in
the log — a stronger validator that survives copies and restores. So the
conditional headers are evaluated here against the sha256 ETag, and the
response is prepared with a copy of the request without them, and with its
ETag header fixed to the sha256.

A full model saved in the diffusers format is a folder; it is served as a
stored (uncompressed) zip, built once next to the job's files and reused.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import ETag
from multidict import CIMultiDict

_CONDITIONAL = (
    hdrs.IF_MATCH,
    hdrs.IF_NONE_MATCH,
    hdrs.IF_MODIFIED_SINCE,
    hdrs.IF_UNMODIFIED_SINCE,
    hdrs.IF_RANGE,
)
# Fixed timestamp for zip entries: the same folder always gives the same bytes.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _etag_values(header: str) -> list[str]:
    return [v.strip().removeprefix("W/").strip('"') for v in header.split(",") if v.strip()]


class ArtifactFileResponse(web.FileResponse):
    """A `FileResponse` whose ETag is `etag` (the artifact's sha256)."""

    def __init__(
        self, path: Path, etag: str, *, content_type: str, filename: str, inline: bool = False
    ) -> None:
        disposition = "inline" if inline else "attachment"
        super().__init__(
            path,
            headers={
                hdrs.CONTENT_TYPE: content_type,
                hdrs.CONTENT_DISPOSITION: f'{disposition}; filename="{filename}"',
                hdrs.CACHE_CONTROL: "private, max-age=31536000, immutable",
            },
        )
        self._artifact_etag = etag
        self._serve_range = True

    @property
    def etag(self) -> ETag | None:
        return super().etag

    @etag.setter
    def etag(self, value: ETag | str | None) -> None:
        # FileResponse assigns its mtime-based tag while preparing; the
        # artifact's content hash is the one every answer carries.
        self.headers[hdrs.ETAG] = f'"{self._artifact_etag}"'

    def evaluate(self, request: web.Request) -> web.Response | None:
        """Conditional headers against the sha256 ETag: an answer (304 / 412), or None."""
        headers = request.headers
        if (if_match := headers.get(hdrs.IF_MATCH)) is not None:
            values = _etag_values(if_match)
            if "*" not in values and self._artifact_etag not in values:
                return web.Response(status=412)
        if (if_none_match := headers.get(hdrs.IF_NONE_MATCH)) is not None:
            values = _etag_values(if_none_match)
            if "*" in values or self._artifact_etag in values:
                return web.Response(status=304, headers={hdrs.ETAG: f'"{self._artifact_etag}"'})
        if (if_range := headers.get(hdrs.IF_RANGE)) is not None:
            # A range of a different (or date-validated) version is not what
            # the client holds part of: send the whole file (RFC 9110 13.1.5).
            self._serve_range = if_range.strip().strip('"') == self._artifact_etag
        return None

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        headers = CIMultiDict(request.headers)
        for name in _CONDITIONAL:
            headers.popall(name, None)
        if not self._serve_range:
            headers.popall(hdrs.RANGE, None)
        return await super().prepare(request.clone(headers=headers))


def zip_folder(folder: Path, dest: Path) -> None:
    """Write `folder` as a stored zip at `dest`, atomically (blocking)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as zf:
            for path in sorted(folder.rglob("*")):
                if path.is_symlink() or not path.is_file():
                    continue  # the runner writes no links; never follow one out
                info = zipfile.ZipInfo(path.relative_to(folder).as_posix(), _ZIP_EPOCH)
                info.external_attr = 0o644 << 16
                with open(path, "rb") as src, zf.open(info, "w", force_zip64=True) as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
