"""LoRA adapters through peft, folding them back into plain weights for saving, and writing them as diffusers'
LoRA file (`export_adapters`)."""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
from pathlib import Path

import diffusers
import torch
from diffusers import ModelMixin
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
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
    alpha: float | None = Field(None, gt=0, description="Scale numerator; defaults to the rank (scale 1).")
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
    config = LoraConfig(r=settings.rank, lora_alpha=settings.rank if settings.alpha is None else settings.alpha,
                        target_modules=targets, init_lora_weights="gaussian")
    # peft's own injection, not the libraries' `add_adapter`: transformers 5's demands a newer peft than
    # the package index has, and this one does the same for any torch module.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{part}".encode()).digest()[:8], "little"))
        try:
            inject_adapter_in_model(config, module)
        except ValueError as e:  # (peft's: no layer of that name, or one of a kind it cannot adapt)
            names = (f"its attention's: {', '.join(DEFAULT_TARGETS['unet'])}" if part == "unet" else
                     f"T5's: {', '.join(T5_TARGETS)}; CLIP's: {', '.join(DEFAULT_TARGETS['text_encoder'])}")
            what = type(module).__name__
            if "not found" not in str(e):  # a LayerNorm, a whole block: say which, and what LoRA adapts
                kind = str(e).split("Target module ", 1)[-1].split("(", 1)[0]
                raise UserError(f"lora targets {targets} name a {kind} in {part} ({what}), which LoRA cannot adapt: "
                                f"name linear or convolution layers ({names})") from None
            raise UserError(f"lora targets {targets} match no layer of {part} ({what}): name its own ({names})") from None
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


ADAPTER_FILE = "pytorch_lora_weights.safetensors"
"""The file name diffusers' `load_lora_weights` looks for in a folder."""


def export_adapters(model: T2IModel, folder: Path) -> str | None:
    """Write `model`'s adapters (relative to the base it was read from) as diffusers' LoRA file in `folder`, which
    `Pipeline.from_pretrained(base).load_lora_weights(folder)` applies: megabytes to share instead of a merged copy of
    the model. None when written, or where there are no adapters or no diffusers pipeline to load them (the tiny
    model); else why not: the model's pipeline class has no LoRA format (PixArt's), or its format has no place for one
    of the adapted parts (Flux's T5, SD3's)."""
    (folder / ADAPTER_FILE).unlink(missing_ok=True)  # (an earlier save's: never left beside a model it did not make)
    adapted = {name: module for name, module in model.trainable_parts().items() if has_lora(module)}
    if not adapted:
        return None
    pipeline = getattr(diffusers, model.pipeline_class, None)
    if not (isinstance(pipeline, type) and issubclass(pipeline, diffusers.DiffusionPipeline)):
        return None
    save = getattr(pipeline, "save_lora_weights", None)
    if save is None:
        return f"{model.pipeline_class} has no LoRA file format"
    accepts = inspect.signature(save).parameters
    keywords: dict = {}
    for name, module in adapted.items():
        part = model.denoiser_folder if name == "unet" else name
        if f"{part}_lora_layers" not in accepts:
            return f"{model.pipeline_class}'s LoRA files hold no adapters for {name} ({type(module).__name__})"
        # transformers 5 flattens CLIPTextModel (no `text_model`); diffusers' files and transformers 4 name its
        # layers under `text_model.` (diffusers strips it where it must, never adds it): written as they expect
        prefix = "text_model." if name != "unet" and "CLIP" in type(module).__name__ and not hasattr(
            module, "text_model") else ""
        layers = {prefix + key: value.detach().cpu() for key, value in get_peft_model_state_dict(module).items()}
        if name != "unet":  # in diffusers' own naming: its loader renames peft's for attention layers alone (and a
            # set of feed-forward ones, `fc1` and `fc2`, with no attention among them would not load at all)
            layers = {key.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."):
                      value for key, value in layers.items()}
        keywords[f"{part}_lora_layers"] = layers
        if f"{part}_lora_adapter_metadata" in accepts:  # (rank and alpha: the scale a loader applies)
            keywords[f"{part}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    folder.mkdir(parents=True, exist_ok=True)
    save(folder, weight_name=f".{ADAPTER_FILE}.partial", safe_serialization=True, **keywords)
    os.replace(folder / f".{ADAPTER_FILE}.partial", folder / ADAPTER_FILE)  # (a disk that fills: no half a file)
    return None
