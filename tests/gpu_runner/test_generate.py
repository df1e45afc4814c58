"""Image generation on tiny real models: parameters, seeds, schedulers, LoRA, cancel."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gpu_runner.errors import Canceled, GenerationError, ModelError
from gpu_runner.generate import (
    SCHEDULERS,
    GeneratedImage,
    GenerateParams,
    generate_images,
    scheduler_names,
)

FAST: dict[str, Any] = {"steps": 2, "width": 64, "height": 64}


def never() -> bool:
    return False


def _gen(
    pipe: Any,
    family: str,
    out: Path,
    lora: Path | None = None,
    should_cancel: Callable[[], bool] = never,
    **fields: Any,
) -> list[GeneratedImage]:
    params = GenerateParams(**{"prompt": "photo of sks dog", **FAST, **fields})
    return generate_images(pipe, family, params, out, lora, should_cancel)


# --------------------------------------------------------------------------
# parameters


def test_unknown_scheduler_is_rejected_with_the_valid_names() -> None:
    """An unknown scheduler name fails validation, listing every valid name."""
    with pytest.raises(ValidationError) as info:
        GenerateParams(prompt="x", scheduler="Euler b")
    message = str(info.value)
    assert "unknown scheduler 'Euler b'" in message
    for name in ("Euler a", "DPM++ 2M Karras", "DDIM", "UniPC"):
        assert repr(name) in message


def test_unknown_fields_are_rejected() -> None:
    """GenerateParams forbids fields the API does not define."""
    with pytest.raises(ValidationError, match="cfg"):
        GenerateParams(prompt="x", cfg=7)  # type: ignore[call-arg]


@pytest.mark.parametrize("side", [63, 65, 100, 4096, 0])
def test_width_and_height_must_be_multiples_of_8_within_bounds(side: int) -> None:
    """Sides must be multiples of 8 between 64 and 2048 pixels."""
    with pytest.raises(ValidationError):
        GenerateParams(prompt="x", width=side)
    with pytest.raises(ValidationError):
        GenerateParams(prompt="x", height=side)


@pytest.mark.parametrize(
    ("family", "fields", "fragment"),
    [
        ("sd15", {"width": 2048}, "between 64 and 1536"),
        ("flux", {"height": 72}, "multiple of 16"),
        ("flux", {"scheduler": "DDIM"}, "'FlowMatch Euler'"),
        ("sd15", {"scheduler": "FlowMatch Euler"}, "'Euler a'"),
    ],
)
def test_family_limits_are_checked_with_clear_messages(
    family: str, fields: dict[str, Any], fragment: str
) -> None:
    """Per-family bounds and schedulers are enforced once the family is known."""
    params = GenerateParams(prompt="x", **fields)
    with pytest.raises(GenerationError) as info:
        params.validate_for_family(family)
    assert info.value.code == "invalid_params"
    assert fragment in str(info.value)


def test_seed_bounds() -> None:
    """Seeds, including seed + i of the last image, are non-negative 32-bit integers."""
    GenerateParams(prompt="x", seed=2**32 - 1)
    with pytest.raises(ValidationError):
        GenerateParams(prompt="x", seed=-1)
    with pytest.raises(ValidationError):
        GenerateParams(prompt="x", seed=2**32)
    # Image i reports seed + i, which must itself be a valid seed.
    with pytest.raises(ValidationError, match="seed"):
        GenerateParams(prompt="x", seed=2**32 - 1, num_images=2)


# --------------------------------------------------------------------------
# generation


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_each_family_generates_an_image_file(
    tiny_pipelines: dict[str, Any], tmp_path: Path, family: str
) -> None:
    """Every family generates a PNG of the asked size, hashed and named by index."""
    import hashlib

    from PIL import Image

    [image] = _gen(tiny_pipelines[family], family, tmp_path, seed=5)
    assert image.path.parent == tmp_path and image.path.suffix == ".png"
    assert (image.width, image.height, image.seed, image.index) == (64, 64, 5, 0)
    data = image.path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == image.sha256
    assert len(data) == image.size_bytes
    with Image.open(image.path) as img:
        assert img.size == (64, 64)
    # Only the final file is left: no temporary files.
    assert [p.name for p in tmp_path.iterdir()] == [image.path.name]


def test_same_seed_gives_identical_bytes(tiny_pipelines: dict[str, Any], tmp_path: Path) -> None:
    """Same model, parameters and seed produce byte-identical images."""
    [a] = _gen(tiny_pipelines["sd15"], "sd15", tmp_path / "a", seed=11)
    [b] = _gen(tiny_pipelines["sd15"], "sd15", tmp_path / "b", seed=11)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.sha256 == b.sha256


def test_image_i_uses_seed_plus_i_and_different_seeds_differ(
    tiny_pipelines: dict[str, Any], tmp_path: Path
) -> None:
    """Image i of a request uses seed + i, equal to a lone request with that seed."""
    pipe = tiny_pipelines["flux"]
    images = _gen(pipe, "flux", tmp_path / "batch", seed=20, num_images=2)
    assert [(im.seed, im.index) for im in images] == [(20, 0), (21, 1)]
    assert images[0].sha256 != images[1].sha256
    [lone] = _gen(pipe, "flux", tmp_path / "lone", seed=21)
    assert lone.sha256 == images[1].sha256


def test_random_seed_is_reported_and_reproduces(
    tiny_pipelines: dict[str, Any], tmp_path: Path
) -> None:
    """With no seed, a random one is used and reported; reusing it reproduces the image."""
    pipe = tiny_pipelines["flux"]
    [first] = _gen(pipe, "flux", tmp_path / "a", seed=None)
    assert 0 <= first.seed <= 2**32 - 1
    [again] = _gen(pipe, "flux", tmp_path / "b", seed=first.seed)
    assert again.sha256 == first.sha256


def test_png_holds_no_metadata(tiny_pipelines: dict[str, Any], tmp_path: Path) -> None:
    """PNG output has only IHDR/IDAT/IEND chunks: no timestamps or text to vary."""
    import struct

    [image] = _gen(tiny_pipelines["flux"], "flux", tmp_path, seed=1)
    data = image.path.read_bytes()
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append(data[pos + 4 : pos + 8].decode())
        pos += 12 + length
    assert set(chunks) == {"IHDR", "IDAT", "IEND"}


@pytest.mark.parametrize(("fmt", "suffix"), [("webp", ".webp"), ("jpeg", ".jpg")])
def test_other_output_formats_are_deterministic(
    tiny_pipelines: dict[str, Any], tmp_path: Path, fmt: str, suffix: str
) -> None:
    """WebP and JPEG outputs carry the right extension and are reproducible too."""
    from PIL import Image

    pipe = tiny_pipelines["flux"]
    [a] = _gen(pipe, "flux", tmp_path / "a", seed=3, output_format=fmt)
    [b] = _gen(pipe, "flux", tmp_path / "b", seed=3, output_format=fmt)
    assert a.path.suffix == suffix
    assert a.sha256 == b.sha256
    with Image.open(a.path) as img:
        assert img.format == fmt.upper()


def test_every_sd_scheduler_generates_and_none_leaks(
    tiny_pipelines: dict[str, Any], tmp_path: Path
) -> None:
    """Each SD scheduler name works, and the cached pipeline keeps its own scheduler."""
    pipe = tiny_pipelines["sd15"]
    original = pipe.scheduler
    original_entry = pipe.config["scheduler"]
    names = scheduler_names("sd15")
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "PNDM", "LMS"} <= set(names)
    assert {"Heun", "UniPC"} <= set(names)
    hashes = {}
    for i, name in enumerate(names):
        # guidance 1 skips the unconditional pass: half the cost, same sampler.
        [image] = _gen(pipe, "sd15", tmp_path / str(i), seed=9, scheduler=name, guidance_scale=1.0)
        hashes[name] = image.sha256
        assert pipe.scheduler is original, name
    assert pipe.config["scheduler"] == original_entry
    # The samplers really differ (Karras and non-Karras variants included).
    assert hashes["Euler"] != hashes["Euler a"] != hashes["DDIM"]
    assert hashes["DPM++ 2M"] != hashes["DPM++ 2M Karras"]


@pytest.mark.parametrize("name", ["Euler", "FlowMatch Euler"])
def test_flux_accepts_flow_match_euler(
    tiny_pipelines: dict[str, Any], tmp_path: Path, name: str
) -> None:
    """Flux runs its flow-matching Euler sampler, also under the plain name "Euler"."""
    pipe = tiny_pipelines["flux"]
    [a] = _gen(pipe, "flux", tmp_path / "a", seed=4, scheduler=name)
    [b] = _gen(pipe, "flux", tmp_path / "b", seed=4)
    assert a.sha256 == b.sha256  # the model's own scheduler is flow-match Euler


def test_flux_rejects_sd_schedulers(tiny_pipelines: dict[str, Any], tmp_path: Path) -> None:
    """SD samplers on Flux fail before generating, naming the valid choices."""
    with pytest.raises(GenerationError, match="valid schedulers for flux"):
        _gen(tiny_pipelines["flux"], "flux", tmp_path, scheduler="DPM++ 2M")
    assert not any(tmp_path.iterdir())
    assert set(scheduler_names("flux")) == {"FlowMatch Euler", "Euler"}
    assert all(name in SCHEDULERS for name in scheduler_names("sd15"))


def test_cancel_after_first_step_stops_and_leaves_no_file(
    tiny_pipelines: dict[str, Any], tmp_path: Path
) -> None:
    """should_cancel turning True after step 1 raises Canceled at once; no file is kept."""
    calls = 0

    def cancel_after_first_step() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 2  # call 1: before the image; call 2: after step 1

    with pytest.raises(Canceled):
        _gen(
            tiny_pipelines["sd15"],
            "sd15",
            tmp_path,
            should_cancel=cancel_after_first_step,
            steps=4,
        )
    assert calls == 2  # no further steps ran
    assert list(tmp_path.iterdir()) == []


def test_cancel_between_images_removes_earlier_images(
    tiny_pipelines: dict[str, Any], tmp_path: Path
) -> None:
    """A cancel before the second image also removes the first one written."""
    calls = 0

    def cancel_before_second_image() -> bool:
        nonlocal calls
        calls += 1
        return calls > 1 + 2  # image 0: check + 2 steps; then cancel

    with pytest.raises(Canceled):
        _gen(
            tiny_pipelines["flux"],
            "flux",
            tmp_path,
            should_cancel=cancel_before_second_image,
            num_images=2,
        )
    assert list(tmp_path.iterdir()) == []


def test_index_offset_continues_numbering(tiny_pipelines: dict[str, Any], tmp_path: Path) -> None:
    """index_offset lets several generate entries of one job share a folder."""
    params = GenerateParams(prompt="x", seed=1, **FAST)
    [image] = generate_images(
        tiny_pipelines["flux"], "flux", params, tmp_path, None, never, index_offset=3
    )
    assert image.index == 3 and image.path.name.startswith("0003_")


# --------------------------------------------------------------------------
# LoRA


@pytest.fixture(scope="module")
def sd15_lora(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random (non-zero) LoRA for the tiny SD 1.x UNet, saved the diffusers way."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd15"], local_files_only=True)
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        # Random B as well as A, so the LoRA visibly changes the output.
        init_lora_weights=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        pipe.unet.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    out = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=config.to_dict(),
        safe_serialization=True,
    )
    return out / "pytorch_lora_weights.safetensors"


def test_lora_changes_output_and_is_removed_afterwards(
    tiny_pipelines: dict[str, Any], tmp_path: Path, sd15_lora: Path
) -> None:
    """A LoRA changes the image, its scale matters, and the pipeline is clean after."""
    pipe = tiny_pipelines["sd15"]
    [base] = _gen(pipe, "sd15", tmp_path / "base", seed=2)
    [full] = _gen(pipe, "sd15", tmp_path / "full", lora=sd15_lora, seed=2)
    [half] = _gen(pipe, "sd15", tmp_path / "half", lora=sd15_lora, seed=2, lora_scale=0.5)
    assert len({base.sha256, full.sha256, half.sha256}) == 3
    assert not getattr(pipe.unet, "peft_config", None)
    [after] = _gen(pipe, "sd15", tmp_path / "after", seed=2)
    assert after.sha256 == base.sha256


def test_missing_lora_is_a_model_error(tiny_pipelines: dict[str, Any], tmp_path: Path) -> None:
    """A LoRA path that does not exist fails clearly and leaves the pipeline usable."""
    with pytest.raises(ModelError, match="does not exist") as info:
        _gen(tiny_pipelines["sd15"], "sd15", tmp_path / "o", lora=tmp_path / "nope.safetensors")
    assert info.value.code == "lora_not_found"
    assert _gen(tiny_pipelines["sd15"], "sd15", tmp_path / "ok", seed=1)
