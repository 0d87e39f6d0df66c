"""`T2IModel`: the one adapter between the recipes and a diffusers-style text-to-image folder.

Recipes never touch a UNet, a VAE or a tokenizer directly; they call `encode_prompts`, `encode_images`,
`predict`, `decode` and `denoising_loss`. This class is therefore the only place that knows the
architecture, so the tiny pixel-space model and Stable Diffusion 1.x/2.x and SDXL folders share every code
path. SDXL is a branch here (two text encoders, and size and crop conditioning), and so are PixArt-alpha/sigma
(EvolveDirector's own base: a transformer denoiser over T5 states with their attention mask), SD3 (flow matching,
two CLIP encoders and T5) and Flux (flow matching over 2 x 2 latent patches, T5 and CLIP's pooled vector, guidance as
an input: `flux.py`); another family later means another branch here, not changes in the recipes.

Conventions: images are float tensors (B, 3, H, W) in [-1, 1]; "latents" are what the denoiser works
on (the pixels themselves for a pixel-space model). Weights are read and written as safetensors only (reading a
folder's parts, and refusing what it would misread: `folders.py`).
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from ..errors import UserError
from ..files import read_json, write_atomically
from . import flux
from .folders import (DENOISER_FOLDERS, FLOW_FAMILIES, SDXL_PARTS, check_conditioning, family_of, index_entry,
                      latent_scale, load_part, known_family, model_family, part_names, read_index)


class PromptEmbeds(NamedTuple):
    """A batch of encoded prompts: per-token states for cross-attention and one pooled vector each."""

    hidden: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor  # (B, D), the state at the EOS token (CLIP's); (B, 0) for PixArt, which has none
    mask: torch.Tensor  # (B, L), 1 where the denoiser attends: every token for CLIP (its pipelines attend to the
    #                     padding too), T5's words and EOS for PixArt


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device from a name; "auto" is the first CUDA device when there is one, else the CPU.
    A device this machine does not have is a `UserError`, not a failure deep inside the first kernel."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r} (try auto, cpu, cuda, cuda:1)") from None
    if resolved.type == "cuda" and not (torch.cuda.is_available()
                                        and (resolved.index or 0) < torch.cuda.device_count()):
        raise UserError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA devices here")
    backend = getattr(torch.backends, resolved.type, None) or getattr(torch, resolved.type, None)  # (mps, xpu: a Mac's)
    if resolved.type not in ("cpu", "cuda") and not (hasattr(backend, "is_available") and backend.is_available()):
        raise UserError(f"device {device!r}: this torch cannot run on it here (try auto, cpu, cuda, cuda:1)")
    return resolved


class T2IModel:
    """A text-to-image diffusion model: denoiser + text encoder + tokenizer + noise schedule (+ VAE).

    `scheduler` is the training noise schedule (DDPM; SD3's flow matching); its `config.prediction_type` says
    whether the denoiser predicts the noise ("epsilon") or the velocity ("v_prediction"). `vae` is None for a
    pixel-space model. `text_encoder_2` and `tokenizer_2` make it SDXL (with an SD3 transformer: SD3's second CLIP,
    `text_encoder_3` its T5); `zeros_for_empty_prompt` (SDXL's `force_zeros_for_empty_prompt`) makes the
    unconditional embedding zeros rather than the empty prompt's, as diffusers' SDXL pipeline samples it. `unet` is
    the denoiser, whatever its architecture: for a PixArt or SD3 folder its transformer (its "transformer" part;
    recipes and configs call the part "unet" all the same, as in `train_unet`). The parts are plain
    diffusers/transformers modules, so LoRA (peft), EMA and optimizers apply to them directly.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: transformers.PreTrainedModel,
        tokenizer: transformers.PreTrainedTokenizerBase,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        name: str = "t2i-model",
        pipeline_class: str | None = None,
        text_encoder_2: transformers.PreTrainedModel | None = None,
        tokenizer_2: transformers.PreTrainedTokenizerBase | None = None,
        zeros_for_empty_prompt: bool = False,
        text_encoder_3: transformers.PreTrainedModel | None = None,
        tokenizer_3: transformers.PreTrainedTokenizerBase | None = None,
    ):
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("text_encoder_2 and tokenizer_2 come together (SDXL) or not at all")
        self.unet = unet
        # Decided once, from the module itself: a trainer replaces `unet` by a wrapper for several processes.
        self.family = family_of(unet)
        self.size_conditioning = self.is_pixart and bool(unet.use_additional_conditions)  # (PixArt at 1024 px)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.vae = vae
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_3 = text_encoder_3  # (SD3's T5; None: zeros in its place, as its pipeline does)
        self.tokenizer_3 = tokenizer_3
        self.zeros_for_empty_prompt = zeros_for_empty_prompt
        # The scheduler a folder came with (its model_index.json entry and config), written back by `save_pretrained`:
        # training reads the noise schedule as DDPM's, but a pipeline loading a saved folder samples as the original.
        self.scheduler_as_saved: tuple[list, dict] | None = None
        self._empty: torch.Tensor | None = None  # `_empty_ids`' cache
        self.name = name
        default = ("StableDiffusionXLPipeline" if self.is_sdxl else "PixArtAlphaPipeline" if self.is_pixart
                   else "StableDiffusion3Pipeline" if self.is_sd3 else "FluxPipeline" if self.is_flux
                   else "StableDiffusionPipeline")
        self.pipeline_class = pipeline_class or ("T2IEvolvePixelPipeline" if vae is None else default)
        if vae is not None:
            vae.requires_grad_(False)  # recipes tune the denoiser and the text encoders, never the VAE

    # -- loading and saving --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
    ) -> "T2IModel":
        """Load a diffusers-style folder (model_index.json + one subfolder per part), safetensors only.
        `device` may be "auto" (see `resolve_device`)."""
        root = Path(path)
        if not root.is_dir():
            raise UserError(f"model folder not found: {root}")
        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise UserError(f"unknown dtype {dtype!r} (try float32, bfloat16, float16)")
            dtype = getattr(torch, dtype)
        index = read_index(root)
        family = model_family(root, index)
        sdxl = family == "unet" and any(index.get(name) not in (None, [None, None]) for name in SDXL_PARTS)
        # SDXL's VAE overflows in float16 (its config says `force_upcast`): read in float32, as diffusers' SDXL
        # pipeline upcasts it to decode.
        vae_config = read_json(root / "vae" / "config.json")  # (one that cannot be read: its loader says why)
        upcast = sdxl and dtype == torch.float16 and not (isinstance(vae_config, dict) and
                                                           vae_config.get("force_upcast") is False)
        folders = {name: DENOISER_FOLDERS[family] if name == "unet" else name for name in part_names(family, sdxl)}
        parts = {name: load_part(root, folder, index.get(folder), torch.float32 if name == "vae" and upcast else dtype,
                                 flow=family in FLOW_FAMILIES) for name, folder in folders.items()}
        check_conditioning(root, parts)
        if parts["vae"] is not None and parts["scheduler"].config.get("clip_sample"):
            # Latents are not bounded like pixels. DDPM clips predicted samples to [-1, 1] by default, and
            # the PNDM configs of Stable Diffusion 1.x folders often do not say otherwise.
            parts["scheduler"] = DDPMScheduler.from_config(parts["scheduler"].config, clip_sample=False)
        name = root.resolve().name
        zeros = sdxl and bool(index.get("force_zeros_for_empty_prompt", True))  # (the SDXL pipeline's default)
        model = cls(**parts, name=name, pipeline_class=index.get("_class_name"), zeros_for_empty_prompt=zeros)
        scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
        if isinstance(scheduler_config, dict) and isinstance(index.get("scheduler"), list):
            model.scheduler_as_saved = (index["scheduler"], scheduler_config)
        return model.to(resolve_device(device))

    @staticmethod
    def reads(path: str | Path) -> bool:
        """Whether `from_pretrained` knows the family of this model folder (see `model_family`; it still checks
        each part as it loads). A folder that is no model folder at all is its one-line error."""
        return known_family(Path(path)) is not None

    def save_pretrained(self, path: str | Path, unchanged_from: Path | None = None, unchanged: Sequence[str] = ()) -> Path:
        """Write every part (weights as safetensors) and a model_index.json that `from_pretrained` reads. The parts
        named in `unchanged` (attributes: "vae", "text_encoder", ...) are copied from the folder `unchanged_from`
        they were read from: exactly as they were, whatever dtype they are held in now, without writing them anew."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        (root / "model_index.json").unlink(missing_ok=True)  # an earlier save's: not to vouch for parts cut short
        index: dict[str, Any] = {"_class_name": self.pipeline_class, "_diffusers_version": diffusers.__version__}
        if self.is_sdxl:
            index["force_zeros_for_empty_prompt"] = self.zeros_for_empty_prompt
        if self.is_sd3 or self.is_flux:  # (what their pipelines expect named, though none is read here)
            index |= {"image_encoder": [None, None], "feature_extractor": [None, None]}
        for attribute in part_names(self.family, self.is_sdxl):
            part = getattr(self, attribute)
            name = self.denoiser_folder if attribute == "unet" else attribute
            index[name] = index_entry(part)
            if attribute in unchanged and unchanged_from is not None and (unchanged_from / name).is_dir():
                if (unchanged_from / name).resolve() != (root / name).resolve():  # (saved over the folder it was read
                    shutil.rmtree(root / name, ignore_errors=True)               # from: there already)
                    shutil.copytree(unchanged_from / name, root / name)
                continue
            if name == "scheduler" and self.scheduler_as_saved:  # the folder's own, for pipelines that load it
                index[name], config = self.scheduler_as_saved
                (root / name).mkdir(exist_ok=True)
                (root / name / "scheduler_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            elif isinstance(part, diffusers.ModelMixin):
                part.save_pretrained(root / name, safe_serialization=True)
            elif part is not None:
                part.save_pretrained(root / name)  # transformers writes safetensors by default
        # Last, and renamed into place: its presence says every part is whole (a save cut short has none).
        write_atomically(root / "model_index.json", json.dumps(index, indent=2) + "\n")
        return root

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "T2IModel":
        # Only name what changes: diffusers 0.42 warns on any `dtype=` keyword, even `dtype=None`.
        kwargs = {key: value for key, value in (("device", device), ("dtype", dtype)) if value is not None}
        for module in self.modules():
            module.to(**kwargs)
        return self

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.text_encoder, self.text_encoder_2, self.text_encoder_3, self.vae)
                if m is not None]

    def trainable_parts(self) -> dict[str, torch.nn.Module]:
        """The parts recipes may tune (full fine-tuning or LoRA): the UNet and the text encoders; the VAE stays
        frozen."""
        parts = {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                 "text_encoder_3": self.text_encoder_3}
        return {name: part for name, part in parts.items() if part is not None}

    def unused_parts(self, name: str) -> list[torch.nn.Module]:
        """The parts of trainable part `name` whose weights never reach what the model reads from it: SDXL reads
        the first text encoder's penultimate hidden states, so its last layer and final norm get no gradient
        (several processes' gradient sync must be told to expect none for them)."""
        if name == "text_encoder" and self.is_sdxl:
            text = getattr(self.text_encoder, "text_model", self.text_encoder)  # (transformers 4 nests it)
            return [text.encoder.layers[-1], text.final_layer_norm]
        return []

    @property
    def is_pixart(self) -> bool:
        return self.family == "pixart"

    @property
    def is_sd3(self) -> bool:
        return self.family == "sd3"

    @property
    def is_flux(self) -> bool:
        return self.family == "flux"

    @property
    def is_sdxl(self) -> bool:
        return self.family == "unet" and self.text_encoder_2 is not None

    @property
    def is_flow(self) -> bool:
        """Trained by flow matching (SD3, Flux: noise and image mixed linearly, the velocity between them predicted),
        not by DDPM's noise schedule."""
        return self.family in FLOW_FAMILIES

    @property
    def embeds_guidance(self) -> bool:
        """Guidance is an input the denoiser reads (Flux-dev, distilled from classifier-free guidance), so sampling
        makes no unconditional pass."""
        return self.is_flux and bool(self.unet.config.guidance_embeds)

    @property
    def denoiser_folder(self) -> str:
        """The folder (and model_index.json entry) of the denoiser: "unet", or PixArt's, SD3's and Flux's "transformer"."""
        return DENOISER_FOLDERS[self.family]

    # -- shapes ---------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        # The UNet's first weight, not diffusers' `ModelMixin.device`: that one walks every submodule looking for
        # offloading hooks (1.6 ms on the tiny model), and the model asks several times a training step.
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_scale(self) -> int:
        """Pixels per latent along each side: 1 in pixel space, 8 for Stable Diffusion's VAE."""
        return latent_scale(self.vae and self.vae.config)

    @property
    def resolution(self) -> int:
        """The image side the model was built for (Flux's configs do not say: 1024 px, as its pipeline draws)."""
        return (self.unet.config.get("sample_size") or flux.SAMPLE_SIZE) * self.latent_scale

    @staticmethod
    def folder_resolution(path: str | Path) -> int:
        """`resolution` of a model folder read from its configs alone: no weights loaded (an SDXL folder
        is gigabytes, and a recipe may only need the size to ask its teachers for)."""
        root = Path(path)
        denoiser = DENOISER_FOLDERS[model_family(root, read_index(root))]

        def config(part: str) -> dict | None:
            file = root / part / "config.json"
            try:
                return json.loads(file.read_text()) if file.is_file() else None
            except json.JSONDecodeError as e:
                raise UserError(f"{file}: bad JSON ({e})") from None

        unet, vae = config(denoiser), config("vae")
        if isinstance(unet, dict) and unet.get("_class_name") == "FluxTransformer2DModel":
            unet = {"sample_size": flux.SAMPLE_SIZE} | unet
        if not isinstance(unet, dict) or "sample_size" not in unet:
            raise UserError(f"{root}: no {denoiser}/config.json with a sample_size")
        return unet["sample_size"] * latent_scale(vae)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        side = (resolution or self.resolution) // self.latent_scale
        packed = 4 if self.is_flux else 1  # (Flux reads each 2 x 2 patch of latents as one token)
        return (self.unet.config.in_channels // packed, side, side)

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts: "epsilon", "v_prediction", "sample", or "flow" (SD3's and Flux's velocity,
        noise - x0)."""
        return "flow" if self.is_flow else self.scheduler.config.prediction_type

    # -- text -----------------------------------------------------------------------------------------

    @property
    def max_length(self) -> int:
        """Tokens per prompt: the tokenizers' limit, capped by the text encoders' positions. T5 (PixArt) has relative
        positions, so no limit of its own: its pipelines cut prompts at 120 tokens (alpha) or 300 (sigma). (SD3 and Flux
        pad each of their tokenizers to its own length: `_token_layout`.)"""
        if self.is_pixart:
            return min(self.tokenizer.model_max_length, 300 if "Sigma" in self.pipeline_class else 120)
        if self.is_sd3 or self.is_flux:  # (a prompt's row: every tokenizer's ids side by side)
            return sum(length for _, length in self._token_layout())
        pairs = ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
        return min(_clip_length(tok, enc) for tok, enc in pairs if tok is not None)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids (B, max_length), always padded to the full length; SDXL: (B, 2, max_length), a row of ids
        per tokenizer (each pads with its own token); SD3: (B, 77 + 77 + 256), its three tokenizers' side by side;
        Flux: (B, 77 + 512), CLIP's and T5's (schnell: 77 + 256).

        Fixed-length padding makes a prompt's embedding independent of the other prompts in its batch
        (cross-attention sees the padding), which the sampler's per-(prompt, seed) determinism needs. PixArt's
        prompts are lowercased and stripped first, as its pipelines do before T5 reads them (their caption cleaning,
        which also drops URLs and some punctuation where bs4 and ftfy are installed, is not done).
        """
        if self.is_pixart:
            prompts = [prompt.lower().strip() for prompt in prompts]
        if self.is_sd3 or self.is_flux:  # each tokenizer its own length, side by side
            return torch.cat([tok(list(prompts), padding="max_length", max_length=length, truncation=True,
                                  return_tensors="pt").input_ids for tok, length in self._token_layout()], 1).to(self.device)
        ids = [tok(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                   return_tensors="pt").input_ids for tok in (self.tokenizer, self.tokenizer_2) if tok is not None]
        return (torch.stack(ids, 1) if self.is_sdxl else ids[0]).to(self.device)

    def _token_layout(self) -> list[tuple[transformers.PreTrainedTokenizerBase, int]]:
        """SD3's and Flux's tokenizers and their lengths, as their pipelines pad them: each CLIP's own limit; T5 cut
        at 256 (SD3) or 512 (Flux)."""
        if self.is_flux:
            return [(self.tokenizer, _clip_length(self.tokenizer, self.text_encoder)),
                    (self.tokenizer_2, min(self.tokenizer_2.model_max_length,
                                           flux.T5_TOKENS["dev" if self.embeds_guidance else "schnell"]))]
        clips = [(tok, _clip_length(tok, enc))
                 for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))]
        t5 = self.tokenizer_3
        return clips if t5 is None else clips + [(t5, min(t5.model_max_length, 256))]

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        return self.encode_tokens(self.tokenize(prompts))

    def encode_tokens(self, input_ids: torch.Tensor, drop: torch.Tensor | None = None) -> PromptEmbeds:
        """Token ids from `tokenize` -> embeddings (trainers tokenize once). Rows where `drop` (B,) is true get
        the unconditional embedding of `encode_empty` (caption dropout teaches the branch guidance samples)."""
        input_ids = input_ids.to(self.device)
        keep = None if drop is None else ~drop.to(self.device, torch.bool).view(-1, *(1,) * (input_ids.dim() - 1))
        if keep is not None and not self.zeros_for_empty_prompt:
            input_ids = torch.where(keep, input_ids, self._empty_ids())
        if self.is_pixart:  # T5's last states, padding masked out (as PixArt's pipelines pass them)
            mask = (input_ids != self.tokenizer.pad_token_id).long()
            hidden = self.text_encoder(input_ids, attention_mask=mask).last_hidden_state
            return PromptEmbeds(hidden, hidden.new_zeros(len(hidden), 0), mask)
        if self.is_sd3:
            return self._encode_sd3(input_ids)
        if self.is_flux:  # T5's states to attend to, CLIP's pooled vector (`pooler_output`: its EOS state)
            clip_ids, t5_ids = input_ids.split([length for _, length in self._token_layout()], dim=1)
            hidden = self.text_encoder_2(t5_ids).last_hidden_state
            return PromptEmbeds(hidden, self.text_encoder(clip_ids).pooler_output,
                                torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device))
        every_token = torch.ones(len(input_ids), input_ids.shape[-1], dtype=torch.long, device=self.device)
        if not self.is_sdxl:
            out = self.text_encoder(input_ids)
            text = PromptEmbeds(out.last_hidden_state, out.pooler_output, every_token)
        else:  # both encoders' penultimate states side by side; the pooled vector is the second's projection
            first = self.text_encoder(input_ids[:, 0], output_hidden_states=True)
            second = self.text_encoder_2(input_ids[:, 1], output_hidden_states=True)
            text = PromptEmbeds(torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1), second.text_embeds,
                                every_token)
        if keep is not None and self.zeros_for_empty_prompt:
            text = PromptEmbeds(text.hidden * keep.view(-1, 1, 1), text.pooled * keep.view(-1, 1), text.mask)
        return text

    def _encode_sd3(self, input_ids: torch.Tensor) -> PromptEmbeds:
        """SD3's text: both CLIP encoders' penultimate states side by side, zero-padded to T5's width, then T5's
        states after them in the sequence (zeros without a T5); the pooled vector is both CLIPs' projections."""
        lengths = [length for _, length in self._token_layout()]
        ids = input_ids.split(lengths, dim=1)
        first = self.text_encoder(ids[0], output_hidden_states=True)
        second = self.text_encoder_2(ids[1], output_hidden_states=True)
        clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1)
        width = self.unet.config.joint_attention_dim
        t5 = (self.text_encoder_3(ids[2]).last_hidden_state if self.text_encoder_3 is not None
              else clip.new_zeros(len(clip), 256, width))
        hidden = torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5.to(clip.dtype)], 1)
        every_token = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return PromptEmbeds(hidden, torch.cat([first.text_embeds, second.text_embeds], -1), every_token)

    def _empty_ids(self) -> torch.Tensor:
        """The empty prompt's ids, tokenized once (a trainer asks every step; a tokenizer call is about 1 ms)."""
        if self._empty is None or self._empty.device != self.device:
            self._empty = self.tokenize([""])
        return self._empty

    def encode_empty(self, n: int) -> PromptEmbeds:
        """The unconditional embedding for classifier-free guidance and caption dropout: the empty prompt's,
        or zeros for an SDXL folder that says `force_zeros_for_empty_prompt` (its pipeline's default)."""
        empty = self.encode_prompts([""] * n)
        if self.zeros_for_empty_prompt:
            return PromptEmbeds(torch.zeros_like(empty.hidden), torch.zeros_like(empty.pooled), empty.mask)
        return empty

    # -- images ---------------------------------------------------------------------------------------

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> latents (the VAE posterior mean, scaled to unit variance)."""
        pixels = pixels.to(self.device)
        if self.vae is None:
            return pixels
        with self._vae_precision():
            latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels, nominally in [-1, 1] (not clamped, so gradients pass everywhere)."""
        if self.vae is None:
            return latents
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
        with self._vae_precision():
            return self.vae.decode(latents).sample

    def _vae_precision(self):
        """SDXL's VAE overflows in float16: kept out of a trainer's fp16 autocast, as it is kept in float32."""
        upcast = self.is_sdxl and self.vae.config.get("force_upcast")
        return torch.autocast(self.device.type, enabled=False) if upcast else nullcontext()

    # -- denoising ------------------------------------------------------------------------------------

    def predict(self, noisy: torch.Tensor, t: torch.Tensor | int, text: PromptEmbeds,
                guidance: float | None = None) -> torch.Tensor:
        """The denoiser's output for noisy latents at timestep(s) `t` (noise or velocity, see prediction_type).
        `guidance`: the scale a guidance-distilled model reads (`embeds_guidance`; None: `flux.TRAINING_GUIDANCE`)."""
        if self.is_pixart:
            return self._predict_pixart(noisy, t, text)
        if self.is_flux:
            return self._predict_flux(noisy, t, text, flux.TRAINING_GUIDANCE if guidance is None else guidance)
        if self.is_sd3:
            return self.unet(hidden_states=noisy.to(self.dtype), timestep=_per_image(t, noisy),
                             encoder_hidden_states=text.hidden.to(self.dtype),
                             pooled_projections=text.pooled.to(self.dtype)).sample
        class_labels = text.pooled.to(self.dtype) if self.unet.config.class_embed_type == "projection" else None
        added = None
        if self.is_sdxl:  # size and crop conditioning: drawn whole at this size (original = target, no crop)
            height, width = (side * self.latent_scale for side in noisy.shape[-2:])
            sizes = torch.tensor([height, width, 0, 0, height, width], device=noisy.device, dtype=self.dtype)
            added = {"text_embeds": text.pooled.to(self.dtype), "time_ids": sizes.expand(len(noisy), 6)}
        return self.unet(noisy.to(self.dtype), t, encoder_hidden_states=text.hidden.to(self.dtype),
                         class_labels=class_labels, added_cond_kwargs=added).sample

    def _predict_pixart(self, noisy: torch.Tensor, t: torch.Tensor | int, text: PromptEmbeds) -> torch.Tensor:
        """PixArt's transformer: T5 states under their mask, a timestep per image, resolution and aspect ratio where
        its config asks for them (the 1024 px alpha model), and, where it also predicts the variance (8 channels
        out), only the mean's half: the samplers here read that alone, and the loss trains it alone (as PixArt's
        own fine-tuning scripts do)."""
        added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if self.size_conditioning:
            height, width = (side * self.latent_scale for side in noisy.shape[-2:])
            sizes = torch.tensor([[height, width, height / width]], device=noisy.device, dtype=self.dtype)
            added = {"resolution": sizes[:, :2].expand(len(noisy), 2), "aspect_ratio": sizes[:, 2:].expand(len(noisy), 1)}
        out = self.unet(noisy.to(self.dtype), encoder_hidden_states=text.hidden.to(self.dtype),
                        encoder_attention_mask=text.mask, timestep=_per_image(t, noisy), added_cond_kwargs=added).sample
        return out[:, :noisy.shape[1]] if out.shape[1] == 2 * noisy.shape[1] else out

    def _predict_flux(self, noisy: torch.Tensor, t: torch.Tensor | int, text: PromptEmbeds,
                      guidance: float) -> torch.Tensor:
        """Flux's transformer over `noisy`'s 2 x 2 patches as tokens, at their positions, the timestep in [0, 1] (its
        pipeline divides by 1000), the guidance scale where it reads one; its output patches put back in place."""
        height, width = noisy.shape[-2:]
        scale = torch.full((len(noisy),), guidance, device=noisy.device) if self.embeds_guidance else None
        timestep = _per_image(t, noisy).to(self.dtype) / 1000
        out = self.unet(hidden_states=flux.pack(noisy.to(self.dtype)), timestep=timestep, guidance=scale,
                        pooled_projections=text.pooled.to(self.dtype), encoder_hidden_states=text.hidden.to(self.dtype),
                        txt_ids=text.hidden.new_zeros(text.hidden.shape[1], 3, dtype=self.dtype),
                        img_ids=flux.image_positions(height, width, noisy.device, self.dtype)).sample
        return flux.unpack(out, height, width)

    def denoising_loss(
        self,
        latents: torch.Tensor,
        text: PromptEmbeds,
        generator: torch.Generator | None = None,
        reduction: Literal["mean", "none"] = "mean",
        snr_gamma: float | None = None,
    ) -> torch.Tensor:
        """The standard diffusion loss: noise clean latents at random timesteps, regress the target.

        The target follows the schedule's prediction type. `reduction="none"` gives one loss per image,
        for recipes that weight samples (e.g. by reward). Flow matching (SD3, Flux) draws its noise levels logit-normal,
        as SD3 was trained and diffusers' SD3 scripts tune it by default (their Flux scripts' default is uniform,
        logit-normal an option), and takes no min-SNR weighting (`snr_gamma` ignored); it regresses the velocity
        unweighted, the SD3 paper's objective (diffusers' SD3 script with `--precondition_outputs 0`; its default
        weights each image's loss by its noise level squared).
        """
        where = generator.device if generator is not None else latents.device  # draw where the generator lives
        noise = torch.randn(latents.shape, generator=generator, device=where).to(latents)
        steps = self.scheduler.config.num_train_timesteps
        if self.is_flow:
            share = torch.sigmoid(torch.randn(len(latents), generator=generator, device=where)).cpu()
            at = (share * steps).long().clamp(max=steps - 1)  # an index into the training schedule's noise levels
            t = self.scheduler.timesteps[at].to(latents.device)
            sigma = self.scheduler.sigmas[at].to(latents).view(-1, *(1,) * (latents.dim() - 1))
            noisy, target = (1 - sigma) * latents + sigma * noise, noise - latents
        else:
            t = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=where).to(latents.device)
            noisy = self.scheduler.add_noise(latents, noise, t)
            if self.prediction_type == "epsilon":
                target = noise
            elif self.prediction_type == "v_prediction":
                target = self.scheduler.get_velocity(latents, noise, t)
            else:
                target = latents
        loss = F.mse_loss(self.predict(noisy, t, text).float(), target.float(), reduction="none")
        loss = loss.flatten(1).mean(1)
        if snr_gamma is not None and not self.is_flow:
            loss = loss * self._min_snr_weight(t, snr_gamma)
        return loss.mean() if reduction == "mean" else loss

    def _min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al., 2023): cap the weight of easy, low-noise timesteps.

        Expressed for the schedule's own target, so it is the same weighting of the x0 error whether the
        model predicts noise (min(snr, g) / snr) or velocity (min(snr, g) / (snr + 1)).
        """
        alphas = self.scheduler.alphas_cumprod.to(t.device)[t].float()
        snr = alphas / (1 - alphas)
        capped = torch.clamp(snr, max=gamma)
        if self.prediction_type == "epsilon":
            return capped / snr
        if self.prediction_type == "v_prediction":
            return capped / (snr + 1)
        return capped


def _per_image(t: torch.Tensor | int, noisy: torch.Tensor) -> torch.Tensor:
    """Timestep(s) as one per image, as the transformers take them (a UNet takes one for the batch as well)."""
    t = torch.as_tensor(t, device=noisy.device)
    return t.expand(len(noisy)) if t.dim() == 0 else t


def _clip_length(tokenizer: transformers.PreTrainedTokenizerBase, encoder: transformers.PreTrainedModel) -> int:
    """A CLIP prompt's tokens: the tokenizer's limit, capped by the encoder's positions."""
    return min(tokenizer.model_max_length, encoder.config.max_position_embeddings)


def to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> float tensor (B, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) in [-1, 1] -> RGB PIL images (values outside the range are clipped)."""
    array = ((pixels.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(a) for a in array.permute(0, 2, 3, 1).cpu().numpy()]
