"""LoRA adapters through peft, and folding them back into plain weights for saving."""

from __future__ import annotations

import copy
import hashlib

import torch
from diffusers import ModelMixin
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from pydantic import Field

from ..config import Config
from ..errors import UserError
from ..models import T2IModel

DEFAULT_TARGETS = {
    "unet": ["to_q", "to_k", "to_v", "to_out.0"],  # attention projections, as SELMA tunes them
    "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"],
}
T5_TARGETS = ["q", "k", "v", "o"]
"""T5's names for the same projections (PixArt's text encoder): what the text-encoder default means there."""


class LoraSettings(Config):
    rank: int = Field(16, ge=1)
    alpha: float | None = Field(None, description="Scale numerator; defaults to the rank (scale 1).")
    unet_targets: list[str] = DEFAULT_TARGETS["unet"]
    text_encoder_targets: list[str] = DEFAULT_TARGETS["text_encoder"]  # CLIP's names; on T5 (PixArt): T5_TARGETS


def add_lora(module: torch.nn.Module, settings: LoraSettings, part: str, seed: int = 0) -> None:
    """Inject an adapter into `module` (a diffusers UNet or a transformers text encoder); only it trains.
    Its random start is drawn from `seed` (peft draws from torch's global generator, which this leaves as it
    was), so a config starts from the same adapter in any process, and a run restarted before its first
    checkpoint starts from the one it began with."""
    targets = settings.unet_targets if part == "unet" else settings.text_encoder_targets
    if part != "unet" and targets == DEFAULT_TARGETS["text_encoder"] and "T5" in type(module).__name__:
        targets = T5_TARGETS
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank,
                        target_modules=targets, init_lora_weights="gaussian")
    # peft's own injection, not the libraries' `add_adapter`: transformers 5's demands a newer peft than
    # the package index has, and this one does the same for any torch module.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{part}".encode()).digest()[:8], "little"))
        try:
            inject_adapter_in_model(config, module)
        except ValueError:  # (peft's: no layer of that name)
            raise UserError(f"lora targets {targets} match no layer of {part} ({type(module).__name__}): name its own "
                            f"(T5's: {', '.join(T5_TARGETS)}; CLIP's: {', '.join(DEFAULT_TARGETS['text_encoder'])})") from None
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)


def merged_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights with its LoRA deltas added in, under the names of the plain module.

    Computed beside the live weights (merge-then-unmerge in place would leave rounding in them), on the CPU:
    a copy of an SDXL UNet is 10 GB that a GPU in the middle of training has no room for.
    """
    state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items() if "lora_" not in k}
    for name, layer in module.named_modules():
        if isinstance(layer, BaseTunerLayer):
            for adapter in layer.active_adapters:
                state[f"{name}.base_layer.weight"] += layer.get_delta_weight(adapter).to(state[f"{name}.base_layer.weight"])
    return {k.replace(".base_layer.", "."): v for k, v in state.items()}


def has_lora(module: torch.nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def merged_copy(model: T2IModel) -> T2IModel:
    """`model` itself when it has no adapters; otherwise a copy with plain modules and merged weights (those on
    the CPU: a copy to save)."""
    adapted = {name: module for name, module in model.trainable_parts().items() if has_lora(module)}
    if not adapted:
        return model
    merged = copy.copy(model)  # the same frozen parts (VAE, tokenizers, schedule); new modules where adapted
    for name, module in adapted.items():
        plain = type(module).from_config(module.config) if isinstance(module, ModelMixin) else type(module)(module.config)
        plain.load_state_dict(merged_state_dict(module))
        setattr(merged, name, plain)
    return merged
