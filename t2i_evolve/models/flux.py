"""What is particular to Flux (Black Forest Labs' rectified-flow transformer), kept out of `T2IModel`'s branches.

Flux reads its latents as a sequence: each 2 x 2 patch of the VAE's latents becomes one token of 4 x C channels,
placed by its (row, column) in rotary position ids; its text is T5's states (the sequence it attends to) and CLIP's
pooled vector. Flux-dev was distilled from classifier-free guidance into an input (`guidance_embeds`): the guidance
scale is a number it reads, not a second, unconditional pass; Flux-schnell has none. Its noise levels are flow
matching's, shifted by how many tokens an image has ("dynamic shifting": larger images spend more steps at high noise).
These functions give `T2IModel` and the sampler the same tokens, ids and schedule that diffusers' `FluxPipeline`
uses, so a folder trained here draws the same in that pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError

TRAINING_GUIDANCE = 1.0
"""The guidance a guidance-distilled Flux (dev) reads while it is fine-tuned, as diffusers' Flux training commands pass
it (`--guidance_scale=1`; their script's own default is 3.5, the scale `FluxPipeline` samples at)."""
SAMPLE_SIZE = 128
"""Latent side a Flux folder draws at when its config does not say (`FluxPipeline.default_sample_size`): 1024 px."""
T5_TOKENS = {"dev": 512, "schnell": 256}
"""T5 tokens per prompt, as Black Forest Labs' reference pads them: 512 for dev, 256 for schnell (`FluxPipeline`'s
`max_sequence_length`, 512 unless given)."""


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) tokens, one per 2 x 2 patch, row by row; each token's channels are
    C-major, then the patch's row and column (the layout Flux was trained on)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise UserError(f"Flux draws latents of even sides; {h} x {w} is not (use an image side divisible by "
                        "twice the VAE's scale)")
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`pack` undone: (B, h/2 * w/2, 4C) tokens -> (B, C, h, w) latents of side `height` x `width`."""
    b, _, channels = tokens.shape
    patches = tokens.reshape(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def image_positions(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The rotary position ids of `pack`'s tokens for latents of `height` x `width`: (tokens, 3), each row
    (0, patch row, patch column)."""
    rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, columns], -1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def sampling_sigmas(steps: int, scheduler_config: Any, image_tokens: int) -> dict[str, Any]:
    """`set_timesteps` keywords for `steps` Euler steps as `FluxPipeline` takes them: noise levels evenly spaced from
    1 down to 1/steps, shifted by `mu` (which grows linearly with the image's tokens) where the schedule shifts
    dynamically."""
    keywords: dict[str, Any] = {"sigmas": np.linspace(1.0, 1 / steps, steps)}
    if scheduler_config.get("use_dynamic_shifting"):
        low, high = scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096)
        shift_low, shift_high = scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15)
        keywords["mu"] = shift_low + (image_tokens - low) * (shift_high - shift_low) / (high - low)
    return keywords


def check_conditioning(root: Path, parts: dict[str, Any]) -> None:
    """Flux's transformer reads CLIP's pooled vector (its `pooled_projection_dim`) and T5's states (its
    `joint_attention_dim`): a folder whose encoders give other widths is one line here, not a shape error later."""
    config, clip, t5 = parts["unet"].config, parts["text_encoder"], parts.get("text_encoder_2")
    if parts["vae"] is None:
        raise UserError(f"{root}: Flux draws a VAE's latents, and model_index.json names no vae")
    if t5 is None or not hasattr(t5.config, "d_model"):
        raise UserError(f"{root}: Flux reads T5's states: text_encoder_2 must be a T5 encoder")
    pooled, width = getattr(clip.config, "hidden_size", None), t5.config.d_model
    if pooled != config.pooled_projection_dim or width != config.joint_attention_dim:
        raise UserError(f"{root}: the transformer reads pooled vectors {config.pooled_projection_dim} wide and text "
                        f"{config.joint_attention_dim} wide; its text encoders give {pooled} (CLIP) and {width} (T5)")
    latent = parts["vae"].config.latent_channels
    if latent * 4 != config.in_channels:
        raise UserError(f"{root}: the transformer reads {config.in_channels} channels a token, not four times the "
                        f"VAE's {latent} latent channels (2 x 2 patches)")
