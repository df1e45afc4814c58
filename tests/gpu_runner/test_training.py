"""Training on tiny real models: LoRA (SD 1.x, SDXL, Flux), full fine-tune, hooks.

Everything runs real diffusers / peft / accelerate code in fp32 on the CPU at
64×64 for a few steps; outputs are compared as latents after two denoising
steps with a fixed seed.
"""

from __future__ import annotations

import math
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file

from gpu_runner.checkpoints import LORA_WEIGHT_NAME, CheckpointFile, sha256_file
from gpu_runner.errors import Canceled
from gpu_runner.training import (
    TrainConfig,
    TrainHooks,
    TrainImage,
    TrainingError,
    TrainResult,
    check_device_support,
    check_family_support,
    generate_class_images,
    make_lr_scheduler,
    total_steps,
    train,
)

PROMPT = "photo of sks dog"
FAMILIES = ("sd15", "sdxl", "flux")
PIPELINES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "flux": "FluxPipeline",
}


def config(**overrides: Any) -> TrainConfig:
    """A small valid training config; `overrides` replace single fields."""
    values: dict[str, Any] = {
        "dataset_id": "ds_test",
        "instance_prompt": PROMPT,
        "steps": 2,
        "resolution": 64,
        "learning_rate": 1e-3,
        "lora_rank": 4,
        "lora_alpha": 8,
    }
    values.update(overrides)
    return TrainConfig(**values)


@dataclass
class Recorder:
    """Hooks that record every call, and cancel once `cancel_after` steps are reported."""

    cancel_after: int | None = None
    progress: list[tuple[int, int, float, float]] = field(default_factory=list)
    checkpoints: list[CheckpointFile] = field(default_factory=list)
    cancel_polls: int = 0

    def hooks(self) -> TrainHooks:
        return TrainHooks(
            on_progress=lambda *args: self.progress.append(args),
            should_cancel=self._should_cancel,
            on_checkpoint=self.checkpoints.append,
        )

    def _should_cancel(self) -> bool:
        self.cancel_polls += 1
        done = self.progress[-1][0] if self.progress else 0
        return self.cancel_after is not None and done >= self.cancel_after


def load_pipeline(family: str, path: Path) -> Any:
    import diffusers

    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe: Any, family: str, scale: float | None = None) -> torch.Tensor:
    """Latents after 2 denoising steps at a fixed seed (LoRA scale `scale`)."""
    kwargs: dict[str, Any] = {
        "prompt": PROMPT,
        "num_inference_steps": 2,
        "height": 64,
        "width": 64,
        "output_type": "latent",
        "generator": torch.Generator().manual_seed(7),
    }
    if family == "flux":
        kwargs["max_sequence_length"] = 32
        if scale is not None:
            kwargs["joint_attention_kwargs"] = {"scale": scale}
    elif scale is not None:
        kwargs["cross_attention_kwargs"] = {"scale": scale}
    with torch.no_grad():
        latents: torch.Tensor = pipe(**kwargs).images
    return latents


def leftovers(folder: Path) -> list[Path]:
    """Staging or temporary entries anywhere under `folder`."""
    return [p for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


@pytest.fixture(scope="module")
def train_images(tmp_path_factory: pytest.TempPathFactory) -> list[TrainImage]:
    """Three random 80×64 images (not square, so resizing and cropping run)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    result = []
    for i in range(3):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(path)
        result.append(TrainImage(path=path, caption="" if i else f"{PROMPT} on grass"))
    return result


@dataclass
class LoraRun:
    family: str
    out: Path
    result: TrainResult
    recorder: Recorder
    config: TrainConfig


@pytest.fixture(scope="module", params=FAMILIES)
def lora_run(
    request: pytest.FixtureRequest,
    tiny_models: dict[str, Path],
    train_images: list[TrainImage],
    tmp_path_factory: pytest.TempPathFactory,
) -> LoraRun:
    """One LoRA run per family: 3 steps, text encoder(s) trained for the first 2,
    a checkpoint at step 1, alpha (8) ≠ rank (4) so a lost alpha shows."""
    torch.set_num_threads(2)
    family = request.param
    cfg = config(
        steps=3,
        save_checkpoints_at=[1],
        train_text_encoder=True,
        text_encoder_steps=2,
        lr_scheduler="linear",
        concept_name="sks",
    )
    out = tmp_path_factory.mktemp(f"lora-{family}")
    recorder = Recorder()
    result = train(
        tiny_models[family],
        family,
        cfg,
        train_images,
        [],
        out,
        "cpu",
        recorder.hooks(),
        return_pipeline=True,
    )
    return LoraRun(family, out, result, recorder, cfg)


def test_lora_run_writes_hashed_checkpoints(lora_run: LoraRun) -> None:
    """Checkpoints land at each save_checkpoints_at step and at the end, each
    announced once after it is complete, with the right size, SHA-256 and mode
    0644, and nothing temporary left behind."""
    result, recorder = lora_run.result, lora_run.recorder
    variants = ["diffusers"] if lora_run.family == "flux" else ["diffusers", "kohya"]
    assert [(c.step, c.variant, c.final) for c in recorder.checkpoints] == [
        (step, v, step == 3) for step in (1, 3) for v in variants
    ]
    assert result.final_checkpoints == recorder.checkpoints[len(variants) :]
    assert result.steps == 3 and result.images_seen == 3
    for checkpoint in recorder.checkpoints:
        assert checkpoint.kind == "lora" and checkpoint.format == "safetensors"
        assert checkpoint.path.parent == lora_run.out / f"checkpoint-{checkpoint.step}"
        assert checkpoint.size_bytes == checkpoint.path.stat().st_size
        assert checkpoint.sha256 == sha256_file(checkpoint.path)
        assert stat.S_IMODE(checkpoint.path.stat().st_mode) == 0o644
    assert leftovers(lora_run.out) == []


def test_lora_weights_change_and_loss_is_finite(lora_run: LoraRun) -> None:
    """Training moves the LoRA weights off their zero-initialised B matrices,
    for the denoiser and the text encoder, and reports finite losses."""
    final = lora_run.result.final_checkpoints[0]
    state = load_file(final.path)
    denoiser = "transformer." if lora_run.family == "flux" else "unet."
    for prefix in (denoiser, "text_encoder."):
        ups = [v for k, v in state.items() if k.startswith(prefix) and "lora_B" in k]
        assert ups and any(v.abs().sum() > 0 for v in ups), prefix
    assert all(math.isfinite(loss) for _, _, loss, _ in lora_run.recorder.progress)


def test_progress_reports_steps_loss_and_lr(lora_run: LoraRun) -> None:
    """Progress is reported for the first and the last step, with the step,
    the total, the loss and the learning rate of the linear schedule."""
    progress = lora_run.recorder.progress
    assert progress[0][:2] == (1, 3) and progress[-1][:2] == (3, 3)
    steps = [p[0] for p in progress]
    assert steps == sorted(set(steps))
    lrs = {step: lr for step, _, _, lr in progress}
    assert lrs[1] == pytest.approx(1e-3 * 2 / 3) and lrs[3] == 0.0


def test_lora_loads_into_pipeline_at_scale_one_and_zero(
    lora_run: LoraRun, tiny_models: dict[str, Path]
) -> None:
    """The diffusers-format file loads with `load_lora_weights`: at scale 1 the
    output differs from the base model's, at scale 0 it equals it exactly."""
    family = lora_run.family
    pipe = load_pipeline(family, tiny_models[family])
    base = sample(pipe, family)
    pipe.load_lora_weights(lora_run.result.final_checkpoints[0].path.parent)
    assert not torch.allclose(sample(pipe, family, 1.0), base, atol=1e-4)
    assert torch.equal(sample(pipe, family, 0.0), base)


def test_reloaded_lora_reproduces_trained_model(
    lora_run: LoraRun, tiny_models: dict[str, Path]
) -> None:
    """Base model + saved LoRA gives the same output as the model as trained,
    so rank, alpha (from the file's metadata) and every weight survived."""
    family = lora_run.family
    pipe = load_pipeline(family, tiny_models[family])
    pipe.load_lora_weights(lora_run.result.final_checkpoints[0].path.parent)
    trained = sample(lora_run.result.pipeline, family)
    torch.testing.assert_close(sample(pipe, family), trained, rtol=0, atol=1e-6)


def test_kohya_copy_has_real_alpha(lora_run: LoraRun) -> None:
    """The kohya / webui copy names modules `lora_unet_…` / `lora_te1_text_model_…`
    and has one `.alpha` per module holding the trained alpha, not the rank."""
    if lora_run.family == "flux":
        # webui has no Flux; ComfyUI and Forge load the diffusers-format file.
        assert all(c.variant != "kohya" for c in lora_run.result.final_checkpoints)
        return
    kohya = next(c for c in lora_run.result.final_checkpoints if c.variant == "kohya")
    assert kohya.path.name == "sks_kohya.safetensors"
    state = load_file(kohya.path)
    downs = {k.split(".")[0] for k in state if k.endswith(".lora_down.weight")}
    alphas = {k.split(".")[0]: v for k, v in state.items() if k.endswith(".alpha")}
    assert downs == set(alphas) and downs
    assert all(float(v) == 8.0 for v in alphas.values())
    assert any(k.startswith("lora_unet_") for k in downs)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in downs)
    if lora_run.family == "sdxl":
        assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in downs)
    with safe_open(kohya.path, "pt") as f:
        assert f.metadata()["ss_network_alpha"] == "8"
        assert f.metadata()["ss_network_dim"] == "4"


def test_same_seed_gives_bit_identical_lora(
    tiny_models: dict[str, Path], train_images: list[TrainImage], tmp_path: Path
) -> None:
    """Two runs with the same config and seed write bit-identical LoRA files;
    another seed gives other weights."""
    torch.set_num_threads(2)
    files = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        result = train(
            tiny_models["sd15"],
            "sd15",
            config(seed=seed),
            train_images,
            [],
            tmp_path / name,
            "cpu",
            TrainHooks(),
        )
        files.append(result.final_checkpoints[0])
    a, b = (load_file(f.path) for f in files[:2])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert files[0].sha256 == files[1].sha256 != files[2].sha256


def test_cancel_stops_within_a_step_and_leaves_no_checkpoint(
    tiny_models: dict[str, Path], train_images: list[TrainImage], tmp_path: Path
) -> None:
    """Once should_cancel turns true after step 1, training raises Canceled
    before another step and leaves no checkpoint folder or temporary file."""
    recorder = Recorder(cancel_after=1)
    with pytest.raises(Canceled):
        train(
            tiny_models["sd15"],
            "sd15",
            config(steps=4, save_checkpoints_at=[2]),
            train_images,
            [],
            tmp_path,
            "cpu",
            recorder.hooks(),
        )
    assert [p[0] for p in recorder.progress] == [1]
    assert recorder.cancel_polls == 2 and recorder.checkpoints == []
    assert list(tmp_path.iterdir()) == []


def test_gradient_accumulation_counts_optimizer_steps(
    tiny_models: dict[str, Path], train_images: list[TrainImage], tmp_path: Path
) -> None:
    """With gradient_accumulation_steps=2 a step is two batches: 2 steps see
    4 images, and the LR schedule advances once per optimizer step."""
    recorder = Recorder()
    result = train(
        tiny_models["sd15"],
        "sd15",
        config(steps=2, gradient_accumulation_steps=2, lr_scheduler="linear"),
        train_images,
        [],
        tmp_path,
        "cpu",
        recorder.hooks(),
    )
    assert (result.steps, result.images_seen, recorder.cancel_polls) == (2, 4, 4)
    assert [(p[0], p[1], p[3]) for p in recorder.progress] == [(1, 2, 5e-4), (2, 2, 0.0)]


def test_prior_preservation_with_generated_class_images(
    tiny_models: dict[str, Path], train_images: list[TrainImage], tmp_path: Path
) -> None:
    """Class images are generated once with the base model (reused on a second
    call) and train beside the instance images; batches pair both kinds."""
    pipe = load_pipeline("sd15", tiny_models["sd15"])
    class_dir = tmp_path / "class"
    made = generate_class_images(
        pipe, "photo of a dog", 2, class_dir, seed=1, resolution=64, num_inference_steps=2
    )
    mtimes = [p.path.stat().st_mtime_ns for p in made]
    again = generate_class_images(pipe, "photo of a dog", 2, class_dir, seed=1, resolution=64)
    assert [p.path.stat().st_mtime_ns for p in again] == mtimes
    assert [p.caption for p in made] == ["photo of a dog"] * 2 and leftovers(class_dir) == []

    result = train(
        tiny_models["sd15"],
        "sd15",
        config(
            steps=1,
            with_prior_preservation=True,
            class_prompt="photo of a dog",
            prior_loss_weight=0.5,
            snr_gamma=5.0,
            offset_noise=0.05,
        ),
        train_images,
        made,
        tmp_path / "out",
        "cpu",
        TrainHooks(),
    )
    assert result.steps == 1 and result.final_checkpoints


def test_random_crop_and_gradient_checkpointing_train(
    tiny_models: dict[str, Path], train_images: list[TrainImage], tmp_path: Path
) -> None:
    """Random crops (images encoded at each use) and gradient checkpointing of
    the UNet and the text encoder train both LoRAs, with batch size 2 and an
    epoch-based length."""
    cfg = config(
        steps=None,
        epochs=1,
        batch_size=2,
        crop="random",
        gradient_checkpointing=True,
        train_text_encoder=True,
    )
    assert total_steps(cfg, len(train_images)) == 2
    result = train(
        tiny_models["sd15"], "sd15", cfg, train_images, [], tmp_path, "cpu", TrainHooks()
    )
    assert (result.steps, result.images_seen) == (2, 4)
    state = load_file(result.final_checkpoints[0].path)
    for prefix in ("unet.", "text_encoder."):
        ups = [v for k, v in state.items() if k.startswith(prefix) and "lora_B" in k]
        assert ups and any(v.abs().sum() > 0 for v in ups), prefix


# --- full fine-tune ---------------------------------------------------------


@pytest.fixture(scope="module")
def full_runs(
    tiny_models: dict[str, Path],
    train_images: list[TrainImage],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, TrainResult]:
    """The same full SD 1.x fine-tune (text encoder included) saved once as a
    diffusers folder and once as an original-layout single file, both with an
    extracted LoRA of rank 64 (at least every layer's full rank here)."""
    torch.set_num_threads(2)
    runs = {}
    for fmt in ("diffusers", "single_file"):
        runs[fmt] = train(
            tiny_models["sd15"],
            "sd15",
            config(
                method="full",
                saved_model_format=fmt,
                extract_lora=True,
                lora_rank=64,
                train_text_encoder=True,
                learning_rate=1e-4,
            ),
            train_images,
            [],
            tmp_path_factory.mktemp(f"full-{fmt}"),
            "cpu",
            TrainHooks(),
        )
    return runs


def test_full_fine_tune_single_file_reloads_identically(
    full_runs: dict[str, TrainResult], tiny_models: dict[str, Path]
) -> None:
    """The single file loads with `from_single_file(config=<diffusers folder>)`
    into exactly the weights of the diffusers-folder checkpoint, and generates
    the same latents."""
    from diffusers import StableDiffusionPipeline

    folder = full_runs["diffusers"].final_checkpoints[0]
    single = full_runs["single_file"].final_checkpoints[0]
    assert (folder.kind, folder.format, folder.variant) == ("full", "diffusers", "diffusers")
    assert (single.kind, single.format, single.variant) == ("full", "safetensors", "single_file")
    assert single.sha256 == sha256_file(single.path)

    from_folder = load_pipeline("sd15", folder.path)
    from_file = StableDiffusionPipeline.from_single_file(
        single.path, config=str(tiny_models["sd15"])
    )
    from_file.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        a = getattr(from_folder, name).state_dict()
        b = getattr(from_file, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    base = load_pipeline("sd15", tiny_models["sd15"]).unet.state_dict()
    assert any(not torch.equal(base[k], v) for k, v in from_folder.unet.state_dict().items())
    assert torch.equal(sample(from_file, "sd15"), sample(from_folder, "sd15"))


def test_extracted_lora_reproduces_fine_tuned_weights(
    full_runs: dict[str, TrainResult], tiny_models: dict[str, Path]
) -> None:
    """The extracted LoRA loads with `load_lora_weights`; fused into the base
    model at full rank it gives the fine-tuned Linear/Conv weights."""
    result = full_runs["diffusers"]
    lora = next(c for c in result.final_checkpoints if c.variant == "extracted_lora")
    assert (lora.kind, lora.path.name) == ("lora", LORA_WEIGHT_NAME)
    tuned = load_pipeline("sd15", result.final_checkpoints[0].path)
    pipe = load_pipeline("sd15", tiny_models["sd15"])
    pipe.load_lora_weights(lora.path.parent)
    pipe.fuse_lora()
    for name in ("unet", "text_encoder"):
        fused = dict(getattr(pipe, name).named_modules())
        for module_name, module in getattr(tuned, name).named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                layer = fused[module_name]
                weight = (
                    layer.get_base_layer().weight
                    if hasattr(layer, "get_base_layer")
                    else layer.weight
                )
                torch.testing.assert_close(weight, module.weight, rtol=0, atol=2e-6)


def test_single_file_base_model_trains_with_local_config(
    full_runs: dict[str, TrainResult],
    tiny_models: dict[str, Path],
    train_images: list[TrainImage],
    tmp_path: Path,
) -> None:
    """A base model given as one original-layout file trains when a local
    diffusers config folder is named; without one it is refused up front."""
    single = full_runs["single_file"].final_checkpoints[0].path
    with pytest.raises(TrainingError) as info:
        train(single, "sd15", config(steps=1), train_images, [], tmp_path, "cpu", TrainHooks())
    assert info.value.code == "model_config_missing"
    result = train(
        single,
        "sd15",
        config(steps=1),
        train_images,
        [],
        tmp_path,
        "cpu",
        TrainHooks(),
        single_file_config=tiny_models["sd15"],
    )
    assert result.final_checkpoints[0].path.is_file()


# --- configuration and device checks -----------------------------------------


def test_schedulers_all_construct_and_warm_up() -> None:
    """Every lr_scheduler name builds a diffusers scheduler; warmup starts at 0
    and the decaying ones reach 0 at the last step."""
    param = torch.nn.Parameter(torch.zeros(1))
    for name in (
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
    ):
        warmup = 0 if name == "constant" else 2
        cfg = config(steps=10, lr_scheduler=name, lr_warmup_steps=warmup)
        optimizer = torch.optim.SGD([param], lr=1.0)
        scheduler = make_lr_scheduler(cfg, optimizer, 10)
        lrs = [scheduler.get_last_lr()[0]]
        for _ in range(10):
            optimizer.step()
            scheduler.step()
            lrs.append(scheduler.get_last_lr()[0])
        assert lrs[0] == (1.0 if name == "constant" else 0.0), name
        assert max(lrs) == 1.0, name
        if name in ("linear", "cosine", "cosine_with_restarts"):
            assert lrs[-1] == pytest.approx(0.0, abs=1e-12), name


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_is_refused_on_cpu(precision: str) -> None:
    """fp16 / bf16 on the CPU is an error naming train.mixed_precision."""
    with pytest.raises(TrainingError) as info:
        check_device_support(config(mixed_precision=precision), "cpu")
    assert (info.value.code, info.value.field) == (
        "mixed_precision_unsupported",
        "train.mixed_precision",
    )


def test_eight_bit_adam_is_refused_without_cuda() -> None:
    """use_8bit_adam without a CUDA device is an error naming train.use_8bit_adam."""
    with pytest.raises(TrainingError) as info:
        check_device_support(config(use_8bit_adam=True), "cpu")
    assert (info.value.code, info.value.field) == (
        "eight_bit_adam_unsupported",
        "train.use_8bit_adam",
    )
    check_device_support(config(), "cpu")


def test_train_checks_the_device_before_any_work(tmp_path: Path) -> None:
    """train() refuses an unsupported request before it reads the model."""
    with pytest.raises(TrainingError, match="mixed_precision"):
        train(
            tmp_path / "no-model",
            "sd15",
            config(mixed_precision="fp16"),
            [],
            [],
            tmp_path,
            "cpu",
            TrainHooks(),
        )
    assert list(tmp_path.iterdir()) == []


def field_of(error: ValidationError) -> tuple[str, str]:
    """(ctx field, message) of the first validation error."""
    first = error.errors()[0]
    return first.get("ctx", {}).get("field", ""), first["msg"]


@pytest.mark.parametrize(
    ("overrides", "context", "field"),
    [
        ({"method": "full"}, {"family": "sdxl"}, "train.method"),
        ({"method": "full"}, {"family": "flux"}, "train.method"),
        (
            {"method": "full", "saved_model_format": "single_file"},
            {"family": "sd2"},
            "train.saved_model_format",
        ),
        ({"snr_gamma": 5.0}, {"family": "flux"}, "train.snr_gamma"),
        ({"with_prior_preservation": True}, {}, "train.class_prompt"),
        ({"save_checkpoints_at": [1, 3]}, {}, "train.save_checkpoints_at"),
        (
            {"steps": None, "epochs": 2, "save_checkpoints_at": [7]},
            {"num_images": 3},
            "train.save_checkpoints_at",
        ),
        ({"epochs": 2}, {}, "train.epochs"),
        ({"steps": None}, {}, "train.steps"),
        ({"extract_lora": True}, {}, "train.extract_lora"),
        ({"text_encoder_steps": 1}, {}, "train.text_encoder_steps"),
        ({"lr_warmup_steps": 1}, {}, "train.lr_warmup_steps"),
        ({"data_url": "https://example.com/a.zip"}, {}, "train.dataset_id"),
        ({"dataset_id": None}, {}, "train.dataset_id"),
        ({"image_urls": ["file:///etc/passwd"], "dataset_id": None}, {}, "train.image_urls"),
    ],
)
def test_bad_combinations_are_rejected_naming_the_field(
    overrides: dict[str, Any], context: dict[str, Any], field: str
) -> None:
    """Each impossible combination fails validation with its field in
    `ctx["field"]` and at the start of the message."""
    values: dict[str, Any] = {"dataset_id": "ds", "instance_prompt": PROMPT, "steps": 2}
    values.update(overrides)
    with pytest.raises(ValidationError) as info:
        TrainConfig.model_validate(values, context=context)
    ctx_field, message = field_of(info.value)
    assert ctx_field == field and message.startswith(field), message


def test_defaults_and_epochs() -> None:
    """Defaults follow API.md; unknown fields are refused; epochs replace the
    default step count and the config round-trips through its JSON dump."""
    cfg = TrainConfig(dataset_id="ds", instance_prompt=PROMPT)
    assert (cfg.steps, cfg.method, cfg.lr_scheduler, cfg.lora_rank, cfg.resolution) == (
        400,
        "lora",
        "constant",
        16,
        512,
    )
    assert cfg.save_checkpoints_at == [] and cfg.mixed_precision == "no"
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"dataset_id": "ds", "instance_prompt": PROMPT, "lr": 1.0})
    by_epochs = TrainConfig(
        dataset_id="ds",
        instance_prompt=PROMPT,
        epochs=3,
        batch_size=2,
        save_checkpoints_at=[5, 2, 2],
    )
    assert by_epochs.steps is None and by_epochs.save_checkpoints_at == [2, 5]
    assert total_steps(by_epochs, 5) == 8
    assert TrainConfig.model_validate(by_epochs.model_dump()) == by_epochs
    check_family_support(config(method="full"), "sd15")
    with pytest.raises(TrainingError) as info:
        check_family_support(config(method="full"), "sdxl")
    assert (info.value.code, info.value.field) == ("full_fine_tune_unsupported", "train.method")
