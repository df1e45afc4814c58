"""GET /v1/models: base models from config, the data folder and the built-in names,
and the tenant's trained models."""

from __future__ import annotations

from pathlib import Path

from tests.service.conftest import Client, ClientFactory
from tests.service.helpers import data_dir, finish_job, submit, train_job


async def test_builtin_models_are_listed_without_being_created(app_client: Client) -> None:
    """The tiny models are listed (they are built on first use by the runner), and
    listing them writes nothing."""
    body = await (await app_client.get("/v1/models")).json()
    names = {m["name"]: m for m in body["models"]}
    assert names["tiny-sd15"]["family"] == "sd15" and names["tiny-sd15"]["source"] == "builtin"
    assert names["tiny-flux"]["family"] == "flux"
    assert not (data_dir(app_client) / "models").exists()


async def test_configured_and_data_folder_models(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    """A configured model that cannot be read is listed as unavailable with the reason;
    a folder under `<data>/models` is listed too; an unknown name is not accepted."""
    client = await make_client(models={"broken": {"path": str(tmp_path / "missing")}})
    folder = data_dir(client) / "models" / "junk"
    folder.mkdir(parents=True)
    body = await (await client.get("/v1/models")).json()
    names = {m["name"]: m for m in body["models"]}
    assert names["broken"]["available"] is False and names["broken"]["detail"]
    assert names["broken"]["source"] == "config"
    assert names["junk"]["source"] == "data" and names["junk"]["available"] is False
    resp = await client.post("/v1/jobs", json={**train_job(), "base_model": "broken"})
    assert resp.status == 422
    assert (await resp.json())["error"]["field"] == "base_model"


async def test_trained_models_of_succeeded_jobs(app_client: Client) -> None:
    """A succeeded training job is listed as `job:<id>` and each of its checkpoints as
    `checkpoint:<id>`; queued jobs are not listed."""
    await submit(app_client, train_job())
    done = await submit(app_client, train_job())
    ids = await finish_job(app_client, done["id"])
    body = await (await app_client.get("/v1/models")).json()
    trained = {m["name"]: m for m in body["models"] if m["kind"] != "base"}
    assert set(trained) == {f"job:{done['id']}", f"checkpoint:{ids['checkpoint']}"}
    checkpoint = trained[f"checkpoint:{ids['checkpoint']}"]
    assert checkpoint["job_id"] == done["id"] and checkpoint["checkpoint_kind"] == "lora"
    assert checkpoint["family"] == "sd15" and checkpoint["step"] == 10
