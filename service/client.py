"""A small HTTP client for boothd, used by the CLI commands and the demo.

It speaks only the public API (API.md): uploads, jobs, server-sent events
(resuming with `Last-Event-ID` after a dropped connection) and downloads.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

TERMINAL_EVENTS = frozenset({"JobSucceeded", "JobFailed", "JobCanceled"})
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


class ClientError(Exception):
    """The server answered with an error (API.md error body) or could not be reached."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        where = f" (field {field})" if field else ""
        super().__init__(f"{status} {code}: {message}{where}")
        self.status = status
        self.code = code


@dataclass
class SseMessage:
    id: int | None
    event: str
    data: dict[str, Any]


class BoothdClient:
    """An authenticated session against one boothd server."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session = aiohttp.ClientSession(headers=headers)

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> BoothdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _json(self, resp: aiohttp.ClientResponse) -> Any:
        body = await resp.json(content_type=None)
        if resp.status >= 400:
            err = (body or {}).get("error", {}) if isinstance(body, dict) else {}
            raise ClientError(
                resp.status, err.get("code", "error"), err.get("message", str(body)),
                err.get("field"),
            )
        return body

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            async with self._session.request(method, self.url + path, **kwargs) as resp:
                return await self._json(resp)
        except aiohttp.ClientConnectionError as exc:
            raise ClientError(0, "unreachable", f"cannot reach {self.url}: {exc}") from None

    async def upload_dataset(self, path: Path) -> dict[str, Any]:
        """Upload a zip file, or every image (and caption .txt) in a folder."""
        form = aiohttp.FormData()
        handles = []
        try:
            if path.is_dir():  # noqa: ASYNC240 - a local CLI, listing a folder is instant
                files = sorted(
                    p for p in path.iterdir()  # noqa: ASYNC240
                    if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or p.suffix == ".txt")
                )
                if not files:
                    raise ClientError(0, "no_images", f"no images found in {path}")
                for file in files:
                    handle = file.open("rb")
                    handles.append(handle)
                    form.add_field("images", handle, filename=file.name)
            else:
                handle = path.open("rb")
                handles.append(handle)
                form.add_field("file", handle, filename=path.name, content_type="application/zip")
            result: dict[str, Any] = await self.request("POST", "/v1/datasets", data=form)
            return result
        finally:
            for handle in handles:
                handle.close()

    async def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("POST", "/v1/jobs", json=body)
        return result

    async def get_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/v1/jobs/{job_id}")
        return result

    async def list_jobs(self, **filters: Any) -> dict[str, Any]:
        params = {k: str(v) for k, v in filters.items() if v is not None}
        result: dict[str, Any] = await self.request("GET", "/v1/jobs", params=params)
        return result

    async def job_events(self, job_id: str, retries: int = 20) -> AsyncIterator[SseMessage]:
        """The job's events until its terminal event, reconnecting with Last-Event-ID.

        A stream can also end without a terminal event (server shutdown, or the
        server dropping a consumer that fell behind): then it reconnects and
        resumes after the last event it saw, so nothing is lost or repeated.
        """
        last_id: int | None = None
        attempts = 0
        while True:
            headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
            try:
                async with self._session.get(
                    f"{self.url}/v1/jobs/{job_id}/events",
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=60),
                ) as resp:
                    if resp.status >= 400:
                        await self._json(resp)
                    async for message in _parse_sse(resp.content):
                        attempts = 0
                        if message.id is not None:
                            last_id = message.id
                        yield message
                        if message.event in TERMINAL_EVENTS:
                            return
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError):
                pass
            attempts += 1
            if attempts > retries:
                raise ClientError(0, "stream_lost", f"lost the event stream of job {job_id}")
            await asyncio.sleep(min(5.0, 0.5 * attempts))

    async def download(self, path: str, dest: Path) -> Path:
        async with self._session.get(self.url + path) as resp:
            if resp.status >= 400:
                await self._json(resp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with dest.open("wb") as out:
                async for chunk in resp.content.iter_chunked(1 << 16):
                    out.write(chunk)
        return dest


async def _parse_sse(content: aiohttp.StreamReader) -> AsyncIterator[SseMessage]:
    event_id: int | None = None
    event = "message"
    data: list[str] = []
    async for raw in content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield SseMessage(event_id, event, json.loads("\n".join(data)))
            event_id, event, data = None, "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                event_id = int(value) if value.isdigit() else None
            elif name == "event":
                event = value
            elif name == "data":
                data.append(value)


def render_progress(job: dict[str, Any], width: int = 30) -> str:
    """One line: a bar, percentage, step, loss and ETA."""
    progress = job.get("progress") or {}
    pct = float(progress.get("percentage") or 0.0)
    filled = int(width * pct / 100)
    bar = "#" * filled + "." * (width - filled)
    parts = [f"[{bar}] {pct:5.1f}%"]
    if progress.get("total_steps"):
        parts.append(f"step {progress.get('step', 0)}/{progress['total_steps']}")
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("eta_seconds") is not None:
        parts.append(f"ETA {progress['eta_seconds']:.0f}s")
    return f"{job['id']} {job['state']:<9} " + "  ".join(parts)


async def watch(client: BoothdClient, job_id: str, out: Any = sys.stderr) -> dict[str, Any]:
    """Follow a job over SSE, drawing a progress line; return the final job object."""
    job = await client.get_job(job_id)
    terminal = {"succeeded", "failed", "canceled"}
    # On a terminal the line is redrawn in place; in a log, only changes are printed.
    live = bool(getattr(out, "isatty", lambda: False)())
    shown = ""
    if job["state"] not in terminal:
        async for _message in client.job_events(job_id):
            job = await client.get_job(job_id)
            line = render_progress(job)
            if line != shown:
                print(("\r" + line) if live else line, end="" if live else "\n", file=out,
                      flush=True)
                shown = line
        if live:
            print(file=out)
        job = await client.get_job(job_id)
    return job


def describe_results(job: dict[str, Any], base_url: str) -> list[str]:
    """Human lines saying where a job's results are."""
    lines = [f"job {job['id']}: {job['state']}"]
    if job.get("failure"):
        lines.append(f"  failure: {job['failure']['code']}: {job['failure']['message']}")
    for ckp in job["result"]["checkpoints"]:
        lines.append(
            f"  checkpoint {ckp['id']} ({ckp['kind']}, step {ckp['step']}, "
            f"{ckp.get('variant', ckp['format'])}, {ckp['size_bytes']} bytes): "
            f"{base_url}{ckp['url']}"
        )
    for img in job["result"]["images"]:
        lines.append(f"  image {img['id']} (seed {img['seed']}): {base_url}{img['url']}")
    return lines


def generate_entries(prompts: Sequence[str], **params: Any) -> list[dict[str, Any]]:
    entries = []
    for prompt in prompts:
        entry: dict[str, Any] = {"prompt": prompt}
        entry.update({k: v for k, v in params.items() if v is not None})
        entries.append(entry)
    return entries
