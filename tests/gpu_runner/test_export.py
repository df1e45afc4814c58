"""Checkpoint publication and the original-layout exporter, without training."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from gpu_runner.checkpoints import (
    canonicalize_safetensors_header,
    describe,
    folder_digest,
    kohya_state_dict,
    staged_folder,
)
from gpu_runner.export import ExportError, extract_lora, unet_to_original, vae_to_original


def test_staged_folder_publishes_complete_folders_only(tmp_path: Path) -> None:
    """A staged checkpoint appears under its final name only when the block
    succeeds, with files 0644 and folders 0755; a failing block leaves
    neither the final folder nor a staging folder."""
    final = tmp_path / "checkpoint-1"
    with pytest.raises(RuntimeError), staged_folder(final) as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []

    with staged_folder(final) as staging:
        (staging / "a.bin").write_bytes(b"a")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.bin").write_bytes(b"b")
        (staging / "a.bin").chmod(0o600)  # what safetensors does
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert stat.S_IMODE((final / "a.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((final / "sub").stat().st_mode) == 0o755

    # A retried job replaces an earlier folder of the same name.
    with staged_folder(final) as staging:
        (staging / "c.bin").write_bytes(b"c")
    assert [p.name for p in final.iterdir()] == ["c.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_canonical_header_makes_equal_content_byte_identical(tmp_path: Path) -> None:
    """Files with the same tensors and metadata have the same bytes once their
    headers are canonical (safetensors writes metadata in hash-map order),
    and still load."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = {"b": torch.ones(2), "a": torch.zeros(3, dtype=torch.float16)}
    metadata = {f"key{i}": str(i) for i in range(8)}
    paths = []
    for i, items in enumerate((metadata.items(), reversed(metadata.items()))):
        path = tmp_path / f"{i}.safetensors"
        save_file(tensors, str(path), metadata=dict(items))
        canonicalize_safetensors_header(path)
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert torch.equal(load_file(paths[0])["b"], tensors["b"])
    with safe_open(paths[0], "pt") as f:
        assert f.metadata() == metadata


def test_folder_digest_depends_on_names_and_bytes(tmp_path: Path) -> None:
    """A diffusers folder's digest changes with any file name or content, and
    `describe` reports it with the total size."""
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"12345")
    (tmp_path / "model_index.json").write_bytes(b"{}")
    size, digest = folder_digest(tmp_path)
    assert size == 7
    record = describe(tmp_path, kind="full", step=3, variant="diffusers", final=True)
    assert (record.size_bytes, record.sha256, record.format) == (7, digest, "diffusers")
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"12346")
    assert folder_digest(tmp_path)[1] != digest
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"12345")
    assert folder_digest(tmp_path)[1] == digest
    (tmp_path / "unet" / "w.safetensors").rename(tmp_path / "unet" / "x.safetensors")
    assert folder_digest(tmp_path)[1] != digest


def test_unknown_weights_are_an_export_error() -> None:
    """A weight the original layout has no place for fails the export instead
    of being dropped from the file."""
    with pytest.raises(ExportError, match="controlnet_cond_embedding"):
        unet_to_original({"controlnet_cond_embedding.conv_in.weight": torch.zeros(1)}, 2, 2)
    with pytest.raises(ExportError):
        vae_to_original({"encoder.extra.weight": torch.zeros(1)}, 2)


def test_unet_mapping_places_blocks_like_the_original() -> None:
    """Down levels take layers_per_block + 1 input blocks, the upsampler sits
    at index 2 after an attention and at 1 without, and ResBlock parameter
    names follow openaimodel."""
    state = {
        "down_blocks.0.resnets.1.conv1.weight": torch.zeros(1),
        "down_blocks.0.downsamplers.0.conv.weight": torch.zeros(1),
        "down_blocks.1.attentions.0.proj_in.weight": torch.zeros(1),
        "up_blocks.0.resnets.2.conv_shortcut.weight": torch.zeros(1),
        "up_blocks.0.upsamplers.0.conv.weight": torch.zeros(1),
        "up_blocks.1.attentions.2.proj_out.weight": torch.zeros(1),
        "up_blocks.1.upsamplers.0.conv.weight": torch.zeros(1),
        "mid_block.resnets.1.time_emb_proj.bias": torch.zeros(1),
    }
    assert set(unet_to_original(state, layers_per_block=2, num_blocks=3)) == {
        "input_blocks.2.0.in_layers.2.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.1.proj_in.weight",
        "output_blocks.2.0.skip_connection.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.1.proj_out.weight",
        "output_blocks.5.2.conv.weight",
        "middle_block.2.emb_layers.1.bias",
    }


def test_extract_lora_is_exact_at_full_rank_and_skips_unchanged_layers() -> None:
    """At rank ≥ a layer's rank, lora_B @ lora_A equals the weight difference
    (Linear and Conv2d); unchanged layers are left out; small layers get their
    own rank and alpha in the patterns, so every layer applies at scale 1."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Conv2d(5, 3, 3), torch.nn.Linear(3, 3)
    )
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight += 0.01 * torch.randn_like(model[0].weight)
        model[1].weight += 0.01 * torch.randn_like(model[1].weight)
    state, config = extract_lora(base, model, rank=8)
    assert sorted(config["target_modules"]) == ["0", "1"]
    assert config["rank_pattern"] == {"0": 5, "1": 3} == config["alpha_pattern"]
    linear = state["0.lora_B.weight"] @ state["0.lora_A.weight"]
    torch.testing.assert_close(linear, model[0].weight - base["0.weight"], atol=1e-6, rtol=0)
    conv = state["1.lora_B.weight"].flatten(1) @ state["1.lora_A.weight"].flatten(1)
    delta = (model[1].weight - base["1.weight"]).flatten(1)
    torch.testing.assert_close(conv, delta, atol=1e-6, rtol=0)
    assert state["1.lora_A.weight"].shape == (3, 5, 3, 3)


def test_kohya_conversion_restores_text_model_prefix_and_alpha() -> None:
    """PEFT keys of a flattened CLIPTextModel get webui's `text_model` level
    back, and every module's alpha is the trained one."""
    layers = {
        "unet": {
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(
                2, 4
            ),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(
                4, 2
            ),
        },
        "text_encoder": {
            "encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 4),
            "encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(4, 2),
        },
    }
    state = kohya_state_dict(layers, alpha=1.5)
    assert set(state) == {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha",
    }
    assert all(float(v) == 1.5 for k, v in state.items() if k.endswith(".alpha"))
