"""The Stable Diffusion side of training: SD 1.x / 2.x and SDXL UNets.

What differs between model families during training — how images become
latents, how captions become conditioning, and what the denoiser is asked to
predict — lives in one small class per family (this module and
`train_flux.py`); the loop in `training.py` is the same for all of them.

SD models are trained as in diffusers' DreamBooth examples: DDPM noise at a
uniformly drawn timestep, the UNet predicts the noise (or the velocity for
v-prediction models such as SD 2.x 768), optionally weighted by min-SNR-γ.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Attention projections: the usual DreamBooth LoRA targets (diffusers' examples,
# kohya's default "attention only" networks).
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
CLIP_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from `generator`, moved to `device`.

    Drawing on the CPU makes a seed give the same numbers on every device, and
    keeps training RNG apart from whatever else uses torch's global RNG.
    """
    return torch.randn(shape, generator=generator).to(device)


def encode_latent_distribution(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE posterior, in the denoiser's latent scale.

    Returned instead of a sample so that a cached encoding can still be
    sampled afresh at every step (`mean + std * ε`), exactly as encoding the
    image again would be; the VAE's shift (Flux) and scaling factors are folded in.
    """
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((dist.mean - shift) * scale).float(), (dist.std * scale).float()


def noise_like(
    latents: torch.Tensor, generator: torch.Generator, offset_noise: float
) -> torch.Tensor:
    """Training noise for `latents`, with optional offset noise.

    Offset noise adds a per-image, per-channel constant, which lets the model
    learn to change an image's overall brightness (very dark or light images).
    """
    noise = randn(tuple(latents.shape), generator, latents.device)
    if offset_noise:
        b, c = latents.shape[:2]
        noise = noise + offset_noise * randn((b, c, 1, 1), generator, latents.device)
    return noise


class SDFamily:
    """Training hooks for `StableDiffusionPipeline` and `StableDiffusionXLPipeline` models."""

    denoiser_name = "unet"
    denoiser_lora_targets = UNET_LORA_TARGETS
    text_encoder_lora_targets = CLIP_LORA_TARGETS

    def __init__(self, pipe: Any, *, xl: bool) -> None:
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.xl = xl
        self.denoiser: Any = pipe.unet
        self.text_encoders: dict[str, Any] = {"text_encoder": pipe.text_encoder}
        if xl:
            self.text_encoders["text_encoder_2"] = pipe.text_encoder_2
        # A training scheduler of its own: inference changes a scheduler's
        # timesteps, and the pipeline's may not even be a DDPM scheduler.
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type: str = self.noise_scheduler.config.prediction_type
        self.resolution_multiple: int = pipe.vae_scale_factor

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and std of a batch of images in [-1, 1]."""
        return encode_latent_distribution(self.pipe.vae, pixels)

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning tensors for `captions`, as the pipeline computes them at inference."""
        device = self.denoiser.device
        if self.xl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=captions, device=device, do_classifier_free_guidance=False
            )
            return {"encoder_hidden_states": embeds, "text_embeds": pooled}
        embeds, _ = self.pipe.encode_prompt(
            captions, device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds}

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
        """Denoising loss of each sample in the batch, shape (batch,).

        `micro_cond` holds SDXL's size conditioning per sample (original
        height, width, crop top, left, target height, width); SD 1.x ignores it.
        """
        scheduler = self.noise_scheduler
        noise = noise_like(latents, generator, offset_noise)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
        ).to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = cond["encoder_hidden_states"]
        kwargs: dict[str, Any] = {}
        if self.xl:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": cond["text_embeds"],
                "time_ids": micro_cond.to(latents.device, hidden.dtype),
            }
        pred = model(noisy, timesteps, hidden, return_dict=False, **kwargs)[0]

        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if snr_gamma is not None:
            loss = loss * self._min_snr_weights(timesteps, snr_gamma)
        return loss

    def _min_snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-γ loss weights (Hang et al. 2023).

        Timesteps with little noise (high SNR) are easy and dominate the plain
        MSE; capping their weight at γ / SNR speeds up convergence. The weight
        is relative to the target: min(SNR, γ) for x₀, divided by SNR for ε,
        and by SNR + 1 for v.
        """
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.noise_scheduler, timesteps)
        capped = torch.clamp(snr, max=gamma)
        if self.prediction_type == "v_prediction":
            return capped / (snr + 1)
        if self.prediction_type == "epsilon":
            return capped / snr
        return capped
