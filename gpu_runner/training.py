"""DreamBooth training: LoRA or full fine-tuning of SD 1.x/2.x, SDXL and Flux.

The runner calls `train()` with a validated `TrainConfig`, the prepared
training images, and hooks for progress, cancellation and checkpoints. The
loop follows diffusers' DreamBooth examples (`accelerator.accumulate`,
`accelerator.backward`, optimizer steps counted on `sync_gradients`), with a
few things done once instead of at every step:

- each training image is encoded by the VAE once when no random crop changes
  it (the posterior's mean and std are kept, and a fresh latent is sampled
  from them at every step, exactly as re-encoding would give);
- the prompts are encoded once while the text encoders are frozen (from the
  start, or from `text_encoder_steps` on);
- the loss is read back from the device only when progress is reported.

Family-specific pieces (latents, conditioning, prediction target) live in
`train_sd.py` (SD 1.x/2.x, SDXL) and `train_flux.py`; checkpoint writing in
`checkpoints.py`; the single-file export and LoRA extraction in `export.py`.

Importing this module does not import torch, so `TrainConfig` can validate
requests in processes that never train.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .checkpoints import (
    LORA_WEIGHT_NAME,
    CheckpointFile,
    CheckpointKind,
    CheckpointVariant,
    TrainState,
    describe,
    load_state_step,
    load_train_state,
    lora_metadata,
    remove_stale_staging,
    save_lora_diffusers,
    save_lora_kohya,
    save_train_state,
    sha256_file,
    staged_folder,
)
from .errors import Canceled, RunnerError

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "CheckpointFile",
    "TrainConfig",
    "TrainHooks",
    "TrainImage",
    "TrainResult",
    "TrainingError",
    "check_device_support",
    "check_family_support",
    "generate_class_images",
    "load_state_step",
    "make_lr_scheduler",
    "total_steps",
    "train",
]

LrScheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]

_PIPELINE_CLASSES: dict[str, str] = {
    "sd15": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "flux": "FluxPipeline",
}
# kohya's `ss_base_model_version` names; Flux LoRAs are only written in the
# diffusers format, which ComfyUI and Forge load as well.
_KOHYA_BASE_MODELS: dict[str, str] = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_FULL_FINE_TUNE_FAMILIES = ("sd15", "sd2")
_SINGLE_FILE_FAMILIES = ("sd15",)

# Optimizer settings of diffusers' DreamBooth examples.
_ADAM_BETAS = (0.9, 0.999)
_ADAM_WEIGHT_DECAY = 1e-2
_ADAM_EPSILON = 1e-8
_MAX_GRAD_NORM = 1.0
_PROGRESS_INTERVAL_S = 0.5
# Captions encoded per text-encoder call when filling the prompt cache.
_PROMPT_CHUNK = 16

log = logging.getLogger(__name__)


class TrainingError(RunnerError):
    """A training request that cannot run here, or a training run that failed.

    `field` is the request field at fault (`train.mixed_precision`), or None.
    """

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(code, message)
        self.field = field


def _config_error(name: str, reason: str) -> PydanticCustomError:
    """A validation error whose message and `ctx.field` name the request field."""
    return PydanticCustomError(
        "invalid_train_config", "{field}: {reason}", {"field": f"train.{name}", "reason": reason}
    )


class TrainConfig(BaseModel):
    """The `train` object of a job (API.md), with its defaults.

    Combinations that cannot work are rejected here, before a job is queued,
    with a message (and `ctx["field"]`) naming the field. Checks that need the
    base model's family or the number of images run when they are passed as
    validation context: `TrainConfig.model_validate(data, context={"family":
    "sdxl", "num_images": 12})`; `train()` repeats them in any case.

    With `epochs` set and `steps` not given, `steps` becomes null and the
    step count is `total_steps(config, num_images)`.
    """

    model_config = ConfigDict(extra="forbid")

    dataset_id: str | None = Field(default=None, min_length=1, max_length=200)
    data_url: str | None = Field(default=None, pattern=r"^https?://", max_length=4000)
    image_urls: list[str] | None = Field(default=None, min_length=1, max_length=1000)
    instance_prompt: str = Field(min_length=1, max_length=2000)
    class_prompt: str | None = Field(default=None, min_length=1, max_length=2000)
    with_prior_preservation: bool = False
    method: Literal["lora", "full"] = "lora"
    steps: int | None = Field(default=400, ge=1, le=1_000_000)
    epochs: int | None = Field(default=None, ge=1, le=100_000)
    learning_rate: float = Field(default=1e-4, gt=0, le=1)
    lr_scheduler: LrScheduler = "constant"
    lr_warmup_steps: int = Field(default=0, ge=0)
    batch_size: int = Field(default=1, ge=1, le=256)
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024)
    resolution: int = Field(default=512, ge=64, le=4096, multiple_of=8)
    crop: Literal["center", "random"] = "center"
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    lora_rank: int = Field(default=16, ge=1, le=1024)
    lora_alpha: int = Field(default=16, ge=1, le=4096)
    train_text_encoder: bool = False
    text_encoder_steps: int | None = Field(default=None, ge=1)
    offset_noise: float = Field(default=0.0, ge=0, le=1)
    snr_gamma: float | None = Field(default=None, gt=0)
    use_8bit_adam: bool = False
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    save_checkpoints_at: list[PositiveInt] = Field(default_factory=list, max_length=1000)
    saved_model_format: Literal["diffusers", "single_file"] = "diffusers"
    extract_lora: bool = False
    concept_name: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", max_length=100
    )
    prior_loss_weight: float = Field(default=1.0, ge=0)
    num_class_images: int = Field(default=100, ge=1, le=10_000)

    @field_validator("image_urls")
    @classmethod
    def _http_urls(cls, urls: list[str] | None) -> list[str] | None:
        for url in urls or []:
            if not url.startswith(("http://", "https://")):
                raise _config_error("image_urls", f"{url[:100]!r} is not an http(s) URL")
        return urls

    @field_validator("save_checkpoints_at")
    @classmethod
    def _sorted_unique(cls, steps: list[int]) -> list[int]:
        return sorted(set(steps))

    @model_validator(mode="after")
    def _check_combinations(self, info: ValidationInfo) -> TrainConfig:
        sources = [n for n in ("dataset_id", "data_url", "image_urls") if getattr(self, n)]
        if len(sources) != 1:
            got = f" (got {', '.join(sources)})" if sources else ""
            raise _config_error(
                "dataset_id", f"give exactly one of dataset_id, data_url or image_urls{got}"
            )
        if self.epochs is not None:
            if "steps" in self.model_fields_set and self.steps is not None:
                raise _config_error("epochs", "give steps or epochs, not both")
            # `steps` only holds its default here: epochs decide the length.
            self.steps = None
        elif self.steps is None:
            raise _config_error("steps", "give steps or epochs")
        if self.with_prior_preservation and not self.class_prompt:
            raise _config_error("class_prompt", "required when with_prior_preservation is true")
        if self.text_encoder_steps is not None and not self.train_text_encoder:
            raise _config_error("text_encoder_steps", "needs train_text_encoder: true")
        if self.extract_lora and self.method != "full":
            raise _config_error(
                "extract_lora", "only applies to method: full (a LoRA training gives a LoRA)"
            )
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            raise _config_error(
                "lr_warmup_steps", "the constant scheduler has no warmup; use constant_with_warmup"
            )
        if self.steps is not None:
            _raise_for_step_problem(self, self.steps)
        context = info.context or {}
        if "family" in context:
            problem = _family_problem(self, context["family"])
            if problem is not None:
                raise _config_error(problem[1], problem[2])
        if "num_images" in context:
            _raise_for_step_problem(self, total_steps(self, int(context["num_images"])))
        return self


def _step_problem(config: TrainConfig, total: int) -> tuple[str, str] | None:
    """(field, reason) for a step setting beyond `total` training steps, or None."""
    beyond = [s for s in config.save_checkpoints_at if s > total]
    if beyond:
        return "save_checkpoints_at", f"step {beyond[0]} is beyond the {total} training steps"
    if config.text_encoder_steps is not None and config.text_encoder_steps > total:
        return "text_encoder_steps", f"{config.text_encoder_steps} is beyond the {total} steps"
    if config.lr_warmup_steps > total:
        return "lr_warmup_steps", f"{config.lr_warmup_steps} is beyond the {total} steps"
    return None


def _raise_for_step_problem(config: TrainConfig, total: int) -> None:
    problem = _step_problem(config, total)
    if problem is not None:
        raise _config_error(*problem)


def _family_problem(config: TrainConfig, family: str) -> tuple[str, str, str] | None:
    """(error code, field, reason) when `config` cannot train a `family` model."""
    if family not in _PIPELINE_CLASSES:
        known = ", ".join(_PIPELINE_CLASSES)
        return "unsupported_family", "method", f"cannot train a {family!r} model (known: {known})"
    if config.method == "full" and family not in _FULL_FINE_TUNE_FAMILIES:
        return (
            "full_fine_tune_unsupported",
            "method",
            f"full fine-tuning is supported for SD 1.x/2.x only; use method: lora for {family}",
        )
    if (
        config.method == "full"
        and config.saved_model_format == "single_file"
        and family not in _SINGLE_FILE_FAMILIES
    ):
        return (
            "single_file_unsupported",
            "saved_model_format",
            f"single_file export is written for SD 1.x only, not {family}; use diffusers",
        )
    if config.snr_gamma is not None and family == "flux":
        return (
            "snr_gamma_unsupported",
            "snr_gamma",
            "min-SNR weighting applies to noise-prediction models (SD), not Flux's flow matching",
        )
    return None


def check_family_support(config: TrainConfig, family: str) -> None:
    """Raise `TrainingError` when `config` cannot train a model of `family`."""
    problem = _family_problem(config, family)
    if problem is not None:
        code, name, reason = problem
        raise TrainingError(code, f"train.{name}: {reason}", f"train.{name}")


def check_device_support(config: TrainConfig, device: str) -> None:
    """Raise `TrainingError` when `config` asks for something `device` cannot do.

    fp16 / bf16 are refused on the CPU: accelerate accepts them there, but
    training runs 6–8× slower than fp32. 8-bit Adam needs bitsandbytes and a
    CUDA GPU.
    """
    kind = device.split(":", 1)[0]
    if kind not in ("cpu", "cuda"):
        raise TrainingError("device_unsupported", f"training runs on cpu or cuda, not {device!r}")
    if kind == "cuda":
        # Only here: the service calls this to validate requests and must not
        # pay torch's import (seconds, hundreds of MB) for a CPU-only server.
        import torch
    if kind == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device_unavailable", f"{device} was asked for but CUDA is unavailable")
    if config.mixed_precision != "no":
        if kind == "cpu":
            raise TrainingError(
                "mixed_precision_unsupported",
                f"train.mixed_precision: {config.mixed_precision} is not supported on the CPU "
                "(it runs several times slower than fp32); use no",
                "train.mixed_precision",
            )
        if config.mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise TrainingError(
                "mixed_precision_unsupported",
                f"train.mixed_precision: this GPU ({device}) has no bf16 support; use fp16",
                "train.mixed_precision",
            )
    if config.use_8bit_adam:
        if kind != "cuda":
            raise TrainingError(
                "eight_bit_adam_unsupported",
                "train.use_8bit_adam: 8-bit Adam (bitsandbytes) needs a CUDA GPU",
                "train.use_8bit_adam",
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise TrainingError(
                "eight_bit_adam_unsupported",
                "train.use_8bit_adam: bitsandbytes is not installed in the runner's environment",
                "train.use_8bit_adam",
            )


def total_steps(config: TrainConfig, num_images: int) -> int:
    """Optimizer steps of a training run over `num_images` instance images.

    `steps` when given; otherwise enough steps for every image to be seen
    `epochs` times, each step taking batch_size × gradient_accumulation_steps
    images.
    """
    if config.steps is not None:
        return config.steps
    assert config.epochs is not None  # the validator guarantees one of the two
    per_step = config.batch_size * config.gradient_accumulation_steps
    return max(1, math.ceil(config.epochs * num_images / per_step))


@dataclass(frozen=True)
class TrainImage:
    """One training (or class) image and its caption."""

    path: Path
    caption: str


def _ignore_progress(step: int, total_steps: int, loss: float, lr: float) -> None:
    return None


def _never_cancel() -> bool:
    return False


def _ignore_checkpoint(checkpoint: CheckpointFile) -> None:
    return None


@dataclass
class TrainHooks:
    """Callbacks from the training loop to the runner.

    - `on_progress(step, total_steps, loss, lr)`: after an optimizer step, at
      most about twice a second, and always at the first and the last step;
      `loss` is the mean over that step's accumulated batches.
    - `should_cancel()`: polled before every batch; once it returns True the
      run stops before the next batch and `train` raises `Canceled`.
    - `on_checkpoint(file)`: after a checkpoint artifact is fully on disk.
    """

    on_progress: Callable[[int, int, float, float], None] = _ignore_progress
    should_cancel: Callable[[], bool] = _never_cancel
    on_checkpoint: Callable[[CheckpointFile], None] = _ignore_checkpoint


@dataclass
class TrainResult:
    """What a finished training run produced.

    `images_seen` counts instance images (steps × accumulation × batch size).
    `pipeline` is the trained pipeline (LoRA adapters attached) when `train`
    was called with `return_pipeline=True`, else None.
    """

    final_checkpoints: list[CheckpointFile]
    steps: int
    images_seen: int
    pipeline: Any = field(default=None, repr=False)


class _FamilyOps(Protocol):
    """What the loop needs from a model family (`train_sd.SDFamily`, `train_flux.FluxFamily`)."""

    denoiser_name: str
    denoiser_lora_targets: list[str]
    text_encoder_lora_targets: list[str]
    denoiser: Any  # a diffusers model: a torch Module with adapter methods
    text_encoders: dict[str, Any]
    resolution_multiple: int

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]: ...

    def per_sample_loss(
        self,
        model: torch.nn.Module,
        latents: torch.Tensor,
        cond: dict[str, torch.Tensor],
        micro_cond: torch.Tensor,
        generator: torch.Generator,
        *,
        offset_noise: float,
        snr_gamma: float | None,
    ) -> torch.Tensor: ...


@dataclass
class _Example:
    """A training image, ready for batching.

    With a fixed crop only the latent posterior is kept; with a random crop
    the resized image is kept and cropped and encoded at each use.
    """

    caption: str
    original_size: tuple[int, int]  # (height, width) before resizing, for SDXL
    crop_top_left: tuple[int, int]
    image: Image.Image | None = None
    latent_mean: torch.Tensor | None = None
    latent_std: torch.Tensor | None = None


def _quiet_libraries() -> None:
    """Switch off library progress bars: they would go to the runner's stderr."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _load_pipeline(model_path: Path, family: str, single_file_config: Path | None) -> Any:
    """Load the base model in fp32, from a diffusers folder or a single file.

    fp32 whatever the files hold: trained weights and optimizer state need it;
    frozen parts are cast down afterwards when mixed precision is on.
    """
    import diffusers
    import torch

    cls = getattr(diffusers, _PIPELINE_CLASSES[family])
    if model_path.is_file():
        if single_file_config is None:
            # Without a local config diffusers would fetch one from the hub.
            raise TrainingError(
                "model_config_missing",
                f"the single-file model {model_path.name} needs a local diffusers config folder",
            )
        pipe = cls.from_single_file(
            str(model_path), config=str(single_file_config), local_files_only=True
        ).to(dtype=torch.float32)
    else:
        kwargs: dict[str, Any] = {}
        if family in ("sd15", "sd2"):
            # The safety checker filters generated images; training never runs it.
            kwargs = {
                "safety_checker": None,
                "feature_extractor": None,
                "requires_safety_checker": False,
            }
        pipe = cls.from_pretrained(model_path, dtype=torch.float32, local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _family_ops(pipe: Any, family: str) -> _FamilyOps:
    if family == "flux":
        from .train_flux import FluxFamily

        return FluxFamily(pipe)
    from .train_sd import SDFamily

    return SDFamily(pipe, xl=family == "sdxl")


def _new_accelerator(config: TrainConfig, device: str) -> Any:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps process-wide singletons and refuses a second Accelerator
    # with another mixed_precision; the runner trains job after job in one
    # process, so every run starts from a clean state.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    if device.startswith("cuda:"):
        # A single-process Accelerator uses the current CUDA device.
        torch.cuda.set_device(torch.device(device))
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        cpu=device == "cpu",
    )


def _resize(image: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side is `resolution` (the aspect ratio is kept)."""
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    return image.resize(size, Image.Resampling.LANCZOS) if size != (w, h) else image


def _to_pixels(image: Image.Image, top: int, left: int, resolution: int) -> torch.Tensor:
    """Crop to a `resolution` square and convert to a (1, 3, H, W) tensor in [-1, 1]."""
    import numpy as np
    import torch

    crop = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(crop, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def _random_offset(span: int, generator: torch.Generator) -> int:
    import torch

    return int(torch.randint(0, span + 1, (1,), generator=generator)) if span > 0 else 0


def _load_examples(
    images: list[TrainImage],
    default_caption: str,
    config: TrainConfig,
    ops: _FamilyOps,
) -> list[_Example]:
    """Open, orient, resize and (for a fixed crop) encode every image once."""
    from PIL import Image, ImageOps

    examples = []
    for item in images:
        try:
            with Image.open(item.path) as opened:
                image = ImageOps.exif_transpose(opened).convert("RGB")
        except OSError as exc:
            raise TrainingError(
                "unreadable_image", f"cannot read training image {item.path.name}: {exc}"
            ) from exc
        original = (image.height, image.width)
        resized = _resize(image, config.resolution)
        span_y = resized.height - config.resolution
        span_x = resized.width - config.resolution
        example = _Example(
            caption=item.caption.strip() or default_caption,
            original_size=original,
            crop_top_left=(span_y // 2, span_x // 2),
        )
        if config.crop == "random" and (span_x or span_y):
            example.image = resized
        else:
            pixels = _to_pixels(resized, span_y // 2, span_x // 2, config.resolution)
            example.latent_mean, example.latent_std = ops.encode_images(pixels)
        examples.append(example)
    return examples


class _IndexBatches:
    """Endless batches of indices: a fresh seeded permutation per epoch.

    Batches run across epoch boundaries, so every batch is full and the number
    of images seen is exactly steps × accumulation × batch size. A class
    rather than a generator so that its position (the current permutation
    and how far it has been read) can be saved and restored: a resumed run
    must see exactly the batches an uninterrupted one would. A permutation is
    drawn only when its first index is needed, so its draws interleave with
    the random crops drawn from the same generator in a fixed order.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n = n
        self.batch_size = batch_size
        self.generator = generator
        self.order: list[int] = []
        self.pos = 0

    def __next__(self) -> list[int]:
        import torch

        batch: list[int] = []
        while len(batch) < self.batch_size:
            if self.pos == len(self.order):
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
                self.pos = 0
            batch.append(self.order[self.pos])
            self.pos += 1
        return batch

    def state(self) -> dict[str, Any]:
        """The data-order position, JSON-serialisable (the generator is saved apart)."""
        return {"order": list(self.order), "pos": self.pos}

    def restore(self, state: dict[str, Any]) -> None:
        order, pos = state["order"], state["pos"]
        if sorted(order) != (list(range(self.n)) if order else []) or not 0 <= pos <= len(order):
            raise ValueError("the saved data order does not fit this dataset")
        self.order, self.pos = [int(i) for i in order], int(pos)


def _batch_latents(
    examples: list[_Example],
    indices: list[int],
    resolution: int,
    ops: _FamilyOps,
    data_gen: torch.Generator,
    noise_gen: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent samples and SDXL size conditioning (B, 6) of one batch."""
    import torch

    from .train_sd import randn

    means, stds, micro = [], [], []
    for index in indices:
        ex = examples[index]
        top, left = ex.crop_top_left
        if ex.image is not None:
            top = _random_offset(ex.image.height - resolution, data_gen)
            left = _random_offset(ex.image.width - resolution, data_gen)
            mean, std = ops.encode_images(_to_pixels(ex.image, top, left, resolution))
        else:
            assert ex.latent_mean is not None and ex.latent_std is not None
            mean, std = ex.latent_mean, ex.latent_std
        means.append(mean)
        stds.append(std)
        micro.append([*ex.original_size, top, left, resolution, resolution])
    mean = torch.cat(means).to(device)
    std = torch.cat(stds).to(device)
    latents = mean + std * randn(tuple(mean.shape), noise_gen, device)
    return latents, torch.tensor(micro, dtype=torch.float32)


def _make_optimizer(config: TrainConfig, groups: list[dict[str, Any]]) -> Any:
    import torch

    if config.use_8bit_adam:
        import bitsandbytes as bnb  # checked by check_device_support

        cls: Any = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(
        groups,
        lr=config.learning_rate,
        betas=_ADAM_BETAS,
        weight_decay=_ADAM_WEIGHT_DECAY,
        eps=_ADAM_EPSILON,
    )


def make_lr_scheduler(config: TrainConfig, optimizer: Any, total: int) -> Any:
    """The diffusers learning-rate scheduler named by `config.lr_scheduler`.

    It is stepped by hand once per optimizer step (not passed to
    `accelerator.prepare`), so warmup and decay count optimizer steps, not
    accumulated batches. `cosine_with_restarts` makes one cycle, `polynomial`
    decays linearly (power 1) to 1e-7.
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=total,
    )


def _artifact_stem(config: TrainConfig, fallback: str) -> str:
    return config.concept_name or fallback


def train(
    model_path: Path,
    family: str,
    config: TrainConfig,
    images: list[TrainImage],
    class_images: list[TrainImage],
    out_dir: Path,
    device: str,
    hooks: TrainHooks,
    *,
    single_file_config: Path | None = None,
    return_pipeline: bool = False,
    state_dir: Path | None = None,
    state_every_steps: int | None = None,
) -> TrainResult:
    """Fine-tune the model at `model_path` and write checkpoints under `out_dir`.

    `model_path` is a diffusers folder, or a single `.safetensors` file read
    with `single_file_config`, a local diffusers folder of the same model type.

    `family` is sd15, sd2, sdxl or flux; `images` are the instance images,
    `class_images` the prior-preservation images (used only with
    `with_prior_preservation`). An empty caption stands for the instance (or
    class) prompt. Checkpoints go to `out_dir/checkpoint-<step>/` at each step
    of `save_checkpoints_at` and at the last step (`final=True`).

    The same config and seed give bit-identical weights on the CPU (the caller
    sets torch's thread count).

    With `state_dir`, the training state (trainable weights, optimizer and LR
    scheduler state, RNG states, step and data-order position) is saved
    there atomically every `state_every_steps` optimizer steps and at every
    step of `save_checkpoints_at` (not at the last step: the final checkpoint
    is the result). When `state_dir` already holds a state of the same config,
    family and images, training resumes from it: on the CPU the result is
    bit-identical to an uninterrupted run, checkpoints of earlier steps are
    neither rewritten nor reported again, and progress goes on from the saved
    step. A state of another run is ignored (with a logged reason) and
    replaced at the first save. The caller removes `state_dir` once the job
    is done. Raises `TrainingError` for a request that
    cannot run (before any work), `Canceled` when `hooks.should_cancel()`
    turns true — leaving no partial checkpoint — and lets other exceptions
    (out of memory, corrupt model files) through.
    """
    check_family_support(config, family)
    check_device_support(config, device)
    if not images:
        raise TrainingError("no_training_images", "the dataset has no usable images", "train")
    if config.with_prior_preservation and not class_images:
        raise TrainingError(
            "no_class_images",
            "train.with_prior_preservation: no class images were given",
            "train.with_prior_preservation",
        )
    if state_every_steps is not None and (state_dir is None or state_every_steps < 1):
        raise ValueError("state_every_steps needs a state_dir and must be at least 1")
    total = total_steps(config, len(images))
    problem = _step_problem(config, total)
    if problem is not None:
        raise TrainingError(
            "invalid_train_config", f"train.{problem[0]}: {problem[1]}", f"train.{problem[0]}"
        )

    import torch

    _quiet_libraries()
    accelerator = _new_accelerator(config, device)
    try:
        return _train(
            model_path,
            single_file_config,
            family,
            config,
            images,
            class_images,
            out_dir,
            hooks,
            accelerator,
            total,
            return_pipeline,
            state_dir,
            state_every_steps,
        )
    finally:
        accelerator.free_memory()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def _train(
    model_path: Path,
    single_file_config: Path | None,
    family: str,
    config: TrainConfig,
    images: list[TrainImage],
    class_images: list[TrainImage],
    out_dir: Path,
    hooks: TrainHooks,
    accelerator: Any,
    total: int,
    return_pipeline: bool,
    state_dir: Path | None,
    state_every_steps: int | None,
) -> TrainResult:
    import torch
    from diffusers.training_utils import cast_training_params, set_seed
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    device = accelerator.device
    # Global RNGs (LoRA initialisation, dropout) from the seed; batches, crops,
    # latent samples, noise and timesteps from generators of their own, so
    # nothing else drawing random numbers in the process can shift them.
    set_seed(config.seed)
    data_gen = torch.Generator().manual_seed(config.seed)
    noise_gen = torch.Generator().manual_seed(config.seed + 1)

    # --- model -------------------------------------------------------------
    pipe = _load_pipeline(model_path, family, single_file_config)
    ops = _family_ops(pipe, family)
    multiple = ops.resolution_multiple
    if config.resolution % multiple:
        raise TrainingError(
            "invalid_resolution",
            f"train.resolution: must be a multiple of {multiple} for this model",
            "train.resolution",
        )
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        config.mixed_precision
    ]
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    pipe.to(device)
    trained_text_encoders = list(ops.text_encoders.values()) if config.train_text_encoder else []

    if config.method == "lora":
        # The frozen base runs in fp16/bf16 under mixed precision, except the
        # VAE: it encodes each image only once, and SDXL's overflows in fp16.
        # (Cast only when needed: diffusers warns on any `.to(dtype)`.)
        if weight_dtype != torch.float32:
            for module in pipe.components.values():
                if isinstance(module, torch.nn.Module) and module is not pipe.vae:
                    module.to(dtype=weight_dtype)
        ops.denoiser.add_adapter(
            LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=ops.denoiser_lora_targets,
            )
        )
        for encoder in trained_text_encoders:
            encoder.add_adapter(
                LoraConfig(
                    r=config.lora_rank,
                    lora_alpha=config.lora_alpha,
                    init_lora_weights="gaussian",
                    target_modules=ops.text_encoder_lora_targets,
                )
            )
        # LoRA weights train in fp32 even when the frozen base runs in fp16/bf16.
        cast_training_params([ops.denoiser, *trained_text_encoders], dtype=torch.float32)
    else:
        # Nothing is cast down: a full checkpoint saves every component, and a
        # frozen text encoder rounded to fp16 would be saved degraded.
        for module in [ops.denoiser, *trained_text_encoders]:
            module.requires_grad_(True)
    if config.gradient_checkpointing:
        ops.denoiser.enable_gradient_checkpointing()
        for encoder in trained_text_encoders:
            # Non-reentrant checkpointing: the reentrant kind drops the gradients
            # of LoRA weights when the block inputs do not require grad.
            if hasattr(encoder, "activation_checkpointing_enable"):  # transformers ≥ 5.x
                encoder.activation_checkpointing_enable()
            else:
                encoder.gradient_checkpointing_enable({"use_reentrant": False})

    denoiser_params = [p for p in ops.denoiser.parameters() if p.requires_grad]
    encoder_params = [p for e in trained_text_encoders for p in e.parameters() if p.requires_grad]
    groups = [{"params": denoiser_params}]
    if encoder_params:
        groups.append({"params": encoder_params})
    trainable = denoiser_params + encoder_params
    # What a resumable state saves: the trainable parameters by name, and
    # nothing else of the model (for LoRA only the adapter weights). Fixed
    # here, so text encoders frozen later on are still saved.
    trained_modules = {ops.denoiser_name: ops.denoiser}
    if config.train_text_encoder:
        trained_modules.update(ops.text_encoders)
    state_params = {
        f"{component}.{name}": p
        for component, module in trained_modules.items()
        for name, p in module.named_parameters()
        if p.requires_grad
    }
    optimizer = _make_optimizer(config, groups)
    lr_scheduler = make_lr_scheduler(config, optimizer, total)
    prepared = accelerator.prepare(ops.denoiser, *trained_text_encoders, optimizer)
    model, optimizer = prepared[0], prepared[-1]
    trained_models = list(prepared[:-1])

    # --- data ----------------------------------------------------------------
    use_prior = config.with_prior_preservation
    examples = _load_examples(images, config.instance_prompt, config, ops)
    class_examples = (
        _load_examples(class_images, config.class_prompt or "", config, ops) if use_prior else []
    )
    batches = _IndexBatches(len(examples), config.batch_size, data_gen)
    class_batches = (
        _IndexBatches(len(class_examples), config.batch_size, data_gen) if use_prior else None
    )
    all_captions = sorted({e.caption for e in examples + class_examples})

    def encode_cached() -> dict[str, dict[str, torch.Tensor]]:
        cache: dict[str, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for start in range(0, len(all_captions), _PROMPT_CHUNK):
                chunk = all_captions[start : start + _PROMPT_CHUNK]
                encoded = ops.encode_prompts(chunk)
                for i, caption in enumerate(chunk):
                    cache[caption] = {k: v[i : i + 1] for k, v in encoded.items()}
        return cache

    encoders_training = bool(trained_text_encoders)
    prompt_cache = {} if encoders_training else encode_cached()

    def conditioning(captions: list[str]) -> dict[str, torch.Tensor]:
        if encoders_training:
            return ops.encode_prompts(captions)
        parts = [prompt_cache[c] for c in captions]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    # --- checkpoints ---------------------------------------------------------
    pipeline_cls = type(pipe)
    base_states: dict[str, dict[str, torch.Tensor]] = {}

    def lora_layers() -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
        modules = {ops.denoiser_name: accelerator.unwrap_model(model)}
        if trained_text_encoders:
            modules.update(ops.text_encoders)
        layers = {name: get_peft_model_state_dict(m) for name, m in modules.items()}
        return layers, {name: lora_metadata(m) for name, m in modules.items()}

    def extracted_layers() -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
        from .export import extract_lora

        modules = {ops.denoiser_name: ops.denoiser}
        if trained_text_encoders:
            modules.update(ops.text_encoders)
        if not base_states:
            # Read back from disk rather than kept from the start: only needed
            # here, and a full copy would sit in memory all run long.
            base = _load_pipeline(model_path, family, single_file_config)
            base_states.update({name: getattr(base, name).state_dict() for name in modules})
            del base
        layers, metadata = {}, {}
        for name, module in modules.items():
            layers[name], metadata[name] = extract_lora(base_states[name], module, config.lora_rank)
        return layers, metadata

    def save_checkpoint(step: int, final: bool) -> list[CheckpointFile]:
        folder = out_dir / f"checkpoint-{step}"
        written: list[tuple[str, CheckpointKind, CheckpointVariant]] = []
        with staged_folder(folder) as staging:
            if config.method == "lora":
                layers, metadata = lora_layers()
                save_lora_diffusers(pipeline_cls, staging, layers, metadata)
                written.append((LORA_WEIGHT_NAME, "lora", "diffusers"))
                if family in _KOHYA_BASE_MODELS:
                    name = f"{_artifact_stem(config, 'lora')}_kohya.safetensors"
                    save_lora_kohya(
                        staging / name,
                        layers,
                        rank=config.lora_rank,
                        alpha=config.lora_alpha,
                        base_model=_KOHYA_BASE_MODELS[family],
                    )
                    written.append((name, "lora", "kohya"))
            else:
                if config.saved_model_format == "single_file":
                    from safetensors.torch import save_file

                    from .export import sd_single_file_state

                    name = f"{_artifact_stem(config, 'model')}.safetensors"
                    state = sd_single_file_state(pipe.unet, pipe.vae, pipe.text_encoder)
                    save_file(state, str(staging / name), metadata={"format": "pt"})
                    written.append((name, "full", "single_file"))
                else:
                    pipe.save_pretrained(staging / "model", safe_serialization=True)
                    written.append(("model", "full", "diffusers"))
                if config.extract_lora:
                    layers, metadata = extracted_layers()
                    save_lora_diffusers(pipeline_cls, staging, layers, metadata)
                    written.append((LORA_WEIGHT_NAME, "lora", "extracted_lora"))
        files = [
            describe(folder / name, kind=kind, step=step, variant=variant, final=final)
            for name, kind, variant in written
        ]
        for file in files:
            hooks.on_checkpoint(file)
        return files

    # --- resumable state -----------------------------------------------------
    fingerprint = _state_fingerprint(config, family, images, class_images if use_prior else [])

    scaler = getattr(accelerator, "scaler", None)

    def save_state(step: int, images_seen: int) -> None:
        assert state_dir is not None
        meta = {
            "step": step,
            "images_seen": images_seen,
            "config_hash": fingerprint,
            "batches": batches.state(),
            "class_batches": class_batches.state() if class_batches is not None else None,
            "python_random": _python_random_state(),
            "numpy_random": _numpy_random_state(),
            # fp16 on a GPU: the loss scale adapts during training.
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
        }
        rng = {
            "data": data_gen.get_state(),
            "noise": noise_gen.get_state(),
            # Global RNGs: nothing in the loop is known to draw from them
            # (dropout is off), but a model that does must still resume exactly.
            "torch": torch.get_rng_state(),
        }
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        save_train_state(
            state_dir,
            TrainState(
                meta=meta,
                weights=dict(state_params),
                rng=rng,
                optimizer=optimizer.state_dict(),
                scheduler=lr_scheduler.state_dict(),
            ),
        )

    def resume() -> tuple[int, int]:
        """Restore a matching saved state; (step, images_seen) to go on from."""
        assert state_dir is not None
        remove_stale_staging(state_dir)
        if not state_dir.exists():
            return 0, 0
        state = _matching_state(state_dir, fingerprint, state_params, total)
        if state is None:
            return 0, 0
        meta = state.meta
        # Everything that can refuse the state is checked before anything changes.
        batches.restore(meta["batches"])
        if class_batches is not None:
            class_batches.restore(meta["class_batches"])
        optimizer.load_state_dict(state.optimizer)
        lr_scheduler.load_state_dict(state.scheduler)
        if scaler is not None and meta.get("grad_scaler"):
            scaler.load_state_dict(meta["grad_scaler"])
        with torch.no_grad():
            for name, param in state_params.items():
                param.copy_(state.weights[name].to(param.device, param.dtype))
        data_gen.set_state(state.rng["data"])
        noise_gen.set_state(state.rng["noise"])
        torch.set_rng_state(state.rng["torch"])
        if device.type == "cuda" and "cuda" in state.rng:
            torch.cuda.set_rng_state(state.rng["cuda"], device)
        _set_python_random_state(meta["python_random"])
        _set_numpy_random_state(meta["numpy_random"])
        log.info("resuming training from step %d of %d (%s)", meta["step"], total, state_dir)
        return int(meta["step"]), int(meta["images_seen"])

    # --- loop ----------------------------------------------------------------
    for m in trained_models:
        m.train()
    step, images_seen = resume() if state_dir is not None else (0, 0)
    if encoders_training and config.text_encoder_steps and step >= config.text_encoder_steps:
        # Resumed past the point where the loop below freezes the encoders.
        for encoder in trained_text_encoders:
            encoder.requires_grad_(False)
            encoder.eval()
        encoders_training = False
        prompt_cache = encode_cached()
    accumulated = torch.zeros((), device=device)
    last_report = -math.inf
    final_files: list[CheckpointFile] = []
    save_at = set(config.save_checkpoints_at)

    while step < total:
        if hooks.should_cancel():
            raise Canceled(f"training canceled after {step} of {total} steps")
        with accelerator.accumulate(*trained_models):
            indices = next(batches)
            latents, micro = _batch_latents(
                examples, indices, config.resolution, ops, data_gen, noise_gen, device
            )
            captions = [examples[i].caption for i in indices]
            if class_batches is not None:
                class_indices = next(class_batches)
                class_latents, class_micro = _batch_latents(
                    class_examples,
                    class_indices,
                    config.resolution,
                    ops,
                    data_gen,
                    noise_gen,
                    device,
                )
                latents = torch.cat([latents, class_latents])
                micro = torch.cat([micro, class_micro])
                captions += [class_examples[i].caption for i in class_indices]
            per_sample = ops.per_sample_loss(
                model,
                latents,
                conditioning(captions),
                micro,
                noise_gen,
                offset_noise=config.offset_noise,
                snr_gamma=config.snr_gamma,
            )
            if class_batches is not None:
                instance_loss, prior_loss = per_sample.chunk(2)
                loss = instance_loss.mean() + config.prior_loss_weight * prior_loss.mean()
            else:
                loss = per_sample.mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(trainable, _MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        images_seen += len(indices)
        accumulated += loss.detach()
        if not accelerator.sync_gradients:
            continue

        lr_scheduler.step()
        step += 1
        step_loss = accumulated / config.gradient_accumulation_steps
        accumulated = torch.zeros((), device=device)

        if encoders_training and step == config.text_encoder_steps and step < total:
            # From here on the text encoders are frozen: their embeddings are
            # computed once more, with the trained weights, and reused.
            for encoder in trained_text_encoders:
                encoder.requires_grad_(False)
                encoder.eval()
            encoders_training = False
            prompt_cache = encode_cached()

        now = time.monotonic()
        if step in (1, total) or now - last_report >= _PROGRESS_INTERVAL_S:
            value = float(step_loss)
            if not math.isfinite(value):
                raise TrainingError(
                    "training_diverged",
                    f"the loss became {value} at step {step}; try a lower train.learning_rate",
                    "train.learning_rate",
                )
            hooks.on_progress(step, total, value, float(lr_scheduler.get_last_lr()[0]))
            last_report = now

        if step in save_at or step == total:
            files = save_checkpoint(step, final=step == total)
            if step == total:
                final_files = files
        if (
            state_dir is not None
            and step < total
            and (step in save_at or (state_every_steps and step % state_every_steps == 0))
        ):
            # After the checkpoint: a state at step N implies checkpoint N is
            # published, so a resumed run never has to write it again.
            save_state(step, images_seen)

    for m in trained_models:
        m.eval()
    return TrainResult(
        final_checkpoints=final_files,
        steps=step,
        images_seen=images_seen,
        pipeline=pipe if return_pipeline else None,
    )


def _state_fingerprint(
    config: TrainConfig, family: str, images: list[TrainImage], class_images: list[TrainImage]
) -> str:
    """A hash of what decides a run's course: config, family, images (bytes, order, captions).

    A saved state is resumed only under the same fingerprint; file contents
    rather than paths, since a retried job may prepare its images afresh.
    """
    digest = hashlib.sha256()
    head = {"config": config.model_dump(mode="json"), "family": family}
    digest.update(json.dumps(head, sort_keys=True).encode())
    for kind, items in (("instance", images), ("class", class_images)):
        digest.update(f"\n{kind}\n".encode())
        for item in items:
            digest.update(f"{sha256_file(item.path)}\0{item.caption}\n".encode())
    return digest.hexdigest()


def _matching_state(
    state_dir: Path, fingerprint: str, params: dict[str, torch.Tensor], total: int
) -> TrainState | None:
    """The state in `state_dir` when it belongs to this run, else None (reason logged)."""
    try:
        state = load_train_state(state_dir)
    except ValueError as exc:
        reason = str(exc)
    else:
        step = state.meta.get("step")
        weights = state.weights
        if state.meta.get("config_hash") != fingerprint:
            reason = "it was saved for another config, model family or image set"
        elif not isinstance(step, int) or not 0 < step < total:
            reason = f"its step {step!r} is outside 1..{total - 1}"
        elif weights.keys() != params.keys() or any(
            weights[k].shape != p.shape for k, p in params.items()
        ):
            reason = "its weights do not match the trained parameters"
        else:
            return state
    log.warning("ignoring the training state in %s: %s; starting afresh", state_dir, reason)
    return None


def _python_random_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_random_state(state: list[Any]) -> None:
    version, internal, gauss = state
    random.setstate((version, tuple(internal), gauss))


def _numpy_random_state() -> list[Any]:
    import numpy as np

    legacy: Any = np.random.get_state(legacy=True)
    name, keys, pos, has_gauss, cached = legacy
    return [name, keys.tolist(), pos, has_gauss, cached]


def _set_numpy_random_state(state: list[Any]) -> None:
    import numpy as np

    name, keys, pos, has_gauss, cached = state
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def generate_class_images(
    pipe: Any,
    prompt: str,
    n: int,
    out_dir: Path,
    seed: int,
    *,
    resolution: int | None = None,
    num_inference_steps: int = 25,
    should_cancel: Callable[[], bool] | None = None,
) -> list[TrainImage]:
    """Make (or reuse) `n` prior-preservation images of `prompt` with the base `pipe`.

    Image i is generated with seed `seed + i` and stored as
    `out_dir/class-<i>.png`; images already there are reused, so a cache
    folder keyed by model, prompt and resolution fills up once. Each file is
    written to a temporary name and renamed, so a reused file is never
    partial. Raises `Canceled` when `should_cancel()` turns true.
    """
    import torch

    from .generate import encode_image, write_atomically

    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    size: dict[str, int] = {"height": resolution, "width": resolution} if resolution else {}
    result = []
    for i in range(n):
        path = out_dir / f"class-{i:05d}.png"
        if not path.exists():
            if should_cancel is not None and should_cancel():
                raise Canceled(f"class image generation canceled after {i} of {n} images")
            generator = torch.Generator("cpu").manual_seed(seed + i)
            image = pipe(
                prompt, num_inference_steps=num_inference_steps, generator=generator, **size
            ).images[0]
            write_atomically(path, encode_image(image, "png"))
        result.append(TrainImage(path=path, caption=prompt))
    return result
