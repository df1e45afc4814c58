"""Generate the hostile-input corpus: archives and images built to hurt.

    python tests/hostile/make_corpus.py OUT_DIR

writes every item into OUT_DIR plus `manifest.json`, which states the outcome
each item must have. Tests call `generate(tmp_path)` instead of keeping
binaries in the repository; `build_zip` is the hand-rolled zip writer used
for archives `zipfile` refuses to write (raw name bytes, forged flags, lying
sizes, shared data).

Manifest entries (`ManifestEntry`):

- kind "zip", expect "error": `safe_extract_zip` raises `DatasetError` with
  `code`.
- kind "zip", expect "extract": it succeeds; `extracted` lists the files
  written (POSIX paths relative to the destination) and `rejected` maps
  member names to a fragment of the reason.
- kind "image", expect "rejected": `validate_image` returns a reason
  containing `reason_contains`; expect "accepted": it returns `ImageInfo`
  with `format`.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

from PIL import Image, ImageDraw

# Small enough to build in well under a second, large enough that the ratio
# (~1000×) is far past the default cap of 200×.
BOMB_BYTES = 8 * 1024 * 1024
# One more member than the default `max_zip_members`.
MANY_MEMBERS = 1001


class ManifestEntry(TypedDict):
    """The expected outcome for one corpus file."""

    file: str
    kind: str  # "zip" | "image"
    expect: str  # "error" | "extract" | "rejected" | "accepted"
    why: str
    code: NotRequired[str]
    extracted: NotRequired[list[str]]
    rejected: NotRequired[dict[str, str]]
    reason_contains: NotRequired[str]
    format: NotRequired[str]


@dataclass
class RawMember:
    """One entry for `build_zip`; every field an attacker controls is here."""

    name: bytes
    data: bytes = b""
    method: int = 0  # 0 stored, 8 deflate
    flags: int = 0
    external_attr: int = 0
    create_system: int = 3  # 3 = Unix, so external_attr's high half is a mode
    crc: int | None = None  # default: the real CRC of `data`
    file_size: int | None = None  # declared uncompressed size; default: real
    compress_size: int | None = None  # declared compressed size; default: real
    central_name: bytes | None = None  # name in the central directory, if different
    payload: bytes | None = None  # stored bytes as written; default: `data` compressed
    version_needed: int = 20  # "version needed to extract" (×10: 20 = 2.0)
    share_offset_with: int | None = None  # index of an earlier member whose local
    # header this central entry points at (overlapping entries); no local
    # header of its own is written


def _compress(data: bytes, method: int) -> bytes:
    if method == 8:
        packer = zlib.compressobj(9, zlib.DEFLATED, -15)
        return packer.compress(data) + packer.flush()
    return data


def build_zip(members: list[RawMember], *, comment: bytes = b"", cd_offset_delta: int = 0) -> bytes:
    """Write a zip byte for byte as told, however wrong that is.

    `cd_offset_delta` is added to the central directory offset recorded in the
    end record (a lie that shifts every member's computed position).
    """
    out = io.BytesIO()
    offsets: list[int] = []
    central: list[bytes] = []
    for member in members:
        payload = (
            _compress(member.data, member.method) if member.payload is None else member.payload
        )
        crc = zlib.crc32(member.data) if member.crc is None else member.crc
        usize = len(member.data) if member.file_size is None else member.file_size
        csize = len(payload) if member.compress_size is None else member.compress_size
        if member.share_offset_with is not None:
            offset = offsets[member.share_offset_with]
        else:
            offset = out.tell()
            out.write(
                struct.pack(
                    "<4sHHHHHLLLHH",
                    b"PK\x03\x04",
                    member.version_needed,
                    member.flags,
                    member.method,
                    0,
                    0x21,
                    crc,
                    csize,
                    usize,
                    len(member.name),
                    0,
                )
            )
            out.write(member.name)
            out.write(payload)
        offsets.append(offset)
        name = member.name if member.central_name is None else member.central_name
        central.append(
            struct.pack(
                "<4sHHHHHHLLLHHHHHLL",
                b"PK\x01\x02",
                (member.create_system << 8) | 20,
                member.version_needed,
                member.flags,
                member.method,
                0,
                0x21,
                crc,
                csize,
                usize,
                len(name),
                0,
                0,
                0,
                0,
                member.external_attr,
                offset,
            )
            + name
        )
    cd_start = out.tell()
    for entry in central:
        out.write(entry)
    cd_size = out.tell() - cd_start
    out.write(
        struct.pack(
            "<4sHHHHLLH",
            b"PK\x05\x06",
            0,
            0,
            len(central),
            len(central),
            cd_size,
            cd_start + cd_offset_delta,
            len(comment),
        )
    )
    out.write(comment)
    return out.getvalue()


def png_bytes(size: tuple[int, int] = (8, 8), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A small valid PNG."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def noise_jpeg(size: tuple[int, int] = (96, 64), seed: int = 1) -> bytes:
    """A JPEG of deterministic noise (noise so that truncation loses real data)."""
    import random

    rng = random.Random(seed)
    im = Image.frombytes(
        "RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3))
    )
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares `width`×`height` with a token IDAT.

    Decoding it would need width×height×3 bytes; a validator must refuse it
    from the header alone.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">L", len(body))
            + kind
            + body
            + struct.pack(">L", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">LLBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _gif_bytes(frames: int) -> bytes:
    """A GIF of `frames` distinct frames (identical frames would be merged)."""
    images = []
    for i in range(frames):
        im = Image.new("RGB", (16, 16), (255, 255, 255))
        ImageDraw.Draw(im).rectangle((i * 4, 0, i * 4 + 3, 15), fill=(255, 0, 0))
        images.append(im.convert("P"))
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=frames > 1, append_images=images[1:], duration=50)
    return buf.getvalue()


def _zip_items(ok_png: bytes) -> list[tuple[str, bytes, ManifestEntry]]:
    items: list[tuple[str, bytes, ManifestEntry]] = []

    def add(name: str, data: bytes, entry: dict[str, Any]) -> None:
        items.append((name, data, cast(ManifestEntry, {"file": name, "kind": "zip", **entry})))

    add(
        "zip_slip.zip",
        build_zip(
            [
                RawMember(b"../evil.png", ok_png),
                RawMember(b"a/../../evil2.png", ok_png),
                RawMember(b"sub/../../../../../../tmp/evil3.png", ok_png),
                RawMember(b"ok.png", ok_png),
            ]
        ),
        {
            "expect": "extract",
            "why": "'..' components would write outside the destination",
            "extracted": ["ok.png"],
            "rejected": {
                "../evil.png": "zip slip",
                "a/../../evil2.png": "zip slip",
                "sub/../../../../../../tmp/evil3.png": "zip slip",
            },
        },
    )
    add(
        "absolute_paths.zip",
        build_zip(
            [
                RawMember(b"/tmp/boothd-corpus-evil.png", ok_png),
                RawMember(b"C:/evil.png", ok_png),
                RawMember(b"C:\\evil.png", ok_png),
                RawMember(b"\\\\server\\share\\evil.png", ok_png),
                RawMember(b"..\\..\\evil.png", ok_png),
                RawMember(b"fine/ok.png", ok_png),
            ]
        ),
        {
            "expect": "extract",
            "why": "absolute, drive-letter and backslash paths are ways out",
            "extracted": ["fine/ok.png"],
            "rejected": {
                "/tmp/boothd-corpus-evil.png": "absolute path",
                "C:/evil.png": "drive letter",
                "C:\\evil.png": "backslash",
                "\\\\server\\share\\evil.png": "backslash",
                "..\\..\\evil.png": "backslash",
            },
        },
    )
    add(
        "symlink.zip",
        build_zip(
            [
                RawMember(b"link.png", b"/etc/passwd", external_attr=0o120777 << 16),
                RawMember(b"dir/link.txt", b"../../../../root", external_attr=0o120777 << 16),
                RawMember(b"fifo.png", b"", external_attr=0o010644 << 16),
                RawMember(b"real.png", ok_png, external_attr=0o100644 << 16),
            ]
        ),
        {
            "expect": "extract",
            "why": "a symlink member followed later would write anywhere",
            "extracted": ["real.png"],
            "rejected": {
                "link.png": "symbolic link",
                "dir/link.txt": "symbolic link",
                "fifo.png": "not a regular file",
            },
        },
    )
    add(
        "bomb_ratio.zip",
        build_zip([RawMember(b"zeros.png", bytes(BOMB_BYTES), method=8)]),
        {
            "expect": "error",
            "code": "zip_bomb",
            "why": f"{BOMB_BYTES:,} zero bytes deflate ~1000:1",
        },
    )
    add(
        "bomb_members.zip",
        build_zip([RawMember(f"f{i}.txt".encode()) for i in range(MANY_MEMBERS)]),
        {
            "expect": "error",
            "code": "too_many_files",
            "why": "more members than max_zip_members",
        },
    )
    add(
        "overlap_same_offset.zip",
        build_zip(
            [
                RawMember(b"a.png", bytes(4096), method=8),
                RawMember(b"b.png", bytes(4096), method=8, share_offset_with=0),
                RawMember(b"c.png", bytes(4096), method=8, share_offset_with=0),
            ]
        ),
        {
            "expect": "error",
            "code": "zip_bomb",
            "why": "entries sharing one local file: the overlapping zip-bomb layout",
        },
    )
    first_len = len(_compress(bytes(1000), 8))
    add(
        "overlap_into_next.zip",
        build_zip(
            [
                RawMember(b"a.png", bytes(1000), method=8, compress_size=first_len + 40),
                RawMember(b"b.png", ok_png),
            ]
        ),
        {
            "expect": "error",
            "code": "zip_bomb",
            "why": "a member's data runs into the next member's header",
        },
    )
    add(
        "duplicates.zip",
        build_zip(
            [
                RawMember(b"a.png", ok_png),
                RawMember(b"a.png", png_bytes(color=(0, 0, 255))),
                RawMember(b"A.PNG", ok_png),
                RawMember(b"x.png", ok_png),
                RawMember(b"x.png/y.png", ok_png),
            ]
        ),
        {
            "expect": "extract",
            "why": "a second entry of the same name must not replace the first",
            "extracted": ["a.png", "x.png"],
            "rejected": {"a.png": "duplicate", "A.PNG": "duplicate", "x.png/y.png": "conflicts"},
        },
    )
    add(
        "encrypted_member.zip",
        build_zip(
            [
                RawMember(b"secret.png", bytes(12) + ok_png, flags=0x1),
                RawMember(b"aes.png", ok_png, method=99),
                RawMember(b"plain.png", ok_png),
            ]
        ),
        {
            "expect": "extract",
            "why": "encrypted members cannot be read; the rest of the archive can",
            "extracted": ["plain.png"],
            "rejected": {"secret.png": "encrypted", "aes.png": "encrypted"},
        },
    )
    add(
        "encrypted_all.zip",
        build_zip(
            [
                RawMember(b"secret1.png", bytes(12) + ok_png, flags=0x1),
                RawMember(b"secret2.png", bytes(12) + ok_png, flags=0x1),
                RawMember(b"secret1.txt", b"a caption left unencrypted"),
            ]
        ),
        {
            "expect": "error",
            "code": "encrypted_zip",
            "why": "every image is encrypted: a password-protected archive",
        },
    )
    add(
        "non_utf8_names.zip",
        build_zip(
            [
                RawMember(b"caf\xe9.png", ok_png),  # Latin-1, no UTF-8 flag
                RawMember("写真.png".encode(), ok_png),  # UTF-8 without the flag
                RawMember("ümlaut.png".encode(), ok_png, flags=0x800),
            ]
        ),
        {
            "expect": "extract",
            "why": "a name in an unknown code page cannot be written faithfully",
            "extracted": ["ümlaut.png", "写真.png"],
            "rejected": {"caf\\xe9.png": "not valid UTF-8"},
        },
    )
    add(
        "non_utf8_flagged.zip",
        build_zip([RawMember(b"bad\xff\xfe.png", ok_png, flags=0x800)]),
        {
            "expect": "error",
            "code": "invalid_zip",
            "why": "a name flagged UTF-8 that is not: zipfile cannot even list it",
        },
    )
    add(
        "control_chars.zip",
        build_zip([RawMember(b"new\nline.png", ok_png), RawMember(b"ok.png", ok_png)]),
        {
            "expect": "extract",
            "why": "control characters in names break logs and terminals",
            "extracted": ["ok.png"],
            "rejected": {"new\\nline.png": "control characters"},
        },
    )
    add(
        "junk.zip",
        build_zip(
            [
                RawMember(b"photos/"),
                RawMember(b"photos/a.png", ok_png),
                RawMember(b"photos/a.txt", b"photo of sks dog"),
                RawMember(b"__MACOSX/photos/._a.png", b"\x00\x05\x16\x07"),
                RawMember(b"photos/.DS_Store", b"\x00\x00\x00\x01Bud1"),
                RawMember(b"photos/Thumbs.db", b"junk"),
                RawMember(b"photos/notes.pdf", b"%PDF-1.4"),
                RawMember(b"inner.zip", build_zip([RawMember(b"x.png", ok_png)])),
            ]
        ),
        {
            "expect": "extract",
            "why": "folders and OS junk are skipped silently; other types reported",
            "extracted": ["photos/a.png", "photos/a.txt"],
            "rejected": {"photos/notes.pdf": "not an image", "inner.zip": "not an image"},
        },
    )
    add(
        "corrupt_member.zip",
        build_zip(
            [
                RawMember(b"bad_crc.png", ok_png, crc=0xDEADBEEF),
                RawMember(b"bad_deflate.png", ok_png, method=8, payload=b"\xff" * 64),
                RawMember(b"unsupported.png", ok_png, method=9),
                RawMember(b"good.png", ok_png),
            ]
        ),
        {
            "expect": "extract",
            "why": "one damaged member does not sink the archive",
            "extracted": ["good.png"],
            "rejected": {
                "bad_crc.png": "corrupt",
                "bad_deflate.png": "corrupt",
                "unsupported.png": "compression method",
            },
        },
    )
    add(
        "lying_size.zip",
        build_zip([RawMember(b"big.png", bytes(4 * 1024 * 1024), method=8, file_size=64)]),
        {
            "expect": "extract",
            "why": "a declared size smaller than the data: output stops there, CRC fails",
            "extracted": [],
            "rejected": {"big.png": "corrupt"},
        },
    )
    add(
        "forged_version.zip",
        build_zip([RawMember(b"a.png", ok_png, version_needed=190)]),
        {
            "expect": "error",
            "code": "invalid_zip",
            "why": "'version needed' 19.0: zipfile refuses to list it",
        },
    )
    add(
        "negative_offset.zip",
        build_zip([RawMember(b"a.png", ok_png), RawMember(b"b.png", ok_png)], cd_offset_delta=64),
        {
            "expect": "error",
            "code": "invalid_zip",
            "why": "a lying directory offset puts members before the file's start",
        },
    )
    add(
        "not_a_zip.zip",
        b"this is not a zip archive at all\n" * 10,
        {"expect": "error", "code": "invalid_zip", "why": "no zip structure"},
    )
    whole = build_zip([RawMember(b"a.png", ok_png), RawMember(b"b.png", ok_png)])
    add(
        "truncated.zip",
        whole[: len(whole) // 2],
        {"expect": "error", "code": "invalid_zip", "why": "cut in half: no directory"},
    )
    return items


def _image_items() -> list[tuple[str, bytes, ManifestEntry]]:
    items: list[tuple[str, bytes, ManifestEntry]] = []

    def add(name: str, data: bytes, entry: dict[str, Any]) -> None:
        items.append((name, data, cast(ManifestEntry, {"file": name, "kind": "image", **entry})))

    jpeg = noise_jpeg()
    ppm = io.BytesIO()
    Image.new("RGB", (8, 8)).save(ppm, format="PPM")
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, format="ICO")
    gif = _gif_bytes(1)
    add(
        "bomb_header.png",
        png_header_only(100_000, 100_000),
        {
            "expect": "rejected",
            "reason_contains": "pixels",
            "why": "IHDR declares 10^10 pixels (Pillow's bomb error)",
        },
    )
    add(
        "bomb_warning.png",
        png_header_only(10_000, 10_000),
        {
            "expect": "rejected",
            "reason_contains": "pixels",
            "why": "10^8 pixels: above Pillow's warning threshold, below its error",
        },
    )
    add(
        "over_cap.png",
        png_header_only(8_000, 6_000),
        {
            "expect": "rejected",
            "reason_contains": "8000×6000",
            "why": "48 MP: under Pillow's limits, over max_image_pixels (40 MP)",
        },
    )
    add(
        "truncated.jpg",
        jpeg[: len(jpeg) * 6 // 10],
        {"expect": "rejected", "reason_contains": "truncated", "why": "cut at 60%"},
    )
    png = png_bytes((64, 64))
    add(
        "truncated.png",
        png[: len(png) - 30],
        {"expect": "rejected", "reason_contains": "PNG", "why": "IDAT/IEND cut off"},
    )
    add(
        "empty.jpg",
        b"",
        {"expect": "rejected", "reason_contains": "empty", "why": "0 bytes"},
    )
    add(
        "polyglot_ppm.png",
        ppm.getvalue(),
        {
            "expect": "rejected",
            "reason_contains": "not a supported image",
            "why": "Pillow opens PPM, but it is not a supported format",
        },
    )
    add(
        "polyglot_ico.jpg",
        ico.getvalue(),
        {
            "expect": "rejected",
            "reason_contains": "not a supported image",
            "why": "an ICO named .jpg",
        },
    )
    add(
        "eps.jpg",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        {
            "expect": "rejected",
            "reason_contains": "not a supported image",
            "why": "EPS would hand the file to Ghostscript",
        },
    )
    add(
        "html.png",
        b"<html><script>alert(1)</script></html>",
        {"expect": "rejected", "reason_contains": "not a supported image", "why": "text"},
    )
    add(
        "fake_png_header.png",
        b"\x89PNG\r\n\x1a\n" + b"garbage" * 20,
        {
            "expect": "rejected",
            "reason_contains": "not a valid PNG",
            "why": "right magic, no IHDR",
        },
    )
    animated = _gif_bytes(3)
    second_frame = animated.index(b"\x21\xf9\x04", animated.index(b"\x21\xf9\x04") + 1)
    add(
        "gif_truncated_second_frame.gif",
        # Cut inside the second frame's image descriptor: the first frame is
        # whole, but asking whether the GIF is animated parses the broken one.
        animated[: second_frame + 8 + 5],
        {
            "expect": "rejected",
            "reason_contains": "corrupt or truncated GIF",
            "why": "a damaged later frame",
        },
    )
    add(
        "gifar.gif",
        gif + build_zip([RawMember(b"payload.class", b"\xca\xfe\xba\xbe")]),
        {
            "expect": "accepted",
            "format": "GIF",
            "why": "GIF+JAR polyglot: the GIF is fine; re-encoding drops the payload",
        },
    )
    add(
        "animated.gif",
        _gif_bytes(3),
        {"expect": "accepted", "format": "GIF", "why": "first frame is used"},
    )
    add("ok.jpg", jpeg, {"expect": "accepted", "format": "JPEG", "why": "control"})
    add("ok.png", png, {"expect": "accepted", "format": "PNG", "why": "control"})
    webp = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(webp, format="WEBP")
    add("ok.webp", webp.getvalue(), {"expect": "accepted", "format": "WEBP", "why": "control"})
    bmp = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(bmp, format="BMP")
    add("ok.bmp", bmp.getvalue(), {"expect": "accepted", "format": "BMP", "why": "control"})
    return items


def generate(dest: Path) -> list[ManifestEntry]:
    """Write every corpus item and `manifest.json` into `dest`; return the manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    manifest: list[ManifestEntry] = []
    for name, data, entry in _zip_items(png_bytes()) + _image_items():
        (dest / name).write_bytes(data)
        manifest.append(entry)
    (dest / "manifest.json").write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return manifest


def main(argv: list[str]) -> int:
    """Command line: `make_corpus.py OUT_DIR`."""
    if len(argv) != 1:
        print("usage: make_corpus.py OUT_DIR", file=sys.stderr)
        return 2
    manifest = generate(Path(argv[0]))
    print(f"wrote {len(manifest)} items and manifest.json to {argv[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
