"""Helpers for the HTTP API tests: request bodies, uploads, and a runner stand-in."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient
from PIL import Image

from events.projections import job_stream
from events.store import SQLiteEventStore
from events.types import CheckpointSaved, Event, ImageGenerated, JobStarted, JobSucceeded
from service.keys import PROJECTOR, SETTINGS, STORE

Client = TestClient[web.Request, web.Application]


def data_dir(client: Client) -> Path:
    return client.app[SETTINGS].storage.data_dir


def store(client: Client) -> SQLiteEventStore:
    return client.app[STORE]


def png(color: tuple[int, int, int] = (200, 30, 30), size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zip_form(data: bytes, name: str = "photos.zip") -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", data, filename=name, content_type="application/zip")
    return form


def images_form(files: dict[str, bytes]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, data in files.items():
        form.add_field("images", data, filename=name, content_type="application/octet-stream")
    return form


def train_job(**train: Any) -> dict[str, Any]:
    """A dreambooth job body that needs no upload (the runner would fetch data_url)."""
    return {
        "type": "dreambooth",
        "train": {
            "instance_prompt": "photo of sks dog",
            "data_url": "http://example.com/photos.zip",
            "steps": 10,
            **train,
        },
    }


def gen_job(**params: Any) -> dict[str, Any]:
    return {"type": "image_gen", "generate": [{"prompt": "a red apple", **params}]}


async def submit(
    client: Client, body: dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """POST /v1/jobs expecting 201; the job object."""
    resp = await client.post("/v1/jobs", json=body, headers=headers)
    assert resp.status == 201, await resp.text()
    job: dict[str, Any] = await resp.json()
    return job


async def append_job_events(client: Client, job_id: str, events: list[Event]) -> int:
    """Append to a job's stream at its current version and wait for the read model."""
    st = store(client)
    version = await st.stream_version(job_stream(job_id))
    positions = await st.append(job_stream(job_id), version, events)
    await client.app[PROJECTOR].wait_for(positions[-1])
    return positions[-1]


async def start_job(client: Client, job_id: str) -> None:
    """Stand-in for a runner claiming the job (runners are not started in these tests)."""
    await append_job_events(client, job_id, [JobStarted(runner_id="test-runner", device="cpu")])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def finish_job(
    client: Client,
    job_id: str,
    *,
    checkpoint: bytes | None = b"\x00safetensors-bytes" * 100,
    checkpoint_folder: dict[str, bytes] | None = None,
    image: bytes | None = None,
    tag: str = "a",
) -> dict[str, str]:
    """Stand-in for the runner (not started in these tests): write real artifact files
    under `<data>/jobs/<id>/` and append the events a runner appends for them
    (`JobStarted`, `CheckpointSaved`, `ImageGenerated`, `JobSucceeded`).

    Returns the artifact ids: `checkpoint`, `folder_checkpoint`, `image`.
    """
    root = data_dir(client)
    folder = root / "jobs" / job_id
    folder.mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}
    events: list[Event] = [JobStarted(runner_id="test-runner", device="cpu")]
    if checkpoint is not None:
        path = folder / "checkpoint-10" / "pytorch_lora_weights.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(checkpoint)
        ids["checkpoint"] = f"ckp_{tag}_{job_id[-6:]}"
        events.append(
            CheckpointSaved(
                checkpoint_id=ids["checkpoint"],
                kind="lora",
                step=10,
                format="safetensors",
                path=path.relative_to(root).as_posix(),
                size_bytes=len(checkpoint),
                sha256=sha256(checkpoint),
                final=True,
            )
        )
    if checkpoint_folder is not None:
        model = folder / "model"
        for name, data in checkpoint_folder.items():
            (model / name).parent.mkdir(parents=True, exist_ok=True)
            (model / name).write_bytes(data)
        ids["folder_checkpoint"] = f"ckp_{tag}full_{job_id[-6:]}"
        events.append(
            CheckpointSaved(
                checkpoint_id=ids["folder_checkpoint"],
                kind="full",
                step=10,
                format="diffusers",
                path=model.relative_to(root).as_posix(),
                size_bytes=sum(len(d) for d in checkpoint_folder.values()),
                sha256="f" * 64,
                final=True,
            )
        )
    if image is not None:
        path = folder / "images" / "0.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image)
        ids["image"] = f"img_{tag}_{job_id[-6:]}"
        events.append(
            ImageGenerated(
                image_id=ids["image"],
                prompt="a red apple",
                seed=42,
                width=16,
                height=16,
                format="png",
                path=path.relative_to(root).as_posix(),
                sha256=sha256(image),
                size_bytes=len(image),
            )
        )
    events.append(JobSucceeded())
    await append_job_events(client, job_id, events)
    return ids
