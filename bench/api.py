"""HTTP API benchmark against a real `boothd serve --no-runners` on loopback.

- get_job_rps: GET /v1/jobs/{id}, 32 concurrent clients.
- submit_rps: POST /v1/jobs (dry_run false; no runner, so jobs stay queued).
- sse_fanout_p99_ms: 500 subscribers on /v1/events; time from the POST that
  appends an event to its delivery on each subscriber (p99 over all deliveries).
- sse_rss_per_subscriber_kb: the server's RSS growth with those subscribers ÷ 500.

The server runs in its own process; the client load comes from this one.
Last line is one JSON object with those keys. `--quick` finishes in under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from service.demo import start_server

ROOT = Path(__file__).resolve().parent.parent

JOB = {"type": "image_gen", "generate": [{"prompt": "photo of sks dog", "steps": 2}]}


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def rate(seconds: float, workers: int, call: object) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()  # type: ignore[operator]
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return done / (time.perf_counter() - start)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seconds = 4.0 if args.quick else 15.0
    subscribers = 500
    fanout_events = 10 if args.quick else 40

    with tempfile.TemporaryDirectory(prefix="boothd-bench-api-") as tmp:
        proc, url = await start_server(Path(tmp) / "data", "--no-runners")
        server = psutil.Process(proc.pid)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(f"{url}/v1/jobs", json=JOB) as resp:
                assert resp.status == 201, await resp.text()
                job_id = (await resp.json())["id"]

            async def get_job() -> None:
                async with session.get(f"{url}/v1/jobs/{job_id}") as r:
                    assert r.status == 200
                    await r.read()

            async def submit() -> None:
                async with session.post(f"{url}/v1/jobs", json=JOB) as r:
                    assert r.status == 201
                    await r.read()

            get_rps = await rate(seconds, 32, get_job)
            emit(measure="get_job_rps", value=round(get_rps))
            submit_rps = await rate(seconds, 32, submit)
            emit(measure="submit_rps", value=round(submit_rps))

            rss_before = server.memory_info().rss
            sent: dict[str, float] = {}
            # Arrival times by job id: an event may arrive before its POST answers.
            arrivals: list[tuple[str, float]] = []
            ready = 0
            all_ready = asyncio.Event()

            async def subscriber() -> None:
                nonlocal ready
                async with session.get(
                    f"{url}/v1/events", params={"types": "JobSubmitted"},
                    timeout=aiohttp.ClientTimeout(total=None),
                ) as resp:
                    assert resp.status == 200
                    ready += 1
                    if ready == subscribers:
                        all_ready.set()
                    async for raw in resp.content:
                        if raw.startswith(b"data: "):
                            # Cheap id extraction: the client shares the 2 cores with
                            # the server, and its own parsing would count as latency.
                            at = time.perf_counter()
                            start = raw.index(b'"job_id":"') + 10
                            arrivals.append((raw[start : raw.index(b'"', start)].decode(), at))

            tasks = [asyncio.create_task(subscriber()) for _ in range(subscribers)]
            await asyncio.wait_for(all_ready.wait(), 120)
            await asyncio.sleep(1.0)
            rss_after = server.memory_info().rss
            per_sub_kb = (rss_after - rss_before) / 1024 / subscribers
            emit(measure="sse_rss_per_subscriber_kb", value=round(per_sub_kb, 1))
            for _ in range(fanout_events):
                start = time.perf_counter()
                async with session.post(f"{url}/v1/jobs", json=JOB) as resp:
                    body = await resp.json()
                sent[body["id"]] = start
                await asyncio.sleep(0.3)
            await asyncio.sleep(1.0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        latencies = [(t - sent[job]) * 1000 for job, t in arrivals if job in sent]
        expected = fanout_events * subscribers
        emit(measure="sse_deliveries", value=len(latencies), expected=expected,
             p50_ms=round(statistics.median(latencies), 2))
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    emit(
        get_job_rps=round(get_rps),
        submit_rps=round(submit_rps),
        sse_fanout_p99_ms=round(statistics.quantiles(latencies, n=100)[98], 2),
        sse_rss_per_subscriber_kb=round(per_sub_kb, 1),
        sse_delivered_fraction=round(len(latencies) / expected, 4),
        quick=args.quick,
    )


if __name__ == "__main__":
    asyncio.run(main())
