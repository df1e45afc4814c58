"""The job request (API.md `POST /v1/jobs` body) as one pydantic model.

It lives in the runner package because both sides need it: the service
validates requests with it and stores `model_dump()` in `JobSubmitted.config`;
the runner parses that back to know what to do. Importing it does not import
torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

from gpu_runner.generate import GenerateParams
from gpu_runner.training import TrainConfig

JobType = Literal["dreambooth", "image_gen", "dreambooth_image_gen"]

#: Webhook event names a subscriber may ask for (API.md); `job.*` and
#: `job.completed` are patterns.
WEBHOOK_EVENT_TYPES: tuple[str, ...] = (
    "job.queued",
    "job.started",
    "job.progress",
    "job.checkpoint",
    "job.image",
    "job.succeeded",
    "job.failed",
    "job.canceled",
)
WEBHOOK_EVENT_PATTERNS: tuple[str, ...] = (*WEBHOOK_EVENT_TYPES, "job.completed", "job.*")


def check_webhook_event_names(names: list[str]) -> list[str]:
    """Validate webhook event names (a pydantic field validator body)."""
    for name in names:
        if name not in WEBHOOK_EVENT_PATTERNS:
            raise ValueError(
                f"unknown webhook event {name!r}; valid: {', '.join(WEBHOOK_EVENT_PATTERNS)}"
            )
    return names


class JobSpec(BaseModel):
    """What a client asks boothd to do; stored (defaults filled in) in `JobSubmitted`."""

    model_config = ConfigDict(extra="forbid")

    type: JobType
    base_model: str | None = Field(default=None, min_length=1, max_length=200)
    train: TrainConfig | None = None
    generate: list[GenerateParams] = Field(default_factory=list, max_length=32)
    callback_url: HttpUrl | None = None
    webhook_events: list[str] = Field(default_factory=lambda: ["job.completed"], max_length=20)
    priority: int = Field(default=100, ge=0, le=1000)
    tags: list[str] = Field(default_factory=list, max_length=20)
    dry_run: bool = False

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: list[str]) -> list[str]:
        for tag in tags:
            if not 1 <= len(tag) <= 64:
                raise ValueError("each tag must be 1–64 characters")
        return tags

    @field_validator("webhook_events")
    @classmethod
    def _webhook_events(cls, names: list[str]) -> list[str]:
        return check_webhook_event_names(names)

    @model_validator(mode="after")
    def _parts_match_type(self) -> JobSpec:
        trains = self.type in ("dreambooth", "dreambooth_image_gen")
        generates = self.type in ("image_gen", "dreambooth_image_gen")
        if trains and self.train is None:
            raise ValueError(f"train is required for a {self.type} job")
        if not trains and self.train is not None:
            raise ValueError(f"train is not allowed for a {self.type} job")
        if generates and not self.generate:
            raise ValueError(f"generate needs at least one entry for a {self.type} job")
        if not generates and self.generate:
            raise ValueError(f"generate is not allowed for a {self.type} job")
        return self
