"""Soak: mixed load on a real `boothd serve` (with its runner) on loopback for N minutes.

Load: job submissions (tiny `image_gen` and, every few, a tiny LoRA
`dreambooth`), GET polls of those jobs and of the job list, SSE subscribers on
`/v1/events`, and a global webhook whose receiver (an aiohttp app in this
process) gets every job event. RSS of the service and of its runner is sampled
after a warm-up and at the end (and printed once a minute).

Last line: {"errors", "p99_ms": {route: ms}, "rss_growth_pct": {"service", "runner"},
"events_appended", "jobs_completed", "webhook_deliveries", "minutes"}.

    python bench/soak.py --minutes 30
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import aiohttp
import psutil
from aiohttp import web
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from service.demo import start_server

ROOT = Path(__file__).resolve().parent.parent

GEN = {"type": "image_gen", "generate": [
    {"prompt": "photo of sks dog", "steps": 2, "width": 64, "height": 64, "seed": 1}]}


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def write_soak_config(folder: Path) -> Path:
    config = folder / "soak.toml"
    config.write_text(
        "[network]\nallow_private_urls = true\n"
        "[webhooks]\nprogress_interval_seconds = 1.0\nretry_schedule_seconds = [0.5, 1.0]\n"
    )
    return config


def _png(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (40 * i % 255, 100, 180)).save(out, "PNG")
    return out.getvalue()


def _rss(pid: int) -> dict[str, int]:
    proc = psutil.Process(pid)
    children = proc.children(recursive=True)
    return {
        "service": proc.memory_info().rss,
        "runner": sum(c.memory_info().rss for c in children),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=1.0)
    args = parser.parse_args()
    deadline = time.monotonic() + args.minutes * 60
    warmup = min(30.0, args.minutes * 60 / 4)
    rng = random.Random(0)
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    job_ids: list[str] = []
    deliveries = 0

    async def receiver(request: web.Request) -> web.Response:
        nonlocal deliveries
        await request.read()
        deliveries += 1
        return web.Response(status=204)

    hook_app = web.Application()
    hook_app.router.add_post("/hook", receiver)
    hook_runner = web.AppRunner(hook_app)
    await hook_runner.setup()
    hook_site = web.TCPSite(hook_runner, "127.0.0.1", 0)
    await hook_site.start()
    hook_port = hook_runner.addresses[0][1]

    with tempfile.TemporaryDirectory(prefix="boothd-soak-") as tmp:
        proc, url = await start_server(
            Path(tmp) / "data", "--config", str(write_soak_config(Path(tmp)))
        )
        async with aiohttp.ClientSession() as session:

            async def call(route: str, method: str, path: str, **kw: object) -> object:
                start = time.perf_counter()
                try:
                    async with session.request(method, url + path, **kw) as resp:  # type: ignore[arg-type]
                        body = await resp.read()
                        if resp.status >= 400:
                            errors.append(f"{route}: {resp.status} {body[:200]!r}")
                            return None
                        return json.loads(body) if body else None
                except Exception as exc:
                    errors.append(f"{route}: {exc!r}")
                    return None
                finally:
                    latencies[route].append((time.perf_counter() - start) * 1000)

            await call("POST /v1/webhooks", "POST", "/v1/webhooks",
                       json={"url": f"http://127.0.0.1:{hook_port}/hook", "events": ["job.*"]})
            form = aiohttp.FormData()
            for i in range(3):
                form.add_field("images", _png(i), filename=f"{i}.png")
            dataset = await call("POST /v1/datasets", "POST", "/v1/datasets", data=form)
            assert isinstance(dataset, dict), errors
            train = {"type": "dreambooth", "train": {
                "dataset_id": dataset["id"], "instance_prompt": "photo of sks dog",
                "steps": 10, "resolution": 64, "lora_rank": 4, "lora_alpha": 4}}

            async def submitter() -> None:
                n = 0
                while time.monotonic() < deadline:
                    n += 1
                    body = train if n % 5 == 0 else GEN
                    job = await call("POST /v1/jobs", "POST", "/v1/jobs", json=body)
                    if isinstance(job, dict):
                        job_ids.append(job["id"])
                    await asyncio.sleep(2.0)

            async def poller() -> None:
                while time.monotonic() < deadline:
                    if job_ids:
                        await call("GET /v1/jobs/{id}", "GET", f"/v1/jobs/{rng.choice(job_ids)}")
                    await call("GET /v1/jobs", "GET", "/v1/jobs?limit=20")
                    await asyncio.sleep(0.05)

            async def subscriber() -> None:
                while time.monotonic() < deadline:
                    try:
                        async with session.get(
                            url + "/v1/events", timeout=aiohttp.ClientTimeout(total=30)
                        ) as resp:
                            async for _ in resp.content:
                                if time.monotonic() > deadline:
                                    return
                    except TimeoutError:
                        continue
                    except Exception as exc:
                        errors.append(f"SSE /v1/events: {exc!r}")
                        await asyncio.sleep(1.0)

            async def sampler() -> dict[str, int]:
                await asyncio.sleep(warmup)
                return _rss(proc.pid)

            async def trajectory() -> None:
                # one line a minute, so growth can be told from warm-up
                started = time.monotonic()
                while time.monotonic() + 60 < deadline:
                    await asyncio.sleep(60)
                    emit(minute=round((time.monotonic() - started) / 60), rss=_rss(proc.pid),
                         errors=len(errors), jobs_submitted=len(job_ids))

            tasks = [asyncio.create_task(t) for t in
                     (submitter(), *(poller() for _ in range(4)),
                      *(subscriber() for _ in range(20)), trajectory())]
            baseline = await sampler()
            await asyncio.gather(*tasks)
            end = _rss(proc.pid)
            # let the queue drain a little, then count what finished
            await asyncio.sleep(5)
            completed = 0
            cursor = ""
            while True:  # count every succeeded job, page by page
                page = await call("GET /v1/jobs", "GET",
                                  f"/v1/jobs?state=succeeded&limit=100{cursor}")
                if not isinstance(page, dict):
                    break
                completed += len(page["jobs"])
                if not page.get("next_cursor"):
                    break
                cursor = f"&cursor={page['next_cursor']}"
            health = await call("GET /healthz", "GET", "/healthz")
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    await hook_runner.cleanup()
    emit(
        errors=len(errors),
        error_samples=errors[:5],
        p99_ms={route: round(statistics.quantiles(v, n=100)[98], 1) if len(v) > 1 else v[0]
                for route, v in sorted(latencies.items())},
        rss_growth_pct={k: round(100 * (end[k] - baseline[k]) / max(1, baseline[k]), 2)
                        for k in end},
        events_appended=health["event_position"] if isinstance(health, dict) else None,
        jobs_completed=completed,
        jobs_submitted=len(job_ids),
        webhook_deliveries=deliveries,
        minutes=args.minutes,
    )


if __name__ == "__main__":
    asyncio.run(main())
