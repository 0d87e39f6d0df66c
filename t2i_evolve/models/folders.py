"""Reading a diffusers-style model folder: which family it is, each part loaded by the class its model_index.json
names (safetensors only), and the checks that make a folder `T2IModel` would misread a one-line error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import (DDPMScheduler, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, PixArtTransformer2DModel,
                       SD3Transformer2DModel, UNet2DConditionModel)
from safetensors import SafetensorError

from ..errors import UserError
from ..files import read_json
from . import flux

PARTS: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
"""The folder parts this adapter reads (a PixArt folder's denoiser is its "transformer"); other entries of
model_index.json (a safety checker) are ignored."""
OPTIONAL_PARTS: frozenset[str] = frozenset({"vae", "text_encoder_3", "tokenizer_3"})
SDXL_PARTS: tuple[str, ...] = ("text_encoder_2", "tokenizer_2")
"""SDXL's second text encoder (CLIP with a projection: the pooled vector) and its tokenizer; both or neither. Flux's
folders use the same names for its T5 and T5's tokenizer."""
SD3_PARTS: tuple[str, ...] = ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
"""SD3's second CLIP encoder, and its T5 (optional: without it, zeros where its states would be)."""
DENOISER_FOLDERS = {"unet": "unet", "pixart": "transformer", "sd3": "transformer", "flux": "transformer"}
"""Where each family this adapter reads keeps its denoiser."""
FLOW_FAMILIES = frozenset({"sd3", "flux"})
"""The families trained by flow matching (noise and image mixed linearly, the velocity between them predicted)."""


def family_of(denoiser: torch.nn.Module) -> str:
    """The family of a loaded denoiser: "pixart", "sd3", "flux", or "unet" (SD 1.x/2.x, SDXL and the tiny model)."""
    if isinstance(denoiser, PixArtTransformer2DModel):
        return "pixart"
    if isinstance(denoiser, FluxTransformer2DModel):
        return "flux"
    return "sd3" if isinstance(denoiser, SD3Transformer2DModel) else "unet"


def part_names(family: str, sdxl: bool) -> tuple[str, ...]:
    """The parts a folder of this family has, by the names `T2IModel` keeps them under, in the order it saves them."""
    return PARTS + (SD3_PARTS if family == "sd3" else SDXL_PARTS if sdxl or family == "flux" else ())
LIBRARIES = {"diffusers": diffusers, "transformers": transformers}


def read_index(root: Path) -> dict[str, Any]:
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"not a model folder (no model_index.json): {root}")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{index_file}: bad JSON ({e})") from None
    if not isinstance(index, dict):
        raise UserError(f"{index_file}: expected a mapping of parts")
    return index


def load_part(root: Path, name: str, entry: Any, dtype: torch.dtype, flow: bool = False) -> Any:
    """Load one part with the class model_index.json names for it; `None` for an absent optional part. `flow`: the
    scheduler is read as flow matching's (SD3, Flux), not DDPM's."""
    if entry is None or entry == [None, None]:
        if name in OPTIONAL_PARTS:
            return None
        raise UserError(f"{root}: model_index.json has no {name!r}, which every model needs")
    library, class_name = entry if isinstance(entry, list) and len(entry) == 2 else (None, entry)
    cls = getattr(LIBRARIES.get(library), str(class_name), None)
    if not isinstance(cls, type):
        raise UserError(f"{root}: model_index.json names no known class for {name!r}: {entry}")
    folder = root / name
    if not folder.is_dir():
        raise UserError(f"{root}: missing part {name!r} (no {name}/ folder)")
    if name == "scheduler":
        # Training always adds noise the DDPM way (flow matching's for SD3 and Flux); the saved class (PNDM, DDIM, ...)
        # only matters to sampling, and the sampler builds its own scheduler from this config.
        cls = FlowMatchEulerDiscreteScheduler if flow else DDPMScheduler
    kwargs: dict[str, Any] = {"local_files_only": True}
    # What a part must be is decided by its name, not by the class the index names: a factory such as
    # AutoModel is no torch module, and would load a pickled .bin past the check below.
    wanted = cls if name == "scheduler" else (transformers.PreTrainedTokenizerBase if name.startswith("tokenizer")
                                              else torch.nn.Module)
    if not issubclass(cls, wanted):
        raise UserError(f"{root}: model_index.json names {class_name} for {name!r}, which is not a {wanted.__name__} class")
    if issubclass(cls, torch.nn.Module):
        if not any(folder.glob("*.safetensors")):
            # Pickled weights (.bin, .pt) can run code when loaded, so they are never read.
            raise UserError(f"{root}: {name}/ has no .safetensors weights (pickled .bin/.pt files are not loaded)")
        kwargs.update(use_safetensors=True, dtype=dtype)
    try:
        return cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{root}: cannot load {name} ({class_name}): {reason}") from None


def index_entry(part: Any) -> list[str | None]:
    """The [library, class] pair model_index.json records for a part (or [null, null] for none)."""
    if part is None:
        return [None, None]
    if type(part) is transformers.PreTrainedTokenizerFast:
        # transformers 5 calls this class TokenizersBackend; the old name loads in 4.x and 5.x alike.
        return ["transformers", "PreTrainedTokenizerFast"]
    return [type(part).__module__.split(".")[0], type(part).__name__]


def known_family(root: Path) -> str | None:
    """`model_family` of the folder at `root`, or None for a family it would refuse (diffusers' pipeline may draw it).
    A folder that is no model folder at all is its one-line error."""
    index = read_index(root)
    try:
        return model_family(root, index)
    except UserError:
        return None


def model_family(root: Path, index: dict[str, Any]) -> str:
    """Which family this adapter reads a model folder as: "unet" (SD 1.x/2.x, SDXL), "pixart" (alpha, sigma), "sd3" or
    "flux" (dev, schnell), decided from model_index.json and configs alone. A family it would misread is a one-line
    `UserError`: another transformer (DiT, HunyuanDiT), a noise schedule the family does not train with (EDM: Playground
    v2.5; flow matching with dynamic shifting for SD3), a UNet over T5 (DeepFloyd IF) or with other added conditioning
    than SDXL's."""

    def class_name(part: str) -> str:
        entry = index.get(part)
        return str(entry[-1] if isinstance(entry, list) and entry else entry)

    if "unet" in index or "transformer" not in index:
        family, unet = "unet", read_json(root / "unet" / "config.json")
        added = unet.get("addition_embed_type") if isinstance(unet, dict) else None
        if added not in (None, "text_time"):
            raise UserError(f"{root}: a UNet with {added!r} added conditioning (not SDXL's) is not supported yet")
        if "T5" in class_name("text_encoder"):
            raise UserError(f"{root}: a UNet over a {class_name('text_encoder')} (DeepFloyd IF) is not supported yet")
        channels = (unet.get("in_channels"), unet.get("out_channels")) if isinstance(unet, dict) else (None, None)
        if None not in channels and channels[0] != channels[1]:
            raise UserError(f"{root}: a UNet of {channels[0]} input channels for {channels[1]} output ones (inpainting "
                            "or another image-conditioned model) is not supported yet")
    else:
        name, config = class_name("transformer"), read_json(root / "transformer" / "config.json")
        # PixArt's own folders name the class diffusers had then, which it still reads as PixArt's by its norm type.
        published = name == "Transformer2DModel" and isinstance(config, dict) and config.get("norm_type") == "ada_norm_single"
        family = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux",
                  "PixArtTransformer2DModel": "pixart"}.get(name, "pixart" if published else None)
        if family is None:
            raise UserError(f"{root}: a {name} denoiser is not supported yet (UNet models, PixArt, SD3 and Flux are)")
    schedule, flow = class_name("scheduler"), family in FLOW_FAMILIES
    if index.get("scheduler") in (None, [None, None]):  # (loading says none is there)
        return family
    if schedule.startswith("EDM") or schedule.startswith("FlowMatch") != flow:
        raise UserError(f"{root}: a {schedule} noise schedule is not supported yet for this model (" + (
            f"{'SD3' if family == 'sd3' else 'Flux'} trains with flow matching" if flow else
            "DDPM-style ones are: DDPM, DDIM, PNDM, Euler, DPM-Solver") + ")")
    scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
    if family == "sd3" and isinstance(scheduler_config, dict) and scheduler_config.get("use_dynamic_shifting"):
        raise UserError(f"{root}: SD3 with a flow-matching schedule that shifts dynamically (Flux's) is not supported yet")
    return family


def check_conditioning(root: Path, parts: dict[str, Any]) -> None:
    """The denoiser must read what the text encoders give and `predict` passes: for PixArt, T5 states as wide as
    its `caption_channels`; for a UNet, no extra conditioning or SDXL's pooled text and sizes from a second text
    encoder of the width its config expects (one line here, not a shape error at the first step)."""
    family = family_of(parts["unet"])  # (`model_family` let no other transformer through)
    if family == "pixart":
        wanted, encoder = parts["unet"].config.caption_channels, parts["text_encoder"]
        width = getattr(encoder.config, "d_model", None)
        if width != wanted:
            raise UserError(f"{root}: the transformer reads text states {wanted} wide; its text encoder "
                            f"({type(encoder).__name__}) gives {width}")
        return
    if family == "sd3":
        check_sd3_conditioning(root, parts)
        return
    if family == "flux":
        flux.check_conditioning(root, parts)
        return
    if not isinstance(parts["unet"], UNet2DConditionModel):
        raise UserError(f"{root}: its denoiser loads as a {type(parts['unet']).__name__}, not a UNet, nor PixArt's, "
                        "SD3's or Flux's transformer")
    unet, encoder = parts["unet"].config, parts.get("text_encoder_2")
    added = unet.get("addition_embed_type")
    if (added == "text_time") != (encoder is not None):
        has = "no text_encoder_2" if encoder is None else "a text_encoder_2 but no size conditioning in its UNet"
        raise UserError(f"{root}: an SDXL-style model needs both a second text encoder and a UNet with size "
                        f"conditioning (addition_embed_type: text_time); this folder has {has}")
    if encoder is not None:
        if not hasattr(encoder, "text_projection"):
            raise UserError(f"{root}: text_encoder_2 is a {type(encoder).__name__}; SDXL's pooled vector comes from a "
                            "text encoder with a projection (CLIPTextModelWithProjection)")
        pooled = getattr(encoder.config, "projection_dim", None)
        expected = unet.get("projection_class_embeddings_input_dim")
        if pooled is None or expected != pooled + 6 * unet.addition_time_embed_dim:
            raise UserError(f"{root}: the UNet expects {expected} added features, text_encoder_2's pooled vector "
                            f"({pooled}) plus six sizes of {unet.addition_time_embed_dim} make another number")


def check_sd3_conditioning(root: Path, parts: dict[str, Any]) -> None:
    """SD3's transformer reads both CLIP encoders' pooled vectors side by side, and their states (padded) beside T5's,
    as wide as its `joint_attention_dim`."""
    config, clips = parts["unet"].config, (parts["text_encoder"], parts.get("text_encoder_2"))
    if clips[1] is None or not all(hasattr(clip, "text_projection") for clip in clips):
        raise UserError(f"{root}: SD3 reads two CLIP text encoders with projections (text_encoder, text_encoder_2)")
    if (parts.get("text_encoder_3") is None) != (parts.get("tokenizer_3") is None):
        raise UserError(f"{root}: SD3's T5 needs both text_encoder_3 and tokenizer_3, or neither (zeros in its place)")
    pooled = sum(clip.config.projection_dim for clip in clips)
    width = sum(clip.config.hidden_size for clip in clips)
    t5 = parts.get("text_encoder_3")
    if pooled != config.pooled_projection_dim or width > config.joint_attention_dim or (
            t5 is not None and getattr(t5.config, "d_model", None) != config.joint_attention_dim):
        raise UserError(f"{root}: the transformer reads pooled vectors {config.pooled_projection_dim} wide and text "
                        f"{config.joint_attention_dim} wide; its text encoders give {pooled}, and states {width} wide "
                        f"(CLIP) and {getattr(getattr(t5, 'config', None), 'd_model', None)} (T5)")


def latent_scale(vae_config) -> int:
    """Pixels per latent along each side for a VAE config (None: pixel space): each level but the last halves."""
    return 1 if vae_config is None else 2 ** (len(vae_config["block_out_channels"]) - 1)
