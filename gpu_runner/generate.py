"""Image generation: validated parameters in, image files with hashes out.

- Scheduler names are the ones AUTOMATIC1111's web UI shows (what clients of
  hosted DreamBooth services send); each maps to a diffusers scheduler built
  from the model's own scheduler config, so noise schedules stay the model's.
- Reproducible: image `i` uses seed `seed + i` with a CPU generator, a fresh
  scheduler, and an encoder that writes no timestamps or metadata, so the same
  model, parameters and seed give the same bytes.
- Pipelines come from a cache shared between jobs: the scheduler swap and the
  job's LoRA are undone whatever happens, so the next job sees a clean model.
- Cancellation stops within one denoising step and leaves no files behind.

torch and diffusers are imported inside functions so that other processes can
import `GenerateParams` for validation without paying for them.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import Canceled, GenerationError, ModelError

MAX_SEED = 2**32 - 1
LORA_ADAPTER_NAME = "boothd_job_lora"


@dataclass(frozen=True)
class SchedulerSpec:
    """How to build one named scheduler: a diffusers class and its options."""

    class_name: str
    options: dict[str, Any] = field(default_factory=dict)
    # Flow-matching models (Flux) need a flow-matching sampler; the
    # noise-prediction samplers of SD are meaningless for them and vice versa.
    flow_match: bool = False


_KARRAS = {"use_karras_sigmas": True}
_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}

# A1111 sampler names -> diffusers schedulers. "DPM++ SDE" and friends are
# left out: they need torchsde, which boothd does not depend on.
SCHEDULERS: dict[str, SchedulerSpec] = {
    "Euler": SchedulerSpec("EulerDiscreteScheduler"),
    "Euler Karras": SchedulerSpec("EulerDiscreteScheduler", _KARRAS),
    "Euler a": SchedulerSpec("EulerAncestralDiscreteScheduler"),
    "Heun": SchedulerSpec("HeunDiscreteScheduler"),
    "Heun Karras": SchedulerSpec("HeunDiscreteScheduler", _KARRAS),
    "DPM2": SchedulerSpec("KDPM2DiscreteScheduler"),
    "DPM2 Karras": SchedulerSpec("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 a": SchedulerSpec("KDPM2AncestralDiscreteScheduler"),
    "DPM2 a Karras": SchedulerSpec("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "DPM++ 2M": SchedulerSpec("DPMSolverMultistepScheduler", _DPMPP),
    "DPM++ 2M Karras": SchedulerSpec("DPMSolverMultistepScheduler", {**_DPMPP, **_KARRAS}),
    "DPM++ 2M SDE": SchedulerSpec("DPMSolverMultistepScheduler", _DPMPP_SDE),
    "DPM++ 2M SDE Karras": SchedulerSpec("DPMSolverMultistepScheduler", {**_DPMPP_SDE, **_KARRAS}),
    "LMS": SchedulerSpec("LMSDiscreteScheduler"),
    "LMS Karras": SchedulerSpec("LMSDiscreteScheduler", _KARRAS),
    "DDIM": SchedulerSpec("DDIMScheduler"),
    # PRK warm-up steps are a PNDM paper detail that SD checkpoints skip.
    "PNDM": SchedulerSpec("PNDMScheduler", {"skip_prk_steps": True}),
    "PLMS": SchedulerSpec("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": SchedulerSpec("UniPCMultistepScheduler"),
    "DEIS": SchedulerSpec("DEISMultistepScheduler"),
    "FlowMatch Euler": SchedulerSpec("FlowMatchEulerDiscreteScheduler", flow_match=True),
}

# For flow-matching models "Euler" means their flow-matching Euler sampler,
# so clients that always send "Euler" work with Flux too.
_FLOW_MATCH_ALIASES = {"Euler": "FlowMatch Euler"}

# (smallest, largest) side in pixels, and the multiple sides must be.
FAMILY_SIZE_LIMITS: dict[str, tuple[int, int, int]] = {
    "sd15": (64, 1536, 8),
    "sd2": (64, 1536, 8),
    "sdxl": (64, 2048, 8),
    # Flux packs 2x2 latent patches: sides must be multiples of 2 x 8.
    "flux": (64, 2048, 16),
}

_EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}


def scheduler_names(family: str) -> list[str]:
    """The scheduler names valid for a model family, in a stable order."""
    flow = family == "flux"
    names = [name for name, spec in SCHEDULERS.items() if spec.flow_match == flow]
    if flow:
        names += list(_FLOW_MATCH_ALIASES)
    return names


class GenerateParams(BaseModel):
    """One `generate` entry of a job (see API.md).

    `width`/`height` None means the model's native size; `seed` None means a
    random seed, which is reported with each image. `scheduler` None keeps
    the model's own scheduler. Family-dependent limits (size bounds, Flux's
    samplers) are checked by `validate_for_family` once the model is known.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str = Field(default="", max_length=4000)
    num_images: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    steps: int = Field(default=25, ge=1, le=150)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=50.0)
    width: int | None = Field(default=None, ge=64, le=2048, multiple_of=8)
    height: int | None = Field(default=None, ge=64, le=2048, multiple_of=8)
    scheduler: str | None = None
    lora_scale: float = Field(default=1.0, ge=-4.0, le=4.0)
    output_format: Literal["png", "webp", "jpeg"] = "png"
    model: str | None = None

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        if value is not None and value not in SCHEDULERS and value not in _FLOW_MATCH_ALIASES:
            valid = ", ".join(repr(name) for name in SCHEDULERS)
            raise ValueError(f"unknown scheduler {value!r}; valid schedulers: {valid}")
        return value

    @model_validator(mode="after")
    def _seeds_fit(self) -> GenerateParams:
        # Image i is reported with seed + i; every reported seed must be one a
        # client can send back to reproduce that image.
        if self.seed is not None and self.seed + self.num_images - 1 > MAX_SEED:
            raise ValueError(
                f"seed + num_images - 1 must not exceed {MAX_SEED} (image i uses seed + i)"
            )
        return self

    def validate_for_family(self, family: str) -> None:
        """Check the limits that depend on the model family.

        Raises `GenerationError("invalid_params", ...)` for an image side out
        of the family's bounds or a scheduler the family cannot use.
        """
        low, high, multiple = FAMILY_SIZE_LIMITS.get(family, FAMILY_SIZE_LIMITS["sd15"])
        for side, value in (("width", self.width), ("height", self.height)):
            if value is None:
                continue
            if not low <= value <= high or value % multiple:
                raise GenerationError(
                    "invalid_params",
                    f"{side} {value} is not valid for a {family} model: it must be a "
                    f"multiple of {multiple} between {low} and {high}",
                )
        if self.scheduler is not None and self.scheduler not in scheduler_names(family):
            valid = ", ".join(repr(name) for name in scheduler_names(family))
            raise GenerationError(
                "invalid_params",
                f"scheduler {self.scheduler!r} cannot be used with a {family} model; "
                f"valid schedulers for {family}: {valid}",
            )


@dataclass(frozen=True)
class GeneratedImage:
    """One image written to disk."""

    path: Path
    seed: int
    width: int
    height: int
    sha256: str
    index: int
    size_bytes: int


# --------------------------------------------------------------------------
# schedulers


def _lms_without_scipy() -> Any:
    """`LMSDiscreteScheduler` whose coefficients need no scipy.

    diffusers integrates the LMS coefficient polynomial with
    `scipy.integrate.quad`; scipy is a large dependency for one integral. The
    integrand is a polynomial of degree order-1 <= 3, which Gauss-Legendre
    quadrature with 4 nodes integrates exactly.
    """
    import numpy as np

    # The top-level export is a placeholder that demands scipy when scipy is
    # missing; the module itself imports scipy only when it is available.
    from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler

    nodes, weights = np.polynomial.legendre.leggauss(4)

    class ExactLMSDiscreteScheduler(LMSDiscreteScheduler):
        def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
            sigmas = np.asarray(self.sigmas, dtype=np.float64)
            a, b = sigmas[t], sigmas[t + 1]
            # Map the nodes from [-1, 1] onto [a, b].
            taus = (b - a) / 2 * nodes + (a + b) / 2
            values = np.ones_like(taus)
            for k in range(order):
                if k == current_order:
                    continue
                values *= (taus - sigmas[t - k]) / (sigmas[t - current_order] - sigmas[t - k])
            return float((b - a) / 2 * np.sum(weights * values))

    return ExactLMSDiscreteScheduler


def make_scheduler(name: str | None, base: Any, family: str) -> Any:
    """A fresh scheduler for `name` built from the config of `base`, the model's scheduler.

    `name` None rebuilds the model's own scheduler class. Building afresh for
    every image keeps images independent of what ran before (multistep
    samplers carry state) and never touches the cached pipeline's scheduler.
    Raises `GenerationError` for a name the family cannot use.
    """
    import diffusers

    base_config = base.config
    if name is None:
        return type(base).from_config(base_config)
    if family == "flux":
        name = _FLOW_MATCH_ALIASES.get(name, name)
    spec = SCHEDULERS.get(name)
    if spec is None or spec.flow_match != (family == "flux"):
        valid = ", ".join(repr(n) for n in scheduler_names(family))
        raise GenerationError(
            "invalid_params",
            f"scheduler {name!r} cannot be used with a {family} model; valid: {valid}",
        )
    if spec.class_name == "LMSDiscreteScheduler":
        cls = _lms_without_scipy()
    else:
        cls = getattr(diffusers, spec.class_name)
    return cls.from_config(base_config, **spec.options)


# --------------------------------------------------------------------------
# output


def encode_image(image: Any, output_format: str) -> bytes:
    """Encode a PIL image deterministically (no metadata, fixed settings)."""
    from PIL import Image

    # Rebuilding from raw pixels drops any `info` (text chunks, dpi, ...) so
    # only pixels decide the bytes.
    clean = Image.frombytes("RGB", image.size, image.convert("RGB").tobytes())
    buffer = io.BytesIO()
    if output_format == "png":
        clean.save(buffer, format="PNG", optimize=False, compress_level=6)
    elif output_format == "webp":
        clean.save(buffer, format="WEBP", quality=90, method=4)
    elif output_format == "jpeg":
        clean.save(buffer, format="JPEG", quality=95, optimize=False, progressive=False)
    else:
        raise GenerationError("invalid_params", f"unknown output format {output_format!r}")
    return buffer.getvalue()


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the whole file or none of it."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            # The job's events will point at this file: it must survive a crash.
            os.fsync(fh.fileno())
        tmp.chmod(0o644)  # mkstemp creates 0600; images are served to clients
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------
# generation


def _family_kwargs(pipe: Any, family: str, params: GenerateParams) -> dict[str, Any]:
    if family == "flux":
        # Flux (guidance-distilled) takes no negative prompt without true CFG;
        # its T5 prompt length is the tokenizer's limit (512 on real Flux).
        tokenizer_2 = getattr(pipe, "tokenizer_2", None)
        limit = getattr(tokenizer_2, "model_max_length", 512)
        return {"max_sequence_length": int(min(512, limit))}
    return {"negative_prompt": params.negative_prompt or None}


def _load_lora(pipe: Any, lora_path: Path, scale: float) -> None:
    if not lora_path.is_file():
        raise ModelError("lora_not_found", f"LoRA file {lora_path} does not exist")
    try:
        pipe.load_lora_weights(
            str(lora_path.parent), weight_name=lora_path.name, adapter_name=LORA_ADAPTER_NAME
        )
        pipe.set_adapters([LORA_ADAPTER_NAME], adapter_weights=[scale])
    except Exception as exc:
        raise ModelError(
            "lora_load_failed",
            f"LoRA {lora_path.name} could not be applied to the model: {type(exc).__name__}: {exc}",
        ) from exc


def _unload_lora(pipe: Any) -> None:
    # Removes the LoRA layers from every component (not just deactivates
    # them), so the cached pipeline is exactly the base model again.
    pipe.unload_lora_weights()


def generate_images(
    pipe: Any,
    family: str,
    params: GenerateParams,
    out_dir: Path,
    lora_path: Path | None,
    should_cancel: Callable[[], bool],
    *,
    index_offset: int = 0,
) -> list[GeneratedImage]:
    """Generate `params.num_images` images into `out_dir` and describe them.

    Image `i` uses seed `params.seed + i` (a random base seed when None) and
    is written atomically as `NNNN_seedS.EXT` with index `index_offset + i`.
    `lora_path` (a LoRA `.safetensors`) is applied at `params.lora_scale` and
    removed afterwards; the pipeline's scheduler is restored too.
    `should_cancel` is polled before each image and after every denoising
    step; when it returns True, generation stops, every file this call wrote
    is removed and `Canceled` is raised. Invalid parameters for the family
    raise `GenerationError`, LoRA problems `ModelError`.
    """
    import torch

    params.validate_for_family(family)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if params.seed is not None:
        base_seed = params.seed
    else:
        # Leave room so that every seed + i stays a valid 32-bit seed.
        base_seed = secrets.randbelow(MAX_SEED - params.num_images + 2)

    original_scheduler = pipe.scheduler
    canceled = False

    def on_step_end(p: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        nonlocal canceled
        if should_cancel():
            canceled = True
            # The pipelines check this flag at the start of every step and
            # skip the remaining ones.
            p._interrupt = True
        return tensors

    written: list[Path] = []
    results: list[GeneratedImage] = []
    try:
        if lora_path is not None:
            _load_lora(pipe, Path(lora_path), params.lora_scale)
        for i in range(params.num_images):
            if should_cancel():
                raise Canceled(f"canceled before image {index_offset + i}")
            seed = base_seed + i
            pipe.scheduler = make_scheduler(params.scheduler, original_scheduler, family)
            # A CPU generator gives the same noise whatever the device.
            generator = torch.Generator(device="cpu").manual_seed(seed)
            output = pipe(
                prompt=params.prompt,
                num_inference_steps=params.steps,
                guidance_scale=params.guidance_scale,
                width=params.width,
                height=params.height,
                generator=generator,
                num_images_per_prompt=1,
                output_type="pil",
                callback_on_step_end=on_step_end,
                **_family_kwargs(pipe, family, params),
            )
            if canceled:
                raise Canceled(f"canceled while generating image {index_offset + i}")
            image = output.images[0]
            data = encode_image(image, params.output_format)
            index = index_offset + i
            path = out_dir / f"{index:04d}_seed{seed}.{_EXTENSIONS[params.output_format]}"
            write_atomically(path, data)
            written.append(path)
            results.append(
                GeneratedImage(
                    path=path,
                    seed=seed,
                    width=image.width,
                    height=image.height,
                    sha256=hashlib.sha256(data).hexdigest(),
                    index=index,
                    size_bytes=len(data),
                )
            )
        return results
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    finally:
        pipe.scheduler = original_scheduler
        if lora_path is not None:
            _unload_lora(pipe)
