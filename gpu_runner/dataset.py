"""Untrusted training data: zip extraction, image validation, dataset preparation.

Everything here treats its input as hostile: uploads reach it from the HTTP
service and downloads (`data_url`, `image_urls`) from the runner. The module
imports neither torch nor `service` — both processes import it, and the
runner must never import `service`.

Three steps, each usable on its own:

1. `safe_extract_zip` unpacks an archive into a fresh folder. Problems with the
   archive as a whole (not a zip, a zip bomb, too many members, everything
   encrypted) raise `DatasetError`; problems with one member (unsafe name,
   symlink, encrypted, corrupt, unsupported type, duplicate) become
   `Rejected` entries and the member is skipped. Nothing is ever written
   outside the destination, and when an error is raised nothing is left in it.
2. `validate_image` decides whether one file is a usable image.
3. `prepare_dataset` turns image files (+ optional `NAME.txt` captions) into
   square RGB PNGs at the training resolution, with a caption each.

Supported image formats are JPEG, PNG, WEBP, BMP and GIF (first frame). The
format is recognised from the file's leading bytes, never from its name, and
Pillow is only allowed to use that one decoder: a file Pillow could open in
some other format (PPM, TGA, ICO, PSD, EPS — the last would start Ghostscript)
is rejected before any decoder sees it. Data appended after a valid image (a
"GIFAR" or a phone's embedded motion video) is accepted, because prepared
images are re-encoded from decoded pixels and the payload never reaches the
output.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import stat
import struct
import unicodedata
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from events.settings import LimitSettings
from gpu_runner.errors import RunnerError

__all__ = [
    "CAPTION_SUFFIX",
    "IMAGE_SUFFIXES",
    "SUPPORTED_FORMATS",
    "DatasetError",
    "ExtractResult",
    "ImageInfo",
    "PreparedDataset",
    "PreparedImage",
    "Rejected",
    "prepare_dataset",
    "safe_extract_zip",
    "validate_image",
]

#: Pillow format names accepted as training images.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
#: File name endings extracted from a zip as images (content is still checked).
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif"}
)
#: Captions live beside their image as `NAME.txt`.
CAPTION_SUFFIX = ".txt"
_ALLOWED_SUFFIXES = IMAGE_SUFFIXES | {CAPTION_SUFFIX}

# Below this many decompressed bytes a member is never called a bomb: tiny
# text files legitimately compress far better than any sane ratio cap.
_RATIO_FLOOR_BYTES = 1024 * 1024
# Central directory bytes one member may need: 46 fixed + name (≤ 1024, see
# _MAX_NAME_CHARS, UTF-8 ≤ 4 bytes a char is not needed for real names) +
# generous room for extra fields. Bounds the work zipfile does parsing the
# directory of an archive that lies about its member count.
_CD_BYTES_PER_MEMBER = 46 + 4096
_MAX_NAME_CHARS = 1024
_MAX_COMPONENT_BYTES = 255  # NAME_MAX on Linux and macOS
_MAX_DEPTH = 32
_CHUNK = 64 * 1024
_MAX_CAPTION_BYTES = 64 * 1024
# Names that operating systems sprinkle into archives; skipped, not reported.
_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini"})
_MASK_ENCRYPTED = 0x1
_MASK_STRONG_ENCRYPTION = 0x40
_MASK_UTF8 = 0x800
_METHOD_AES = 99  # WinZip AES: encrypted, whatever the flag bits say
_METHODS = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
)


class DatasetError(RunnerError):
    """The dataset as a whole is unusable.

    Codes: `invalid_zip`, `zip_bomb`, `too_many_files`, `encrypted_zip`,
    `no_valid_images`, `too_many_images`. `rejected` lists per-file reasons
    where they explain the failure (for `no_valid_images`).
    """

    def __init__(self, code: str, message: str, rejected: Sequence[Rejected] = ()) -> None:
        super().__init__(code, message)
        self.rejected: list[Rejected] = list(rejected)


@dataclass(frozen=True, slots=True)
class Rejected:
    """One input file that was skipped, and why (shown to the user)."""

    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class ExtractResult:
    """Files written by `safe_extract_zip` (sorted) and members it skipped."""

    files: list[Path]
    rejected: list[Rejected]


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What `validate_image` learnt about a usable image."""

    format: str
    width: int
    height: int
    mode: str
    animated: bool = False


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """One training image: a square RGB PNG and its caption."""

    path: Path
    caption: str
    source_name: str


@dataclass(frozen=True, slots=True)
class PreparedDataset:
    """The result of `prepare_dataset`."""

    images: list[PreparedImage]
    rejected: list[Rejected] = field(default_factory=list)


# --------------------------------------------------------------------------- #
# Zip extraction
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class _Directory:
    """What the end-of-central-directory record declares."""

    entries: int
    size: int
    start: int  # file offset of the central directory, prepended data included


def _read_directory(fp: IO[bytes]) -> _Directory:
    """Locate and read the end-of-central-directory record.

    Done before `zipfile` parses anything so that an archive declaring (or
    padding its directory for) millions of members is refused cheaply. The
    search mirrors `zipfile`: the last signature in the final 64 KiB + 22.
    """
    fp.seek(0, os.SEEK_END)
    file_size = fp.tell()
    tail_len = min(file_size, 65535 + 22)
    fp.seek(file_size - tail_len)
    tail = fp.read(tail_len)
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or len(tail) - pos < 22:
        raise DatasetError("invalid_zip", "not a zip archive (no end of central directory)")
    eocd_offset = file_size - tail_len + pos
    (_, _, _, _, entries, cd_size, _cd_offset, _) = struct.unpack(
        "<4sHHHHLLH", tail[pos : pos + 22]
    )
    cd_end = eocd_offset
    if entries == 0xFFFF or cd_size == 0xFFFFFFFF:
        # Zip64: the real figures are in the zip64 record before the locator.
        locator_at = pos - 20
        if locator_at >= 0 and tail[locator_at : locator_at + 4] == b"PK\x06\x07":
            record_at = eocd_offset - 20 - 56
            if record_at < 0:
                raise DatasetError("invalid_zip", "truncated zip64 directory record")
            fp.seek(record_at)
            record = fp.read(56)
            if len(record) != 56 or record[:4] != b"PK\x06\x06":
                raise DatasetError("invalid_zip", "corrupt zip64 directory record")
            _, _, _, _, _, _, _, entries, cd_size, _ = struct.unpack("<4sQ2H2L4Q", record)
            cd_end = record_at
    start = cd_end - cd_size
    if start < 0:
        raise DatasetError("invalid_zip", "central directory lies outside the file")
    return _Directory(entries=entries, size=cd_size, start=start)


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    """The member name's bytes as stored in the archive."""
    if info.flag_bits & _MASK_UTF8:
        return info.orig_filename.encode("utf-8")
    # zipfile decoded it as cp437, which maps every byte, so this round-trips.
    return info.orig_filename.encode("cp437")


def _display_name(raw: bytes) -> str:
    """A printable member name for messages: undecodable bytes shown as \\xNN."""
    text = raw.decode("utf-8", errors="backslashreplace")
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _check_member_name(raw: bytes) -> list[str] | str:
    """Decode and vet a member name: its safe path parts, or a reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # Names without the UTF-8 flag are meant to be cp437, but in practice
        # they are UTF-8 or a local code page nobody can guess; guessing wrong
        # would write mojibake names, so such members are refused.
        return "name is not valid UTF-8"
    if len(text) > _MAX_NAME_CHARS:
        return f"name is longer than {_MAX_NAME_CHARS} characters"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        return "name contains control characters"
    if "\\" in text:
        # A backslash is a separator on Windows and a plain character here:
        # either reading is a way to smuggle a path, so neither is taken.
        return "name contains a backslash (Windows path separator)"
    if text.startswith("/"):
        return "absolute path"
    if len(text) >= 2 and text[1] == ":" and text[0].isascii() and text[0].isalpha():
        return "name starts with a drive letter"
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if ".." in parts:
        return "path escapes the destination (zip slip: '..')"
    if len(parts) > _MAX_DEPTH:
        return f"path is nested deeper than {_MAX_DEPTH} folders"
    if any(len(part.encode("utf-8")) > _MAX_COMPONENT_BYTES for part in parts):
        return f"a path component is longer than {_MAX_COMPONENT_BYTES} bytes"
    return [unicodedata.normalize("NFC", part) for part in parts]


def _is_junk(parts: list[str]) -> bool:
    """macOS resource forks, dotfiles and OS thumbnails: skipped silently."""
    if parts[0] == "__MACOSX":
        return True
    if any(part.startswith(".") for part in parts):
        return True
    return parts[-1].casefold() in _JUNK_NAMES


def _member_type_problem(info: zipfile.ZipInfo) -> str | None:
    """A reason when the member is not a plain, readable file."""
    mode = info.external_attr >> 16
    if mode and stat.S_ISLNK(mode):
        return "symbolic link (links are never extracted)"
    if mode and stat.S_IFMT(mode) and not stat.S_ISREG(mode):
        return "not a regular file (device, pipe or socket)"
    if (
        info.flag_bits & (_MASK_ENCRYPTED | _MASK_STRONG_ENCRYPTION)
        or info.compress_type == _METHOD_AES
    ):
        return "encrypted (password-protected archives are not supported)"
    if info.compress_type not in _METHODS:
        return f"unsupported compression method {info.compress_type}"
    return None


def _is_directory_entry(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    return (
        info.orig_filename.endswith("/")
        or bool(mode and stat.S_ISDIR(mode))
        or bool(info.external_attr & 0x10)
    )


def _check_layout(fp: IO[bytes], infos: list[zipfile.ZipInfo], directory: _Directory) -> None:
    """Refuse archives whose members share bytes.

    Overlapping members are how the non-recursive "better zip bomb" reaches a
    ratio of millions: one compressed kernel referenced by every entry. Each
    member's extent is its local header through the end of its compressed
    data, read from the local header itself (the central directory's copy of
    the name/extra lengths may differ).
    """
    extents: list[tuple[int, int, str]] = []
    for info in infos:
        header = b""
        if info.header_offset >= 0:
            fp.seek(info.header_offset)
            header = fp.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise DatasetError(
                "invalid_zip", f"member {_display_name(_raw_name(info))!r} has no local header"
            )
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        end = info.header_offset + 30 + name_len + extra_len + info.compress_size
        extents.append((info.header_offset, end, _display_name(_raw_name(info))))
    extents.sort()
    for (_, end_a, name_a), (start_b, _, name_b) in itertools.pairwise(extents):
        if start_b < end_a:
            raise DatasetError(
                "zip_bomb",
                f"members {name_a!r} and {name_b!r} overlap (a zip-bomb construction)",
            )
    if extents and extents[-1][1] > directory.start:
        raise DatasetError(
            "invalid_zip", f"member {extents[-1][2]!r} runs into the central directory"
        )


class _InflateBudget:
    """Counts bytes as they are decompressed and stops a bomb mid-stream.

    Declared sizes are checked up front too, but only as an early exit: the
    caps are enforced on bytes actually produced, so an archive that lies
    about its sizes (or a reader that stops honouring them) cannot get past.
    """

    def __init__(self, total_limit: int, ratio_limit: float) -> None:
        self.total_limit = total_limit
        self.ratio_limit = ratio_limit
        self.total = 0
        self._member = ""
        self._member_out = 0
        self._member_in = 1

    def start_member(self, name: str, compressed_size: int) -> None:
        """Begin counting a member whose compressed data is `compressed_size` bytes."""
        self._member = name
        self._member_out = 0
        self._member_in = max(compressed_size, 1)

    def add(self, count: int) -> None:
        """Account for `count` more decompressed bytes; raise `zip_bomb` past a cap."""
        self.total += count
        self._member_out += count
        if self.total > self.total_limit:
            raise DatasetError(
                "zip_bomb",
                f"archive expands to more than {self.total_limit:,} bytes "
                f"(the limit) while extracting {self._member!r}",
            )
        if (
            self._member_out > _RATIO_FLOOR_BYTES
            and self._member_out / self._member_in > self.ratio_limit
        ):
            raise DatasetError(
                "zip_bomb",
                f"member {self._member!r} expands more than {self.ratio_limit:g}× "
                "its compressed size",
            )


@dataclass(slots=True)
class _Planned:
    info: zipfile.ZipInfo
    display: str
    parts: list[str]


def _plan_members(infos: list[zipfile.ZipInfo], rejected: list[Rejected]) -> list[_Planned]:
    """Decide, from names and headers alone, which members will be extracted."""
    planned: list[_Planned] = []
    file_keys: set[str] = set()
    dir_keys: set[str] = set()
    for info in infos:
        raw = _raw_name(info)
        display = _display_name(raw)
        parts = _check_member_name(raw)
        if isinstance(parts, str):
            rejected.append(Rejected(display, parts))
            continue
        if not parts or _is_directory_entry(info) or _is_junk(parts):
            continue
        problem = _member_type_problem(info)
        if problem is not None:
            rejected.append(Rejected(display, problem))
            continue
        suffix = Path(parts[-1]).suffix.lower()
        if suffix not in _ALLOWED_SUFFIXES:
            rejected.append(
                Rejected(
                    display,
                    f"not an image or caption file ({suffix or 'no extension'}); "
                    "accepted: .jpg .jpeg .png .webp .bmp .gif and .txt captions",
                )
            )
            continue
        # Keys are case- and normalisation-folded so that the extracted tree
        # is the same on case-insensitive file systems (macOS, Windows).
        folded = [part.casefold() for part in parts]
        key = "/".join(folded)
        prefixes = ["/".join(folded[:i]) for i in range(1, len(folded))]
        if key in file_keys:
            rejected.append(Rejected(display, "duplicate entry (an earlier member has this name)"))
            continue
        if key in dir_keys or any(prefix in file_keys for prefix in prefixes):
            rejected.append(Rejected(display, "path conflicts with another member"))
            continue
        file_keys.add(key)
        dir_keys.update(prefixes)
        planned.append(_Planned(info, display, parts))
    return planned


def _extract_member(
    zf: zipfile.ZipFile, item: _Planned, target: Path, budget: _InflateBudget
) -> str | None:
    """Stream one member to `target`; a reason if the member is corrupt."""
    budget.start_member(item.display, item.info.compress_size)
    # O_EXCL|O_NOFOLLOW: never overwrite, never write through a link, even if
    # something raced us into the destination.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as out, zf.open(item.info) as src:
            while chunk := src.read(_CHUNK):
                budget.add(len(chunk))
                out.write(chunk)
    except DatasetError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
        target.unlink(missing_ok=True)
        return f"corrupt member ({exc})"
    except Exception as exc:
        # zlib.error, lzma.LZMAError, OSError from bz2 …: one damaged member
        # is that member's problem, not the archive's.
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # a real I/O error on our side (disk full): not the user's fault
        target.unlink(missing_ok=True)
        return f"corrupt member ({type(exc).__name__}: {exc})"
    return None


def _clear_dir(folder: Path, created: Path | None) -> None:
    """Leave nothing behind: remove the folders we made, or empty the one given."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _prepare_empty_dir(path: Path) -> Path | None:
    """Make sure `path` is an empty folder.

    Returns the topmost folder this call created (removing it undoes
    everything), or None when `path` already existed (and is empty).
    """
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    try:
        path.mkdir(parents=True)
        return top
    except FileExistsError:
        if not path.is_dir() or path.is_symlink():
            raise ValueError(f"{path} exists and is not a folder") from None
        if any(path.iterdir()):
            raise ValueError(f"{path} must be empty") from None
        return None


def safe_extract_zip(zip_path: Path, dest_dir: Path, limits: LimitSettings) -> ExtractResult:
    """Extract an untrusted zip into `dest_dir` (absent or empty).

    Only images (by extension; content is checked later) and `.txt`
    captions are extracted, keeping their folders. Directories, `__MACOSX/`,
    dotfiles and OS thumbnail files are skipped silently.

    Raises `DatasetError` — `invalid_zip` (not a zip, truncated, corrupt
    directory), `too_many_files` (more members than
    `limits.max_zip_members`), `zip_bomb` (more than
    `limits.max_zip_uncompressed_bytes` in total, a member expanding more
    than `limits.max_zip_ratio`×, or overlapping members), `encrypted_zip`
    (every image is encrypted) — after removing everything it wrote.
    """
    created = _prepare_empty_dir(dest_dir)
    dest_real = dest_dir.resolve()
    rejected: list[Rejected] = []
    files: list[Path] = []
    try:
        with open(zip_path, "rb") as fp:
            directory = _read_directory(fp)
            if directory.entries > limits.max_zip_members:
                raise DatasetError(
                    "too_many_files",
                    f"archive has {directory.entries:,} members; "
                    f"the limit is {limits.max_zip_members:,}",
                )
            if directory.size > limits.max_zip_members * _CD_BYTES_PER_MEMBER:
                raise DatasetError(
                    "too_many_files",
                    f"archive directory is {directory.size:,} bytes, more than "
                    f"{limits.max_zip_members:,} members can need",
                )
            try:
                zf = zipfile.ZipFile(fp)
            except UnicodeDecodeError:
                raise DatasetError(
                    "invalid_zip", "a member name is marked UTF-8 but is not valid UTF-8"
                ) from None
            except (
                zipfile.BadZipFile,
                zipfile.LargeZipFile,
                NotImplementedError,  # "zip file version 25.2" from a forged header
                EOFError,
                ValueError,
                struct.error,
                OSError,
            ) as exc:
                raise DatasetError("invalid_zip", f"not a readable zip archive ({exc})") from None
            with zf:
                infos = zf.infolist()
                if len(infos) > limits.max_zip_members:
                    raise DatasetError(
                        "too_many_files",
                        f"archive has {len(infos):,} members; "
                        f"the limit is {limits.max_zip_members:,}",
                    )
                _check_layout(fp, infos, directory)
                planned = _plan_members(infos, rejected)
                encrypted = any(r.reason.startswith("encrypted") for r in rejected)
                images = [p for p in planned if Path(p.parts[-1]).suffix.lower() in IMAGE_SUFFIXES]
                if encrypted and not images:
                    raise DatasetError(
                        "encrypted_zip",
                        "the archive is password-protected; upload an unencrypted zip",
                    )
                _check_declared_sizes(planned, limits)
                budget = _InflateBudget(limits.max_zip_uncompressed_bytes, limits.max_zip_ratio)
                for item in planned:
                    # Defence in depth, checked before anything is created:
                    # the name checks above already exclude every way out.
                    # Lexical normalisation suffices because nothing in
                    # dest_dir is a link (links are never extracted).
                    resolved = Path(os.path.normpath(dest_real.joinpath(*item.parts)))
                    if not resolved.is_relative_to(dest_real):
                        raise AssertionError(f"refusing to write outside {dest_dir}")
                    target = dest_dir.joinpath(*item.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    problem = _extract_member(zf, item, target, budget)
                    if problem is None:
                        files.append(target)
                    else:
                        rejected.append(Rejected(item.display, problem))
    except BaseException:
        _clear_dir(dest_dir, created)
        raise
    files.sort()
    return ExtractResult(files=files, rejected=rejected)


def _check_declared_sizes(planned: list[_Planned], limits: LimitSettings) -> None:
    """Refuse a bomb before decompressing anything when its header admits it."""
    total = 0
    for item in planned:
        size = item.info.file_size
        total += size
        if size > _RATIO_FLOOR_BYTES and size / max(item.info.compress_size, 1) > (
            limits.max_zip_ratio
        ):
            raise DatasetError(
                "zip_bomb",
                f"member {item.display!r} declares {size:,} bytes from "
                f"{item.info.compress_size:,} compressed (more than "
                f"{limits.max_zip_ratio:g}×)",
            )
    if total > limits.max_zip_uncompressed_bytes:
        raise DatasetError(
            "zip_bomb",
            f"archive declares {total:,} uncompressed bytes; the limit is "
            f"{limits.max_zip_uncompressed_bytes:,}",
        )


# --------------------------------------------------------------------------- #
# Image validation
# --------------------------------------------------------------------------- #


class _Unusable(Exception):
    """Internal: the image cannot be used, for the reason given."""


def _sniff_format(head: bytes) -> str | None:
    """The supported format these leading bytes announce, if any."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM"):
        return "BMP"
    return None


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _open_image(
    path: Path, max_pixels: int, draft_size: tuple[int, int] | None = None
) -> Iterator[tuple[Image.Image, ImageInfo]]:
    """Open and fully decode a supported image, or raise `_Unusable`.

    `draft_size` lets the JPEG decoder scale down while decoding (DCT
    scaling): the whole stream is still read, so truncation is still found.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _Unusable(f"cannot read file ({exc.strerror})") from None
    if size == 0:
        raise _Unusable("empty file (0 bytes)")
    with open(path, "rb") as fp:
        fmt = _sniff_format(fp.read(16))
        if fmt is None:
            raise _Unusable(
                "not a supported image (JPEG, PNG, WEBP, BMP or GIF, recognised by content)"
            )
        fp.seek(0)
        with warnings.catch_warnings():
            # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice
            # that; both mean "declared size too large" and are refusals here,
            # not warnings printed to stderr. (The filter is process-wide for
            # the instant of the open; it only ever turns that one warning
            # category into an error, which no other code relies on.)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im = Image.open(fp, formats=[fmt])
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                # Pillow only gets here above its own threshold, which may be
                # lower or higher than ours: name whichever refused it.
                threshold = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
                raise _Unusable(
                    f"image declares more than {threshold:,} pixels (decompression bomb?)"
                ) from None
            except UnidentifiedImageError:
                raise _Unusable(f"not a valid {fmt} image") from None
            except Exception as exc:
                # Pillow signals a bad header with a zoo of types (OSError,
                # SyntaxError, struct.error, ValueError …): all mean unusable.
                raise _Unusable(f"not a valid {fmt} image ({_short(exc)})") from None
        with im:
            width, height = im.size
            # Phone JPEGs carrying several pictures open as MPO (a JPEG too).
            if im.format != fmt and not (fmt == "JPEG" and im.format == "MPO"):
                raise _Unusable(f"not a valid {fmt} image")
            if width <= 0 or height <= 0:
                raise _Unusable(f"image has no pixels ({width}×{height})")
            # The declared size is checked before a single pixel is decoded.
            if width * height > max_pixels:
                raise _Unusable(
                    f"image is {width}×{height} = {width * height:,} pixels; "
                    f"the limit is {max_pixels:,}"
                )
            try:
                # Asking whether there is a second frame parses into it, so a
                # damaged later frame is found here: refused as corrupt.
                animated = bool(getattr(im, "is_animated", False))
                if animated:
                    im.seek(0)  # training uses the first frame only
                if draft_size is not None and fmt == "JPEG":
                    im.draft(None, draft_size)
                im.load()
            except Exception as exc:
                raise _Unusable(f"corrupt or truncated {fmt} image ({_short(exc)})") from None
            info = ImageInfo(
                format=fmt, width=width, height=height, mode=im.mode, animated=animated
            )
            yield im, info


def validate_image(path: Path, max_pixels: int) -> ImageInfo | str:
    """Check that `path` is a usable image; its `ImageInfo`, or a human reason.

    Refuses empty files, unsupported formats (recognised by content; see the
    module docstring), images whose declared size exceeds `max_pixels`
    (checked before decoding, so a decompression bomb costs nothing) and
    corrupt or truncated images (the whole image is decoded).
    """
    try:
        with _open_image(path, max_pixels) as (_, info):
            return info
    except _Unusable as exc:
        return str(exc)


# --------------------------------------------------------------------------- #
# Dataset preparation
# --------------------------------------------------------------------------- #


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparency composited on white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale: a plain convert clips everything above 255 to white.
        im = im.convert("I").point(lambda value: value * (1 / 257)).convert("L")
    elif im.mode == "F":
        im = im.convert("L")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return im.convert("RGB")


def _crop_box(
    width: int, height: int, crop: Literal["center", "random"], rng: random.Random
) -> tuple[int, int, int, int]:
    side = min(width, height)
    if crop == "center":
        left, top = (width - side) // 2, (height - side) // 2
    else:
        left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    return left, top, left + side, top + side


def _read_caption(path: Path) -> str:
    """The caption text (whitespace collapsed), or raise `_Unusable`."""
    with open(path, "rb") as fp:
        data = fp.read(_MAX_CAPTION_BYTES + 1)
    if len(data) > _MAX_CAPTION_BYTES:
        raise _Unusable(f"caption file is larger than {_MAX_CAPTION_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _Unusable("caption file is not valid UTF-8 text") from None
    return " ".join(text.split())


def _source_name(path: Path, root: Path | None) -> str:
    if root is not None:
        with contextlib.suppress(ValueError):
            return path.relative_to(root).as_posix()
    return path.name


def prepare_dataset(
    files: Sequence[Path],
    out_dir: Path,
    resolution: int,
    crop: Literal["center", "random"],
    seed: int,
    instance_prompt: str,
    concept_name: str | None,
    max_images: int,
    max_pixels: int,
    *,
    root: Path | None = None,
) -> PreparedDataset:
    """Turn image files into training images in `out_dir` (absent or empty).

    Each usable image is turned upright (EXIF orientation), converted to RGB
    (transparency on white), cropped to a square — centred, or at an offset
    drawn from `seed` and the file's name — resized to
    `resolution`×`resolution` with Lanczos, and saved as `0000.png`,
    `0001.png` … in the order of the source names. The same inputs and seed
    give byte-identical outputs.

    Captions: `NAME.txt` beside `NAME.jpg` wins; otherwise `concept_name`
    when given, else `instance_prompt`. `concept_name` follows RunPod's
    DreamBooth endpoint, which renames every training image to
    "<concept_name> (n).ext" and trains with file names as prompts — i.e.
    the concept name becomes each image's prompt.

    Source names are paths relative to `root` when given (e.g. the folder a
    zip was extracted to), else file names. Unusable files and caption files
    are listed in `rejected`. Raises `DatasetError` `no_valid_images` (with
    every file's reason) or `too_many_images` (more than `max_images` usable
    images), leaving `out_dir` as it was.
    """
    if resolution <= 0:
        raise ValueError("resolution must be positive")
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', not {crop!r}")
    by_name = sorted(((_source_name(p, root), p) for p in files), key=lambda item: item[0])
    captions: dict[tuple[Path, str], tuple[str, Path]] = {}
    images: list[tuple[str, Path]] = []
    for name, path in by_name:
        if path.suffix.lower() == CAPTION_SUFFIX:
            captions[(path.parent, path.stem)] = (name, path)
        else:
            images.append((name, path))

    rejected: list[Rejected] = []
    used_captions: set[tuple[Path, str]] = set()
    default_caption = concept_name if concept_name else instance_prompt
    created = _prepare_empty_dir(out_dir)
    prepared: list[PreparedImage] = []
    try:
        for name, path in images:
            key = (path.parent, path.stem)
            caption = default_caption
            if key in captions:
                used_captions.add(key)
                caption_name, caption_path = captions[key]
                try:
                    caption = _read_caption(caption_path) or default_caption
                except _Unusable as exc:
                    rejected.append(Rejected(caption_name, str(exc)))
            target = out_dir / f"{len(prepared):04d}.png"
            try:
                _prepare_one(path, target, name, resolution, crop, seed, max_pixels)
            except _Unusable as exc:
                rejected.append(Rejected(name, str(exc)))
                continue
            prepared.append(PreparedImage(path=target, caption=caption, source_name=name))
            if len(prepared) > max_images:
                # Stop at the first image over the cap: preparing the rest
                # would be work thrown away.
                raise DatasetError(
                    "too_many_images",
                    f"more than {max_images} usable images ({len(images)} image files "
                    f"given); the limit is {max_images} per dataset",
                )
        for key, (caption_name, _) in captions.items():
            if key not in used_captions:
                rejected.append(Rejected(caption_name, "caption file without a matching image"))
        if not prepared:
            shown = "; ".join(f"{r.name}: {r.reason}" for r in rejected[:20])
            more = f" (and {len(rejected) - 20} more)" if len(rejected) > 20 else ""
            raise DatasetError(
                "no_valid_images",
                f"no usable images among {len(images)} image files"
                + (f": {shown}{more}" if shown else ""),
                rejected,
            )
    except BaseException:
        _clear_dir(out_dir, created)
        raise
    rejected.sort(key=lambda r: r.name)
    return PreparedDataset(images=prepared, rejected=rejected)


def _prepare_one(
    path: Path,
    target: Path,
    name: str,
    resolution: int,
    crop: Literal["center", "random"],
    seed: int,
    max_pixels: int,
) -> None:
    """Decode, orient, convert, crop, resize and save one image."""
    with _open_image(path, max_pixels, draft_size=(resolution, resolution)) as (im, _):
        try:
            upright = ImageOps.exif_transpose(im)
        except Exception:
            # Malformed EXIF in an otherwise fine photo: keep it as stored
            # rather than refuse it.
            upright = im
        rgb = _to_rgb(upright)
    # Seeded from the seed and the file's name (str seeds hash with SHA-512,
    # stable across processes), so one file's crop does not depend on which
    # other files were accepted.
    rng = random.Random(f"boothd-crop:{seed}:{name}")
    box = _crop_box(rgb.width, rgb.height, crop, rng)
    square = rgb.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box)
    square.save(target, format="PNG", compress_level=3)
