"""Artifact downloads: ETag = sha256, Range, conditional requests, folders, path safety.

The artifacts are written by `helpers.finish_job`, a stand-in for the runner
(no runner runs in these tests): real files on disk and the events a runner
appends for them.
"""

from __future__ import annotations

import io
import zipfile

from events.types import CheckpointSaved, ImageGenerated
from tests.service.conftest import Client
from tests.service.helpers import (
    append_job_events,
    data_dir,
    finish_job,
    png,
    sha256,
    submit,
    train_job,
)

WEIGHTS = bytes(range(256)) * 40  # 10,240 bytes, every offset distinguishable


async def _finished(client: Client, **kwargs: object) -> tuple[str, dict[str, str]]:
    job = await submit(client, train_job())
    ids = await finish_job(client, job["id"], **kwargs)  # type: ignore[arg-type]
    return job["id"], ids


async def test_checkpoint_download_has_length_etag_and_name(app_client: Client) -> None:
    """The file comes whole with Content-Length, ETag = its sha256 and an attachment name."""
    _, ids = await _finished(app_client, checkpoint=WEIGHTS)
    resp = await app_client.get(f"/v1/checkpoints/{ids['checkpoint']}/download")
    assert resp.status == 200
    assert await resp.read() == WEIGHTS
    assert resp.headers["Content-Length"] == str(len(WEIGHTS))
    assert resp.headers["ETag"] == f'"{sha256(WEIGHTS)}"'
    assert resp.headers["Accept-Ranges"] == "bytes"
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert f'filename="{ids["checkpoint"]}.safetensors"' in resp.headers["Content-Disposition"]


async def test_range_requests(app_client: Client) -> None:
    """`Range` gives 206 with the slice and Content-Range; a suffix range and an
    unsatisfiable one behave per RFC 9110."""
    _, ids = await _finished(app_client, checkpoint=WEIGHTS)
    url = f"/v1/checkpoints/{ids['checkpoint']}/download"
    resp = await app_client.get(url, headers={"Range": "bytes=100-299"})
    assert resp.status == 206
    assert await resp.read() == WEIGHTS[100:300]
    assert resp.headers["Content-Range"] == f"bytes 100-299/{len(WEIGHTS)}"
    assert resp.headers["ETag"] == f'"{sha256(WEIGHTS)}"'
    tail = await app_client.get(url, headers={"Range": "bytes=-10"})
    assert tail.status == 206 and await tail.read() == WEIGHTS[-10:]
    beyond = await app_client.get(url, headers={"Range": f"bytes={len(WEIGHTS) + 5}-"})
    assert beyond.status == 416


async def test_conditional_requests_use_the_sha256_etag(app_client: Client) -> None:
    """If-None-Match with the sha256 → 304; with another tag → the file. If-Range with
    the sha256 keeps the range; with another validator the whole file comes. If-Match
    with another tag → 412."""
    _, ids = await _finished(app_client, checkpoint=WEIGHTS)
    url = f"/v1/checkpoints/{ids['checkpoint']}/download"
    etag = f'"{sha256(WEIGHTS)}"'
    cached = await app_client.get(url, headers={"If-None-Match": etag})
    assert cached.status == 304 and cached.headers["ETag"] == etag
    assert await cached.read() == b""
    assert (await app_client.get(url, headers={"If-None-Match": '"other"'})).status == 200
    ranged = await app_client.get(url, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert ranged.status == 206 and await ranged.read() == WEIGHTS[:10]
    stale = await app_client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert stale.status == 200 and await stale.read() == WEIGHTS
    assert (await app_client.get(url, headers={"If-Match": '"other"'})).status == 412
    assert (await app_client.get(url, headers={"If-Match": etag})).status == 200


async def test_image_download(app_client: Client) -> None:
    """An image is served inline with its image content type and sha256 ETag."""
    image = png((9, 9, 9))
    _, ids = await _finished(app_client, checkpoint=None, image=image)
    resp = await app_client.get(f"/v1/images/{ids['image']}")
    assert resp.status == 200
    assert resp.content_type == "image/png"
    assert await resp.read() == image
    assert resp.headers["ETag"] == f'"{sha256(image)}"'
    assert resp.headers["Content-Disposition"].startswith("inline")
    job_doc = await (await app_client.get("/v1/jobs")).json()
    assert job_doc["jobs"][0]["result"]["images"][0]["url"] == f"/v1/images/{ids['image']}"


async def test_folder_checkpoint_comes_as_a_zip(app_client: Client) -> None:
    """A full model saved as a diffusers folder is served as a zip of its files
    (built once, then reused), with range support."""
    files = {"model_index.json": b"{}", "unet/config.json": b'{"a": 1}', "unet/w.bin": WEIGHTS}
    job_id, ids = await _finished(app_client, checkpoint=None, checkpoint_folder=files)
    url = f"/v1/checkpoints/{ids['folder_checkpoint']}/download"
    resp = await app_client.get(url)
    assert resp.status == 200
    body = await resp.read()
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert sorted(zf.namelist()) == sorted(files)
        assert zf.read("unet/w.bin") == WEIGHTS
    assert resp.headers["Content-Disposition"].endswith(f'{ids["folder_checkpoint"]}.zip"')
    again = await app_client.get(url, headers={"Range": "bytes=0-1"})
    assert again.status == 206 and await again.read() == body[:2]
    assert (data_dir(app_client) / "jobs" / job_id / ".downloads").is_dir()


async def test_paths_outside_the_data_folder_are_never_served(app_client: Client) -> None:
    """An artifact whose recorded path leaves the data folder is 404, not served."""
    secret = data_dir(app_client).parent / "outside.txt"
    secret.write_text("not yours")
    job = await submit(app_client, train_job())
    await append_job_events(
        app_client,
        job["id"],
        [
            CheckpointSaved(
                checkpoint_id="ckp_escape",
                kind="lora",
                step=1,
                format="safetensors",
                path="../outside.txt",
                size_bytes=9,
                sha256="0" * 64,
            ),
            ImageGenerated(
                image_id="img_escape",
                prompt="x",
                seed=1,
                width=8,
                height=8,
                format="png",
                path="/etc/hostname",
                sha256="0" * 64,
            ),
        ],
    )
    for url in ("/v1/checkpoints/ckp_escape/download", "/v1/images/img_escape"):
        resp = await app_client.get(url)
        assert resp.status == 404, url
        assert "not yours" not in await resp.text()


async def test_missing_artifacts(app_client: Client) -> None:
    """An unknown id is 404; a recorded file gone from disk is 410 `data_removed`."""
    assert (await app_client.get("/v1/checkpoints/ckp_none/download")).status == 404
    assert (await app_client.get("/v1/images/img_none")).status == 404
    job_id, ids = await _finished(app_client, checkpoint=WEIGHTS)
    for path in (data_dir(app_client) / "jobs" / job_id).rglob("*.safetensors"):
        path.unlink()
    resp = await app_client.get(f"/v1/checkpoints/{ids['checkpoint']}/download")
    assert resp.status == 410
    assert (await resp.json())["error"]["code"] == "data_removed"
