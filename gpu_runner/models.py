"""Model registry: find a base model by name, tell its family, load and cache it.

A model name resolves, in this order, to:

1. `[models.NAME]` in config.toml: a local diffusers folder, or a single
   `.safetensors` / `.ckpt` file together with a local diffusers `config`
   folder (single-file loading without one would fetch configs from the hub);
   a hub repository id only when `network.allow_model_downloads` is true.
2. `DATA_DIR/models/NAME` (what `boothd init-model` writes).
3. The built-in tiny models (`tiny-sd15`, `tiny-sdxl`, `tiny-flux`) are
   written there on first use, so the default configuration runs anywhere.

Every failure is a `ModelError` whose message names the model. Heavy libraries
(torch, diffusers) are imported only by the functions that load pipelines, so
listing and resolving models stays cheap for any process.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from events.settings import ModelSettings, Settings

from .errors import ModelError
from .tiny_models import create_tiny_model

if TYPE_CHECKING:
    import torch

ModelFamily = Literal["sd15", "sd2", "sdxl", "flux"]
MODEL_FAMILIES: tuple[str, ...] = get_args(ModelFamily)

# Names that are built on first use instead of failing as "not found".
BUILTIN_TINY_MODELS: dict[str, Literal["sd15", "sdxl", "flux"]] = {
    "tiny-sd15": "sd15",
    "tiny-sdxl": "sdxl",
    "tiny-flux": "flux",
}

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# "owner/name" as the hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

# A safetensors header larger than this is not a real model header; refusing
# it keeps a corrupt or hostile file from making us allocate gigabytes.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class ModelRef:
    """A resolved base model: where it is and how to load it.

    `path` is a local folder or single file; for a hub model (downloads
    allowed) it is the repository id as a relative path and `hub` is True.
    `config` is the local diffusers folder that describes a single file.
    """

    name: str
    family: ModelFamily
    path: Path
    single_file: bool
    config: Path | None = None
    hub: bool = False


def _corrupt(name: str, where: Path, why: str) -> ModelError:
    return ModelError("model_corrupt", f"model {name!r} at {where} is not a usable model: {why}")


# --------------------------------------------------------------------------
# family detection


def _family_from_pipeline_folder(folder: Path, name: str) -> ModelFamily:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise _corrupt(name, folder, "no model_index.json (not a diffusers pipeline folder)")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(name, folder, f"model_index.json is unreadable ({exc})") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise _corrupt(name, folder, "model_index.json has no _class_name")
    # Every component the index names must be there, or loading fails later
    # with a far less helpful message.
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        if not (folder / component).is_dir():
            raise _corrupt(name, folder, f"component folder {component!r} is missing")
    class_name: str = index["_class_name"]
    if class_name.startswith("StableDiffusionXL"):
        return "sdxl"
    if class_name.startswith("Flux"):
        return "flux"
    if class_name.startswith("StableDiffusion"):
        # SD 2.x uses the same pipeline class; its UNet cross-attends to
        # OpenCLIP-H states of width 1024 where SD 1.x uses CLIP-L's 768.
        try:
            unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise _corrupt(name, folder, "unet/config.json is missing or unreadable") from None
        return "sd2" if unet.get("cross_attention_dim") == 1024 else "sd15"
    raise ModelError(
        "model_unsupported",
        f"model {name!r} at {folder} is a {class_name}, which boothd does not support "
        "(supported: Stable Diffusion 1.x/2.x, SDXL, Flux)",
    )


def _safetensors_keys(file: Path, name: str) -> list[str]:
    """Tensor names from a safetensors header, without reading the tensors."""
    try:
        with file.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise _corrupt(name, file, "file is too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_SAFETENSORS_HEADER:
                raise _corrupt(name, file, "safetensors header length is implausible")
            header_bytes = fh.read(header_len)
    except OSError as exc:
        raise _corrupt(name, file, f"cannot read it ({exc.strerror})") from None
    if len(header_bytes) != header_len:
        raise _corrupt(name, file, "safetensors header is truncated")
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(name, file, "safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(name, file, "safetensors header is not a JSON object")
    return [key for key in header if key != "__metadata__"]


def _ckpt_keys(file: Path, name: str) -> list[str]:
    """Tensor names from a pickled checkpoint, loaded safely (weights only)."""
    import torch

    try:
        # mmap avoids reading gigabytes just to look at the key names.
        data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise _corrupt(name, file, f"cannot read the checkpoint ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise _corrupt(name, file, "checkpoint holds no state dict")
    return [str(key) for key in data]


def family_from_keys(keys: Iterable[str]) -> ModelFamily | None:
    """Tell the family of a single-file checkpoint from its tensor names.

    Recognises the original (LDM / BFL) layouts that single files are shared
    in, and a diffusers-layout Flux transformer. None when nothing matches.
    """
    keys = list(keys)

    def has(*prefixes: str) -> bool:
        return any(key.startswith(prefixes) for key in keys)

    def contains(*parts: str) -> bool:
        return any(part in key for key in keys for part in parts)

    # Flux: BFL layout (double/single stream blocks), optionally wrapped in
    # "model.diffusion_model.", or the diffusers layout of its transformer.
    if has("double_blocks.", "model.diffusion_model.double_blocks.", "single_transformer_blocks."):
        return "flux"
    # SDXL: two text encoders under "conditioner.embedders" and the UNet's
    # size/crop conditioning ("label_emb").
    if has("conditioner.embedders.", "model.diffusion_model.label_emb."):
        return "sdxl"
    # SD 2.x: an OpenCLIP text encoder ("cond_stage_model.model.").
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer.", "model.diffusion_model.input_blocks."):
        return "sd15"
    if contains("input_blocks.") and contains("output_blocks."):
        return "sd15"
    return None


def detect_family(path: Path, name: str | None = None) -> ModelFamily:
    """Tell a model's family from its files.

    A diffusers folder is recognised by `model_index.json`'s `_class_name`
    (SD 1.x and 2.x told apart by the UNet's cross-attention width); a single
    `.safetensors` / `.ckpt` file by its tensor names. Raises `ModelError`
    (naming `name`, or the path when no name is given) when the path is
    missing, corrupt or of an unsupported kind.
    """
    path = Path(path)
    label = name if name is not None else str(path)
    if path.is_dir():
        return _family_from_pipeline_folder(path, label)
    if not path.exists():
        raise ModelError("model_not_found", f"model {label!r}: {path} does not exist")
    if path.suffix.lower() == ".safetensors":
        keys = _safetensors_keys(path, label)
    elif path.suffix.lower() == ".ckpt":
        keys = _ckpt_keys(path, label)
    else:
        raise ModelError(
            "model_unsupported",
            f"model {label!r} at {path} is neither a diffusers folder nor a "
            ".safetensors/.ckpt file",
        )
    family = family_from_keys(keys)
    if family is None:
        raise ModelError(
            "model_unsupported",
            f"model {label!r} at {path}: the checkpoint's tensor names match no "
            "supported family (sd15, sd2, sdxl, flux)",
        )
    return family


# --------------------------------------------------------------------------
# resolution


def _check_family(name: str, detected: ModelFamily, expected: str | None, where: Path) -> None:
    if expected is not None and expected != detected:
        raise ModelError(
            "model_family_mismatch",
            f"model {name!r} is configured as family {expected!r} but {where} is a "
            f"{detected!r} model",
        )


def ref_from_path(
    name: str,
    path: Path,
    *,
    config: Path | None = None,
    family: str | None = None,
) -> ModelRef:
    """Describe the local model at `path` (folder, or single file plus `config`).

    Also used for trained full checkpoints. `family`, when given, must match
    what the files say. Raises `ModelError` naming `name`.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError("model_not_found", f"model {name!r}: {path} does not exist")
    if path.is_dir():
        detected = detect_family(path, name)
        _check_family(name, detected, family, path)
        return ModelRef(name=name, family=detected, path=path, single_file=False)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelError(
            "model_unsupported",
            f"model {name!r}: {path} is neither a diffusers folder nor a .safetensors/.ckpt file",
        )
    if config is None:
        raise ModelError(
            "model_config_missing",
            f"model {name!r} is a single file ({path.name}); it needs `config`, a local "
            "diffusers folder of the same architecture, to load offline",
        )
    config = Path(config)
    if not config.is_dir():
        raise ModelError(
            "model_config_missing",
            f"model {name!r}: config folder {config} does not exist",
        )
    detected = detect_family(path, name)
    _check_family(name, detected, family, path)
    config_family = detect_family(config, f"{name} (config)")
    if config_family != detected:
        raise ModelError(
            "model_family_mismatch",
            f"model {name!r}: the file {path.name} is a {detected!r} checkpoint but its "
            f"config folder {config} is a {config_family!r} model",
        )
    return ModelRef(name=name, family=detected, path=path, single_file=True, config=config)


def _local_path(raw: str, data_dir: Path) -> Path:
    # Relative paths in config.toml are taken relative to the data folder, so
    # a config that moves together with its data keeps working.
    path = Path(raw).expanduser()
    return path if path.is_absolute() else Path(data_dir) / path


def _hub_ref(name: str, repo_id: str, family: str | None, settings: Settings) -> ModelRef:
    if not settings.network.allow_model_downloads:
        raise ModelError(
            "model_download_not_allowed",
            f"model {name!r} refers to the hub repository {repo_id!r}, but downloading "
            "models is disabled (set network.allow_model_downloads = true, or point "
            "the model at a local folder)",
        )
    if family is None:
        # Only the small index file is fetched here; the weights come later,
        # in load_pipeline.
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(repo_id, "model_index.json"))
            class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
        except Exception as exc:
            raise ModelError(
                "model_not_found", f"model {name!r}: cannot read hub repository {repo_id!r}: {exc}"
            ) from None
        family = (
            "sdxl"
            if class_name.startswith("StableDiffusionXL")
            else "flux"
            if class_name.startswith("Flux")
            else "sd15"
            if class_name.startswith("StableDiffusion")
            else None
        )
        if family is None:
            raise ModelError(
                "model_unsupported", f"model {name!r}: {repo_id} is a {class_name or 'unknown'}"
            )
    return ModelRef(
        name=name,
        family=family,  # type: ignore[arg-type]  # one of MODEL_FAMILIES by construction
        path=Path(repo_id),
        single_file=False,
        hub=True,
    )


def _valid_name(name: str) -> bool:
    return (
        bool(name)
        and not name.startswith(".")
        and not any(c in name for c in "/\\:\0")
        and len(name) <= 200
    )


def resolve_model(name: str | None, settings: Settings, data_dir: Path) -> ModelRef:
    """Find the base model called `name` (None: `jobs.default_base_model`).

    See the module docstring for the search order. Built-in tiny model names
    are created under `data_dir/models/` on first use. Raises `ModelError`
    naming the model when it is missing, corrupt, of the wrong family, or a
    hub repository while downloads are not allowed.
    """
    if name is None:
        name = settings.jobs.default_base_model
    data_dir = Path(data_dir)
    configured: ModelSettings | None = settings.models.get(name)
    if configured is not None:
        raw = configured.path
        local = _local_path(raw, data_dir)
        if not local.exists() and _HUB_ID.match(raw):
            return _hub_ref(name, raw, configured.family, settings)
        config = _local_path(configured.config, data_dir) if configured.config else None
        return ref_from_path(name, local, config=config, family=configured.family)

    if _HUB_ID.match(name):
        return _hub_ref(name, name, None, settings)
    if not _valid_name(name):
        raise ModelError("invalid_model_name", f"invalid model name {name!r}")

    folder = data_dir / "models" / name
    if not folder.exists() and name in BUILTIN_TINY_MODELS:
        try:
            create_tiny_model(BUILTIN_TINY_MODELS[name], folder)
        except FileExistsError:
            pass  # another runner created it meanwhile; use theirs
    if not folder.exists():
        known = sorted(set(settings.models) | set(BUILTIN_TINY_MODELS))
        raise ModelError(
            "model_not_found",
            f"model {name!r} not found: it is not configured in [models] and "
            f"{folder} does not exist (known models: {', '.join(known)})",
        )
    return ref_from_path(name, folder)


# --------------------------------------------------------------------------
# loading


def configure_hub_access(allow_downloads: bool) -> None:
    """Forbid network access by huggingface_hub for this process unless allowed.

    huggingface_hub reads `HF_HUB_OFFLINE` when it is imported, so the runner
    calls this before importing diffusers; `load_pipeline` additionally
    passes `local_files_only` so a late call is still safe.
    """
    # Allowing downloads leaves the variable alone: an operator who set
    # HF_HUB_OFFLINE themselves still gets offline mode.
    if not allow_downloads:
        os.environ["HF_HUB_OFFLINE"] = "1"
    # Progress bars and the "requires torchvision" notices go to stderr,
    # which the service captures as the runner's log.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _pipeline_class(family: ModelFamily) -> Any:
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    return {
        "sd15": StableDiffusionPipeline,
        "sd2": StableDiffusionPipeline,
        "sdxl": StableDiffusionXLPipeline,
        "flux": FluxPipeline,
    }[family]


def load_pipeline(
    ref: ModelRef, device: str, dtype: torch.dtype, *, allow_downloads: bool = False
) -> Any:
    """Load `ref` with its family's diffusers pipeline class onto `device`.

    Loads offline unless `allow_downloads` (hub models need it); single files
    are read with `from_single_file(config=<local folder>)`. Progress bars are
    disabled. Raises `ModelError` naming the model when loading fails.
    """
    if ref.hub and not allow_downloads:
        raise ModelError(
            "model_download_not_allowed",
            f"model {ref.name!r} is the hub repository {ref.path.as_posix()!r} and downloads "
            "are disabled",
        )
    configure_hub_access(allow_downloads)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    cls = _pipeline_class(ref.family)
    source = ref.path.as_posix() if ref.hub else str(ref.path)
    try:
        if ref.single_file:
            import torch

            # fp32 is what the converted weights already are; passing it
            # anyway makes diffusers cast each model and log a warning.
            dtype_kwargs = {} if dtype == torch.float32 else {"dtype": dtype}
            pipe = cls.from_single_file(
                source,
                config=str(ref.config),
                local_files_only=not allow_downloads,
                **dtype_kwargs,
            )
        else:
            kwargs: dict[str, Any] = {}
            if ref.family in ("sd15", "sd2"):
                # boothd has no safety checker component; without these the
                # pipeline logs a warning on every load.
                kwargs = {"safety_checker": None, "requires_safety_checker": False}
            pipe = cls.from_pretrained(
                source, local_files_only=not allow_downloads, dtype=dtype, **kwargs
            )
        pipe = pipe.to(device)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            "model_load_failed",
            f"model {ref.name!r} at {source} could not be loaded: {type(exc).__name__}: {exc}",
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def estimate_pipeline_bytes(pipe: Any) -> int:
    """Memory a pipeline holds: the bytes of every component's parameters and buffers."""
    import torch

    total = 0
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, torch.nn.Module):
            for tensor in (*component.parameters(), *component.buffers()):
                total += tensor.numel() * tensor.element_size()
    return total


Loader = Callable[["ModelRef", str, "torch.dtype"], Any]


class PipelineCache:
    """Keep loaded pipelines between jobs, least recently used out first.

    Loading costs seconds (real models: tens of seconds), so the runner keeps
    pipelines while their estimated memory stays within `budget_mb`. A
    pipeline larger than the whole budget is returned but not kept. Entries
    are keyed by model, device and dtype; callers must leave a pipeline as
    they found it (generate restores schedulers and unloads LoRAs).
    """

    def __init__(self, budget_mb: float, loader: Loader | None = None) -> None:
        self.budget_bytes = int(budget_mb * 1024 * 1024)
        self._loader: Loader = loader if loader is not None else load_pipeline
        self._entries: OrderedDict[tuple[ModelRef, str, str], tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ref: ModelRef, device: str, dtype: torch.dtype) -> Any:
        """Return the cached pipeline for (ref, device, dtype), loading it if needed."""
        key = (ref, device, str(dtype))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[0]
        pipe = self._loader(ref, device, dtype)
        size = estimate_pipeline_bytes(pipe)
        with self._lock:
            if size <= self.budget_bytes:
                self._entries[key] = (pipe, size)
                self._entries.move_to_end(key)
                self._evict()
        return pipe

    def _evict(self) -> None:
        evicted = False
        while self._entries and self.total_bytes > self.budget_bytes:
            self._entries.popitem(last=False)
            evicted = True
        if evicted:
            _release_memory()

    @property
    def total_bytes(self) -> int:
        """Estimated bytes held by the cached pipelines."""
        return sum(size for _, size in self._entries.values())

    def cached(self) -> list[ModelRef]:
        """The cached models, least recently used first."""
        with self._lock:
            return [key[0] for key in self._entries]

    def clear(self) -> None:
        """Drop every cached pipeline."""
        with self._lock:
            self._entries.clear()
        _release_memory()

    def __len__(self) -> int:
        return len(self._entries)


def _release_memory() -> None:
    # Dropping the last reference frees CPU memory; CUDA keeps freed blocks in
    # its caching allocator until asked to give them back.
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency of the runner
        pass
