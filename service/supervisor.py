"""Starts and supervises one runner subprocess per configured device.

A runner that dies (SIGKILL, out of memory, a crash) is noticed when its
process exits: the jobs it had claimed get `JobFailed` with the exit code and
a hint, `RunnerStopped` is recorded, and a new runner is started. A clean
stop (SIGTERM) lets the runner reach a step boundary and put its job back in
the queue (`JobRequeued`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
from dataclasses import dataclass
from typing import Any

import structlog

from events.errors import ConcurrencyError
from events.projections import fold, job_stream
from events.settings import Settings
from events.store import ANY_VERSION, SQLiteEventStore
from events.types import JobFailed, JobRequeued, RunnerStopped
from gpu_runner.queue import QueueView
from gpu_runner.worker import GRACEFUL_STOP_REASON

log = structlog.get_logger(__name__)

_LEVELS = {"debug", "info", "warning", "error", "critical"}


def exit_hint(code: int) -> str:
    """A human reading of a runner's exit status."""
    if code == -signal.SIGKILL:
        return "killed by SIGKILL — out of memory?"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == 137:
        return "killed (exit 137) — out of memory?"
    return "crashed; see the runner's log lines"


@dataclass
class RunnerSlot:
    device: str
    runner_id: str = ""
    pid: int | None = None
    state: str = "starting"
    restarts: int = 0
    last_exit_code: int | None = None
    process: asyncio.subprocess.Process | None = None


class RunnerSupervisor:
    """One runner subprocess per device in `settings.runner.devices`."""

    def __init__(
        self,
        settings: Settings,
        store: SQLiteEventStore,
        restart_delay: float = 1.0,
        stop_timeout: float = 60.0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.restart_delay = restart_delay
        self.stop_timeout = stop_timeout
        self.slots = [RunnerSlot(device) for device in settings.runner.devices]
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._queue = QueueView()

    async def start(self) -> None:
        """Requeue jobs left running by a previous service, then start the runners."""
        await self._requeue_orphans()
        for slot in self.slots:
            self._tasks.append(
                asyncio.create_task(self._supervise(slot), name=f"runner-{slot.device}")
            )

    async def stop(self) -> None:
        """SIGTERM every runner, wait for it to stop at a step boundary, then kill."""
        self._stopping = True
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signal.SIGTERM)
        for slot in self.slots:
            proc = slot.process
            if proc is None or proc.returncode is not None:
                continue
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout)
            except TimeoutError:
                log.warning("runner.kill_after_timeout", runner_id=slot.runner_id)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "device": s.device,
                "runner_id": s.runner_id,
                "pid": s.pid,
                "state": s.state,
                "restarts": s.restarts,
                "last_exit_code": s.last_exit_code,
            }
            for s in self.slots
        ]

    # ------------------------------------------------------------ internals

    def _command(self, slot: RunnerSlot) -> list[str]:
        cmd = [sys.executable, "-m", "gpu_runner", "--device", slot.device]
        cmd += ["--runner-id", slot.runner_id]
        cmd += ["--data-dir", str(self.settings.storage.data_dir)]
        return cmd

    async def _supervise(self, slot: RunnerSlot) -> None:
        while not self._stopping:
            slot.runner_id = f"{slot.device}-{secrets.token_hex(4)}"
            slot.state = "starting"
            proc = await asyncio.create_subprocess_exec(
                *self._command(slot),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                # The effective settings (config file plus CLI overrides) travel
                # whole, so the runner sees exactly what the service sees.
                env=dict(os.environ, BOOTHD_SETTINGS_JSON=self.settings.model_dump_json()),
            )
            slot.process, slot.pid, slot.state = proc, proc.pid, "running"
            log.info("runner.spawned", runner_id=slot.runner_id, pid=proc.pid, device=slot.device)
            assert proc.stderr is not None
            forward = asyncio.create_task(self._forward_logs(slot.runner_id, proc.stderr))
            code = await proc.wait()
            await forward
            slot.last_exit_code = code
            slot.state = "stopped"
            await self._runner_exited(slot, code)
            if self._stopping:
                return
            slot.restarts += 1
            slot.state = "restarting"
            await asyncio.sleep(self.restart_delay)

    async def _runner_exited(self, slot: RunnerSlot, code: int) -> None:
        clean = code == 0 and self._stopping
        reason = "stopped" if clean else exit_hint(code)
        if not clean:
            log.error("runner.died", runner_id=slot.runner_id, exit_code=code, hint=reason)
        await self._queue.refresh(self.store)
        for job_id in self._queue.claimed_by(slot.runner_id):
            cause = f"the runner exited with code {code} ({reason})"
            await self._runner_lost_job(job_id, cause, code)
        await self.store.append(
            f"runner-{slot.runner_id}",
            ANY_VERSION,
            [RunnerStopped(runner_id=slot.runner_id, exit_code=code, reason=reason)],
        )

    async def _runner_lost_job(self, job_id: str, cause: str, code: int | None) -> None:
        """Requeue the job as a new attempt (it resumes from its saved training state),
        or fail it with every attempt's cause once `max_attempts` is reached."""
        state = fold(await self.store.read_stream(job_stream(job_id)))
        if state is None:
            return
        # A graceful stop (service shutdown) is not the job's fault: it does not count.
        causes = [
            a.interrupted
            for a in state.attempts[:-1]
            if a.interrupted and a.interrupted != GRACEFUL_STOP_REASON
        ] + [cause]
        if len(causes) < self.settings.jobs.max_attempts:
            await self._append_if_running(job_id, JobRequeued(reason=cause))
            return
        history = "; ".join(f"attempt {i}: {c}" for i, c in enumerate(causes, start=1))
        message = f"gave up after {len(causes)} failed attempts — {history}"
        await self._append_if_running(
            job_id, JobFailed(code="runner_died", message=message, exit_code=code)
        )

    async def _requeue_orphans(self) -> None:
        """Jobs marked running when no runner of ours is alive go back to the queue."""
        await self._queue.refresh(self.store)
        for job_id in list(self._queue.running):
            await self._runner_lost_job(job_id, "the service stopped without stopping it", None)

    async def _append_if_running(self, job_id: str, event: JobFailed | JobRequeued) -> None:
        """Append `event` only while the job is still running (checked at its version)."""
        for _ in range(5):
            events = await self.store.read_stream(job_stream(job_id))
            state = fold(events)
            if state is None or state.state != "running":
                return
            try:
                await self.store.append(job_stream(job_id), events[-1].version, [event])
                return
            except ConcurrencyError:
                continue

    async def _forward_logs(self, runner_id: str, stream: asyncio.StreamReader) -> None:
        """Turn the runner's stderr (JSON lines, or a library's plain text) into our log."""
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line longer than the buffer limit
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            if not text:
                continue
            try:
                record = json.loads(text)
                if not isinstance(record, dict):
                    raise ValueError
            except ValueError:
                log.info("runner.output", runner_id=runner_id, line=text[:2000])
                continue
            level = str(record.pop("level", "info"))
            event = str(record.pop("event", "runner.log"))
            record.pop("timestamp", None)
            record.pop("runner_id", None)
            emit = getattr(log, level if level in _LEVELS else "info")
            emit(event, runner_id=runner_id, **record)
