"""The runner's view of the job queue, folded from the log.

The runner keeps its own small fold (job id → priority, age, state) instead of
reading the service's read model, so it needs nothing but the log. Claiming
is done against the job's stream version, so a stale view can at worst cost a
lost race, never a double run.
"""

from __future__ import annotations

from dataclasses import dataclass

from events.projections import JOB_STREAM_PREFIX
from events.store import EventStore
from events.types import RecordedEvent

#: Event types that change whether a job is waiting in the queue.
QUEUE_EVENT_TYPES: tuple[str, ...] = (
    "JobSubmitted",
    "JobStarted",
    "JobRequeued",
    "JobSucceeded",
    "JobFailed",
    "JobCanceled",
)


@dataclass
class QueuedJob:
    job_id: str
    priority: int
    submitted_position: int
    queued: bool = True


class QueueView:
    """Queued jobs, ordered by priority (higher first), then age (older first)."""

    def __init__(self) -> None:
        self.jobs: dict[str, QueuedJob] = {}
        #: job id → id of the runner that claimed it, for jobs running now.
        self.running: dict[str, str] = {}
        self.position = 0

    def apply(self, recorded: RecordedEvent) -> None:
        self.position = max(self.position, recorded.position)
        if not recorded.stream_id.startswith(JOB_STREAM_PREFIX):
            return
        job_id = recorded.stream_id[len(JOB_STREAM_PREFIX) :]
        kind = recorded.type
        if kind == "JobSubmitted":
            priority = getattr(recorded.event, "priority", 100)
            self.jobs[job_id] = QueuedJob(job_id, priority, recorded.position)
        elif job_id not in self.jobs:
            return
        elif kind == "JobStarted":
            self.jobs[job_id].queued = False
            self.running[job_id] = getattr(recorded.event, "runner_id", "")
        elif kind == "JobRequeued":
            self.jobs[job_id].queued = True
            self.running.pop(job_id, None)
        else:  # terminal
            del self.jobs[job_id]
            self.running.pop(job_id, None)

    async def refresh(self, store: EventStore) -> None:
        """Apply every queue-relevant event committed since the last refresh."""
        while True:
            events, scanned_to = await store.scan(self.position, 5000, QUEUE_EVENT_TYPES)
            for recorded in events:
                self.apply(recorded)
            self.position = max(self.position, scanned_to)
            if len(events) < 5000:
                return

    def claimed_by(self, runner_id: str) -> list[str]:
        """Jobs running now that `runner_id` claimed."""
        return [job for job, owner in self.running.items() if owner == runner_id]

    def next_candidates(self) -> list[str]:
        """Queued job ids, best first."""
        waiting = [j for j in self.jobs.values() if j.queued]
        waiting.sort(key=lambda j: (-j.priority, j.submitted_position))
        return [j.job_id for j in waiting]
