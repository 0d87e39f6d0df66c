"""A tiny text-to-image model for the shapes world, made of ordinary Hugging Face parts.

It is small enough to train from random init on two CPU cores in minutes (see SHAPES-MODEL.md for the
measurements behind every default), yet it is a real `UNet2DConditionModel` + `CLIPTextModel` +
tokenizer + `DDPMScheduler` folder, so every recipe runs unchanged on a Stable-Diffusion-style model.

Differences from Stable Diffusion, each for speed or for a word-level vocabulary:
- pixel space: no VAE, the UNet denoises 32x32 RGB directly (`model_index.json` says `vae: [null, null]`);
- a word-level tokenizer over the grammar's words, so one word is one token;
- the pooled text embedding also enters the UNet as a class embedding (`class_embed_type="projection"`):
  measured to learn colours and shapes much faster than cross-attention alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from pydantic import Field, model_validator
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from ..config import Config
from ..errors import UserError
from ..world.grammar import COLORS, COUNT_WORDS, MAX_GROUPS, RELATIONS, SHAPES, SIZES
from .t2i_model import T2IModel

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>")
"""Ids 0-3. EOS must not be 2: `CLIPTextModel` then pools at the largest token id instead of at EOS."""
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)


def grammar_words() -> list[str]:
    """Every word the shapes grammar can write, plus the punctuation its parser tolerates."""
    links = ["and"] + [word for relation in RELATIONS for word in relation.split()]
    words = [*COUNT_WORDS, *SIZES, *COLORS, *SHAPES, *(s + "s" for s in SHAPES), *links, ",", "."]
    return list(dict.fromkeys(words))


def longest_prompt_tokens() -> int:
    """Tokens in the longest grammar prompt, BOS and EOS included.

    Every group is at most four words (count, size, colour, shape) and every link at most two ("left of").
    """
    link_words = max(len(link.split()) for link in ("and", *RELATIONS))
    return MAX_GROUPS * 4 + (MAX_GROUPS - 1) * link_words + 2


def build_tokenizer(max_length: int = longest_prompt_tokens()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: lowercase, split on whitespace and punctuation, wrap in BOS ... EOS."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *grammar_words()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=max_length,
    )


DownBlockType = Literal["DownBlock2D", "CrossAttnDownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"]
"""The diffusers down blocks this `UNet2DConditionModel` builds and samples with; each mirrors (Down -> Up)
to a real up block: UpBlock2D, CrossAttnUpBlock2D, AttnUpBlock2D, ResnetUpsampleBlock2D. Skip, Encoder and
K blocks belong to other UNets and fail here; SimpleCrossAttn fails unless the heads divide the channels."""
PLAIN_BLOCKS = ("DownBlock2D", "ResnetDownsampleBlock2D")
"""Down blocks without attention, so without a limit on `attention_head_dim`."""

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
"""Schedules that DDPMScheduler (training) and the DDIM and DPM-Solver++ samplers all implement."""

PositiveInt = Annotated[int, Field(ge=1, le=4096)]


class TinyModelConfig(Config):
    """Architecture and noise schedule of the tiny shapes-world model.

    `attention_head_dim` follows diffusers' historical naming: in `UNet2DConditionModel` it sets the
    number of heads, not their width. `norm_num_groups` must divide every channel count.
    """

    resolution: int = Field(32, ge=8, le=1024)  # (the pixel judge reads scenes of at least 8 px a side)
    # Measured (benchmarks/learning_curve.py, RESULTS.md): cross-attention at 16x16 and 8x8 learns more per
    # image than attention at 8x8 only; 16 channels at 32x32 (where convolutions are most of a CPU step)
    # trains 1.4x faster than 32 there, so the demo sees more images in its budget and ends higher.
    block_out_channels: tuple[PositiveInt, ...] = Field((16, 32, 64), min_length=1)
    layers_per_block: int = Field(1, ge=1, le=32)
    down_block_types: tuple[DownBlockType, ...] = Field(
        ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), min_length=1
    )
    attention_head_dim: int = Field(4, ge=1, le=256)
    # Per down block (mirrored for the up blocks): True makes a transformer block's first attention
    # attend to the text instead of to the image itself. At 16x16, image self-attention over 256
    # positions was a quarter of a CPU training step; without it the model learns as much per image
    # (benchmarks/learning_curve.py) and trains about 18% faster.
    only_cross_attention: bool | tuple[bool, ...] = (False, True, False)
    norm_num_groups: int = Field(8, ge=1, le=4096)
    text_hidden_size: int = Field(64, ge=1, le=4096)
    text_layers: int = Field(2, ge=0, le=64)
    text_heads: int = Field(4, ge=1, le=256)
    text_intermediate_size: int = Field(256, ge=1, le=16384)
    max_length: int = longest_prompt_tokens()
    prediction_type: Literal["v_prediction", "epsilon"] = "v_prediction"
    beta_schedule: BetaSchedule = "squaredcos_cap_v2"
    num_train_timesteps: int = Field(1000, ge=1, le=100_000)

    @model_validator(mode="after")
    def _check_shapes(self) -> "TinyModelConfig":
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError("down_block_types needs one entry per block_out_channels entry")
        if isinstance(self.only_cross_attention, tuple) and len(self.only_cross_attention) != len(self.down_block_types):
            raise ValueError("only_cross_attention needs one entry per down block (or one bool for all)")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"norm_num_groups {self.norm_num_groups} must divide every block_out_channels entry")
        # attention_head_dim is the number of heads; each head needs at least one channel, in every
        # attention block and in the mid block (which runs at the last block's channels).
        attended = [c for c, kind in zip(self.block_out_channels, self.down_block_types) if kind not in PLAIN_BLOCKS]
        narrowest = min([*attended, self.block_out_channels[-1]])
        if self.attention_head_dim > narrowest:
            raise ValueError(f"attention_head_dim (the number of heads) must be between 1 and {narrowest}, the "
                             f"fewest channels of an attention block, not {self.attention_head_dim}")
        if self.text_hidden_size % self.text_heads:
            raise ValueError("text_heads must divide text_hidden_size")
        if self.max_length < longest_prompt_tokens():
            raise ValueError(f"max_length must be at least {longest_prompt_tokens()} (the longest grammar prompt)")
        downsamples = len(self.block_out_channels) - 1
        if self.resolution % 2**downsamples:
            raise ValueError(f"resolution must be a multiple of {2**downsamples}")
        return self

    @property
    def up_block_types(self) -> tuple[str, ...]:
        """The down blocks mirrored: the UNet's decoder walks the resolutions back up."""
        return tuple(name.replace("Down", "Up") for name in reversed(self.down_block_types))


def tiny_model(config: TinyModelConfig = TinyModelConfig(), seed: int = 0) -> T2IModel:
    """A randomly initialised tiny model in memory; the same seed gives the same weights."""
    tokenizer = build_tokenizer(config.max_length)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config)
        unet = UNet2DConditionModel(
            sample_size=config.resolution,
            in_channels=3,
            out_channels=3,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            down_block_types=config.down_block_types,
            up_block_types=config.up_block_types,
            attention_head_dim=config.attention_head_dim,
            only_cross_attention=config.only_cross_attention,
            norm_num_groups=config.norm_num_groups,
            cross_attention_dim=config.text_hidden_size,
            class_embed_type="projection",
            projection_class_embeddings_input_dim=config.text_hidden_size,
        )
    scheduler = DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        clip_sample=True,  # pixels live in [-1, 1], so clipping predicted images there is exact
    )
    return T2IModel(unet, text_encoder, tokenizer, scheduler, vae=None, name="tiny-shapes")


def init_tiny_model(
    path: str | Path, config: TinyModelConfig = TinyModelConfig(), seed: int = 0, overwrite: bool = False
) -> Path:
    """Write a randomly initialised tiny model as a diffusers-style folder and return its path.

    Refuses to write into a non-empty folder unless `overwrite`, so a trained model is never replaced
    by noise by accident.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{path} is not empty: pick a new folder, or overwrite it (`init-model --overwrite`, "
                        "`overwrite=True`) to replace what it holds")
    tiny_model(config, seed).save_pretrained(path)
    return path
