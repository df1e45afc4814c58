"""The service never loads torch: validating a training request must stay cheap."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import service.app, service.cli, service.supervisor
from gpu_runner.jobspec import JobSpec
from gpu_runner.training import check_device_support
spec = JobSpec.model_validate({"type": "dreambooth", "train": {
    "instance_prompt": "photo of sks dog", "dataset_id": "ds_x", "steps": 10}})
check_device_support(spec.train, "cpu")
heavy = [m for m in ("torch", "diffusers", "transformers", "peft") if m in sys.modules]
print(",".join(heavy))
"""


def test_service_and_request_validation_do_not_import_torch() -> None:
    """Importing the service and validating a dreambooth request (device checks
    included) loads none of torch, diffusers, transformers or peft."""
    out = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
