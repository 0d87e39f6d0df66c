"""Sampling: the denoising loop on tensors, and a `Generator` that turns prompts and seeds into images.

`sample_pixels` is the one loop. The `Sampler` calls it without gradients to make images; reward-tune and
itercomp call it with `grad_steps=K` to back-propagate a reward through the last K denoising steps only
(DRaFT-K style): the earlier steps run under `torch.no_grad`, so memory grows with K, not with the
number of steps, and `checkpoint=True` trades compute for memory within those K steps as well.

Determinism: every item draws its initial noise from its own `torch.Generator` seeded by its seed, prompts
are padded to a fixed length, and the samplers are deterministic (DDIM with eta 0, DPM-Solver++), so an
image depends on (prompt, seed) and the settings, not on the other items of its batch: bitwise at one
batch size. Kernels pick their blocking by batch size, so across batch sizes results differ by float
rounding (about 1e-6 on CPU, 1e-3 on a GPU), which moves a rare pixel by one level of 255.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from pydantic import Field
from torch.utils.checkpoint import checkpoint as checkpointed

from ..config import Config
from ..errors import UserError
from . import flux
from .t2i_model import PromptEmbeds, T2IModel, to_pil

SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
}


class SamplerConfig(Config):
    """How to sample. `guidance` 1.0 or below means no classifier-free guidance (and no unconditional pass), as in
    diffusers' pipelines; for a model that reads its guidance as an input (Flux-dev), the scale it reads, never an
    unconditional pass."""

    scheduler: Literal["ddim", "dpm++"] = "ddim"  # (a flow-matching model, SD3 or Flux, samples with its Euler steps)
    steps: int = Field(20, ge=1, le=10_000)
    guidance: float = Field(1.0, allow_inf_nan=False)
    batch_size: int = Field(64, ge=1)
    resolution: int | None = Field(None, ge=8)  # None: the model's own (the pixel judge reads 8 px and up)


def sampled_with(config: SamplerConfig, flow: bool) -> str:
    """The scheduler a model samples with under `config`, as ids name it: a flow-matching model (SD3, Flux) its Euler
    steps, whatever `config.scheduler` says."""
    return "flow-euler" if flow else config.scheduler


def make_scheduler(model: T2IModel, name: str, steps: int, resolution: int | None = None) -> SchedulerMixin:
    """A fresh sampling scheduler on the model's training noise schedule.

    "trailing" spacing starts at the last training timestep, so few-step sampling begins from pure noise
    (the default "leading" spacing skips the noisiest steps). Fresh per call: multistep schedulers keep
    state between steps. A flow-matching model (SD3, Flux) samples with its Euler scheduler, whatever `name` says;
    Flux with its pipeline's noise levels, shifted for images of side `resolution` (None: the model's own).
    """
    trained = model.scheduler.config.num_train_timesteps
    if steps > trained:
        raise UserError(f"{steps} sampling steps is more than the {trained} timesteps the model was trained with; "
                        f"use at most {trained}")
    if model.is_flow:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config)
        if model.is_flux:
            _, height, width = model.latent_shape(resolution)
            scheduler.set_timesteps(device=model.device,
                                    **flux.sampling_sigmas(steps, scheduler.config, (height // 2) * (width // 2)))
        else:
            scheduler.set_timesteps(steps, device=model.device)
        return scheduler
    cls, extra = SCHEDULERS[name]
    scheduler = cls.from_config(model.scheduler.config, timestep_spacing="trailing", **extra)
    scheduler.set_timesteps(steps, device=model.device)
    return scheduler


def initial_noise(model: T2IModel, seeds: Sequence[int], resolution: int | None = None) -> torch.Tensor:
    """Gaussian latents (B, C, h, w), each drawn on the CPU from its own seed, so the same on any device."""
    shape = model.latent_shape(resolution)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return torch.stack(noise).to(model.device)


def unconditional_pass(model: T2IModel, guidance: float) -> bool:
    """Whether classifier-free guidance runs, as diffusers' pipelines decide it: at a scale above 1, for a model that
    does not read its scale as an input (Flux-dev does); at 1 or below, the conditional prediction alone (schnell's
    usual 0.0 draws the prompt, not the empty one)."""
    return guidance > 1.0 and not model.embeds_guidance


def guidance_tag(guidance: float, embedded: bool) -> str:
    """'-cfg<scale>' for an id where the scale changes the images: any but 1 for a model that reads it (`embedded`),
    above 1 for any other (`unconditional_pass`); '' where it does not."""
    return f"-cfg{guidance:g}" if (guidance != 1.0 if embedded else guidance > 1.0) else ""


def _guided_prediction(
    model: T2IModel, x: torch.Tensor, t: torch.Tensor, text: PromptEmbeds, uncond: PromptEmbeds | None, guidance: float
) -> torch.Tensor:
    """The denoiser's output, pushed away from the unconditional one when guidance is on (or, for a model that reads
    its guidance, at that guidance)."""
    if model.embeds_guidance:
        return model.predict(x, t, text, guidance=guidance).float()
    if uncond is None:
        return model.predict(x, t, text).float()
    both = PromptEmbeds(*(torch.cat(pair) for pair in zip(uncond, text)))
    out_uncond, out_text = model.predict(torch.cat([x, x]), t, both).float().chunk(2)
    return out_uncond + guidance * (out_text - out_uncond)


def denoise(
    model: T2IModel,
    noise: torch.Tensor,
    text: PromptEmbeds,
    scheduler: SchedulerMixin,
    guidance: float = 1.0,
    uncond: PromptEmbeds | None = None,
    grad_steps: int = 0,
    checkpoint: bool = False,
) -> torch.Tensor:
    """Run the scheduler's timesteps from `noise` to clean latents (float32).

    Only the last `grad_steps` steps record gradients; `checkpoint` recomputes their denoiser activations
    during the backward pass instead of storing them.
    """
    timesteps = scheduler.timesteps
    if not 0 <= grad_steps <= len(timesteps):
        raise ValueError(f"grad_steps must be between 0 and the {len(timesteps)} sampling steps, not {grad_steps}")
    unconditional = unconditional_pass(model, guidance)
    if unconditional and uncond is None:
        raise ValueError("classifier-free guidance needs the unconditional embedding (model.encode_empty)")
    uncond = uncond if unconditional else None
    first_grad = len(timesteps) - grad_steps
    latents = noise.float() * getattr(scheduler, "init_noise_sigma", 1.0)  # (flow matching: none, the noise as is)
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(i >= first_grad):
            x = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
            args = (model, x, t, text, uncond, guidance)
            if checkpoint and torch.is_grad_enabled():
                out = checkpointed(_guided_prediction, *args, use_reentrant=False)
            else:
                out = _guided_prediction(*args)
            latents = scheduler.step(out, t, latents).prev_sample
    return latents


def sample_pixels(
    model: T2IModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: SamplerConfig = SamplerConfig(),
    grad_steps: int = 0,
    checkpoint: bool = False,
) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] for prompts and seeds, in one batch (`config.batch_size` is ignored).

    With `grad_steps=0` nothing is recorded and the result does not require grad. With `grad_steps=K`
    the prompts are encoded and the image decoded with gradients, so a loss on the result reaches the
    text encoder and the denoiser through the last K steps only.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    with_grad = grad_steps > 0
    with torch.set_grad_enabled(with_grad):
        text = model.encode_prompts(prompts)
        uncond = model.encode_empty(len(prompts)) if unconditional_pass(model, config.guidance) else None
    scheduler = make_scheduler(model, config.scheduler, config.steps, config.resolution)
    noise = initial_noise(model, seeds, config.resolution)
    latents = denoise(model, noise, text, scheduler, config.guidance, uncond, grad_steps, checkpoint)
    with torch.set_grad_enabled(with_grad):
        return model.decode(latents).float().clamp(-1.0, 1.0)


class Sampler:
    """A `Generator` backed by a `T2IModel`: batched, seeded, deterministic per (prompt, seed).

    `id` names the model and the sampling settings, so cached images of one setting are never served for
    another; pass your own when the model's weights change (a checkpoint name, a training step).
    """

    def __init__(self, model: T2IModel, config: SamplerConfig = SamplerConfig(), id: str | None = None):
        self.model = model
        self.config = config
        guidance = guidance_tag(config.guidance, model.embeds_guidance)
        self.id = id or f"{model.name}:{sampled_with(config, model.is_flow)}-{config.steps}{guidance}"

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        images: list[Image.Image] = []
        size = self.config.batch_size
        for start in range(0, len(prompts), size):
            chunk = slice(start, start + size)
            images += to_pil(sample_pixels(self.model, prompts[chunk], seeds[chunk], self.config))
        return images
