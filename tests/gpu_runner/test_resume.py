"""Resumable training: an interrupted run resumed from its saved state ends
bit-identical to an uninterrupted one.

Interruptions are simulated with `should_cancel`, which is polled before every
batch: returning True on poll `k * accumulation + 1` stops the run right after
optimizer step k (a crash there would lose nothing more, since cancelling
saves no state of its own).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from gpu_runner.checkpoints import LORA_WEIGHT_NAME, STATE_WEIGHTS, CheckpointFile
from gpu_runner.errors import Canceled
from gpu_runner.training import (
    TrainConfig,
    TrainHooks,
    TrainImage,
    TrainResult,
    load_state_step,
    train,
)

from .test_training import config, train_images  # noqa: F401  (a fixture)


@dataclass
class Hooks:
    """Records checkpoints and progress; cancels once `stop_after` optimizer steps ran."""

    accumulation: int = 1
    stop_after: int | None = None
    polls: int = 0
    progress: list[int] = field(default_factory=list)
    checkpoints: list[CheckpointFile] = field(default_factory=list)

    def hooks(self) -> TrainHooks:
        return TrainHooks(
            on_progress=lambda step, *_: self.progress.append(step),
            should_cancel=self._should_cancel,
            on_checkpoint=self.checkpoints.append,
        )

    def _should_cancel(self) -> bool:
        self.polls += 1
        return self.stop_after is not None and self.polls > self.stop_after * self.accumulation


def run(
    model: Path,
    cfg: TrainConfig,
    images: list[TrainImage],
    out: Path,
    hooks: Hooks,
    state_dir: Path | None = None,
    every: int | None = 2,
) -> TrainResult:
    torch.set_num_threads(2)
    return train(
        model,
        "sd15",
        cfg,
        images,
        [],
        out,
        "cpu",
        hooks.hooks(),
        state_dir=state_dir,
        state_every_steps=every if state_dir is not None else None,
    )


def interrupted_then_resumed(
    model: Path,
    cfg: TrainConfig,
    images: list[TrainImage],
    root: Path,
    stop_after: int,
) -> tuple[TrainResult, Hooks, Hooks]:
    """Run until `stop_after` steps, then resume to the end with fresh hooks."""
    state = root / "state"
    first = Hooks(cfg.gradient_accumulation_steps, stop_after)
    with pytest.raises(Canceled):
        run(model, cfg, images, root / "out", first, state)
    assert hidden_entries(root) == []
    second = Hooks(cfg.gradient_accumulation_steps)
    result = run(model, cfg, images, root / "out", second, state)
    assert hidden_entries(root) == []
    return result, first, second


def hidden_entries(folder: Path) -> list[Path]:
    """Staging / replaced-state folders or temporary files left under `folder`."""
    return [p for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and ta
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


LORA = {
    "steps": 6,
    "save_checkpoints_at": [3],
    "crop": "random",  # crops draw from the data generator between permutations
    "train_text_encoder": True,
    "text_encoder_steps": 3,  # the resumed run starts with frozen encoders
    "lr_scheduler": "linear",
}


@pytest.fixture(scope="module")
def lora_reference(
    tiny_models: dict[str, Path],
    train_images: list[TrainImage],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> TrainResult:
    """The uninterrupted LoRA run every resumed one is compared with (no state)."""
    out = tmp_path_factory.mktemp("lora-reference")
    return run(tiny_models["sd15"], config(**LORA), train_images, out, Hooks())


def test_lora_resumed_between_saves_is_bit_identical(
    tiny_models: dict[str, Path],
    train_images: list[TrainImage],  # noqa: F811
    lora_reference: TrainResult,
    tmp_path: Path,
) -> None:
    """Stopped after step 5 (last state at 4, checkpoint 3 published), the
    resumed run redoes step 5, writes only the final checkpoint, and its LoRA
    equals the uninterrupted run's bit for bit."""
    cfg = config(**LORA)
    result, first, second = interrupted_then_resumed(
        tiny_models["sd15"], cfg, train_images, tmp_path, stop_after=5
    )
    assert [c.step for c in first.checkpoints] == [3, 3]  # diffusers + kohya files
    checkpoint_3 = tmp_path / "out" / "checkpoint-3" / LORA_WEIGHT_NAME
    written_at = checkpoint_3.stat().st_mtime_ns
    assert {c.step for c in second.checkpoints} == {6}
    assert second.progress[0] == 5 and second.progress[-1] == 6
    assert checkpoint_3.stat().st_mtime_ns == written_at
    assert result.steps == 6 and result.images_seen == lora_reference.images_seen
    assert len(result.final_checkpoints) == len(lora_reference.final_checkpoints) == 2
    pairs = zip(result.final_checkpoints, lora_reference.final_checkpoints, strict=True)
    for mine, reference in pairs:
        assert_same_tensors(mine.path, reference.path)
        assert mine.sha256 == reference.sha256


def test_lora_state_is_small_and_holds_only_lora_weights(
    tiny_models: dict[str, Path],
    train_images: list[TrainImage],  # noqa: F811
    tmp_path: Path,
) -> None:
    """A LoRA state holds adapter weights and their optimizer state, far less
    than the UNet; `load_state_step` reads its step."""
    state = tmp_path / "state"
    with pytest.raises(Canceled):
        run(
            tiny_models["sd15"], config(steps=4), train_images, tmp_path / "out", Hooks(1, 2), state
        )
    assert load_state_step(state) == 2
    assert load_state_step(tmp_path / "missing") is None
    weights = load_file(state / STATE_WEIGHTS)
    assert weights and all("lora" in key for key in weights)
    unet_bytes = sum(p.stat().st_size for p in (tiny_models["sd15"] / "unet").glob("*.safetensors"))
    state_bytes = sum(p.stat().st_size for p in state.rglob("*") if p.is_file())
    assert state_bytes < unet_bytes / 4
    assert hidden_entries(tmp_path) == []


def test_accumulation_resumed_at_a_save_is_bit_identical(
    tiny_models: dict[str, Path],
    train_images: list[TrainImage],  # noqa: F811
    tmp_path: Path,
) -> None:
    """With 2 batches per step (data order running across epochs of 3 images),
    a run stopped right at its state save (step 2) resumes bit-identically."""
    cfg = config(steps=4, gradient_accumulation_steps=2, lr_scheduler="cosine")
    reference = run(tiny_models["sd15"], cfg, train_images, tmp_path / "ref", Hooks())
    result, _, second = interrupted_then_resumed(
        tiny_models["sd15"], cfg, train_images, tmp_path, stop_after=2
    )
    assert second.polls == 2 * 2  # only the remaining two steps' batches ran
    assert result.images_seen == reference.images_seen == 8
    assert_same_tensors(result.final_checkpoints[0].path, reference.final_checkpoints[0].path)


def test_full_fine_tune_resumed_is_bit_identical(
    tiny_models: dict[str, Path],
    train_images: list[TrainImage],  # noqa: F811
    tmp_path: Path,
) -> None:
    """A full UNet + text encoder fine-tune stopped after step 3 (state at 2)
    resumes to the same weights; its state holds the UNet's weights."""
    cfg = config(steps=4, method="full", train_text_encoder=True, learning_rate=1e-4)
    reference = run(tiny_models["sd15"], cfg, train_images, tmp_path / "ref", Hooks())
    root = tmp_path / "resumed"
    result, first, _ = interrupted_then_resumed(
        tiny_models["sd15"], cfg, train_images, root, stop_after=3
    )
    assert first.checkpoints == []
    weights = load_file(root / "state" / STATE_WEIGHTS)
    assert any(k.startswith("unet.") for k in weights)
    assert any(k.startswith("text_encoder.") for k in weights)
    for component in ("unet", "text_encoder"):
        (mine,) = (result.final_checkpoints[0].path / component).glob("*.safetensors")
        (theirs,) = (reference.final_checkpoints[0].path / component).glob("*.safetensors")
        assert_same_tensors(mine, theirs)


def test_state_of_another_config_is_ignored(
    tiny_models: dict[str, Path],
    train_images: list[TrainImage],  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A state saved for another learning rate is ignored with a logged reason:
    the run starts at step 1 and then replaces it with its own."""
    state = tmp_path / "state"
    with pytest.raises(Canceled):
        run(tiny_models["sd15"], config(steps=4), train_images, tmp_path / "a", Hooks(1, 2), state)
    other = config(steps=4, learning_rate=5e-4)
    hooks = Hooks(1, 3)
    with caplog.at_level(logging.WARNING, "gpu_runner.training"), pytest.raises(Canceled):
        run(tiny_models["sd15"], other, train_images, tmp_path / "b", hooks, state)
    assert hooks.progress[0] == 1 and hooks.polls == 4
    assert any("another config" in r.getMessage() for r in caplog.records)
    assert load_state_step(state) == 2  # the new run's own state, saved at its step 2
    hooks = Hooks(1)
    run(tiny_models["sd15"], other, train_images, tmp_path / "b", hooks, state)
    assert hooks.progress[0] == 3  # now it resumes


def test_state_every_steps_needs_a_state_dir(
    tiny_models: dict[str, Path],
    train_images: list[TrainImage],  # noqa: F811
    tmp_path: Path,
) -> None:
    kwargs: dict[str, Any] = {"state_every_steps": 2}
    with pytest.raises(ValueError, match="state_dir"):
        train(
            tiny_models["sd15"],
            "sd15",
            config(),
            train_images,
            [],
            tmp_path,
            "cpu",
            TrainHooks(),
            **kwargs,
        )
