"""`/v1/jobs`: submit, list, read, cancel and delete jobs.

Writes are events appended at an expected stream version (the store's
optimistic-concurrency check); reads come from the projector's `jobs` table.
After a write the handler waits for the projector to reach the new event, so
the job object it answers with — and any GET right after — includes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web

from events.errors import ConcurrencyError
from events.projections import JobState, fold, job_stream
from events.store import ANY_VERSION, NO_STREAM
from events.types import Event, JobArtifactsDeleted, JobCanceled, JobCancelRequested, JobSubmitted
from gpu_runner.jobspec import JobSpec
from service import readmodel
from service.errors import ApiError, not_found
from service.handlers.common import read_json, respond, tenant_of
from service.jobview import render_job
from service.keys import PROJECTOR, SETTINGS, STORE
from service.openapi import Operation, operation
from service.paths import remove_job_files
from service.schemas import JobList, JobListQuery, JobObject
from service.submission import check_job
from service.webhooks import send_dry_run_callback

log = structlog.get_logger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
_MAX_IDEMPOTENCY_KEY = 255
_CANCEL_RETRIES = 20


def new_job_id() -> str:
    return "job_" + secrets.token_hex(10)


def idempotent_job_id(tenant: str, key: str) -> str:
    """The job id a tenant's `Idempotency-Key` always maps to.

    Deriving the id from the key turns "was this key used?" into the store's
    own uniqueness check: the second append at `NO_STREAM` fails, however
    close together two requests arrive.
    """
    digest = hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()
    return "job_" + digest[:24]


def request_digest(body: Any) -> str:
    """sha256 of the body as canonical JSON: key order and spacing do not matter."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def job_object(state: JobState, *, dry_run: bool = False) -> JobObject:
    doc = render_job(state)
    doc["dry_run"] = dry_run
    return JobObject.model_validate(doc)


async def _load(request: web.Request, job_id: str) -> JobState:
    tenant = tenant_of(request)
    # Read your writes, also the runner's: a client that saw an event over SSE
    # must find it reflected in the job object.
    await request.app[PROJECTOR].sync()
    state = await request.app[STORE].read_transaction(
        lambda c: readmodel.get_job(c, job_id, tenant)
    )
    if state is None:
        raise not_found("job", job_id)
    return state


async def _answer_after(
    request: web.Request,
    job_id: str,
    position: int,
    status: int,
    headers: dict[str, str] | None = None,
) -> web.Response:
    await request.app[PROJECTOR].wait_for(position)
    return respond(job_object(await _load(request, job_id)), status, headers)


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= _MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"{IDEMPOTENCY_HEADER} must be 1–{_MAX_IDEMPOTENCY_KEY} printable characters",
            IDEMPOTENCY_HEADER,
        )
    return key


async def _replay(request: web.Request, job_id: str, digest: str | None) -> web.Response | None:
    """The answer to a repeated `Idempotency-Key`, or None when the key is new."""
    events = await request.app[STORE].read_stream(job_stream(job_id))
    if not events:
        return None
    first = events[0].event
    if not isinstance(first, JobSubmitted) or first.request_sha256 != digest:
        raise ApiError(
            409,
            "idempotency_conflict",
            f"this {IDEMPOTENCY_HEADER} was already used with a different request body",
            IDEMPOTENCY_HEADER,
        )
    return await _answer_after(
        request, job_id, events[0].position, 200, {"Location": f"/v1/jobs/{job_id}"}
    )


async def _dry_run(request: web.Request, spec: JobSpec, tenant: str) -> web.Response:
    now = datetime.now(UTC)
    state = JobState(
        id="TEST_" + secrets.token_hex(10),
        tenant=tenant,
        type=spec.type,
        priority=spec.priority,
        tags=list(spec.tags),
        config=spec.model_dump(mode="json"),
        created_at=now,
        updated_at=now,
    )
    job = job_object(state, dry_run=True)
    if spec.callback_url is not None:
        # The sample callback is the webhook dispatcher's to send.
        await send_dry_run_callback(request.app, job.model_dump(mode="json"), tenant=tenant)
    return respond(job, 201)


@operation(
    Operation(
        summary="Submit a job",
        body=JobSpec,
        headers={IDEMPOTENCY_HEADER: "same key + same body → the same job (200); other body → 409"},
        responses={201: JobObject, 200: JobObject},
        tags=("jobs",),
    )
)
async def submit_job(request: web.Request) -> web.Response:
    """Validate the job completely, then queue it (`JobSubmitted`).

    `dry_run: true` validates everything and answers with a `TEST_` id
    without storing anything.
    """
    body = await read_json(request)
    tenant = tenant_of(request)
    app = request.app
    dry_run = isinstance(body, dict) and body.get("dry_run") is True
    key = None if dry_run else _idempotency_key(request)
    digest = request_digest(body) if key is not None else None
    job_id = idempotent_job_id(tenant, key) if key is not None else new_job_id()
    if key is not None:
        # A retry is answered from what was stored, not re-validated: limits
        # or models may have changed since, and the job exists regardless.
        replayed = await _replay(request, job_id, digest)
        if replayed is not None:
            return replayed

    checked = await check_job(body, tenant=tenant, settings=app[SETTINGS], store=app[STORE])
    spec = checked.spec
    if spec.dry_run:
        return await _dry_run(request, spec, tenant)
    event = JobSubmitted(
        job_id=job_id,
        tenant=tenant,
        job_type=spec.type,
        config=spec.model_dump(mode="json"),
        priority=spec.priority,
        tags=list(spec.tags),
        request_sha256=digest,
    )
    try:
        (position,) = await app[STORE].append(job_stream(job_id), NO_STREAM, [event])
    except ConcurrencyError:
        if key is None:
            raise  # a random 80-bit id collided: a bug, not a client error
        # The same key arrived concurrently and the other request won.
        replayed = await _replay(request, job_id, digest)
        assert replayed is not None
        return replayed
    log.info("job.submitted", job_id=job_id, tenant=tenant, job_type=spec.type)
    return await _answer_after(request, job_id, position, 201, {"Location": f"/v1/jobs/{job_id}"})


@operation(
    Operation(
        summary="List jobs, newest first",
        query=JobListQuery,
        responses={200: JobList},
        tags=("jobs",),
    )
)
async def list_jobs(request: web.Request) -> web.Response:
    """Filter by `type`, `state` and `tag`; page with `limit` (1–100) and `cursor`."""
    query = JobListQuery.model_validate(dict(request.query))
    after = readmodel.Cursor.decode(query.cursor) if query.cursor else None
    tenant = tenant_of(request)
    await request.app[PROJECTOR].sync()
    states, next_cursor = await request.app[STORE].read_transaction(
        lambda c: readmodel.list_jobs(
            c,
            tenant,
            job_type=query.type,
            state=query.state,
            tag=query.tag,
            limit=query.limit,
            after=after,
        )
    )
    return respond(
        JobList(
            jobs=[job_object(s) for s in states],
            next_cursor=next_cursor.encode() if next_cursor else None,
        )
    )


@operation(Operation(summary="Get a job", responses={200: JobObject}, tags=("jobs",)))
async def get_job(request: web.Request) -> web.Response:
    """The job object; another tenant's job is 404."""
    return respond(job_object(await _load(request, request.match_info["id"])))


@operation(Operation(summary="Cancel a job", responses={202: JobObject}, tags=("jobs",)))
async def cancel_job(request: web.Request) -> web.Response:
    """A queued job is canceled at once (`JobCanceled`); a running one is asked to
    stop (`JobCancelRequested`) and stops within one training or denoising
    step. A finished job is 409 `job_finished`.
    """
    job_id = request.match_info["id"]
    await _load(request, job_id)  # 404 before anything else, also for other tenants
    store = request.app[STORE]
    stream = job_stream(job_id)
    for _ in range(_CANCEL_RETRIES):
        # The stream, not the read model: the append below needs its exact version.
        state = fold(await store.read_stream(stream))
        assert state is not None
        if state.terminal:
            raise ApiError(409, "job_finished", f"job {job_id!r} already {state.state}")
        if state.state == "running" and state.cancel_requested:
            return await _answer_after(request, job_id, state.position, 202)
        event: Event = JobCanceled() if state.state == "queued" else JobCancelRequested()
        try:
            (position,) = await store.append(stream, state.version, [event])
        except ConcurrencyError:
            # A runner started it, or reported progress, meanwhile: decide again.
            continue
        log.info("job.cancel", job_id=job_id, event_type=event.type)
        return await _answer_after(request, job_id, position, 202)
    raise ApiError(409, "job_busy", f"job {job_id!r} changed too often to cancel; retry")


@operation(Operation(summary="Delete a job's files", responses={200: JobObject}, tags=("jobs",)))
async def delete_job(request: web.Request) -> web.Response:
    """Delete the checkpoints and images of a finished job. The job stays listed
    with `data_removed: true`; a queued or running job is 409 `job_active`.
    """
    job_id = request.match_info["id"]
    state = await _load(request, job_id)
    if not state.terminal:
        raise ApiError(409, "job_active", f"job {job_id!r} is {state.state}; cancel it first")
    paths = [c.path for c in state.checkpoints] + [i.path for i in state.images]
    await asyncio.to_thread(remove_job_files, request.app[SETTINGS].storage.data_dir, job_id, paths)
    position = state.position
    if not state.data_removed:
        (position,) = await request.app[STORE].append(
            job_stream(job_id), ANY_VERSION, [JobArtifactsDeleted(reason="user")]
        )
        log.info("job.files_deleted", job_id=job_id)
    return await _answer_after(request, job_id, position, 200)
