"""Shared fixtures for runner tests: tiny real models, built once per session.

Building a tiny model takes well under a second, but importing torch and
diffusers takes several, so each family is built (and loaded) once per test
session and shared. Tests that change a pipeline must leave it as they found
it — which is exactly the contract the runner's pipeline cache relies on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_runner.tiny_models import create_tiny_model

# Set before anything imports huggingface_hub (it reads these at import time;
# the imports above are light on purpose): tests must never reach the
# network, and the "requires torchvision" notices from transformers are noise.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

# diffusers' k-diffusion style schedulers (Euler, Heun, DPM2, LMS) call NumPy
# functions on torch tensors; NumPy 2 answers with DeprecationWarnings about
# torch's `__array__` / `__array_wrap__` signatures. Harmless, outside our
# code and not fixable here, so they are ignored for runner tests only
# (pyproject turns every other warning into an error).
SCHEDULER_NUMPY_WARNINGS = (
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
    "ignore:__array_wrap__ must accept context and return_scalar:DeprecationWarning",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Apply the scheduler NumPy warning filter to tests in this folder."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            for spec in SCHEDULER_NUMPY_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(spec))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of the tiny `sd15`, `sdxl` and `flux` models (seed 0), by family."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: create_tiny_model(family, root / family) for family in ("sd15", "sdxl", "flux")}


@pytest.fixture(scope="session")
def tiny_pipelines(tiny_models: dict[str, Path]) -> Iterator[dict[str, Any]]:
    """The tiny models loaded once (fp32, CPU) through the runner's own loader."""
    import torch

    from gpu_runner.models import load_pipeline, ref_from_path

    # Two threads is what the machine has; more would only contend.
    torch.set_num_threads(2)
    pipes = {
        family: load_pipeline(ref_from_path(f"tiny-{family}", path), "cpu", torch.float32)
        for family, path in tiny_models.items()
    }
    yield pipes
