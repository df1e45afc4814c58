"""Tiny offline models: they build, load with stock diffusers, and are deterministic."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from gpu_runner import tiny_models
from gpu_runner.errors import ModelError
from gpu_runner.tiny_models import create_tiny_model, init_model_main


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


@pytest.mark.parametrize(
    ("family", "class_name"),
    [
        ("sd15", "StableDiffusionPipeline"),
        ("sdxl", "StableDiffusionXLPipeline"),
        ("flux", "FluxPipeline"),
    ],
)
def test_each_family_loads_with_its_stock_pipeline_class(
    tiny_models: dict[str, Path], family: str, class_name: str
) -> None:
    """A tiny model folder loads offline with the family's normal diffusers class."""
    import diffusers

    folder = tiny_models[family]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == class_name
    pipe = getattr(diffusers, class_name).from_pretrained(folder, local_files_only=True)
    assert type(pipe).__name__ == class_name
    # Small enough to build and load in well under a second.
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 20 * 1024 * 1024


def test_same_seed_gives_identical_files_and_other_seed_other_weights(tmp_path: Path) -> None:
    """Building is deterministic per seed; a different seed changes the weights only."""
    a = _hashes(create_tiny_model("sd15", tmp_path / "a", seed=3))
    b = _hashes(create_tiny_model("sd15", tmp_path / "b", seed=3))
    c = _hashes(create_tiny_model("sd15", tmp_path / "c", seed=4))
    assert a == b
    changed = {name for name in a if a[name] != c[name]}
    assert changed and all(name.endswith(".safetensors") for name in changed)


def test_existing_destination_is_refused_and_nothing_is_left_behind(tmp_path: Path) -> None:
    """create_tiny_model never overwrites a folder and leaves no temporary folders."""
    dest = tmp_path / "m"
    dest.mkdir()
    with pytest.raises(FileExistsError):
        create_tiny_model("flux", dest)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_failed_build_leaves_no_partial_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build that fails midway removes its temporary folder and creates no dest."""

    def broken(seed: int) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setitem(tiny_models._BUILDERS, "sd15", broken)
    with pytest.raises(RuntimeError, match="boom"):
        create_tiny_model("sd15", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_files_are_world_readable(tiny_models: dict[str, Path]) -> None:
    """Model files get 0644 even though safetensors writes 0600 and mkdtemp 0700."""
    folder = tiny_models["sd15"]
    assert folder.stat().st_mode & 0o777 == 0o755
    for f in folder.rglob("*"):
        if f.is_file():
            assert f.stat().st_mode & 0o777 == 0o644, f


def test_clip_tokenizer_keeps_prompt_words_whole(tiny_pipelines: dict[str, Any]) -> None:
    """The generated BPE merges make common prompt words single tokens."""
    pipe = tiny_pipelines["sd15"]
    tokens = pipe.tokenizer.tokenize("a photo of sks dog")
    assert tokens == ["a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>"]
    ids = pipe.tokenizer("photo of sks dog").input_ids
    # The text encoder must agree with the tokenizer on bos/eos: CLIP pools
    # the hidden state at the first eos.
    config = pipe.text_encoder.config
    assert ids[0] == config.bos_token_id == pipe.tokenizer.bos_token_id
    assert ids[-1] == config.eos_token_id == pipe.tokenizer.eos_token_id
    assert config.eos_token_id != 2


def test_t5_tokenizer_is_unigram_with_eos(tiny_pipelines: dict[str, Any]) -> None:
    """Flux's T5 tokenizer splits on words, knows prompt words and appends </s>."""
    tokenizer = tiny_pipelines["flux"].tokenizer_2
    assert tokenizer.tokenize("photo of sks dog") == ["▁photo", "▁of", "▁sks", "▁dog"]
    ids = tokenizer("photo of sks dog").input_ids
    assert ids[-1] == tokenizer.eos_token_id == 1
    assert tokenizer.pad_token_id == 0


def test_sdxl_text_encoders_have_different_widths(tiny_pipelines: dict[str, Any]) -> None:
    """SDXL's two encoders differ in hidden size, and the UNet is sized for both."""
    pipe = tiny_pipelines["sdxl"]
    h1 = pipe.text_encoder.config.hidden_size
    h2 = pipe.text_encoder_2.config.hidden_size
    assert h1 != h2
    assert pipe.unet.config.cross_attention_dim == h1 + h2
    projection = pipe.text_encoder_2.config.projection_dim
    time_dim = pipe.unet.config.addition_time_embed_dim
    assert pipe.unet.config.projection_class_embeddings_input_dim == 6 * time_dim + projection


def test_flux_rope_axes_match_head_dim(tiny_pipelines: dict[str, Any]) -> None:
    """Flux's rope axes add up to the attention head dimension."""
    config = tiny_pipelines["flux"].transformer.config
    assert sum(config.axes_dims_rope) == config.attention_head_dim


def test_init_model_main_writes_under_data_dir_and_refuses_overwrite(tmp_path: Path) -> None:
    """`boothd init-model` writes DATA/models/NAME once; a second run is an error."""
    path = init_model_main("flux", "mine", tmp_path)
    assert path == tmp_path / "models" / "mine"
    assert (path / "model_index.json").is_file()
    with pytest.raises(ModelError) as info:
        init_model_main("flux", "mine", tmp_path)
    assert info.value.code == "model_exists"
    assert "'mine'" in str(info.value)


@pytest.mark.parametrize(
    ("family", "name", "code"),
    [("sd3", "x", "unknown_family"), ("sd15", "../x", "invalid_model_name")],
)
def test_init_model_main_rejects_bad_input(
    tmp_path: Path, family: str, name: str, code: str
) -> None:
    """Unknown families and path-like names are refused before anything is written."""
    with pytest.raises(ModelError) as info:
        init_model_main(family, name, tmp_path)
    assert info.value.code == code
    assert not (tmp_path / "models").exists()
