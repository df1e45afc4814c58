"""Checkpoint files: atomic publication, hashes, and the LoRA file formats.

A checkpoint is written into a hidden staging folder beside its final place,
every file is flushed to disk (and made world-readable: safetensors writes
0600 whatever the umask), and the folder is then renamed into place. A reader
— the service listing artifacts, a user downloading — therefore sees either
no `checkpoint-N` folder or a complete one, never a half-written file, and a
crash or a cancel leaves only a staging folder that is removed on the way out.

LoRA checkpoints are written twice:

- the diffusers format (`pytorch_lora_weights.safetensors`, PEFT key names),
  saved through the pipeline class's own `save_lora_weights` so that the LoRA
  alpha travels in the safetensors metadata — a file written with a plain
  `save_file` would load with alpha = rank, i.e. at the wrong strength;
- a kohya / webui copy (AUTOMATIC1111, ComfyUI, Forge, InvokeAI) from
  diffusers' `convert_state_dict_to_kohya`, whose `.alpha` tensors are then
  set to the real alpha (the converter writes the rank there).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

CheckpointKind = Literal["lora", "full"]
CheckpointFormat = Literal["safetensors", "diffusers"]
CheckpointVariant = Literal["diffusers", "kohya", "single_file", "extracted_lora"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class CheckpointFile:
    """One published checkpoint artifact.

    `path` is a file, except for a full model in diffusers format, which is a
    folder; its `size_bytes` is then the sum of its files and its `sha256` the
    digest of its manifest (see `folder_digest`). `final` marks the artifacts
    of the last training step.
    """

    kind: CheckpointKind
    step: int
    format: CheckpointFormat
    variant: CheckpointVariant
    path: Path
    size_bytes: int
    sha256: str
    final: bool


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digest(folder: Path) -> tuple[int, str]:
    """Total size and manifest digest of a folder.

    The manifest is one line `<relative path>\\0<sha256 of the file>\\n` per
    file, sorted by path; its SHA-256 changes when any file's name or bytes
    change, and does not depend on file system order or timestamps.
    """
    lines = []
    total = 0
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        total += file.stat().st_size
        lines.append(f"{file.relative_to(folder).as_posix()}\0{sha256_file(file)}\n")
    return total, hashlib.sha256("".join(lines).encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def canonicalize_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors header with its keys in sorted order, in place.

    safetensors serialises the `__metadata__` map in hash-map order, which
    changes from one save to the next: the same tensors and metadata would
    give files with different bytes and SHA-256s. The header is re-encoded
    the way safetensors writes it (compact JSON, space padding); a header
    that would not fit in its old length is left as it is.
    """
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        encoded = json.dumps(
            header, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
        if len(encoded) <= length:
            f.seek(8)
            f.write(encoded.ljust(length, b" "))


def _seal(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk, with shareable modes
    and canonical safetensors headers.

    Checkpoints are downloadable artifacts read by the service process, not
    secrets; safetensors' 0600 would lock out a service running as another
    user of the same group.
    """
    for root, dirs, files in os.walk(folder):
        for name in files:
            path = Path(root, name)
            if path.suffix == ".safetensors":
                canonicalize_safetensors_header(path)
            path.chmod(0o644)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        for name in dirs:
            Path(root, name).chmod(0o755)
        _fsync_dir(Path(root))
    folder.chmod(0o755)


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yield an empty staging folder that becomes `final` when the block succeeds.

    The staging folder lives in `final`'s parent, so the closing rename never
    crosses file systems and is atomic. An earlier folder at `final` (a job
    retried after a crash) is replaced. When the block raises (cancel, full
    disk), the staging folder is removed and `final` is left untouched.
    """
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".{final.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
        _seal(staging)
        if final.exists():
            # rename(2) refuses to replace a non-empty folder: move the old one
            # aside first, so `final` is missing for one rename at most.
            old = parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(final)
        _fsync_dir(parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def describe(
    path: Path,
    *,
    kind: CheckpointKind,
    step: int,
    variant: CheckpointVariant,
    final: bool,
) -> CheckpointFile:
    """Build the `CheckpointFile` record of a published file or diffusers folder."""
    if path.is_dir():
        size, digest = folder_digest(path)
        fmt: CheckpointFormat = "diffusers"
    else:
        size, digest = path.stat().st_size, sha256_file(path)
        fmt = "safetensors"
    return CheckpointFile(
        kind=kind,
        step=step,
        format=fmt,
        variant=variant,
        path=path,
        size_bytes=size,
        sha256=digest,
        final=final,
    )


def peft_config_metadata(config: Any) -> dict[str, Any]:
    """A PEFT config as the dict stored in a LoRA file's metadata.

    Sets (`target_modules`) become sorted lists: diffusers writes them in set
    iteration order, which differs between runs and would make the same
    weights hash differently.
    """
    values: dict[str, Any] = config.to_dict()
    return {k: sorted(v) if isinstance(v, set | frozenset) else v for k, v in values.items()}


def lora_metadata(module: Any) -> dict[str, Any]:
    """The metadata of `module`'s trained (`default`) PEFT adapter."""
    return peft_config_metadata(module.peft_config["default"])


def save_lora_diffusers(
    pipeline_cls: Any,
    folder: Path,
    layers: dict[str, dict[str, torch.Tensor]],
    metadata: dict[str, dict[str, Any]],
) -> Path:
    """Write the diffusers-format LoRA file; return its path.

    `layers` maps a pipeline component name (`unet`, `transformer`,
    `text_encoder`, `text_encoder_2`) to its PEFT state dict, `metadata` the
    same names to their PEFT configs. The pipeline class's `save_lora_weights`
    stores the configs in the safetensors header, so `load_lora_weights`
    restores the exact rank and alpha.
    """
    kwargs: dict[str, Any] = {}
    for name, state in layers.items():
        kwargs[f"{name}_lora_layers"] = state
        kwargs[f"{name}_lora_adapter_metadata"] = metadata[name]
    pipeline_cls.save_lora_weights(
        folder, weight_name=LORA_WEIGHT_NAME, safe_serialization=True, **kwargs
    )
    return folder / LORA_WEIGHT_NAME


def kohya_state_dict(
    layers: dict[str, dict[str, torch.Tensor]], alpha: float
) -> dict[str, torch.Tensor]:
    """Convert PEFT LoRA state dicts (by component) to the kohya / webui layout.

    Text encoder keys get their `text_model.` prefix back: transformers ≥ 5.6
    flattened `CLIPTextModel`, so its PEFT keys start at `encoder.`, while
    webui LoRAs name `lora_te1_text_model_encoder_…`.
    """
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    prefixed: dict[str, torch.Tensor] = {}
    for component, state in layers.items():
        for key, value in state.items():
            if component.startswith("text_encoder") and not key.startswith("text_model."):
                key = f"text_model.{key}"
            prefixed[f"{component}.{key}"] = value
    converted: dict[str, torch.Tensor] = convert_state_dict_to_kohya(prefixed)
    # The converter writes alpha = rank (scale 1); the trained scale is alpha / rank.
    alpha_tensor = torch.tensor(float(alpha), dtype=torch.float32)
    for key in converted:
        if key.endswith(".alpha"):
            converted[key] = alpha_tensor.clone()
    return {k: v.contiguous() for k, v in converted.items()}


def save_lora_kohya(
    path: Path,
    layers: dict[str, dict[str, torch.Tensor]],
    *,
    rank: int,
    alpha: float,
    base_model: str,
) -> Path:
    """Write the kohya / webui-format copy of a LoRA at `path`; return `path`.

    The `ss_*` metadata keys are the ones kohya's sd-scripts write; UIs show
    them and some read the network dimension and alpha from them.
    """
    from safetensors.torch import save_file

    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": base_model,
        "ss_training_comment": "trained with boothd",
    }
    save_file(kohya_state_dict(layers, alpha), str(path), metadata=metadata)
    return path


# --- resumable training state -------------------------------------------------
#
# A training state is a folder written through `staged_folder`, so it is
# replaced as a whole and a reader never sees a half-written one:
#
# - `weights.safetensors`: the trainable parameters only (LoRA layers for a
#   LoRA job, the UNet / text encoder for a full fine-tune), keyed
#   `<component>.<parameter name>`;
# - `rng.safetensors`: torch generator states (uint8 tensors);
# - `optimizer.pt`, `scheduler.pt`: `torch.save`d state dicts (loaded back
#   with `weights_only=True`, so a state file cannot run code);
# - `state.json`: written last, the step, the config hash and every small
#   value (data order, python / numpy RNG states).

STATE_FORMAT = 1
STATE_META = "state.json"
STATE_WEIGHTS = "weights.safetensors"
STATE_RNG = "rng.safetensors"
STATE_OPTIMIZER = "optimizer.pt"
STATE_SCHEDULER = "scheduler.pt"


@dataclass
class TrainState:
    """Everything needed to continue a training run where it stopped.

    `meta` holds the JSON-serialisable part (`step`, `config_hash`, data order,
    python / numpy RNG states, …); `weights` the trainable parameters, `rng`
    the torch generator states, `optimizer` and `scheduler` their state dicts.
    """

    meta: dict[str, Any]
    weights: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]


def save_train_state(state_dir: Path, state: TrainState) -> None:
    """Write `state` atomically to `state_dir`, replacing an earlier state.

    The files are staged in a hidden folder beside `state_dir`, flushed, and
    renamed into place (`staged_folder`): a crash at any moment leaves the
    previous complete state or the new one, plus at most a staging folder
    that `remove_stale_staging` clears on the next start.
    """
    import torch
    from safetensors.torch import save_file

    with staged_folder(state_dir) as staging:
        # clone(): safetensors refuses tensors sharing storage, and LoRA
        # parameters may be views; contiguous CPU copies are what it writes.
        save_file(
            {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.weights.items()},
            str(staging / STATE_WEIGHTS),
        )
        save_file(
            {k: v.to("cpu", copy=True).contiguous() for k, v in state.rng.items()},
            str(staging / STATE_RNG),
        )
        torch.save(state.optimizer, staging / STATE_OPTIMIZER)
        torch.save(state.scheduler, staging / STATE_SCHEDULER)
        meta = {"format": STATE_FORMAT, **state.meta}
        (staging / STATE_META).write_text(json.dumps(meta, sort_keys=True))


def remove_stale_staging(state_dir: Path) -> None:
    """Remove staging / replaced-state folders a killed process left beside `state_dir`.

    When a process died between `staged_folder`'s two renames, `state_dir` is
    missing and its last complete state is the `.old-` folder: that one is
    moved back into place instead of removed.
    """
    parent = state_dir.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".{state_dir.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not state_dir.exists() and (olds[-1] / STATE_META).is_file():
        olds.pop().rename(state_dir)
    for stale in [*olds, *parent.glob(f".{state_dir.name}.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def read_state_meta(state_dir: Path) -> dict[str, Any] | None:
    """The `state.json` of a training state, or None when there is none readable."""
    try:
        meta = json.loads((state_dir / STATE_META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def load_state_step(state_dir: Path) -> int | None:
    """The optimizer step a saved training state resumes from, or None.

    None when `state_dir` holds no readable state of this format. The state
    may still be refused by `train` (another config); this only reads the
    step, for progress reporting.
    """
    meta = read_state_meta(state_dir)
    if meta is None or meta.get("format") != STATE_FORMAT:
        return None
    step = meta.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def load_train_state(state_dir: Path) -> TrainState:
    """Read a whole training state (tensors on the CPU).

    Raises `ValueError` or `OSError` for a missing, foreign or damaged state;
    the caller decides whether that means a fresh start.
    """
    import torch
    from safetensors.torch import load_file

    meta = read_state_meta(state_dir)
    if meta is None:
        raise ValueError(f"no readable {STATE_META}")
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"state format {meta.get('format')!r}, expected {STATE_FORMAT}")
    try:
        return TrainState(
            meta=meta,
            weights=load_file(str(state_dir / STATE_WEIGHTS)),
            rng=load_file(str(state_dir / STATE_RNG)),
            optimizer=torch.load(
                state_dir / STATE_OPTIMIZER, map_location="cpu", weights_only=True
            ),
            scheduler=torch.load(
                state_dir / STATE_SCHEDULER, map_location="cpu", weights_only=True
            ),
        )
    except (OSError, RuntimeError) as exc:  # safetensors / pickle errors
        raise ValueError(f"damaged state files: {exc}") from exc
