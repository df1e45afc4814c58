"""Event types: every fact boothd records, as frozen pydantic models.

Each class's docstring says when it is emitted; the event catalogue in
README.md is generated from these docstrings (`python -m events.catalogue`).
Events carry paths (relative to the data folder) and hashes, never tensors
or image bytes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Rejection(_Event):
    """One input file that was not used, and why."""

    name: str
    reason: str


# ---------------------------------------------------------------- job stream


class JobSubmitted(_Event):
    """A client submitted a job (POST /v1/jobs); it is queued from now on.

    `config` is the request as validated, defaults filled in.
    `request_sha256` is the digest of the request body when the client sent an
    `Idempotency-Key`: a retry with the same key and body gets this job back,
    the same key with another body is refused.
    """

    type: Literal["JobSubmitted"] = "JobSubmitted"
    job_id: str
    tenant: str
    job_type: Literal["dreambooth", "image_gen", "dreambooth_image_gen"]
    config: dict[str, Any]
    priority: int = 100
    tags: list[str] = Field(default_factory=list)
    request_sha256: str | None = None


class JobStarted(_Event):
    """A runner claimed the queued job (appended at the expected stream version,
    so two runners can never both start it) and began working on it."""

    type: Literal["JobStarted"] = "JobStarted"
    runner_id: str
    device: str
    attempt: int = 1


class DatasetPrepared(_Event):
    """The runner validated, cropped and resized the training images."""

    type: Literal["DatasetPrepared"] = "DatasetPrepared"
    images: int
    rejected: list[Rejection] = Field(default_factory=list)
    path: str


class TrainingProgressed(_Event):
    """Training advanced; emitted at most about twice a second and at the last step."""

    type: Literal["TrainingProgressed"] = "TrainingProgressed"
    step: int
    total_steps: int
    loss: float | None = None
    learning_rate: float | None = None


class CheckpointSaved(_Event):
    """A checkpoint file (or folder) was completely written and renamed into place."""

    type: Literal["CheckpointSaved"] = "CheckpointSaved"
    checkpoint_id: str
    kind: Literal["lora", "full"]
    step: int
    format: str
    variant: str = "diffusers"
    path: str
    size_bytes: int
    sha256: str
    final: bool = False


class ImageGenerated(_Event):
    """An image was generated and written to disk."""

    type: Literal["ImageGenerated"] = "ImageGenerated"
    image_id: str
    prompt: str
    seed: int
    width: int
    height: int
    format: str
    path: str
    sha256: str
    size_bytes: int = 0


class JobCancelRequested(_Event):
    """A client asked to cancel the job (POST /v1/jobs/{id}/cancel)."""

    type: Literal["JobCancelRequested"] = "JobCancelRequested"


class JobSucceeded(_Event):
    """The job finished its work; terminal."""

    type: Literal["JobSucceeded"] = "JobSucceeded"


class JobFailed(_Event):
    """The job failed (bad input found late, a model error, the runner died); terminal."""

    type: Literal["JobFailed"] = "JobFailed"
    code: str
    message: str
    exit_code: int | None = None


class JobCanceled(_Event):
    """The job stopped because cancellation was requested; terminal."""

    type: Literal["JobCanceled"] = "JobCanceled"


class JobRequeued(_Event):
    """A running job went back to the queue because its runner stopped before
    finishing it (service shutdown, runner restart); it starts again as a new attempt."""

    type: Literal["JobRequeued"] = "JobRequeued"
    reason: str


class JobArtifactsDeleted(_Event):
    """The job's files were deleted (by the client or by retention)."""

    type: Literal["JobArtifactsDeleted"] = "JobArtifactsDeleted"
    reason: Literal["user", "retention"]


# ------------------------------------------------------------ dataset stream


class DatasetUploaded(_Event):
    """A dataset was uploaded (POST /v1/datasets) and its images stored."""

    type: Literal["DatasetUploaded"] = "DatasetUploaded"
    dataset_id: str
    tenant: str
    images: int
    rejected: list[Rejection] = Field(default_factory=list)
    bytes: int
    path: str


# ------------------------------------------------------------ webhook stream


class WebhookEndpointCreated(_Event):
    """A global webhook endpoint was registered (POST /v1/webhooks)."""

    type: Literal["WebhookEndpointCreated"] = "WebhookEndpointCreated"
    endpoint_id: str
    tenant: str
    url: str
    events: list[str]
    description: str = ""
    secret: str


class WebhookEndpointDeleted(_Event):
    """A webhook endpoint was deleted (DELETE /v1/webhooks/{id})."""

    type: Literal["WebhookEndpointDeleted"] = "WebhookEndpointDeleted"


class WebhookDeliveryAttempted(_Event):
    """One delivery attempt to an endpoint (or a job's `callback_url`) failed (non-2xx,
    timeout, connection error); `next_attempt_at` is when it is retried, or null when
    it is given up. `delivery_id` is the `webhook-id` header, the same on every
    attempt; `event_position` 0 marks a test sample (POST /v1/webhooks/{id}/test)."""

    type: Literal["WebhookDeliveryAttempted"] = "WebhookDeliveryAttempted"
    delivery_id: str
    event_position: int
    attempt: int
    status: int | None = None
    error: str | None = None
    next_attempt_at: datetime | None = None
    event_type: str = ""
    job_id: str | None = None


class WebhookDelivered(_Event):
    """An endpoint (or a job's `callback_url`) accepted a delivery with a 2xx answer."""

    type: Literal["WebhookDelivered"] = "WebhookDelivered"
    delivery_id: str
    event_position: int
    attempt: int
    status: int
    event_type: str = ""
    job_id: str | None = None


class WebhookEndpointDisabled(_Event):
    """An endpoint answered 410 Gone (or was otherwise disabled); no more deliveries."""

    type: Literal["WebhookEndpointDisabled"] = "WebhookEndpointDisabled"
    reason: str


class WebhookDefaultSecretCreated(_Event):
    """A tenant's default signing secret (for per-job `callback_url` deliveries) was
    created, on first use (GET /v1/webhooks/default/secret or the first callback)."""

    type: Literal["WebhookDefaultSecretCreated"] = "WebhookDefaultSecretCreated"
    tenant: str
    secret: str


# ------------------------------------------------------------- runner stream


class RunnerStarted(_Event):
    """A runner subprocess started and is ready to claim jobs."""

    type: Literal["RunnerStarted"] = "RunnerStarted"
    runner_id: str
    device: str
    pid: int


class RunnerStopped(_Event):
    """A runner subprocess exited (cleanly or not), as seen by the service."""

    type: Literal["RunnerStopped"] = "RunnerStopped"
    runner_id: str
    exit_code: int | None = None
    reason: str = ""


Event = Annotated[
    JobSubmitted
    | JobStarted
    | DatasetPrepared
    | TrainingProgressed
    | CheckpointSaved
    | ImageGenerated
    | JobCancelRequested
    | JobSucceeded
    | JobFailed
    | JobCanceled
    | JobRequeued
    | JobArtifactsDeleted
    | DatasetUploaded
    | WebhookEndpointCreated
    | WebhookEndpointDeleted
    | WebhookDeliveryAttempted
    | WebhookDelivered
    | WebhookEndpointDisabled
    | WebhookDefaultSecretCreated
    | RunnerStarted
    | RunnerStopped,
    Field(discriminator="type"),
]

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)

#: Every event class by its `type` name, in declaration order.
EVENT_CLASSES: dict[str, type[BaseModel]] = {
    cls.model_fields["type"].default: cls
    for cls in (
        JobSubmitted,
        JobStarted,
        DatasetPrepared,
        TrainingProgressed,
        CheckpointSaved,
        ImageGenerated,
        JobCancelRequested,
        JobSucceeded,
        JobFailed,
        JobCanceled,
        JobRequeued,
        JobArtifactsDeleted,
        DatasetUploaded,
        WebhookEndpointCreated,
        WebhookEndpointDeleted,
        WebhookDeliveryAttempted,
        WebhookDelivered,
        WebhookEndpointDisabled,
        WebhookDefaultSecretCreated,
        RunnerStarted,
        RunnerStopped,
    )
}

JOB_TERMINAL_TYPES = frozenset({"JobSucceeded", "JobFailed", "JobCanceled"})


class RecordedEvent(NamedTuple):
    """An event as stored: its global position, stream, version and time.

    A NamedTuple rather than a pydantic model or frozen dataclass: one is
    built for every event read (cheaply), and only the payload (`event`)
    needs validating.
    """

    position: int
    stream_id: str
    version: int
    recorded_at: datetime
    event: Event

    @property
    def type(self) -> str:
        return self.event.type
