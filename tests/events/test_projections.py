"""Job projections: pure folds, the projector, and rebuilds."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events import projections
from events import projector as projector_module
from events.projections import fold, job_stream
from events.projector import JobProjector, read_model_rows, rebuild_job_read_model
from events.store import ANY_VERSION, NO_STREAM, SQLiteEventStore
from events.types import (
    CheckpointSaved,
    Event,
    ImageGenerated,
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

JOB_IDS = [f"j{i}" for i in range(4)]


def submitted(job_id: str) -> JobSubmitted:
    return JobSubmitted(
        job_id=job_id, tenant="t", job_type="dreambooth", config={"steps": 10}, tags=["x"]
    )


follow_up = st.one_of(
    st.builds(JobStarted, runner_id=st.just("r1"), device=st.just("cpu")),
    st.builds(
        TrainingProgressed,
        step=st.integers(0, 10),
        total_steps=st.just(10),
        loss=st.floats(0, 1),
        learning_rate=st.just(1e-4),
    ),
    st.builds(
        CheckpointSaved,
        checkpoint_id=st.text("abc", min_size=1, max_size=4),
        kind=st.sampled_from(["lora", "full"]),
        step=st.integers(0, 10),
        format=st.just("safetensors"),
        path=st.just("a/b"),
        size_bytes=st.integers(0, 100),
        sha256=st.just("0" * 64),
    ),
    st.builds(
        ImageGenerated,
        image_id=st.just("img"),
        prompt=st.just("p"),
        seed=st.integers(0, 5),
        width=st.just(64),
        height=st.just(64),
        format=st.just("png"),
        path=st.just("x.png"),
        sha256=st.just("0" * 64),
    ),
    st.just(JobCancelRequested()),
    st.just(JobSucceeded()),
    st.builds(JobFailed, code=st.just("boom"), message=st.just("it broke")),
    st.just(JobCanceled()),
    st.just(JobRequeued(reason="runner stopped")),
)

# A script: which job each event goes to (a job's first event is always its submission).
scripts = st.lists(st.tuples(st.sampled_from(JOB_IDS), follow_up), min_size=1, max_size=40)


async def _append_script(
    store: SQLiteEventStore, script: list[tuple[str, Event]], started: set[str]
) -> None:
    for job_id, event in script:
        if job_id not in started:
            await store.append(job_stream(job_id), NO_STREAM, [submitted(job_id)])
            started.add(job_id)
        await store.append(job_stream(job_id), ANY_VERSION, [event])


def _run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(script=scripts, cut=st.integers(0, 40), batch=st.integers(1, 7))
def test_incremental_equals_rebuild_and_restart(
    tmp_path_factory: object, script: list[tuple[str, Event]], cut: int, batch: int
) -> None:
    """For any valid event sequence, the incrementally maintained read model (with the
    projector stopped and restarted part-way, small batches) equals a rebuild from the log."""

    async def scenario() -> None:
        folder: Path = tmp_path_factory.mktemp("proj")  # type: ignore[attr-defined]
        store = await SQLiteEventStore.open(folder / "events.db")
        try:
            first = JobProjector(store, batch_size=batch)
            await first.start()
            started: set[str] = set()
            await _append_script(store, script[:cut], started)
            await first.wait_for(await store.head())
            await first.stop()
            # restart mid-stream: a new projector resumes from the tracked position
            await _append_script(store, script[cut:], started)
            second = JobProjector(store, batch_size=batch)
            await second.start()
            await second.wait_for(await store.head())
            await second.stop()
            incremental = await read_model_rows(store)
            rebuilt_position = await rebuild_job_read_model(store, batch_size=3)
            assert rebuilt_position == await store.head()
            assert await read_model_rows(store) == incremental
        finally:
            await store.close()

    _run(scenario())


def _recorded(script: list[tuple[str, Event]], job_id: str) -> list[RecordedEvent]:
    """The stream of one job in `script`, as the store would record it."""
    events: list[Event] = [submitted(job_id), *(e for j, e in script if j == job_id)]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        RecordedEvent(i * 7 + 3, job_stream(job_id), i, start + timedelta(seconds=i), event)
        for i, event in enumerate(events, start=1)
    ]


@settings(max_examples=60, deadline=None)
@given(script=scripts)
def test_fast_state_copy_matches_model_copy(script: list[tuple[str, Event]]) -> None:
    """`evolve` copies states with `_replace`; folding with pydantic's own `model_copy`
    instead gives equal states, the same fields-set and the same JSON."""
    fast = {j: fold(_recorded(script, j)) for j in JOB_IDS}
    with mock.patch.object(
        projections, "_replace", lambda state, update: state.model_copy(update=update)
    ):
        reference = {j: fold(_recorded(script, j)) for j in JOB_IDS}
    for job_id in JOB_IDS:
        a, b = fast[job_id], reference[job_id]
        assert a is not None and b is not None
        assert a == b
        assert a.model_dump_json() == b.model_dump_json()
        assert a.model_fields_set == b.model_fields_set
        assert a.progress.model_fields_set == b.progress.model_fields_set
        assert [x.model_fields_set for x in a.attempts] == [x.model_fields_set for x in b.attempts]


async def test_read_model_reflects_job_lifecycle(tmp_path: Path) -> None:
    """Submitted → started → progress → checkpoint → succeeded shows in the jobs table."""
    store = await SQLiteEventStore.open(tmp_path / "events.db")
    projector = JobProjector(store)
    await projector.start()
    await store.append(job_stream("a"), NO_STREAM, [submitted("a")])
    await store.append(
        job_stream("a"),
        1,
        [
            JobStarted(runner_id="r", device="cpu"),
            TrainingProgressed(step=5, total_steps=10, loss=0.1, learning_rate=1e-4),
            CheckpointSaved(
                checkpoint_id="c1",
                kind="lora",
                step=10,
                format="safetensors",
                path="p",
                size_bytes=3,
                sha256="0" * 64,
                final=True,
            ),
            JobSucceeded(),
        ],
    )
    await projector.wait_for(await store.head())
    rows = await read_model_rows(store)
    assert len(rows) == 2
    job_id, tenant, jtype, state, *_ = rows[0]
    assert (job_id, tenant, jtype, state) == ("a", "t", "dreambooth", "succeeded")
    assert rows[1] == ("c1", "a", "t", "checkpoint")
    await projector.stop()
    await store.close()


async def test_projector_follows_live_commits(tmp_path: Path) -> None:
    """A started projector applies new commits without being asked (wake-up on commit)."""
    store = await SQLiteEventStore.open(tmp_path / "events.db")
    projector = JobProjector(store)
    await projector.start()
    await store.append(job_stream("a"), NO_STREAM, [submitted("a")])
    async with asyncio.timeout(5):
        while projector.position < 1:
            await asyncio.sleep(0.01)
    assert len(await read_model_rows(store)) == 1
    await projector.stop()
    await store.close()


async def test_projector_memory_is_bounded_and_evicted_jobs_reload(tmp_path: Path) -> None:
    """The projector keeps at most CACHE_LIMIT job states in memory (a long-running
    service must not grow with every job it has seen); a job whose state was evicted
    is re-read from its row on its next event, so the read model stays exact."""
    store = await SQLiteEventStore.open(tmp_path / "events.db")
    try:
        with mock.patch.object(projector_module, "CACHE_LIMIT", 8):
            projector = JobProjector(store, batch_size=5)
            await projector.start()
            jobs = [f"m{i:02d}" for i in range(30)]
            for job_id in jobs:
                await store.append(job_stream(job_id), NO_STREAM, [submitted(job_id)])
            await projector.wait_for(await store.head())
            assert projector.cached_jobs == 8
            # the oldest jobs were evicted: their next events must fold onto the stored rows
            for job_id in jobs[:5]:
                await store.append(
                    job_stream(job_id),
                    ANY_VERSION,
                    [JobStarted(runner_id="r1", device="cpu"), JobSucceeded()],
                )
            await projector.wait_for(await store.head())
            assert projector.cached_jobs == 8
            await projector.stop()
        live = await read_model_rows(store)
        states = {row[0]: row[3] for row in live if len(row) > 4}
        assert [states[j] for j in jobs[:6]] == ["succeeded"] * 5 + ["queued"]
        await rebuild_job_read_model(store)
        assert await read_model_rows(store) == live
    finally:
        await store.close()
