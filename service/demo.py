"""`make demo`: the whole loop on the embedded tiny model, through the real server.

Starts `boothd serve` on a free port with its data in `demo-data/`, makes a
handful of sample images, uploads them, trains a LoRA and generates images
from it in one `dreambooth_image_gen` job (following its progress over SSE),
prints the job, the checkpoint and image paths, and stops the server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from service.client import BoothdClient, describe_results, watch

ROOT = Path(__file__).resolve().parent.parent


def make_sample_images(folder: Path, n: int = 5) -> Path:
    """A few 128×128 pictures of the same 'subject' (a red ball on varied backgrounds)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (128, 128), (60 + 35 * i, 140, 220 - 30 * i))
        draw = ImageDraw.Draw(img)
        x, y = 24 + 8 * i, 30 + 5 * i
        draw.ellipse((x, y, x + 60, y + 60), fill=(210, 30, 30), outline=(90, 0, 0), width=3)
        draw.rectangle((0, 110, 128, 128), fill=(80, 60, 40))
        img.save(folder / f"ball_{i}.png")
    return folder


async def start_server(
    data_dir: Path, *serve_args: str, timeout: float = 120.0
) -> tuple[asyncio.subprocess.Process, str]:
    """Start `boothd serve` on a free loopback port with its data in `data_dir`
    (extra `serve` flags such as `--no-runners` or `--config FILE` appended);
    return the process and its URL once it listens."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "--log-level", "warning", "serve",
        "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", "0", *serve_args,
        stdout=asyncio.subprocess.PIPE,
        env=dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONPATH=str(ROOT)),
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode().strip()
    if not line.startswith("boothd listening on "):
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, line.removeprefix("boothd listening on ")


async def main() -> int:
    data_dir = ROOT / "demo-data"
    images = make_sample_images(data_dir / "sample-images")
    print(f"sample images: {images}")
    proc, url = await start_server(data_dir / "server")
    print(f"server: {url}")
    try:
        async with BoothdClient(url) as client:
            dataset = await client.upload_dataset(images)
            print(f"dataset {dataset['id']}: {dataset['images']} images uploaded")
            job = await client.create_job(
                {
                    "type": "dreambooth_image_gen",
                    "base_model": "tiny-sd15",
                    "train": {
                        "dataset_id": dataset["id"],
                        "instance_prompt": "photo of sks ball",
                        "method": "lora",
                        "steps": 60,
                        "resolution": 64,
                        "lora_rank": 8,
                        "lora_alpha": 8,
                        "learning_rate": 1e-3,
                        "save_checkpoints_at": [30],
                    },
                    "generate": [
                        {"prompt": "photo of sks ball on the moon", "num_images": 2,
                         "seed": 42, "steps": 20, "width": 64, "height": 64},
                    ],
                    "tags": ["demo"],
                }
            )
            print(f"job {job['id']} submitted; training a LoRA on the tiny SD 1.x model")
            job = await watch(client, job["id"], out=sys.stdout)
            for line in describe_results(job, url):
                print(line)
            server_data = data_dir / "server"
            print("files on disk:")
            for folder in ("checkpoints", "images"):
                for path in sorted((server_data / "jobs" / job["id"] / folder).rglob("*")):
                    if path.is_file():
                        print(f"  {path.relative_to(ROOT)}")
            return 0 if job["state"] == "succeeded" else 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await proc.wait()
        print(f"server stopped (exit code {code})")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
