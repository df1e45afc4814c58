"""Errors raised by the runner.

Every runner failure that should reach a user is a `RunnerError` with a
stable, machine-readable `code` (it becomes the job's `failure.code`) and a
human message that names the thing at fault.
"""

from __future__ import annotations


class RunnerError(Exception):
    """Base class of the runner's user-facing errors."""

    code: str = "runner_error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class ModelError(RunnerError):
    """A base model is missing, corrupt, of an unexpected family, or not allowed."""


class GenerationError(RunnerError):
    """Image generation was asked for something the model cannot do."""


class Canceled(RunnerError):
    """The job was canceled while it ran; nothing partial was kept."""

    def __init__(self, message: str = "canceled") -> None:
        super().__init__("canceled", message)
