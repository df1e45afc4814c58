"""Where things live in the data folder, and the one check that keeps paths inside it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

# Ids are generated here (`job_<hex>`, `ds_<hex>`); anything else never names a folder.
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


def inside_data_dir(data_dir: Path, relative: str) -> Path | None:
    """`data_dir / relative`, resolved, or None when it would leave the data folder.

    Paths in events are relative to the data folder; one that resolves
    elsewhere (`..`, an absolute path, a symlink pointing out) is never
    read, served or deleted.
    """
    root = data_dir.resolve()
    candidate = (root / relative).resolve()
    return candidate if candidate.is_relative_to(root) and candidate != root else None


def job_dir(data_dir: Path, job_id: str) -> Path | None:
    """The folder of a job's files, or None for an id that cannot name one."""
    return data_dir / "jobs" / job_id if _SAFE_ID.match(job_id) else None


def datasets_dir(data_dir: Path) -> Path:
    return data_dir / "datasets"


def staging_dir(data_dir: Path) -> Path:
    """Uploads are received here first; on the same filesystem as their final
    place, so publishing a dataset is one atomic rename. Only uploads live
    here, so whatever is left at start-up was cut off by a crash."""
    return data_dir / "tmp" / "uploads"


def remove_job_files(data_dir: Path, job_id: str, artifact_paths: list[str]) -> None:
    """Delete a job's folder and any of its artifacts recorded elsewhere in the data folder."""
    folder = job_dir(data_dir, job_id)
    if folder is not None and folder.exists():
        shutil.rmtree(folder)
    # Artifacts are written inside the job's folder; any recorded elsewhere
    # in the data folder go too.
    for relative in artifact_paths:
        path = inside_data_dir(data_dir, relative)
        if path is None or not path.exists():
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
