"""Model registry: family detection, name resolution, loading errors, pipeline cache."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from events.settings import ModelSettings, Settings
from gpu_runner.errors import ModelError, RunnerError
from gpu_runner.models import (
    ModelRef,
    PipelineCache,
    detect_family,
    estimate_pipeline_bytes,
    load_pipeline,
    ref_from_path,
    resolve_model,
)


def _settings(models: dict[str, dict[str, Any]] | None = None, downloads: bool = False) -> Settings:
    return Settings.model_validate(
        {"models": models or {}, "network": {"allow_model_downloads": downloads}}
    )


def _single_file(path: Path, keys: list[str]) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({key: torch.zeros(1) for key in keys}, str(path))
    return path


# --------------------------------------------------------------------------
# detection


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_detect_family_of_each_tiny_folder(tiny_models: dict[str, Path], family: str) -> None:
    """A diffusers folder's family comes from model_index.json's _class_name."""
    assert detect_family(tiny_models[family]) == family


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (
            ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x"],
            "sd15",
        ),
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.ln"], "sd2"),
        (["model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.0.x"], "sdxl"),
        (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "flux"),
        (["model.diffusion_model.double_blocks.0.img_mod.lin.weight"], "flux"),
        (["single_transformer_blocks.0.attn.to_q.weight"], "flux"),
    ],
)
def test_detect_family_of_single_files_from_key_names(
    tmp_path: Path, keys: list[str], family: str
) -> None:
    """A single .safetensors file's family is read from its tensor names (header only)."""
    assert detect_family(_single_file(tmp_path / "m.safetensors", keys)) == family


def test_unrecognised_or_corrupt_single_files_are_model_errors(tmp_path: Path) -> None:
    """Files that are not checkpoints of a known family fail with a ModelError."""
    unknown = _single_file(tmp_path / "u.safetensors", ["some.other.weight"])
    with pytest.raises(ModelError, match="match no supported family"):
        detect_family(unknown, "odd")
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelError, match="not valid JSON") as info:
        detect_family(garbage, "junk")
    assert info.value.code == "model_corrupt" and "'junk'" in str(info.value)
    assert isinstance(info.value, RunnerError)


# --------------------------------------------------------------------------
# resolution


def test_default_model_is_created_on_first_use(tmp_path: Path) -> None:
    """The default base model name resolves to a tiny sd15 built once in DATA/models."""
    settings = _settings()
    ref = resolve_model(None, settings, tmp_path)
    assert ref == ModelRef(
        name="tiny-sd15", family="sd15", path=tmp_path / "models" / "tiny-sd15", single_file=False
    )
    stamp = (ref.path / "model_index.json").stat().st_mtime_ns
    assert resolve_model("tiny-sd15", settings, tmp_path) == ref
    assert (ref.path / "model_index.json").stat().st_mtime_ns == stamp  # not rebuilt


def test_configured_folder_and_data_dir_models_resolve(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """[models.NAME] paths (absolute, or relative to the data dir) and DATA/models/NAME resolve."""
    shutil.copytree(tiny_models["flux"], tmp_path / "models" / "f")
    shutil.copytree(tiny_models["sdxl"], tmp_path / "elsewhere")
    settings = _settings(
        {
            "abs": {"path": str(tiny_models["sd15"]), "family": "sd15"},
            "rel": {"path": "elsewhere"},
        }
    )
    assert resolve_model("abs", settings, tmp_path).family == "sd15"
    assert resolve_model("rel", settings, tmp_path).path == tmp_path / "elsewhere"
    assert resolve_model("f", settings, tmp_path).family == "flux"


def test_missing_model_names_the_model(tmp_path: Path) -> None:
    """An unknown name or a configured path that does not exist is model_not_found."""
    with pytest.raises(ModelError) as info:
        resolve_model("ghost", _settings(), tmp_path)
    assert info.value.code == "model_not_found"
    assert "'ghost'" in str(info.value) and "tiny-sd15" in str(info.value)
    settings = _settings({"gone": {"path": str(tmp_path / "nowhere")}})
    with pytest.raises(ModelError, match=r"'gone'.*does not exist") as info:
        resolve_model("gone", settings, tmp_path)
    assert info.value.code == "model_not_found"


def test_corrupt_folders_name_the_model_and_the_problem(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """Folders without a readable model_index.json or with a missing component are corrupt."""
    empty = tmp_path / "models" / "empty"
    empty.mkdir(parents=True)
    with pytest.raises(ModelError, match=r"'empty'.*no model_index.json") as info:
        resolve_model("empty", _settings(), tmp_path)
    assert info.value.code == "model_corrupt"

    broken = tmp_path / "models" / "broken"
    shutil.copytree(tiny_models["sd15"], broken)
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"'broken'.*unreadable"):
        resolve_model("broken", _settings(), tmp_path)

    partial = tmp_path / "models" / "partial"
    shutil.copytree(tiny_models["sd15"], partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(ModelError, match=r"'partial'.*'vae' is missing"):
        resolve_model("partial", _settings(), tmp_path)


def test_configured_family_must_match_the_files(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """A [models] family that contradicts the files is model_family_mismatch."""
    settings = _settings({"liar": {"path": str(tiny_models["sd15"]), "family": "sdxl"}})
    with pytest.raises(ModelError) as info:
        resolve_model("liar", settings, tmp_path)
    assert info.value.code == "model_family_mismatch"
    assert "'liar'" in str(info.value) and "'sdxl'" in str(info.value)


def test_hub_ids_need_permission_to_download(tmp_path: Path) -> None:
    """Hub repository ids are refused unless network.allow_model_downloads is true."""
    with pytest.raises(ModelError) as info:
        resolve_model("stabilityai/sdxl-turbo", _settings(), tmp_path)
    assert info.value.code == "model_download_not_allowed"
    assert "stabilityai/sdxl-turbo" in str(info.value)
    assert "allow_model_downloads" in str(info.value)
    settings = _settings({"hubby": {"path": "runwayml/stable-diffusion-v1-5"}})
    with pytest.raises(ModelError, match=r"'hubby'.*runwayml/stable-diffusion-v1-5"):
        resolve_model("hubby", settings, tmp_path)
    # With permission and a known family nothing is fetched until loading.
    allowed = _settings(
        {"hubby": {"path": "runwayml/stable-diffusion-v1-5", "family": "sd15"}}, downloads=True
    )
    ref = resolve_model("hubby", allowed, tmp_path)
    assert ref.hub and ref.family == "sd15"
    with pytest.raises(ModelError, match="downloads"):
        load_pipeline(ref, "cpu", _float32())


def test_single_file_needs_a_matching_local_config(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """A single-file model needs a `config` folder of the same family to load offline."""
    ckpt = _single_file(tmp_path / "x.safetensors", ["conditioner.embedders.0.x"])
    with pytest.raises(ModelError) as info:
        resolve_model("solo", _settings({"solo": {"path": str(ckpt)}}), tmp_path)
    assert info.value.code == "model_config_missing" and "'solo'" in str(info.value)

    wrong = _settings({"solo": {"path": str(ckpt), "config": str(tiny_models["sd15"])}})
    with pytest.raises(ModelError, match=r"'solo'.*'sdxl' checkpoint.*'sd15' model"):
        resolve_model("solo", wrong, tmp_path)

    right = _settings({"solo": {"path": str(ckpt), "config": str(tiny_models["sdxl"])}})
    ref = resolve_model("solo", right, tmp_path)
    assert (ref.single_file, ref.family, ref.config) == (True, "sdxl", tiny_models["sdxl"])


def test_invalid_names_are_refused(tmp_path: Path) -> None:
    """Names that could escape the models folder are rejected."""
    for name in ("..", ".hidden", "a\\b", "c:d"):
        with pytest.raises(ModelError) as info:
            resolve_model(name, _settings(), tmp_path)
        assert info.value.code == "invalid_model_name"
    assert ModelSettings(path="x").family is None


# --------------------------------------------------------------------------
# loading and caching


def _float32() -> Any:
    import torch

    return torch.float32


def test_truncated_weights_fail_to_load_naming_the_model(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """A model whose weights file is damaged fails with model_load_failed, naming it."""
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_models["flux"], folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    ref = ref_from_path("damaged", folder)
    with pytest.raises(ModelError) as info:
        load_pipeline(ref, "cpu", _float32())
    assert info.value.code == "model_load_failed" and "'damaged'" in str(info.value)


def test_single_file_loads_offline_with_its_config(
    tmp_path: Path, tiny_models: dict[str, Path], tiny_pipelines: dict[str, Any]
) -> None:
    """A single original-layout file plus a local config folder loads offline, same weights."""
    from safetensors.torch import save_file

    from gpu_runner.export import sd_single_file_state
    from gpu_runner.generate import GenerateParams, generate_images

    base = tiny_pipelines["sd15"]
    state = sd_single_file_state(base.unet, base.vae, base.text_encoder)
    file = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    settings = _settings({"solo": {"path": str(file), "config": str(tiny_models["sd15"])}})
    ref = resolve_model("solo", settings, tmp_path)
    assert (ref.single_file, ref.family) == (True, "sd15")
    pipe = load_pipeline(ref, "cpu", _float32())
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    params = GenerateParams(prompt="photo of sks dog", seed=1, steps=2, width=64, height=64)
    [a] = generate_images(pipe, "sd15", params, tmp_path / "a", None, lambda: False)
    [b] = generate_images(base, "sd15", params, tmp_path / "b", None, lambda: False)
    assert a.sha256 == b.sha256


def test_estimate_counts_parameter_bytes(tiny_pipelines: dict[str, Any]) -> None:
    """A pipeline's size estimate is the bytes of its weights (fp32: 4 per parameter)."""
    pipe = tiny_pipelines["sd15"]
    params = sum(p.numel() for p in pipe.unet.parameters())
    size = estimate_pipeline_bytes(pipe)
    assert size >= 4 * params
    assert 1_000_000 < size < 20_000_000


def _fake_pipeline(mebibytes: int) -> Any:
    import torch

    # A Linear without bias holding exactly `mebibytes` MiB of fp32 weights.
    return SimpleNamespace(
        components={"unet": torch.nn.Linear(256 * mebibytes, 1024, bias=False), "tok": None}
    )


def test_pipeline_cache_evicts_least_recently_used_beyond_budget() -> None:
    """The cache keeps pipelines within its MB budget, evicting least recently used first."""
    sizes = {"a": 2, "b": 2, "c": 2, "huge": 9}
    loads: list[str] = []

    def loader(ref: ModelRef, device: str, dtype: Any) -> Any:
        loads.append(ref.name)
        return _fake_pipeline(sizes[ref.name])

    def ref(name: str) -> ModelRef:
        return ModelRef(name=name, family="sd15", path=Path(name), single_file=False)

    cache = PipelineCache(budget_mb=5, loader=loader)
    dtype = _float32()
    a = cache.get(ref("a"), "cpu", dtype)
    cache.get(ref("b"), "cpu", dtype)
    assert cache.get(ref("a"), "cpu", dtype) is a  # hit, and now most recent
    cache.get(ref("c"), "cpu", dtype)  # 6 MiB > 5: "b" is the least recent
    assert [r.name for r in cache.cached()] == ["a", "c"]
    assert cache.total_bytes == 4 * 1024 * 1024
    assert loads == ["a", "b", "c"]
    cache.get(ref("b"), "cpu", dtype)  # reloaded, evicting "a"
    assert [r.name for r in cache.cached()] == ["c", "b"]
    # Larger than the whole budget: returned but not kept, nothing evicted.
    assert cache.get(ref("huge"), "cpu", dtype) is not None
    assert [r.name for r in cache.cached()] == ["c", "b"]
    cache.clear()
    assert len(cache) == 0 and cache.total_bytes == 0


def test_pipeline_cache_with_real_pipelines(tiny_models: dict[str, Path]) -> None:
    """Real tiny pipelines are cached per model and evicted when the budget is exceeded."""
    sd15 = ref_from_path("tiny-sd15", tiny_models["sd15"])
    flux = ref_from_path("tiny-flux", tiny_models["flux"])
    dtype = _float32()
    cache = PipelineCache(budget_mb=8)  # holds either model, not both
    first = cache.get(sd15, "cpu", dtype)
    assert cache.get(sd15, "cpu", dtype) is first
    cache.get(flux, "cpu", dtype)
    assert cache.cached() == [flux]
    assert cache.get(sd15, "cpu", dtype) is not first  # loaded afresh
