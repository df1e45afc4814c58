"""Pydantic models of the HTTP answers (and query strings) — the API's response contract.

Handlers serialise through these models and `/openapi.json` is generated from
them, so the documentation cannot drift from what is sent. Request bodies
are `gpu_runner.jobspec.JobSpec` (jobs) and the multipart form below
(datasets). `extra="forbid"` makes a field added to `render_job` without a
schema fail the tests instead of going undocumented.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from events.projections import JobStateName
from gpu_runner.jobspec import JobType


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    """The error object; some errors add members (e.g. `rejected` for uploads)."""

    model_config = ConfigDict(extra="allow")

    code: str = Field(description="stable, snake_case; clients branch on it")
    message: str = Field(description="for humans")
    field: str | None = Field(
        description="dotted path of the offending request field (`train.steps`, "
        "`generate.0.scheduler`), or null"
    )


class ErrorResponse(_Out):
    """Every error answer (API.md)."""

    error: ErrorDetail


# --------------------------------------------------------------------- jobs

#: The stored job config is the validated `JobSpec`, defaults filled in; it is
#: documented as that schema but passed through as stored, so a job submitted
#: before a JobSpec change still renders.
JobConfig = Annotated[
    dict[str, Any], WithJsonSchema({"allOf": [{"$ref": "#/components/schemas/JobSpec"}]})
]


class ProgressOut(_Out):
    step: int
    total_steps: int | None
    percentage: float = Field(description="100 once the job has succeeded")
    loss: float | None
    eta_seconds: float | None


class CheckpointOut(_Out):
    id: str
    kind: str = Field(description="lora | full")
    step: int
    format: str
    variant: str
    final: bool
    size_bytes: int
    sha256: str
    url: str


class ImageOut(_Out):
    id: str
    seed: int
    prompt: str
    width: int
    height: int
    format: str
    url: str


class JobResultOut(_Out):
    checkpoints: list[CheckpointOut]
    images: list[ImageOut]


class FailureOut(_Out):
    code: str
    message: str


class AttemptOut(_Out):
    attempt: int
    runner_id: str
    started_at: datetime
    interrupted: str | None = Field(description="why the attempt ended without finishing")


class JobObject(_Out):
    """A job (API.md "Job object")."""

    id: str
    type: JobType
    state: JobStateName
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queued_seconds: float
    running_seconds: float
    progress: ProgressOut
    config: JobConfig
    result: JobResultOut
    failure: FailureOut | None
    attempts: int
    attempt_history: list[AttemptOut]
    cancel_requested: bool
    data_removed: bool = Field(description="true once the job's files were deleted")
    tags: list[str]
    dry_run: bool
    position: int = Field(description="position of the job's latest event in the log")


class JobList(_Out):
    """One page of jobs, newest first."""

    jobs: list[JobObject]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null at end")


class JobListQuery(BaseModel):
    """Query string of `GET /v1/jobs`."""

    model_config = ConfigDict(extra="ignore")

    type: JobType | None = None
    state: JobStateName | None = None
    tag: str | None = Field(default=None, min_length=1, max_length=64)
    limit: int = Field(default=50, ge=1, le=100)
    cursor: str | None = Field(default=None, max_length=500)


# ----------------------------------------------------------------- datasets

_Binary = Annotated[bytes, WithJsonSchema({"type": "string", "format": "binary"})]


class DatasetUploadForm(BaseModel):
    """`POST /v1/datasets` multipart form: one zip, or several images.

    Captions are `NAME.txt` beside `NAME.jpg` (inside the zip, or uploaded as
    `images` parts too).
    """

    file: _Binary | None = Field(default=None, description="a .zip of images (+ captions)")
    images: list[_Binary] | None = Field(default=None, description="image files")


class RejectionOut(_Out):
    name: str
    reason: str


class DatasetCreated(_Out):
    """An upload was stored as a dataset; use its `id` as `train.dataset_id`."""

    id: str
    images: int = Field(description="usable images stored")
    rejected: list[RejectionOut] = Field(description="files not used, with the reason")
    bytes: int = Field(description="bytes stored (images and captions)")


# ------------------------------------------------------------------- models


class ModelOut(_Out):
    """A model usable as `base_model` or `generate[].model`."""

    name: str = Field(description="the value to send: a base model name, checkpoint:ID or job:ID")
    kind: Literal["base", "checkpoint", "job"]
    family: str | None = Field(description="sd15 | sd2 | sdxl | flux; null when unknown")
    source: str = Field(description="base models: config | data | builtin; trained: the job id")
    available: bool = Field(description="false when a configured model cannot be read")
    detail: str | None = Field(default=None, description="why a model is unavailable")
    job_id: str | None = None
    checkpoint_kind: str | None = Field(default=None, description="lora | full")
    step: int | None = None
    created_at: datetime | None = None


class ModelList(_Out):
    models: list[ModelOut]


# ------------------------------------------------------------------- system


class Health(_Out):
    """`GET /healthz`."""

    status: Literal["ok", "degraded"]
    runners: list[dict[str, Any]] = Field(description="one status object per runner process")
    queue_depth: int
    event_position: int
