"""Text-to-image models: one adapter over diffusers/transformers parts, a tiny shapes-world model, sampling.

- `T2IModel`: load, encode, predict, decode, save; the only code that knows the architecture (`folders.py`: what
  a model folder is, and the families read: SD 1.x/2.x, SDXL, PixArt-alpha/sigma, SD3).
- `init_tiny_model` / `tiny_model`: a small pixel-space model for the shapes world, trainable on a CPU.
- `Sampler`: a `Generator` (prompts + seeds -> images); `sample_pixels` is the loop behind it, with
  gradients through the last K steps for reward-tune and itercomp.
"""

from diffusers.utils import logging as _diffusers_logging
from transformers.utils import logging as _transformers_logging

from .sampler import Sampler, SamplerConfig, denoise, initial_noise, make_scheduler, sample_pixels
from .t2i_model import PromptEmbeds, T2IModel, resolve_device, to_pil, to_pixels
from .tiny import TinyModelConfig, build_tokenizer, init_tiny_model, longest_prompt_tokens, tiny_model

__all__ = [
    "PromptEmbeds",
    "Sampler",
    "SamplerConfig",
    "T2IModel",
    "TinyModelConfig",
    "build_tokenizer",
    "denoise",
    "init_tiny_model",
    "initial_noise",
    "longest_prompt_tokens",
    "make_scheduler",
    "resolve_device",
    "sample_pixels",
    "tiny_model",
    "to_pil",
    "to_pixels",
]

# Loading a 0.1M-parameter model should not draw two progress bars; our own bars say what runs.
_diffusers_logging.disable_progress_bar()
_transformers_logging.disable_progress_bar()
