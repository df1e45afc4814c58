"""The API's job object (API.md) rendered from the projected `JobState`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from events.projections import TERMINAL_STATES, JobState


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def _seconds(start: datetime | None, end: datetime | None) -> float:
    if start is None or end is None:
        return 0.0
    return round(max(0.0, (end - start).total_seconds()), 3)


def checkpoint_url(checkpoint_id: str) -> str:
    return f"/v1/checkpoints/{checkpoint_id}/download"


def image_url(image_id: str) -> str:
    return f"/v1/images/{image_id}"


def render_job(state: JobState, now: datetime | None = None) -> dict[str, Any]:
    """The job object of API.md; durations of a live job are measured up to `now`."""
    now = now or datetime.now(UTC)
    terminal = state.state in TERMINAL_STATES
    queued_until = state.started_at or (state.finished_at if terminal else now)
    running_until = state.finished_at if terminal else now
    progress = state.progress
    total = progress.total_steps
    if state.state == "succeeded":
        percentage = 100.0
    elif total:
        percentage = round(100.0 * min(progress.step, total) / total, 2)
    else:
        percentage = 0.0
    eta: float | None = None
    if (
        not terminal
        and total
        and progress.step > 0
        and progress.first_step_at is not None
        and progress.updated_at is not None
        and progress.updated_at > progress.first_step_at
    ):
        per_step = (progress.updated_at - progress.first_step_at).total_seconds() / progress.step
        eta = round(per_step * max(0, total - progress.step), 1)
    return {
        "id": state.id,
        "type": state.type,
        "state": state.state,
        "created_at": _iso(state.created_at),
        "started_at": _iso(state.started_at),
        "finished_at": _iso(state.finished_at),
        "queued_seconds": _seconds(state.created_at, queued_until),
        "running_seconds": _seconds(state.started_at, running_until),
        "progress": {
            "step": progress.step,
            "total_steps": total,
            "percentage": percentage,
            "loss": progress.loss,
            "eta_seconds": eta,
        },
        "config": state.config,
        "result": {
            "checkpoints": [
                {
                    "id": c.id,
                    "kind": c.kind,
                    "step": c.step,
                    "format": c.format,
                    "variant": c.variant,
                    "final": c.final,
                    "size_bytes": c.size_bytes,
                    "sha256": c.sha256,
                    "url": checkpoint_url(c.id),
                }
                for c in state.checkpoints
            ],
            "images": [
                {
                    "id": i.id,
                    "seed": i.seed,
                    "prompt": i.prompt,
                    "width": i.width,
                    "height": i.height,
                    "format": i.format,
                    "url": image_url(i.id),
                }
                for i in state.images
            ],
        },
        "failure": None
        if state.failure is None
        else {"code": state.failure.code, "message": state.failure.message},
        "attempts": len(state.attempts),
        "attempt_history": [
            {
                "attempt": a.attempt,
                "runner_id": a.runner_id,
                "started_at": _iso(a.started_at),
                "interrupted": a.interrupted,
            }
            for a in state.attempts
        ],
        "cancel_requested": state.cancel_requested,
        "data_removed": state.data_removed,
        "tags": state.tags,
        "dry_run": False,
        "position": state.position,
    }
