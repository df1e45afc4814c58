"""POST/GET /v1/jobs, cancel and delete: validation, idempotency, listing, lifecycle."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from events.projections import fold, job_stream
from tests.service.conftest import Client, ClientFactory
from tests.service.helpers import (
    data_dir,
    finish_job,
    gen_job,
    images_form,
    png,
    start_job,
    store,
    submit,
    train_job,
)


async def _error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    error: dict[str, Any] = (await resp.json())["error"]
    return error


# ---------------------------------------------------------------- submission


async def test_submit_answers_the_queued_job_and_stores_it(app_client: Client) -> None:
    """201 with the job object (defaults filled in), a Location, and a JobSubmitted
    in the log whose config is the validated spec; a GET right after sees it."""
    resp = await app_client.post("/v1/jobs", json=train_job(), headers={})
    assert resp.status == 201
    job = await resp.json()
    assert job["id"].startswith("job_")
    assert resp.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] == "queued" and job["dry_run"] is False
    assert job["config"]["base_model"] == "tiny-sd15"
    assert job["config"]["train"]["learning_rate"] == 1e-4
    assert job["progress"]["percentage"] == 0.0
    again = await (await app_client.get(f"/v1/jobs/{job['id']}")).json()
    assert again["id"] == job["id"] and again["state"] == "queued"
    events = await store(app_client).read_stream(job_stream(job["id"]))
    submitted = events[0].event
    assert submitted.type == "JobSubmitted"
    assert submitted.config == job["config"] and submitted.tenant == "default"


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        (train_job(steps=0), "validation_error", "train.steps"),
        (train_job(steps=20_001), "limit_exceeded", "train.steps"),
        (train_job(colour="red"), "validation_error", "train.colour"),
        (
            train_job(steps=10, save_checkpoints_at=[20]),
            "validation_error",
            "train.save_checkpoints_at",
        ),
        (train_job(mixed_precision="fp16"), "mixed_precision_unsupported", "train.mixed_precision"),
        (train_job(use_8bit_adam=True), "eight_bit_adam_unsupported", "train.use_8bit_adam"),
        ({**train_job(), "extra": 1}, "validation_error", "extra"),
        ({**train_job(), "base_model": "no-such-model"}, "unknown_model", "base_model"),
        ({**train_job(), "base_model": "owner/repo"}, "model_download_not_allowed", "base_model"),
        (
            {**train_job(method="full"), "base_model": "tiny-sdxl"},
            "validation_error",
            "train.method",
        ),
        (gen_job(scheduler="Nope"), "validation_error", "generate.0.scheduler"),
        (gen_job(num_images=17), "validation_error", "generate.0.num_images"),
        (gen_job(model="job:job_nope"), "unknown_model", "generate.0.model"),
        (gen_job(model="checkpoint:ckp_nope"), "unknown_model", "generate.0.model"),
        (gen_job(model="also-unknown"), "unknown_model", "generate.0.model"),
        (gen_job(width=1001), "validation_error", "generate.0.width"),
        (gen_job(width=2048), "invalid_params", "generate.0.width"),
        (
            {**gen_job(scheduler="Euler a"), "base_model": "tiny-flux"},
            "invalid_params",
            "generate.0.scheduler",
        ),
        (
            {"type": "image_gen", "generate": [{"prompt": ""}]},
            "validation_error",
            "generate.0.prompt",
        ),
        ({"type": "nonsense"}, "validation_error", "type"),
        ({**gen_job(), "tags": [""]}, "validation_error", "tags"),
    ],
)
async def test_invalid_jobs_are_422_naming_the_field(
    app_client: Client, body: dict[str, Any], code: str, field: str
) -> None:
    """Every refusal carries a stable code and the dotted path of the field at fault;
    nothing is stored."""
    error = await _error(await app_client.post("/v1/jobs", json=body), 422)
    assert (error["code"], error["field"]) == (code, field), error
    assert error["message"]
    assert await store(app_client).head() == 0


async def test_limits_come_from_config(make_client: ClientFactory) -> None:
    """`limits.max_steps` and `limits.max_num_images` are the server's, not the model's."""
    client = await make_client(limits={"max_steps": 50, "max_num_images": 2})
    error = await _error(await client.post("/v1/jobs", json=train_job(steps=51)), 422)
    assert (error["code"], error["field"]) == ("limit_exceeded", "train.steps")
    error = await _error(await client.post("/v1/jobs", json=gen_job(num_images=3)), 422)
    assert (error["code"], error["field"]) == ("limit_exceeded", "generate.0.num_images")
    await submit(client, train_job(steps=50))


@pytest.mark.parametrize(
    ("raw", "code", "status"),
    [
        (b"{not json", "invalid_json", 400),
        (b"", "invalid_json", 400),
        (
            b'{"type": "image_gen", "generate": [{"prompt": "x", "guidance_scale": NaN}]}',
            "invalid_json",
            400,
        ),
        (b"[1, 2]", "validation_error", 422),
    ],
)
async def test_bodies_that_are_not_a_json_object(
    app_client: Client, raw: bytes, code: str, status: int
) -> None:
    """Unparseable JSON (NaN included) is 400 `invalid_json`; JSON of the wrong shape is 422."""
    resp = await app_client.post("/v1/jobs", data=raw, headers={"Content-Type": "application/json"})
    error = await _error(resp, status)
    assert error["code"] == code


async def test_uploaded_dataset_is_accepted_and_checked(app_client: Client) -> None:
    """`train.dataset_id` must be an uploaded dataset; epochs are counted against
    `max_steps` with its image count."""
    upload = await app_client.post("/v1/datasets", data=images_form({"a.png": png()}))
    dataset_id = (await upload.json())["id"]
    body = train_job()
    body["train"] = {"instance_prompt": "photo of sks dog", "dataset_id": dataset_id, "steps": 5}
    job = await submit(app_client, body)
    assert job["config"]["train"]["dataset_id"] == dataset_id
    body["train"]["dataset_id"] = "ds_missing"
    error = await _error(await app_client.post("/v1/jobs", json=body), 422)
    assert (error["code"], error["field"]) == ("unknown_dataset", "train.dataset_id")
    body["train"] = {"instance_prompt": "x", "dataset_id": dataset_id, "epochs": 30_000}
    error = await _error(await app_client.post("/v1/jobs", json=body), 422)
    assert (error["code"], error["field"]) == ("limit_exceeded", "train.epochs")


async def test_generate_can_name_the_tenants_trained_models(app_client: Client) -> None:
    """`job:<id>` and `checkpoint:<id>` of a succeeded training job are usable; a
    job still queued is not (422 `model_unavailable`)."""
    queued = await submit(app_client, train_job())
    error = await _error(
        await app_client.post("/v1/jobs", json=gen_job(model=f"job:{queued['id']}")), 422
    )
    assert (error["code"], error["field"]) == ("model_unavailable", "generate.0.model")
    trained = await submit(app_client, train_job())
    ids = await finish_job(app_client, trained["id"])
    await submit(app_client, gen_job(model=f"job:{trained['id']}"))
    await submit(app_client, gen_job(model=f"checkpoint:{ids['checkpoint']}"))
    await submit(app_client, gen_job(model="tiny-sdxl", width=128, height=128))


async def test_dry_run_validates_but_stores_nothing(app_client: Client) -> None:
    """`dry_run: true` answers 201 with a TEST_ id and the full job object, appends
    nothing, and still refuses an invalid request."""
    resp = await app_client.post("/v1/jobs", json={**train_job(), "dry_run": True})
    assert resp.status == 201
    job = await resp.json()
    assert job["id"].startswith("TEST_") and job["dry_run"] is True
    assert job["config"]["base_model"] == "tiny-sd15"
    assert await store(app_client).head() == 0
    assert (await app_client.get(f"/v1/jobs/{job['id']}")).status == 404
    bad = await app_client.post("/v1/jobs", json={**train_job(steps=0), "dry_run": True})
    assert bad.status == 422


async def test_dry_run_sends_a_sample_callback(app_client: Client, aiohttp_server: Any) -> None:
    """A dry run with `callback_url` hands a sample payload to the webhook dispatcher,
    which delivers it signed (Standard Webhooks headers) to the URL."""
    received: asyncio.Queue[web.Request] = asyncio.Queue()

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        await received.put(request)
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hook", receive)
    server = await aiohttp_server(receiver)
    body = {**gen_job(), "dry_run": True, "callback_url": str(server.make_url("/hook"))}
    resp = await app_client.post("/v1/jobs", json=body)
    assert resp.status == 201
    async with asyncio.timeout(10):
        request = await received.get()
    assert request.headers["webhook-id"] and request.headers["webhook-signature"].startswith("v1,")
    assert await store(app_client).head() <= 1  # at most the tenant's default secret


# ---------------------------------------------------------------- idempotency


async def test_idempotency_key_same_body_gives_the_same_job(app_client: Client) -> None:
    """Same key + same body (in any key order) → 200 with the first job; one job stored."""
    headers = {"Idempotency-Key": "order-17"}
    first = await app_client.post("/v1/jobs", json=gen_job(seed=1), headers=headers)
    assert first.status == 201
    body = gen_job(seed=1)
    reordered = {"generate": body["generate"], "type": body["type"]}
    second = await app_client.post("/v1/jobs", json=reordered, headers=headers)
    assert second.status == 200
    assert (await second.json())["id"] == (await first.json())["id"]
    assert second.headers["Location"] == first.headers["Location"]
    listing = await (await app_client.get("/v1/jobs")).json()
    assert len(listing["jobs"]) == 1


async def test_idempotency_key_other_body_is_409(app_client: Client) -> None:
    """Same key + a different body → 409 `idempotency_conflict`; other keys are independent."""
    headers = {"Idempotency-Key": "order-18"}
    await submit(app_client, gen_job(seed=1), headers=headers)
    resp = await app_client.post("/v1/jobs", json=gen_job(seed=2), headers=headers)
    error = await _error(resp, 409)
    assert error["code"] == "idempotency_conflict"
    await submit(app_client, gen_job(seed=2), headers={"Idempotency-Key": "order-19"})


async def test_concurrent_identical_requests_make_one_job(app_client: Client) -> None:
    """Ten identical requests racing with one key: one 201, nine 200, all the same job."""
    headers = {"Idempotency-Key": "race"}
    responses = await asyncio.gather(
        *(app_client.post("/v1/jobs", json=gen_job(), headers=headers) for _ in range(10))
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] * 9 + [201]
    ids = {(await r.json())["id"] for r in responses}
    assert len(ids) == 1
    listing = await (await app_client.get("/v1/jobs")).json()
    assert len(listing["jobs"]) == 1


async def test_idempotency_keys_are_per_tenant_and_checked(app_client: Client) -> None:
    """An overlong or unprintable key is 400 `invalid_idempotency_key`."""
    resp = await app_client.post("/v1/jobs", json=gen_job(), headers={"Idempotency-Key": "k" * 300})
    error = await _error(resp, 400)
    assert (error["code"], error["field"]) == ("invalid_idempotency_key", "Idempotency-Key")


# ---------------------------------------------------------------- listing


async def test_list_pages_newest_first_with_filters(app_client: Client) -> None:
    """Pages of `limit` jobs, newest first, chained by `next_cursor` with no
    duplicates or gaps; `type`, `state` and `tag` filter."""
    created = []
    for i in range(7):
        body = gen_job() if i % 2 else train_job()
        body["tags"] = ["even"] if i % 2 == 0 else ["odd"]
        created.append(await submit(app_client, body))
    await finish_job(app_client, created[0]["id"], checkpoint=None)

    seen: list[str] = []
    cursor = None
    while True:
        url = "/v1/jobs?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = await (await app_client.get(url)).json()
        assert len(page["jobs"]) <= 3
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [j["id"] for j in reversed(created)]

    async def ids(query: str) -> list[str]:
        body = await (await app_client.get(f"/v1/jobs?{query}")).json()
        return [j["id"] for j in body["jobs"]]

    assert await ids("type=image_gen") == [created[i]["id"] for i in (5, 3, 1)]
    assert await ids("tag=even&type=dreambooth") == [created[i]["id"] for i in (6, 4, 2, 0)]
    assert await ids("state=succeeded") == [created[0]["id"]]
    assert await ids("state=queued&tag=odd&limit=1") == [created[5]["id"]]


@pytest.mark.parametrize(
    ("query", "field", "code"),
    [
        ("limit=0", "limit", "validation_error"),
        ("limit=101", "limit", "validation_error"),
        ("limit=ten", "limit", "validation_error"),
        ("state=finished", "state", "validation_error"),
        ("type=video", "type", "validation_error"),
        ("cursor=not-a-cursor!", "cursor", "invalid_cursor"),
    ],
)
async def test_bad_list_queries_are_422(
    app_client: Client, query: str, field: str, code: str
) -> None:
    """`limit` must be 1–100; filters take known values; cursors are ours only."""
    error = await _error(await app_client.get(f"/v1/jobs?{query}"), 422)
    assert (error["code"], error["field"]) == (code, field)


async def test_missing_job_is_404(app_client: Client) -> None:
    """An unknown job id is 404 `job_not_found` on every job route."""
    for method, url in [
        ("GET", "/v1/jobs/job_nope"),
        ("POST", "/v1/jobs/job_nope/cancel"),
        ("DELETE", "/v1/jobs/job_nope"),
    ]:
        error = await _error(await app_client.request(method, url), 404)
        assert error["code"] == "job_not_found"


# ---------------------------------------------------------------- cancel / delete


async def test_cancel_queued_job_cancels_it_at_once(app_client: Client) -> None:
    """A queued job is canceled directly: 202, state `canceled`, JobCanceled in the log."""
    job = await submit(app_client, train_job())
    resp = await app_client.post(f"/v1/jobs/{job['id']}/cancel")
    assert resp.status == 202
    body = await resp.json()
    assert body["state"] == "canceled" and body["finished_at"] is not None
    events = await store(app_client).read_stream(job_stream(job["id"]))
    assert [e.type for e in events] == ["JobSubmitted", "JobCanceled"]
    again = await app_client.post(f"/v1/jobs/{job['id']}/cancel")
    assert (await _error(again, 409))["code"] == "job_finished"


async def test_cancel_running_job_asks_the_runner(app_client: Client) -> None:
    """A running job gets JobCancelRequested (once, however often cancel is called);
    it stays running until its runner stops it."""
    job = await submit(app_client, train_job())
    await start_job(app_client, job["id"])
    for _ in range(2):
        resp = await app_client.post(f"/v1/jobs/{job['id']}/cancel")
        assert resp.status == 202
        body = await resp.json()
        assert body["state"] == "running" and body["cancel_requested"] is True
    events = await store(app_client).read_stream(job_stream(job["id"]))
    assert [e.type for e in events] == ["JobSubmitted", "JobStarted", "JobCancelRequested"]


async def test_delete_removes_files_and_keeps_the_job(app_client: Client) -> None:
    """DELETE of a finished job removes its folder and artifacts, appends
    JobArtifactsDeleted(user) once, and the job stays listed with data_removed;
    its downloads then answer 410 `data_removed`."""
    job = await submit(app_client, train_job())
    ids = await finish_job(app_client, job["id"], image=png())
    folder = data_dir(app_client) / "jobs" / job["id"]
    assert folder.is_dir()
    for _ in range(2):
        resp = await app_client.delete(f"/v1/jobs/{job['id']}")
        assert resp.status == 200
        assert (await resp.json())["data_removed"] is True
    assert not folder.exists()
    state = fold(await store(app_client).read_stream(job_stream(job["id"])))
    assert state is not None and state.data_removed
    events = await store(app_client).read_stream(job_stream(job["id"]))
    assert [e.type for e in events].count("JobArtifactsDeleted") == 1
    listing = await (await app_client.get("/v1/jobs")).json()
    assert listing["jobs"][0]["data_removed"] is True
    for url in (f"/v1/checkpoints/{ids['checkpoint']}/download", f"/v1/images/{ids['image']}"):
        assert (await _error(await app_client.get(url), 410))["code"] == "data_removed"
    models = await (await app_client.get("/v1/models")).json()
    assert f"job:{job['id']}" not in {m["name"] for m in models["models"]}


async def test_delete_active_job_is_409(app_client: Client) -> None:
    """Queued and running jobs keep their files: 409 `job_active`."""
    job = await submit(app_client, train_job())
    assert (await _error(await app_client.delete(f"/v1/jobs/{job['id']}"), 409))[
        "code"
    ] == "job_active"
    await start_job(app_client, job["id"])
    assert (await _error(await app_client.delete(f"/v1/jobs/{job['id']}"), 409))[
        "code"
    ] == "job_active"
