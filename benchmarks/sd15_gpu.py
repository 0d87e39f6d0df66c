"""Real sizes on a GPU: a random-init Stable-Diffusion-1.5-shaped (or PixArt-alpha-shaped) folder through our model,
trainer and sampler.

Builds the folder from configs (SD1.5: UNet 860M with SD1.5's block layout, CLIP ViT-L/14-sized text encoder;
`--arch pixart`: PixArt-XL-2-512's 611M transformer over a T5-XXL-sized encoder, 4.6B without the vocabulary,
frozen as EvolveDirector trains it; `--arch sd3`: SD3-medium's 2B MMDiT over CLIP-L and CLIP-G, no T5; SD's VAE; letter-level tokenizers since no vocabulary can be downloaded), saves it
as safetensors, then times what the recipes do: denoising training steps through `Trainer` (bf16 autocast,
gradient checkpointing), sampling through `Sampler`, and a reward-style backward through the last K sampling steps.

    python benchmarks/sd15_gpu.py [--arch sd15|pixart|sd3] [--resolution 512] [--batch 8] [--steps 10] [--json]
    python benchmarks/sd15_gpu.py --small    # a CPU-sized smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel,
                       SD3Transformer2DModel, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from builders import write_clip_tokenizer, write_t5_tokenizer  # noqa: E402  (the tests' letter-level tokenizers)

from t2i_evolve.models import Sampler, SamplerConfig, T2IModel, sample_pixels  # noqa: E402
from t2i_evolve.train import TrainConfig, Trainer, TrainingSet  # noqa: E402
from t2i_evolve.world import GrammarPrompts, ProceduralTeacher  # noqa: E402


def build_sd15(root: Path, small: bool) -> None:
    vocab = write_clip_tokenizer(root / "tokenizer")
    hidden = 64 if small else 768
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2 if small else 12,
        num_attention_heads=4 if small else 12, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )).save_pretrained(root / "text_encoder")
    write_sd_vae(root / "vae", small)
    UNet2DConditionModel(
        sample_size=64, cross_attention_dim=hidden, attention_head_dim=8,
        block_out_channels=(32, 64, 64, 64) if small else (320, 640, 1280, 1280), norm_num_groups=32,
    ).save_pretrained(root / "unet")
    write_schedule_and_index(root, "StableDiffusionPipeline", ("unet", "UNet2DConditionModel"), "CLIPTextModel",
                             "CLIPTokenizer", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def write_sd_vae(folder: Path, small: bool, latent_channels: int = 4, **extra) -> None:
    channels = (32, 32, 64, 64) if small else (128, 256, 512, 512)
    AutoencoderKL(
        block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=latent_channels, layers_per_block=2, sample_size=512,
        norm_num_groups=32, **extra,
    ).save_pretrained(folder)


def build_pixart(root: Path, small: bool) -> None:
    """PixArt-XL-2-512: 28 blocks 1152 wide over T5-XXL states (4096 wide, 24 layers; 120 tokens), SD's VAE."""
    vocab_size = write_t5_tokenizer(root / "tokenizer")
    width = 64 if small else 4096
    T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=width, d_kv=16 if small else 64, d_ff=128 if small else 10240,
        num_layers=2 if small else 24, num_heads=4 if small else 64, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32, decoder_start_token_id=0,
    )).save_pretrained(root / "text_encoder")
    write_sd_vae(root / "vae", small)
    PixArtTransformer2DModel(
        num_attention_heads=4 if small else 16, attention_head_dim=16 if small else 72, num_layers=2 if small else 28,
        in_channels=4, out_channels=8, sample_size=64, patch_size=2, caption_channels=width,
        cross_attention_dim=64 if small else 1152,
    ).save_pretrained(root / "transformer")
    write_schedule_and_index(root, "PixArtAlphaPipeline", ("transformer", "PixArtTransformer2DModel"), "T5EncoderModel",
                             "T5Tokenizer", beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def build_sd3(root: Path, small: bool) -> None:
    """SD3-medium: its 2B MMDiT (24 blocks, 1536 wide) over CLIP-L and CLIP-G-sized encoders, a 16-channel VAE, flow
    matching. No T5 (4.7B to build and save): zeros in its place, as SD3 runs without one."""
    for suffix, (hidden, layers, heads) in zip(("", "_2"), [(64, 2, 4)] * 2 if small else [(768, 12, 12), (1280, 32, 20)]):
        vocab = write_clip_tokenizer(root / f"tokenizer{suffix}")
        CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
        )).save_pretrained(root / f"text_encoder{suffix}")
    write_sd_vae(root / "vae", small, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
    SD3Transformer2DModel(
        sample_size=8 if small else 128, patch_size=2, in_channels=16, out_channels=16, num_layers=2 if small else 24,
        attention_head_dim=16 if small else 64, num_attention_heads=4 if small else 24,
        joint_attention_dim=128 if small else 4096, caption_projection_dim=64 if small else 1536,
        pooled_projection_dim=128 if small else 2048, pos_embed_max_size=192,
    ).save_pretrained(root / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    clip = ["transformers", "CLIPTextModelWithProjection"]
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": clip, "text_encoder_2": clip,
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "text_encoder_3": [None, None], "tokenizer_3": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }))


def write_schedule_and_index(root: Path, pipeline: str, denoiser: tuple[str, str], text_encoder: str, tokenizer: str,
                             **schedule) -> None:
    """The DDPM noise schedule, and the model_index.json that names every part's class."""
    DDPMScheduler(**schedule).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": pipeline, denoiser[0]: ["diffusers", denoiser[1]], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", text_encoder], "tokenizer": ["transformers", tokenizer],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }))


BUILDERS = {"sd15": build_sd15, "pixart": build_pixart, "sd3": build_sd3}


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=list(BUILDERS), default="sd15")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.small:
        args.resolution, args.batch, args.steps = 64, 2, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "arch": args.arch,
                     "resolution": args.resolution, "batch": args.batch}
    prompts = GrammarPrompts().sample(64, seed=0)
    images = [im.resize((args.resolution, args.resolution)) for im in ProceduralTeacher().generate(prompts, range(64))]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / args.arch
        BUILDERS[args.arch](root, args.small)
        model = T2IModel.from_pretrained(root)
        results["unet_params_m"] = sum(p.numel() for p in model.unet.parameters()) / 1e6
        results["text_params_m"] = sum(p.numel() for p in model.text_encoder.parameters()) / 1e6
        del model
        data = TrainingSet.from_images(prompts, images)
        precision = "bf16" if device.type == "cuda" else "no"
        for checkpointing in (False, True):
            config = TrainConfig(model=str(root), output_dir=f"{tmp}/run{int(checkpointing)}", steps=args.steps + 2,
                                 batch_size=args.batch, lr=1e-5, warmup_steps=0, train_text_encoder=False,
                                 mixed_precision=precision, gradient_checkpointing=checkpointing, ema_decay=None,
                                 checkpoint_every=10**9, tracker="none")
            trainer = Trainer(config, data)
            for _ in range(2):
                trainer._train_step()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = timed(lambda: [trainer._train_step() for _ in range(args.steps)], device)
            key = "train_checkpointed" if checkpointing else "train"
            results[key] = {"images_per_s": args.steps * args.batch / seconds,
                            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
            del trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()
        model = T2IModel.from_pretrained(root, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        sampler = Sampler(model, SamplerConfig(steps=20, batch_size=args.batch))
        sampler.generate(prompts[:2], [0, 1])
        seconds = timed(lambda: sampler.generate(prompts[: args.batch], list(range(args.batch))), device)
        results["sample_ddim20_images_per_s"] = args.batch / seconds
        for k in (1, 5):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()

            def reward_backward():
                pixels = sample_pixels(model, prompts[:2], [0, 1], SamplerConfig(steps=25), grad_steps=k, checkpoint=True)
                pixels.mean().backward()

            seconds = timed(reward_backward, device)
            results[f"reward_grad_last{k}"] = {"seconds": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30
                                               if device.type == "cuda" else None}
            model.unet.zero_grad(set_to_none=True)
            model.text_encoder.zero_grad(set_to_none=True)
    print(json.dumps(results) if args.json else json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
