"""The Flux side of training: rectified-flow matching on a `FluxTransformer2DModel`.

As in diffusers' `train_dreambooth_lora_flux.py`: an image latent x₀ and noise
ε are mixed as x_σ = (1 − σ)·x₀ + σ·ε at a σ drawn uniformly from the training
scheduler's sigmas, and the transformer predicts the velocity ε − x₀. Latents
are packed into 2×2 patches the way `FluxPipeline` does at inference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .train_sd import CLIP_LORA_TARGETS, encode_latent_distribution, noise_like

# Attention projections of both the image and the text stream of the joint
# blocks (the single blocks share to_q/k/v with the image stream).
TRANSFORMER_LORA_TARGETS = [
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
    "add_k_proj",
    "add_q_proj",
    "add_v_proj",
    "to_add_out",
]
# The distilled guidance value FLUX.1-dev LoRAs are usually trained at
# (diffusers' and kohya's default); only used by guidance-embedding models.
TRAIN_GUIDANCE = 3.5
# T5 prompt length in tokens: FLUX.1-dev's 512, or less for a tokenizer
# that cannot take that many.
MAX_SEQUENCE_LENGTH = 512


class FluxFamily:
    """Training hooks for `FluxPipeline` models (LoRA only)."""

    denoiser_name = "transformer"
    denoiser_lora_targets = TRANSFORMER_LORA_TARGETS
    text_encoder_lora_targets = CLIP_LORA_TARGETS

    def __init__(self, pipe: Any) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.pipe = pipe
        self.denoiser: Any = pipe.transformer
        # Only the CLIP encoder (pooled prompt) is trained; T5 stays frozen, as
        # in diffusers' Flux DreamBooth script.
        self.text_encoders: dict[str, Any] = {"text_encoder": pipe.text_encoder}
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        # The VAE downsamples by vae_scale_factor and packing halves again.
        self.resolution_multiple: int = pipe.vae_scale_factor * 2
        self.max_sequence_length = min(MAX_SEQUENCE_LENGTH, pipe.tokenizer_2.model_max_length)

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and std (shifted and scaled) of a batch of images in [-1, 1]."""
        return encode_latent_distribution(self.pipe.vae, pixels)

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """T5 sequence and CLIP pooled embeddings of `captions`, as at inference."""
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=captions,
            prompt_2=None,
            device=self.denoiser.device,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

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
    ) -> torch.Tensor:
        """Flow-matching loss of each sample in the batch, shape (batch,).

        `micro_cond` and `snr_gamma` are SD-only and ignored (the config
        validation rejects `snr_gamma` for Flux).
        """
        pipe = self.pipe
        scheduler = self.noise_scheduler
        b, c, h, w = latents.shape
        device = latents.device
        noise = noise_like(latents, generator, offset_noise)

        n = len(scheduler.sigmas)
        index = (torch.rand((b,), generator=generator) * n).long().clamp(max=n - 1)
        sigmas = scheduler.sigmas[index].to(device)[:, None, None, None]
        timesteps = scheduler.timesteps[index].to(device)
        noisy = (1.0 - sigmas) * latents + sigmas * noise

        hidden = cond["encoder_hidden_states"]
        dtype = hidden.dtype
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full((b,), TRAIN_GUIDANCE, device=device, dtype=torch.float32)
        pred = model(
            hidden_states=pipe._pack_latents(noisy.to(dtype), b, c, h, w),
            # The transformer scales timesteps by 1000 itself, as the pipeline expects.
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=device, dtype=dtype),
            img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype),
            return_dict=False,
        )[0]
        # Packing only permutes elements, so the loss can be taken on packed tensors.
        target = pipe._pack_latents(noise - latents, b, c, h, w)
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2))
