"""Queries on the projector's read-model tables (`jobs`, `artifacts`).

Each function takes a raw `sqlite3.Connection` and runs inside
`store.read_transaction`, i.e. on the reader's thread within one snapshot.
Every query is scoped to a tenant: a row of another tenant is simply not
found, which the handlers answer with 404.
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from events.projections import JobState
from service.errors import ApiError


def get_job(conn: sqlite3.Connection, job_id: str, tenant: str) -> JobState | None:
    """The tenant's job `job_id`, or None."""
    row = conn.execute(
        "SELECT doc FROM jobs WHERE job_id = ? AND tenant = ?", (job_id, tenant)
    ).fetchone()
    return None if row is None else JobState.model_validate_json(row[0])


def find_artifact(
    conn: sqlite3.Connection, artifact_id: str, kind: str, tenant: str
) -> JobState | None:
    """The job holding the tenant's checkpoint or image `artifact_id`, or None."""
    row = conn.execute(
        "SELECT jobs.doc FROM artifacts JOIN jobs ON jobs.job_id = artifacts.job_id "
        "WHERE artifacts.artifact_id = ? AND artifacts.kind = ? AND artifacts.tenant = ?",
        (artifact_id, kind, tenant),
    ).fetchone()
    return None if row is None else JobState.model_validate_json(row[0])


def trained_jobs(conn: sqlite3.Connection, tenant: str) -> list[JobState]:
    """The tenant's succeeded training jobs whose files still exist, newest first."""
    rows = conn.execute(
        "SELECT doc FROM jobs WHERE tenant = ? AND state = 'succeeded' "
        "AND type IN ('dreambooth', 'dreambooth_image_gen') "
        "ORDER BY created_at DESC, job_id DESC",
        (tenant,),
    ).fetchall()
    states = [JobState.model_validate_json(doc) for (doc,) in rows]
    return [s for s in states if not s.data_removed]


def count_by_state(conn: sqlite3.Connection) -> dict[str, int]:
    """Jobs of every tenant by state."""
    return dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())


# ------------------------------------------------------------------ listing


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: the last job's (created_at, job_id) in listing order."""

    created_at: str
    job_id: str

    def encode(self) -> str:
        raw = json.dumps([self.created_at, self.job_id], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        """Parse a token from `encode`; anything else is a 422 `invalid_cursor`."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            created_at, job_id = json.loads(raw)
            if not isinstance(created_at, str) or not isinstance(job_id, str):
                raise ValueError("wrong types")
        except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
            raise ApiError(
                422, "invalid_cursor", "cursor is not one this API returned", "cursor"
            ) from None
        return cls(created_at, job_id)


def list_jobs(
    conn: sqlite3.Connection,
    tenant: str,
    *,
    job_type: str | None,
    state: str | None,
    tag: str | None,
    limit: int,
    after: Cursor | None,
) -> tuple[list[JobState], Cursor | None]:
    """One page of the tenant's jobs, newest first, and the cursor of the next page."""
    sql = "SELECT created_at, job_id, doc FROM jobs WHERE tenant = ?"
    params: list[Any] = [tenant]
    if job_type is not None:
        sql += " AND type = ?"
        params.append(job_type)
    if state is not None:
        sql += " AND state = ?"
        params.append(state)
    if tag is not None:
        sql += " AND EXISTS (SELECT 1 FROM json_each(jobs.tags) WHERE json_each.value = ?)"
        params.append(tag)
    if after is not None:
        # Row-value comparison walks the (tenant, created_at DESC, job_id DESC)
        # index from the cursor: a page costs the same however deep it is.
        sql += " AND (created_at, job_id) < (?, ?)"
        params.extend([after.created_at, after.job_id])
    sql += " ORDER BY created_at DESC, job_id DESC LIMIT ?"
    params.append(limit + 1)
    rows = conn.execute(sql, params).fetchall()
    page = rows[:limit]
    states = [JobState.model_validate_json(doc) for _, _, doc in page]
    next_cursor = Cursor(page[-1][0], page[-1][1]) if len(rows) > limit else None
    return states, next_cursor


def expired_jobs(conn: sqlite3.Connection, finished_before: str) -> list[JobState]:
    """Finished jobs (any tenant) last updated before `finished_before` (ISO time)
    whose files still exist: what retention deletes."""
    rows = conn.execute(
        "SELECT doc FROM jobs WHERE state IN ('succeeded', 'failed', 'canceled') "
        "AND updated_at < ? ORDER BY updated_at",
        (finished_before,),
    ).fetchall()
    states = [JobState.model_validate_json(doc) for (doc,) in rows]
    return [s for s in states if not s.data_removed]
