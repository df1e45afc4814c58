"""The whole loop through the real server: HTTP on loopback, the real SQLite log,
the real runner subprocess and real diffusers code on the tiny SD 1.x model."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from service.demo import make_sample_images, start_server

TRAIN = {
    "instance_prompt": "photo of sks ball", "steps": 6, "resolution": 64,
    "lora_rank": 4, "lora_alpha": 4, "save_checkpoints_at": [3],
}
GEN = {"prompt": "photo of sks ball", "steps": 2, "seed": 11, "width": 64, "height": 64}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    data = tmp_path / "data"
    proc, url = await start_server(data)
    yield url, data
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)


async def _sse_until_terminal(
    session: aiohttp.ClientSession, url: str, job_id: str, last_id: int | None = None
) -> list[tuple[int, str, dict[str, Any]]]:
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    messages: list[tuple[int, str, dict[str, Any]]] = []
    async with session.get(f"{url}/v1/jobs/{job_id}/events", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line == "":
                if "data" in fields:
                    data = json.loads(fields["data"])
                    messages.append((int(fields["id"]), fields["event"], data))
                fields = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                fields[key] = value
    return messages


async def test_upload_train_stream_download_generate(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    """Upload → dreambooth job → SSE until succeeded → checkpoint download whose sha256
    matches the event → image_gen with job:<id> → a PNG; SSE resume is exactly-once."""
    url, _data = server
    images = make_sample_images(tmp_path / "imgs", 3)
    async with aiohttp.ClientSession() as session:
        form = aiohttp.FormData()
        for path in sorted(images.iterdir()):
            form.add_field("images", path.read_bytes(), filename=path.name)
        async with session.post(f"{url}/v1/datasets", data=form) as resp:
            assert resp.status == 201, await resp.text()
            dataset = await resp.json()
        assert dataset["images"] == 3
        body = {"type": "dreambooth", "train": dict(TRAIN, dataset_id=dataset["id"])}
        async with session.post(f"{url}/v1/jobs", json=body) as resp:
            assert resp.status == 201, await resp.text()
            job = await resp.json()
        messages = await _sse_until_terminal(session, url, job["id"])
        kinds = [kind for _, kind, _ in messages]
        assert kinds[0] == "JobSubmitted" and kinds[-1] == "JobSucceeded", kinds
        assert "TrainingProgressed" in kinds and "CheckpointSaved" in kinds
        ids = [i for i, _, _ in messages]
        assert ids == sorted(set(ids))
        # resume from the middle: exactly the later events, once each
        middle = ids[len(ids) // 2]
        resumed = await _sse_until_terminal(session, url, job["id"], last_id=middle)
        assert [i for i, _, _ in resumed] == [i for i in ids if i > middle]

        async with session.get(f"{url}/v1/jobs/{job['id']}") as resp:
            job = await resp.json()
        assert job["state"] == "succeeded" and job["progress"]["percentage"] == 100.0
        final = [c for c in job["result"]["checkpoints"] if c["step"] == 6]
        assert final
        for ckp in final:
            async with session.get(f"{url}{ckp['url']}") as resp:
                assert resp.status == 200
                content = await resp.read()
            assert hashlib.sha256(content).hexdigest() == ckp["sha256"]
            assert len(content) == ckp["size_bytes"]

        gen = {"type": "image_gen", "generate": [dict(GEN, model=f"job:{job['id']}")]}
        async with session.post(f"{url}/v1/jobs", json=gen) as resp:
            assert resp.status == 201, await resp.text()
            gen_job = await resp.json()
        done = await _sse_until_terminal(session, url, gen_job["id"])
        assert done[-1][1] == "JobSucceeded", done[-1]
        async with session.get(f"{url}/v1/jobs/{gen_job['id']}") as resp:
            gen_job = await resp.json()
        image = gen_job["result"]["images"][0]
        assert image["seed"] == 11
        async with session.get(f"{url}{image['url']}") as resp:
            assert resp.status == 200
            png = await resp.read()
        assert Image.open(io.BytesIO(png)).size == (64, 64)


async def test_sigterm_with_a_job_running_exits_cleanly_and_requeues(tmp_path: Path) -> None:
    """SIGTERM while training: SSE streams end, the runner stops at a step boundary, the
    server exits 0, and after a restart the job is queued again (nothing lost)."""
    data = tmp_path / "data"
    proc, url = await start_server(data)
    images = make_sample_images(tmp_path / "imgs", 2)
    async with aiohttp.ClientSession() as session:
        form = aiohttp.FormData()
        for path in sorted(images.iterdir()):
            form.add_field("images", path.read_bytes(), filename=path.name)
        async with session.post(f"{url}/v1/datasets", data=form) as resp:
            dataset = await resp.json()
        body = {"type": "dreambooth", "train": dict(TRAIN, steps=5000, save_checkpoints_at=[],
                                                     dataset_id=dataset["id"])}
        async with session.post(f"{url}/v1/jobs", json=body) as resp:
            job = await resp.json()
        async with asyncio.timeout(120):
            while True:
                async with session.get(f"{url}/v1/jobs/{job['id']}") as resp:
                    state = await resp.json()
                if state["progress"]["step"] > 0:
                    break
                await asyncio.sleep(0.3)
        stream = asyncio.create_task(_sse_until_terminal(session, url, job["id"]))
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        await asyncio.wait_for(stream, 10)  # the stream ended with the server

    proc, url = await start_server(data)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/v1/jobs/{job['id']}") as resp:
                again = await resp.json()
        assert again["state"] in ("queued", "running")
        assert again["attempts"] >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
