"""Projections: current state as pure folds over the log.

`evolve(state, recorded) -> state` never reads a clock or a file: the same
events always give the same state, which is what lets the read model be
dropped and rebuilt byte for byte (`boothd rebuild-projections`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from events.types import (
    CheckpointSaved,
    DatasetPrepared,
    ImageGenerated,
    JobArtifactsDeleted,
    JobCanceled,
    JobCancelRequested,
    JobFailed,
    JobRequeued,
    JobStarted,
    JobSubmitted,
    JobSucceeded,
    RecordedEvent,
    TrainingProgressed,
)

JobStateName = Literal["queued", "running", "succeeded", "failed", "canceled"]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})

JOB_STREAM_PREFIX = "job-"


def job_stream(job_id: str) -> str:
    """The stream id of a job."""
    return JOB_STREAM_PREFIX + job_id


class _State(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


S = TypeVar("S", bound=_State)
_set_attr = object.__setattr__


def _replace(state: S, update: dict[str, Any]) -> S:
    """`state.model_copy(update=update)` without pydantic's generic copy machinery.

    The fold runs once per event on every rebuild, and the generic path
    (`__copy__` plus three `copy.copy` calls plus the update bookkeeping) was
    a third of the rebuild time. The state models have no extras and no
    private attributes, so a copy is a new `__dict__` (and a new fields-set
    when a field is set for the first time); tests/events/test_projections.py
    checks the result equals `model_copy`'s, fields-sets included.
    Like `model_copy`, `update` is not validated: callers pass values of the
    right types (they come from validated events).
    """
    cls = type(state)
    new = cls.__new__(cls)
    values = state.__dict__.copy()
    values.update(update)
    _set_attr(new, "__dict__", values)
    fields_set = state.__pydantic_fields_set__
    if not update.keys() <= fields_set:
        # A new set only when a field is set for the first time; otherwise the
        # (never mutated: the models are frozen) set is shared with `state`.
        fields_set = fields_set | update.keys()
    _set_attr(new, "__pydantic_fields_set__", fields_set)
    _set_attr(new, "__pydantic_extra__", None)
    _set_attr(new, "__pydantic_private__", None)
    return new


class Progress(_State):
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    learning_rate: float | None = None
    # When the step counter was last seen and when training started, for the ETA.
    first_step_at: datetime | None = None
    updated_at: datetime | None = None


class CheckpointView(_State):
    id: str
    kind: str
    step: int
    format: str
    variant: str
    path: str
    size_bytes: int
    sha256: str
    final: bool


class ImageView(_State):
    id: str
    seed: int
    prompt: str
    width: int
    height: int
    format: str
    path: str
    sha256: str
    size_bytes: int


class Failure(_State):
    code: str
    message: str
    exit_code: int | None = None


class Attempt(_State):
    attempt: int
    runner_id: str
    started_at: datetime
    #: Why the attempt ended without finishing the job (runner died, shutdown).
    interrupted: str | None = None


class JobState(_State):
    """Everything known about one job, folded from its stream."""

    id: str
    tenant: str
    type: str
    state: JobStateName = "queued"
    priority: int = 100
    tags: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime
    progress: Progress = Progress()
    checkpoints: list[CheckpointView] = Field(default_factory=list)
    images: list[ImageView] = Field(default_factory=list)
    dataset_images: int | None = None
    dataset_rejected: list[dict[str, str]] = Field(default_factory=list)
    failure: Failure | None = None
    cancel_requested: bool = False
    data_removed: bool = False
    attempts: list[Attempt] = Field(default_factory=list)
    version: int = 0
    position: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


def evolve(state: JobState | None, recorded: RecordedEvent) -> JobState | None:
    """Apply one event of a job stream to the job's state (pure)."""
    event = recorded.event
    at = recorded.recorded_at
    if isinstance(event, JobSubmitted):
        return JobState(
            id=event.job_id,
            tenant=event.tenant,
            type=event.job_type,
            priority=event.priority,
            tags=list(event.tags),
            config=event.config,
            created_at=at,
            updated_at=at,
            version=recorded.version,
            position=recorded.position,
        )
    if state is None:
        # An event of a stream whose JobSubmitted is missing: nothing to fold into.
        return None
    update: dict[str, Any] = {
        "updated_at": at,
        "version": recorded.version,
        "position": recorded.position,
    }
    if isinstance(event, JobStarted):
        update.update(
            state="running",
            started_at=state.started_at or at,
            attempts=[
                *state.attempts,
                Attempt(attempt=event.attempt, runner_id=event.runner_id, started_at=at),
            ],
        )
    elif isinstance(event, DatasetPrepared):
        update.update(
            dataset_images=event.images,
            dataset_rejected=[r.model_dump() for r in event.rejected],
        )
    elif isinstance(event, TrainingProgressed):
        # _replace: the values come from an already validated event, and
        # progress events are most of the log (rebuild speed).
        update["progress"] = _replace(
            state.progress,
            {
                "step": event.step,
                "total_steps": event.total_steps,
                "loss": event.loss,
                "learning_rate": event.learning_rate,
                "first_step_at": state.progress.first_step_at or at,
                "updated_at": at,
            },
        )
    elif isinstance(event, CheckpointSaved):
        update["checkpoints"] = [
            *state.checkpoints,
            CheckpointView(
                id=event.checkpoint_id,
                kind=event.kind,
                step=event.step,
                format=event.format,
                variant=event.variant,
                path=event.path,
                size_bytes=event.size_bytes,
                sha256=event.sha256,
                final=event.final,
            ),
        ]
    elif isinstance(event, ImageGenerated):
        update["images"] = [
            *state.images,
            ImageView(
                id=event.image_id,
                seed=event.seed,
                prompt=event.prompt,
                width=event.width,
                height=event.height,
                format=event.format,
                path=event.path,
                sha256=event.sha256,
                size_bytes=event.size_bytes,
            ),
        ]
    elif isinstance(event, JobCancelRequested):
        update["cancel_requested"] = True
    elif isinstance(event, JobSucceeded):
        update.update(state="succeeded", finished_at=at)
    elif isinstance(event, JobFailed):
        update.update(
            state="failed",
            finished_at=at,
            failure=Failure(code=event.code, message=event.message, exit_code=event.exit_code),
        )
    elif isinstance(event, JobCanceled):
        update.update(state="canceled", finished_at=at)
    elif isinstance(event, JobRequeued):
        attempts = list(state.attempts)
        if attempts:
            attempts[-1] = _replace(attempts[-1], {"interrupted": event.reason})
        update.update(state="queued", attempts=attempts)
    elif isinstance(event, JobArtifactsDeleted):
        update["data_removed"] = True
    return _replace(state, update)


def fold(events: list[RecordedEvent]) -> JobState | None:
    """The state of a job from its whole stream."""
    state: JobState | None = None
    for recorded in events:
        state = evolve(state, recorded)
    return state
