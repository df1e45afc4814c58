"""POST /v1/datasets: streamed uploads under a size cap, hostile archives, per-file reasons."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from service.uploads import _safe_name
from tests.hostile.make_corpus import ManifestEntry, generate
from tests.service.conftest import Client, ClientFactory
from tests.service.helpers import data_dir, images_form, png, store, zip_form, zip_of


def _leftovers(client: Client) -> list[Path]:
    """Every file in the upload areas of the data folder, and any staging folder."""
    root = data_dir(client)
    files = [p for area in ("datasets", "tmp") for p in (root / area).rglob("*") if p.is_file()]
    return files + list((root / "datasets").glob("*")) + list((root / "tmp/uploads").glob("*"))


async def _error(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    error: dict[str, Any] = (await resp.json())["error"]
    return error


def _form_field(name: str, data: bytes) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field(name, data, filename="x.bin")
    return form


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ManifestEntry]]:
    """The hostile-input corpus (tests/hostile/make_corpus.py), built once."""
    folder = tmp_path_factory.mktemp("corpus")
    return folder, generate(folder)


async def test_zip_upload_stores_usable_images_and_captions(app_client: Client) -> None:
    """A zip becomes `<data>/datasets/<id>/` holding its usable images and their
    captions; unusable files are listed with reasons; DatasetUploaded is appended."""
    archive = zip_of(
        {
            "dog/1.png": png((1, 2, 3)),
            "dog/1.txt": b"photo of sks dog on grass",
            "dog/2.png": png((4, 5, 6)),
            "dog/broken.png": b"\x89PNG\r\n\x1a\nnot really",
            "orphan.txt": b"no image",
            "notes.pdf": b"%PDF-1.4",
        }
    )
    resp = await app_client.post("/v1/datasets", data=zip_form(archive))
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body["id"].startswith("ds_")
    assert body["images"] == 2
    reasons = {r["name"]: r["reason"] for r in body["rejected"]}
    assert set(reasons) == {"dog/broken.png", "orphan.txt", "notes.pdf"}
    assert "caption" in reasons["orphan.txt"]
    folder = data_dir(app_client) / "datasets" / body["id"]
    stored = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert stored == ["dog/1.png", "dog/1.txt", "dog/2.png"]
    assert body["bytes"] == sum((folder / name).stat().st_size for name in stored)
    (event,) = await store(app_client).read_stream(f"dataset-{body['id']}")
    assert event.event.type == "DatasetUploaded"
    assert event.event.path == f"datasets/{body['id']}" and event.event.images == 2
    assert not [p for p in (data_dir(app_client) / "tmp").rglob("*") if p.is_file()]


async def test_image_upload_checks_each_file(app_client: Client) -> None:
    """Several `images` parts: each is checked by content; bad names, unknown
    extensions and duplicates are rejected without being stored."""
    form = images_form(
        {
            "a.png": png(),
            "a.txt": b"caption for a",
            "b.jpg": b"not a jpeg",
            "c.exe": b"MZ",
            "A.PNG": png(),
            "../evil.png": png(),
        }
    )
    resp = await app_client.post("/v1/datasets", data=form)
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body["images"] == 1
    reasons = {r["name"]: r["reason"] for r in body["rejected"]}
    assert "b.jpg" in reasons and "c.exe" in reasons and "A.PNG" in reasons
    # aiohttp's client percent-encodes the slash; the name then starts with a dot.
    assert any("evil" in name for name in reasons)
    folder = data_dir(app_client) / "datasets" / body["id"]
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == ["a.png", "a.txt"]
    assert not [p for p in data_dir(app_client).parent.rglob("*") if "evil" in p.name]


@pytest.mark.parametrize(
    ("raw", "safe"),
    [
        ("../evil.png", "evil.png"),
        ("C:\\photos\\dog.jpg", "dog.jpg"),
        ("dir/sub/a.png", "a.png"),
        (".hidden.png", None),
        ("new\nline.png", None),
        ("", None),
        ("x" * 300 + ".png", None),
    ],
)
def test_client_file_names_become_safe_base_names(raw: str, safe: str | None) -> None:
    """Only the base name of a client's file name is used, and only when it is a
    plain, visible name (a file name never places a file anywhere)."""
    assert _safe_name(raw) == safe


@pytest.mark.parametrize(
    ("form", "status", "code"),
    [
        (zip_form(b"PK\x03\x04 but not really a zip"), 415, "invalid_zip"),
        (zip_form(zip_of({"x.txt": b"only text"})), 422, "no_valid_images"),
        (images_form({"x.png": b"garbage"}), 422, "no_valid_images"),
        (_form_field("name", b"x"), 422, "invalid_upload"),
    ],
)
async def test_refused_uploads_leave_nothing_behind(
    app_client: Client, form: aiohttp.FormData, status: int, code: str
) -> None:
    """A refused upload answers a stable code and leaves no file in the data folder
    and no event in the log."""
    error = await _error(await app_client.post("/v1/datasets", data=form), status)
    assert error["code"] == code
    assert _leftovers(app_client) == []
    assert await store(app_client).head() == 0


async def test_no_valid_images_lists_every_reason(app_client: Client) -> None:
    """`no_valid_images` carries the per-file reasons in `error.rejected`."""
    resp = await app_client.post("/v1/datasets", data=images_form({"x.png": b"", "y.gif": b"GIF"}))
    error = await _error(resp, 422)
    assert {r["name"] for r in error["rejected"]} == {"x.png", "y.gif"}


async def test_form_shape_errors(app_client: Client) -> None:
    """Not multipart → 415; both a zip and images → 422; an empty form → 422 `no_files`."""
    resp = await app_client.post("/v1/datasets", json={"file": "x"})
    assert (await _error(resp, 415))["code"] == "unsupported_media_type"
    form = zip_form(zip_of({"a.png": png()}))
    form.add_field("images", png(), filename="b.png")
    assert (await _error(await app_client.post("/v1/datasets", data=form), 422))[
        "code"
    ] == "invalid_upload"
    empty = aiohttp.FormData()
    empty.add_field("file", b"", filename="x.zip")
    # An empty zip part is still a zip: refused as not a zip archive.
    assert (await _error(await app_client.post("/v1/datasets", data=empty), 415))[
        "code"
    ] == "invalid_zip"
    assert _leftovers(app_client) == []


async def test_too_many_images_is_422(make_client: ClientFactory) -> None:
    """More usable images than `limits.max_images_per_dataset` → 422 `too_many_images`."""
    client = await make_client(limits={"max_images_per_dataset": 2})
    archive = zip_of({f"{i}.png": png((i, i, i)) for i in range(3)})
    error = await _error(await client.post("/v1/datasets", data=zip_form(archive)), 422)
    assert error["code"] == "too_many_images"
    assert _leftovers(client) == []


async def test_hostile_zip_corpus(
    app_client: Client, corpus: tuple[Path, list[ManifestEntry]]
) -> None:
    """Every archive of the hostile corpus is refused with its code, or stored with
    its bad members rejected (with the reason); nothing is ever written outside
    the dataset's own folder, and a refusal leaves nothing at all."""
    folder, manifest = corpus
    root = data_dir(app_client)
    for entry in (e for e in manifest if e["kind"] == "zip"):
        data = (folder / entry["file"]).read_bytes()
        resp = await app_client.post("/v1/datasets", data=zip_form(data, entry["file"]))
        body = await resp.json()
        name = entry["file"]
        if entry["expect"] == "error":
            assert resp.status in (415, 422), (name, body)
            assert body["error"]["code"] == entry["code"], (name, body)
            continue
        if resp.status == 201:
            rejected = {r["name"]: r["reason"] for r in body["rejected"]}
            stored = root / "datasets" / body["id"]
            files = {p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file()}
            assert files <= set(entry.get("extracted", [])), (name, files)
        else:
            assert body["error"]["code"] == "no_valid_images", (name, body)
            rejected = {r["name"]: r["reason"] for r in body["error"]["rejected"]}
        for member, fragment in entry.get("rejected", {}).items():
            assert fragment in rejected.get(member, ""), (name, member, rejected)
    outside = [p for p in root.rglob("*") if "evil" in p.name]
    assert outside == []
    assert not [p for p in (root / "tmp").rglob("*") if p.is_file()]
    assert not Path("/tmp/boothd-corpus-evil.png").exists()


async def test_hostile_image_corpus(
    app_client: Client, corpus: tuple[Path, list[ManifestEntry]]
) -> None:
    """Uploaded as `images`: every hostile image is rejected with its reason and
    every control image is stored."""
    folder, manifest = corpus
    images = [e for e in manifest if e["kind"] == "image"]
    form = images_form({e["file"]: (folder / e["file"]).read_bytes() for e in images})
    resp = await app_client.post("/v1/datasets", data=form)
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    rejected = {r["name"]: r["reason"] for r in body["rejected"]}
    accepted = [e["file"] for e in images if e["expect"] == "accepted"]
    assert body["images"] == len(accepted)
    for entry in images:
        if entry["expect"] == "rejected":
            assert entry["reason_contains"] in rejected[entry["file"]], entry
    stored = data_dir(app_client) / "datasets" / body["id"]
    assert sorted(p.name for p in stored.rglob("*")) == sorted(accepted)


# ------------------------------------------------------------------ size cap


async def _raw_request(client: Client, head: str, body_parts: list[bytes]) -> bytes:
    """Send a request head and body parts on a raw connection, then read the status
    line while the connection is still open (the rest of the body is never sent)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head.encode())
        for part in body_parts:
            writer.write(part)
            await writer.drain()
        async with asyncio.timeout(10):
            status_line = await reader.readline()
            response = status_line + await reader.read(4096)
    finally:
        writer.close()
    return response


async def test_declared_oversize_is_413_before_the_body(make_client: ClientFactory) -> None:
    """A Content-Length over `limits.max_upload_bytes` is answered 413 at once: the
    server does not wait for a body it will refuse."""
    client = await make_client(limits={"max_upload_bytes": 100_000})
    head = (
        "POST /v1/datasets HTTP/1.1\r\nHost: test\r\n"
        "Content-Type: multipart/form-data; boundary=XyZ\r\n"
        f"Content-Length: {10 * 1024 * 1024}\r\n\r\n"
    )
    response = await _raw_request(client, head, [])
    assert response.startswith(b"HTTP/1.1 413"), response[:100]
    assert b'"payload_too_large"' in response
    assert _leftovers(client) == []


async def test_streamed_oversize_is_413_while_reading(make_client: ClientFactory) -> None:
    """A chunked upload (no Content-Length) is cut off with 413 as soon as the parts
    pass the cap, while the client is still sending; the partial file is removed."""
    limit = 100_000
    client = await make_client(limits={"max_upload_bytes": limit})
    head = (
        "POST /v1/datasets HTTP/1.1\r\nHost: test\r\n"
        "Content-Type: multipart/form-data; boundary=XyZ\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    part_head = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="big.zip"\r\n'
        b"Content-Type: application/zip\r\n\r\n"
    )

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    parts = [chunk(part_head)] + [chunk(b"\0" * 16384) for _ in range(16)]
    # 256 KiB sent of a body that never ends: no terminating chunk, no closing boundary.
    response = await _raw_request(client, head, parts)
    assert response.startswith(b"HTTP/1.1 413"), response[:100]
    assert b'"payload_too_large"' in response
    await asyncio.sleep(0.05)
    assert _leftovers(client) == []


async def test_upload_within_limit_after_refusals(make_client: ClientFactory) -> None:
    """The cap counts one upload only: a small upload after a refused one succeeds."""
    client = await make_client(limits={"max_upload_bytes": 50_000})
    big = images_form({"a.png": png(size=16), "b.png": b"\0" * 60_000})
    assert (await _error(await client.post("/v1/datasets", data=big), 413))[
        "code"
    ] == "payload_too_large"
    ok = await client.post("/v1/datasets", data=images_form({"a.png": png()}))
    assert ok.status == 201
    listing = json.loads(await ok.text())
    assert listing["images"] == 1
