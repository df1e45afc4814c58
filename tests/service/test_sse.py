"""Server-sent events: GET /v1/jobs/{id}/events and GET /v1/events, over real HTTP
on loopback against the real SQLite store. Job events are appended by the test
(the runner stand-in, see `sse_fixtures`)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from events.store import SQLiteEventStore
from events.types import (
    ImageGenerated,
    JobStarted,
    JobSucceeded,
    TrainingProgressed,
)
from service.keys import SHUTTING_DOWN, STORE
from service.sse import SSE_HUB, SseOptions
from tests.service.sse_fixtures import (
    SseReader,
    append_job_events,
    auth,
    build_app,
    settings_for,
    submitted,
    wait_for,
)

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
Client = TestClient[web.Request, web.Application]


@pytest.fixture
def new_client(aiohttp_client: ClientFactory, tmp_path: Path) -> Callable[..., Awaitable[Client]]:
    async def make(**options: Any) -> Client:
        app = build_app(settings_for(tmp_path), SseOptions(**options))
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def client(new_client: Callable[..., Awaitable[Client]]) -> Client:
    return await new_client()


def store_of(client: Client) -> SQLiteEventStore:
    return client.app[STORE]


def progress(step: int) -> TrainingProgressed:
    return TrainingProgressed(step=step, total_steps=100, loss=0.5)


async def test_replay_then_live(client: Client) -> None:
    """A job stream replays the job's events from the start, then follows live;
    each message has id = position, event = type and data = the event's fields
    plus job_id, position and recorded_at; SSE headers are set."""
    store = store_of(client)
    positions = await append_job_events(
        store, "j1", submitted("j1"), JobStarted(runner_id="r1", device="cpu")
    )
    async with client.get("/v1/jobs/j1/events", headers=auth("acme")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"
        reader = SseReader(resp)
        replayed = await reader.events(2)
        assert [m.id for m in replayed] == positions
        assert [m.event for m in replayed] == ["JobSubmitted", "JobStarted"]
        first = replayed[0].data
        assert first is not None
        assert first["job_id"] == "j1" and first["tenant"] == "acme"
        assert first["position"] == positions[0] and first["recorded_at"].endswith("Z")
        (live_position,) = await append_job_events(store, "j1", progress(5))
        (live,) = await reader.events(1)
        assert live.id == live_position and live.event == "TrainingProgressed"
        assert live.data is not None and live.data["step"] == 5


@pytest.mark.parametrize("replay_batch", [500, 3])
async def test_resume_with_last_event_id_is_exactly_once(
    new_client: Callable[..., Awaitable[Client]], replay_batch: int
) -> None:
    """A client that disconnects mid-stream and reconnects with Last-Event-ID gets
    every later event exactly once and in order, while events keep being appended
    during the reconnect (the replay/live hand-over has no gap and no duplicate,
    with replay in one read or in many small ones)."""
    client = await new_client(replay_batch=replay_batch)
    store = store_of(client)
    first = await append_job_events(store, "j1", submitted("j1"), progress(1), progress(2))
    async with client.get("/v1/jobs/j1/events", headers=auth("acme")) as resp:
        seen = await SseReader(resp).events(2)
    last_id = seen[-1].id
    assert last_id == first[1]

    async def keep_appending() -> list[int]:
        positions = []
        for step in range(3, 40):
            positions += await append_job_events(store, "j1", progress(step))
            await asyncio.sleep(0)
        positions += await append_job_events(store, "j1", JobSucceeded())
        return positions

    appender = asyncio.create_task(keep_appending())
    headers = {**auth("acme"), "Last-Event-ID": str(last_id)}
    async with client.get("/v1/jobs/j1/events", headers=headers) as resp:
        rest = await SseReader(resp).rest()
    later = await appender
    assert [m.id for m in rest] == [first[2], *later]


async def test_last_event_id_query_parameter(client: Client) -> None:
    """`?last_event_id=` works like the header (for clients that cannot set headers)."""
    positions = await append_job_events(
        store_of(client), "j1", submitted("j1"), progress(1), JobSucceeded()
    )
    url = f"/v1/jobs/j1/events?last_event_id={positions[0]}"
    async with client.get(url, headers=auth("acme")) as resp:
        rest = await SseReader(resp).rest()
    assert [m.id for m in rest] == positions[1:]


async def test_job_stream_closes_after_terminal_event(client: Client) -> None:
    """The job stream ends right after the job's terminal event, live or replayed,
    and at once when the client has already seen the terminal event."""
    store = store_of(client)
    await append_job_events(store, "j1", submitted("j1"))
    async with client.get("/v1/jobs/j1/events", headers=auth("acme")) as resp:
        reader = SseReader(resp)
        await reader.events(1)
        (end,) = await append_job_events(store, "j1", JobSucceeded())
        assert [(m.id, m.event) for m in await reader.rest()] == [(end, "JobSucceeded")]

    # Already terminal at connect: the replay ends with the terminal event.
    async with client.get("/v1/jobs/j1/events", headers=auth("acme")) as resp:
        assert [m.event for m in await SseReader(resp).rest()] == ["JobSubmitted", "JobSucceeded"]

    # Already seen: an empty stream that ends at once.
    headers = {**auth("acme"), "Last-Event-ID": str(end)}
    async with client.get("/v1/jobs/j1/events", headers=headers) as resp:
        assert resp.status == 200
        assert await SseReader(resp).rest() == []


async def test_ping_comment_on_idle_stream(
    new_client: Callable[..., Awaitable[Client]],
) -> None:
    """An idle stream carries a `: ping` comment every ping interval (lowered here)."""
    client = await new_client(ping_interval=0.05)
    await append_job_events(store_of(client), "j1", submitted("j1"))
    async with client.get("/v1/jobs/j1/events", headers=auth("acme")) as resp:
        reader = SseReader(resp)
        await reader.events(1)
        message = await reader.next(timeout=5)
        assert message is not None and message.comment == "ping"


async def test_other_tenants_job_is_not_found(client: Client) -> None:
    """Another tenant's job stream answers 404 `job_not_found`, like a missing job."""
    await append_job_events(store_of(client), "j1", submitted("j1", tenant="acme"))
    for job_id in ("j1", "missing"):
        async with client.get(f"/v1/jobs/{job_id}/events", headers=auth("globex")) as resp:
            assert resp.status == 404
            body = await resp.json()
            assert body["error"]["code"] == "job_not_found"


async def test_bad_last_event_id_and_types_are_rejected(client: Client) -> None:
    """A Last-Event-ID that is not a position, or an unknown event type, is a 400."""
    await append_job_events(store_of(client), "j1", submitted("j1"))
    headers = {**auth("acme"), "Last-Event-ID": "abc"}
    async with client.get("/v1/jobs/j1/events", headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_last_event_id"
    async with client.get("/v1/events?types=JobSubmitted,Nope", headers=auth("acme")) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["code"] == "invalid_event_type" and error["field"] == "types"


async def test_all_events_shows_only_the_tenants_events(client: Client) -> None:
    """/v1/events carries only the caller's tenant's job events, filtered by
    `types`, live and on replay after Last-Event-ID."""
    store = store_of(client)
    url = "/v1/events?types=JobSubmitted,JobSucceeded"
    async with client.get(url, headers=auth("acme")) as resp:
        reader = SseReader(resp)
        (a_sub,) = await append_job_events(store, "a1", submitted("a1", tenant="acme"))
        await append_job_events(store, "g1", submitted("g1", tenant="globex"))
        await append_job_events(store, "a1", JobStarted(runner_id="r", device="cpu"))
        (a_end,) = await append_job_events(store, "a1", JobSucceeded())
        await append_job_events(store, "g1", JobSucceeded())
        (a2_sub,) = await append_job_events(store, "a2", submitted("a2", tenant="acme"))
        got = await reader.events(3)
        assert [(m.id, m.event) for m in got] == [
            (a_sub, "JobSubmitted"),
            (a_end, "JobSucceeded"),
            (a2_sub, "JobSubmitted"),
        ]
        assert {m.data["job_id"] for m in got if m.data} == {"a1", "a2"}

    headers = {**auth("acme"), "Last-Event-ID": "0"}
    async with client.get("/v1/events?types=JobSubmitted", headers=headers) as resp:
        replayed = await SseReader(resp).events(2)
        assert [m.id for m in replayed] == [a_sub, a2_sub]


async def test_burst_larger_than_queue_is_delivered_exactly_once(
    new_client: Callable[..., Awaitable[Client]],
) -> None:
    """A burst bigger than a subscriber's queue does not lose or repeat events: the
    hub drops the overflowing subscriber, which catches up from the store and
    joins again."""
    client = await new_client(queue_limit=4, replay_batch=16)
    store = store_of(client)
    await append_job_events(store, "j1", submitted("j1"))
    async with client.get("/v1/jobs/j1/events", headers=auth("acme")) as resp:
        reader = SseReader(resp)
        await reader.events(1)
        burst = await append_job_events(store, "j1", *(progress(i) for i in range(200)))
        (end,) = await append_job_events(store, "j1", JobSucceeded())
        assert [m.id for m in await reader.rest()] == [*burst, end]


async def test_slow_consumer_is_disconnected(
    new_client: Callable[..., Awaitable[Client]],
) -> None:
    """A client that stops reading is disconnected once a write has waited
    `write_timeout`, while another subscriber of the same job keeps getting every
    event: the slow one costs nobody else time or memory."""
    client = await new_client(write_timeout=0.3)
    store = store_of(client)
    hub = client.app[SSE_HUB]
    await append_job_events(store, "j1", submitted("j1"))
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A tiny receive window: the server's writes block after a little data.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        assert client.port is not None
        await loop.sock_connect(sock, ("127.0.0.1", client.port))
        request = (
            "GET /v1/jobs/j1/events HTTP/1.1\r\nHost: localhost\r\n"
            "Authorization: Bearer key-acme\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        async with client.get("/v1/jobs/j1/events", headers=auth("acme")) as resp:
            healthy = SseReader(resp)
            await healthy.events(1)
            await wait_for(lambda: hub.subscriber_count == 2)
            big = [
                ImageGenerated(
                    image_id=f"img_{i}",
                    prompt="x" * 64_000,
                    seed=i,
                    width=8,
                    height=8,
                    format="png",
                    path="p",
                    sha256="0",
                )
                for i in range(80)
            ]
            positions = await append_job_events(store, "j1", *big)
            assert [m.id for m in await healthy.events(len(big))] == positions
            await wait_for(lambda: hub.subscriber_count == 1)
        # The server closed the slow connection: draining it ends in EOF or a reset.
        async with asyncio.timeout(10):
            while True:
                try:
                    if not await loop.sock_recv(sock, 1 << 16):
                        break
                except ConnectionResetError:
                    break
    finally:
        sock.close()


async def test_streams_end_on_shutdown(client: Client) -> None:
    """Every open stream ends cleanly when the app starts shutting down."""
    await append_job_events(store_of(client), "j1", submitted("j1"))
    async with (
        client.get("/v1/jobs/j1/events", headers=auth("acme")) as job_resp,
        client.get("/v1/events", headers=auth("acme")) as all_resp,
    ):
        job_reader = SseReader(job_resp)
        await job_reader.events(1)
        await wait_for(lambda: client.app[SSE_HUB].subscriber_count == 2)
        client.app[SHUTTING_DOWN].set()
        assert await job_reader.rest() == []
        assert await SseReader(all_resp).rest() == []


async def test_job_submitted_over_http_streams(client: Client) -> None:
    """A job submitted with POST /v1/jobs streams its JobSubmitted (the runner
    stand-in then finishes it and the stream ends)."""
    body = {"type": "image_gen", "generate": [{"prompt": "a red apple"}]}
    async with client.post("/v1/jobs", json=body, headers=auth("acme")) as resp:
        assert resp.status == 201, await resp.text()
        job_id = (await resp.json())["id"]
    async with client.get(f"/v1/jobs/{job_id}/events", headers=auth("acme")) as resp:
        reader = SseReader(resp)
        (first,) = await reader.events(1)
        assert first.event == "JobSubmitted" and first.data is not None
        assert first.data["job_id"] == job_id
        await append_job_events(store_of(client), job_id, JobSucceeded())
        assert [m.event for m in await reader.rest()] == ["JobSucceeded"]
