"""Exports of a fully fine-tuned model: original-layout single file, extracted LoRA.

diffusers reads original (CompVis / AUTOMATIC1111) single-file checkpoints
but cannot write them, so the diffusers → original key mapping is written
here, for Stable Diffusion 1.x (UNet, VAE, CLIP text encoder). It is the
inverse of diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`
and `convert_ldm_clip_checkpoint`: loading the file back with
`StableDiffusionPipeline.from_single_file(path, config=<diffusers folder>)`
gives the same tensors.

`extract_lora` turns the difference between a fine-tuned and a base model
into a LoRA by a truncated SVD per Linear / Conv2d layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

# Parameter names inside a UNet ResBlock: diffusers → original.
_UNET_RESNET_RENAMES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)
# Parameter names inside the VAE's mid-block attention: diffusers → original.
_VAE_ATTENTION_RENAMES = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


class ExportError(ValueError):
    """The model has a layout this exporter does not know how to write."""


def _rename(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _map_by_prefix(
    state: dict[str, torch.Tensor],
    prefixes: list[tuple[str, str, tuple[tuple[str, str], ...]]],
    what: str,
) -> dict[str, torch.Tensor]:
    """Rename every key of `state` by the longest matching module prefix.

    `prefixes` holds (diffusers prefix, original prefix, renames applied to the
    rest of the key). A key that no prefix covers is an error rather than a
    silently dropped weight.
    """
    ordered = sorted(prefixes, key=lambda p: len(p[0]), reverse=True)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for old, new, renames in ordered:
            if key.startswith(old):
                out[new + _rename(key[len(old) :], renames)] = value
                break
        else:
            raise ExportError(f"cannot export {what} weight {key!r} to the original layout")
    return out


def _has_prefix(state: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def unet_to_original(
    state: dict[str, torch.Tensor], layers_per_block: int, num_blocks: int
) -> dict[str, torch.Tensor]:
    """Map a diffusers `UNet2DConditionModel` state dict to LDM `openaimodel` names.

    The original UNet is a flat list of input blocks (block 0 is `conv_in`,
    then per level `layers_per_block` ResBlock [+ attention] pairs and a
    downsampler), a middle block, and output blocks of `layers_per_block + 1`
    entries per level, the last one carrying the upsampler (at index 2 after an
    attention, else 1).
    """
    none: tuple[tuple[str, str], ...] = ()
    res = _UNET_RESNET_RENAMES
    prefixes: list[tuple[str, str, tuple[tuple[str, str], ...]]] = [
        ("time_embedding.linear_1.", "time_embed.0.", none),
        ("time_embedding.linear_2.", "time_embed.2.", none),
        ("add_embedding.linear_1.", "label_emb.0.0.", none),
        ("add_embedding.linear_2.", "label_emb.0.2.", none),
        ("conv_in.", "input_blocks.0.0.", none),
        ("conv_norm_out.", "out.0.", none),
        ("conv_out.", "out.2.", none),
        ("mid_block.resnets.0.", "middle_block.0.", res),
        ("mid_block.attentions.0.", "middle_block.1.", none),
        ("mid_block.resnets.1.", "middle_block.2.", res),
    ]
    per_level = layers_per_block + 1
    for i in range(num_blocks):
        for j in range(layers_per_block):
            index = 1 + i * per_level + j
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0.", res))
            prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{index}.1.", none))
        prefixes.append(
            (
                f"down_blocks.{i}.downsamplers.0.conv.",
                f"input_blocks.{1 + i * per_level + layers_per_block}.0.op.",
                none,
            )
        )
        for j in range(per_level):
            index = i * per_level + j
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{index}.0.", res))
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{index}.1.", none))
        slot = 2 if _has_prefix(state, f"up_blocks.{i}.attentions.") else 1
        prefixes.append(
            (
                f"up_blocks.{i}.upsamplers.0.conv.",
                f"output_blocks.{i * per_level + layers_per_block}.{slot}.conv.",
                none,
            )
        )
    return _map_by_prefix(state, prefixes, "UNet")


def vae_to_original(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """Map a diffusers `AutoencoderKL` state dict to LDM `autoencoder` names.

    The original decoder numbers its up blocks from the lowest resolution
    upwards (the reverse of diffusers), and its mid-block attention uses 1×1
    convolutions where diffusers has Linear layers.
    """
    none: tuple[tuple[str, str], ...] = ()
    attn = _VAE_ATTENTION_RENAMES
    prefixes: list[tuple[str, str, tuple[tuple[str, str], ...]]] = [
        ("quant_conv.", "quant_conv.", none),
        ("post_quant_conv.", "post_quant_conv.", none),
    ]
    for part in ("encoder", "decoder"):
        prefixes += [
            (f"{part}.conv_in.", f"{part}.conv_in.", none),
            (f"{part}.conv_out.", f"{part}.conv_out.", none),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", none),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", none),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", none),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", attn),
        ]
    for i in range(num_blocks):
        prefixes.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", none))
        prefixes.append(
            (
                f"encoder.down_blocks.{i}.downsamplers.0.conv.",
                f"encoder.down.{i}.downsample.conv.",
                none,
            )
        )
        level = num_blocks - 1 - i
        prefixes.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{level}.block.", none))
        prefixes.append(
            (
                f"decoder.up_blocks.{i}.upsamplers.0.conv.",
                f"decoder.up.{level}.upsample.conv.",
                none,
            )
        )
    # A ResBlock's `conv_shortcut` is `nin_shortcut` in every VAE block.
    out = {
        key.replace(".conv_shortcut.", ".nin_shortcut."): value
        for key, value in _map_by_prefix(state, prefixes, "VAE").items()
    }
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def clip_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a transformers `CLIPTextModel` state dict to SD 1.x `cond_stage_model` names.

    The original wraps the Hugging Face model, so the names are the same up
    to the `text_model.` level, which transformers ≥ 5.6 no longer has.
    """
    return {
        (key if key.startswith("text_model.") else f"text_model.{key}"): value
        for key, value in state.items()
    }


def sd_single_file_state(unet: Any, vae: Any, text_encoder: Any) -> dict[str, torch.Tensor]:
    """The original-layout state dict of an SD 1.x pipeline's three models.

    Raises `ExportError` for a UNet or VAE whose layout the mapping does not
    cover (e.g. per-block `layers_per_block` lists).
    """
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise ExportError("single-file export needs one layers_per_block for all UNet blocks")
    out: dict[str, torch.Tensor] = {}
    unet_state = unet_to_original(unet.state_dict(), layers, len(unet.config.block_out_channels))
    vae_state = vae_to_original(vae.state_dict(), len(vae.config.block_out_channels))
    for prefix, state in (
        (UNET_PREFIX, unet_state),
        (VAE_PREFIX, vae_state),
        (TEXT_ENCODER_PREFIX, clip_to_original(text_encoder.state_dict())),
    ):
        for key, value in state.items():
            # A CPU copy per tensor: safetensors refuses tensors that share
            # storage (tied or sliced), and GPU memory is not doubled.
            out[prefix + key] = value.detach().to("cpu", copy=True).contiguous()
    return out


def extract_lora(
    base: dict[str, torch.Tensor], tuned: Any, rank: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """LoRA of rank ≤ `rank` approximating `tuned − base` per Linear / Conv2d layer.

    `base` is the state dict of the model before fine-tuning, `tuned` the
    fine-tuned module. Each weight difference, flattened to (out, in·k·k), is
    factored by SVD; the top `r` singular values are split evenly between the
    PEFT `lora_B` (out, r) and `lora_A` (r, in·k·k) factors. Layers that did not
    change are left out. A layer smaller than `rank` gets its full rank.

    Returns the PEFT-format state dict and the LoRA config (as a dict, for the
    file's metadata) with alpha = r for every layer, so the LoRA applies at
    scale 1; per-layer ranks go into `rank_pattern` / `alpha_pattern`.
    Biases and norm weights a full fine-tune also changed are not captured.
    """
    import torch
    from peft import LoraConfig

    from .checkpoints import peft_config_metadata

    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    with torch.no_grad():
        for name, module in tuned.named_modules():
            is_conv = isinstance(module, torch.nn.Conv2d)
            if not (isinstance(module, torch.nn.Linear) or (is_conv and module.groups == 1)):
                continue
            weight = module.weight
            delta = weight.float() - base[f"{name}.weight"].to(weight.device).float()
            if not torch.any(delta):
                continue
            u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
            r = min(rank, s.numel())
            root = s[:r].sqrt()
            up = u[:, :r] * root
            down = root[:, None] * vh[:r]
            if is_conv:
                down = down.reshape(r, *delta.shape[1:])
                up = up.reshape(delta.shape[0], r, 1, 1)
            state[f"{name}.lora_A.weight"] = down.to(weight.dtype).contiguous().cpu()
            state[f"{name}.lora_B.weight"] = up.to(weight.dtype).contiguous().cpu()
            ranks[name] = r
    smaller = {name: r for name, r in ranks.items() if r != rank}
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(ranks),
        rank_pattern=smaller,
        alpha_pattern=dict(smaller),
    )
    return state, peft_config_metadata(config)
