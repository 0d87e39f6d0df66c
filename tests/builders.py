"""Model folders built from configs in temp dirs, shared by tests (no hub, no downloads)."""

import json
import shutil
import string

import torch
from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler,
                       FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, PixArtTransformer2DModel, PNDMScheduler,
                       SD3Transformer2DModel, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer


def write_clip_tokenizer(folder):
    """A CLIP BPE tokenizer over single letters: no merges, every word spelled out."""
    folder.mkdir(parents=True)
    words = list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    vocab = {w: i for i, w in enumerate(words + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 24}))
    return vocab


def clip_text_config(vocab, **extra):
    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], **extra,
    )


def write_tiny_vae(folder, **extra):
    """A 2-level VAE: latents of 4 channels at half the side."""
    AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=32, **extra,
    ).save_pretrained(folder)


def build_tiny_sd(root):
    """A random-init Stable-Diffusion-style folder (UNet, VAE, CLIP text encoder and tokenizer, scheduler)."""
    vocab = write_clip_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    CLIPTextModel(clip_text_config(vocab)).save_pretrained(root / "text_encoder")
    write_tiny_vae(root / "vae")
    UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ).save_pretrained(root / "unet")
    PNDMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True, steps_offset=1,
        set_alpha_to_one=False,
    ).save_pretrained(root / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def build_tiny_sdxl(root):
    """A random-init SDXL-style folder: the tiny SD folder's VAE, scheduler and first text encoder, a second
    CLIP encoder with a projection (the pooled vector) and a UNet with SDXL's size conditioning."""
    build_tiny_sd(root)
    vocab = write_clip_tokenizer(root / "tokenizer_2")
    torch.manual_seed(1)
    CLIPTextModelWithProjection(clip_text_config(vocab, projection_dim=16)).save_pretrained(root / "text_encoder_2")
    UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
    ).save_pretrained(root / "unet")
    index = json.loads((root / "model_index.json").read_text())
    index |= {"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
              "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def write_t5_tokenizer(folder):
    """A T5 (Unigram) tokenizer over single letters and a few words, built without sentencepiece or a download;
    512 tokens long, as T5's (PixArt's pipelines cut prompts shorter)."""
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + [f"\u2581{w}" for w in ("a", "red", "blue", "circle", "square")]
    pieces += list(string.ascii_lowercase) + [f"\u2581{c}" for c in string.ascii_lowercase]
    vocab = [(piece, 0.0 if i < 3 else -1.0 - 0.01 * i) for i, piece in enumerate(dict.fromkeys(pieces))]
    T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512).save_pretrained(folder)
    return len(vocab)


def build_tiny_pixart(root, additional_conditions: bool = False, pipeline: str = "PixArtAlphaPipeline",
                      as_published: bool = False):
    """A random-init PixArt-alpha-style folder: a DiT over T5 states (8 channels out: the learned variance too),
    the tiny SD folder's VAE, a DPM-Solver schedule. `additional_conditions`: resolution and aspect-ratio
    embeddings, which diffusers gives a model of latent side 128 (the 1024 px alpha): large patches keep it cheap.
    `as_published`: the transformer named `Transformer2DModel`, as PixArt's own folders on the hub name it."""
    vocab_size = write_t5_tokenizer(root / "tokenizer")
    torch.manual_seed(2)
    T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                            decoder_start_token_id=0)).save_pretrained(root / "text_encoder")
    write_tiny_vae(root / "vae")
    PixArtTransformer2DModel(
        num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=24, caption_channels=32, **({"sample_size": 128, "patch_size": 8} if additional_conditions
                                                       else {"sample_size": 16, "patch_size": 2}),
    ).save_pretrained(root / "transformer")
    DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02).save_pretrained(root / "scheduler")
    transformer = "Transformer2DModel" if as_published else "PixArtTransformer2DModel"
    if as_published:
        config = json.loads((root / "transformer" / "config.json").read_text())
        (root / "transformer" / "config.json").write_text(json.dumps(config | {"_class_name": transformer}))
    index = {
        "_class_name": pipeline,
        "transformer": ["diffusers", transformer],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def build_tiny_sd3(root):
    """A random-init Stable-Diffusion-3-style folder: an MMDiT over two CLIP encoders and T5, flow matching."""
    torch.manual_seed(3)
    for suffix in ("", "_2"):
        vocab = write_clip_tokenizer(root / f"tokenizer{suffix}")
        CLIPTextModelWithProjection(clip_text_config(vocab, projection_dim=32)).save_pretrained(root / f"text_encoder{suffix}")
    vocab_size = write_t5_tokenizer(root / "tokenizer_3")
    T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=64, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                            relative_attention_num_buckets=8, decoder_start_token_id=0)).save_pretrained(root / "text_encoder_3")
    write_tiny_vae(root / "vae", scaling_factor=1.5305, shift_factor=0.0609)  # (SD3's)
    SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
                          pooled_projection_dim=64).save_pretrained(root / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer_3": ["transformers", "T5Tokenizer"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def build_tiny_flux(root, guidance_embeds: bool = True):
    """A random-init Flux-style folder: a rectified-flow transformer over 2 x 2 latent patches, T5's states and CLIP's
    pooled vector, Flux-dev's dynamically shifted schedule (`guidance_embeds`: dev; without it: schnell's, unshifted).
    Flux's configs give no sample size (its pipeline draws 1024 px); this one's config says 16 latents (32 px), a key
    diffusers keeps (with a warning) and `T2IModel` reads, so that recipes ask its teachers for small images."""
    torch.manual_seed(5)
    vocab = write_clip_tokenizer(root / "tokenizer")
    CLIPTextModel(clip_text_config(vocab)).save_pretrained(root / "text_encoder")
    vocab_size = write_t5_tokenizer(root / "tokenizer_2")
    T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=64, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                            relative_attention_num_buckets=8, decoder_start_token_id=0)).save_pretrained(root / "text_encoder_2")
    write_tiny_vae(root / "vae", scaling_factor=0.3611, shift_factor=0.1159)  # (Flux's)
    FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                           num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
                           guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4)).save_pretrained(root / "transformer")
    config = json.loads((root / "transformer" / "config.json").read_text())
    (root / "transformer" / "config.json").write_text(json.dumps(config | {"sample_size": 16}))
    shifting = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
                "max_shift": 1.15}
    FlowMatchEulerDiscreteScheduler(**({"shift": 3.0} | shifting if guidance_embeds else {"shift": 1.0})).save_pretrained(
        root / "scheduler")
    index = {
        "_class_name": "FluxPipeline",
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer_2": ["transformers", "T5Tokenizer"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def build_tiny_edm_sdxl(root):
    """The tiny SDXL folder with an EDM noise schedule, as Playground v2.5 has: a family `T2IModel` does not read,
    which a local teacher draws with diffusers' own pipeline."""
    build_tiny_sdxl(root)
    shutil.rmtree(root / "scheduler")
    EDMDPMSolverMultistepScheduler().save_pretrained(root / "scheduler")
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps(index | {"scheduler": ["diffusers", "EDMDPMSolverMultistepScheduler"]}))
    return root


def fixed_loss(model, data) -> float:
    """The denoising loss on the same noise and timesteps each time it is asked."""
    with torch.no_grad():
        latents = model.encode_images(data.images.float() / 127.5 - 1)
        text = model.encode_prompts(data.prompts)
        return model.denoising_loss(latents, text, generator=torch.Generator().manual_seed(0)).item()


def diffusers_pipeline(model):
    """diffusers' own pipeline over the very modules of a `T2IModel`, sampling as our sampler does: DDIM with trailing
    spacing for SD and SDXL (zeros for SDXL's empty prompt: its default), Flux's own Euler steps for Flux."""
    from diffusers import DDIMScheduler, FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if model.is_flux:
        return FluxPipeline(transformer=model.unet, vae=model.vae, text_encoder=model.text_encoder,
                            tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2,
                            scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config))
    scheduler = DDIMScheduler.from_config(model.scheduler.config, timestep_spacing="trailing")
    parts = dict(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
                 scheduler=scheduler)
    if model.is_sdxl:
        return StableDiffusionXLPipeline(**parts, text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2,
                                         add_watermarker=False)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def copy_with_index(folder, dest, **entries):
    """A copy of model folder `folder` at `dest` whose model_index.json names `entries` (part: [library, class])."""
    shutil.copytree(folder, dest)
    index = json.loads((dest / "model_index.json").read_text())
    (dest / "model_index.json").write_text(json.dumps(index | entries))
    return dest


def check_learns_and_trains_lora(model_dir, tmp_path, t5_part: str) -> None:
    """A transformer folder with T5 (SD3, Flux) learns under full fine-tuning (its loss on fixed noise falls by 30%
    in 30 steps) and trains LoRA on every part (bf16, checkpointing), each part's changed weights only those of the
    projections LoRA targets: the transformer's attention, CLIP's, and T5's (`t5_part`) under T5's own names.
    The LoRA run's merged model is left in `tmp_path / "lora" / "model"`."""
    from t2i_evolve.models import T2IModel
    from t2i_evolve.train import LoraSettings, TrainConfig, Trainer, TrainingSet
    from t2i_evolve.world import GrammarPrompts, ProceduralTeacher

    base = T2IModel.from_pretrained(model_dir)
    shapes = TrainingSet.from_generator(ProceduralTeacher(), GrammarPrompts().sample(8, seed=4))
    full = TrainConfig(model=str(model_dir), output_dir=str(tmp_path / "full"), steps=30, batch_size=8, lr=2e-3,
                       warmup_steps=0, ema_decay=None, caption_dropout=0, tracker="none")
    Trainer(full, shapes).run()
    before, after = fixed_loss(base, shapes), fixed_loss(T2IModel.from_pretrained(tmp_path / "full" / "model"), shapes)
    assert after < 0.7 * before, (before, after)  # the flow-matching loss on the same noise and noise levels

    lora = TrainConfig(model=str(model_dir), output_dir=str(tmp_path / "lora"), steps=3, batch_size=4, lr=1e-2,
                       warmup_steps=0, lora=LoraSettings(rank=4), caption_dropout=0.5, ema_decay=None,
                       mixed_precision="bf16", gradient_checkpointing=True, tracker="none")
    Trainer(lora, shapes).run()
    saved = T2IModel.from_pretrained(tmp_path / "lora" / "model")
    names = {"unet": ("to_q", "to_k", "to_v", "to_out.0"), t5_part: ("q", "k", "v", "o")}
    for part in saved.trainable_parts():
        wanted = names.get(part, ("q_proj", "k_proj", "v_proj", "out_proj"))
        before = dict(getattr(base, part).named_parameters())
        changed = [n for n, p in getattr(saved, part).named_parameters() if not torch.equal(p, before[n])]
        assert changed and all(n.rsplit(".", 1)[0].endswith(tuple(f".{t}" for t in wanted)) for n in changed), part


def build_teacher_ledger(folder, n: int, seed: int, deleted: int = 0):
    """A run folder whose ledger holds `n` strong-teacher images of grammar prompts, the last `deleted` of them
    deleted by the judge (replayable)."""
    from t2i_evolve.data import Ledger
    from t2i_evolve.world import GrammarPrompts, ProceduralTeacher

    prompts = GrammarPrompts().sample(n, seed=seed)
    with Ledger(folder) as ledger:
        for i, (prompt, image) in enumerate(zip(prompts, ProceduralTeacher().generate(prompts, list(range(n))))):
            record = ledger.add_record(prompt=prompt, generator="strong", seed=i, image=image)
            if i >= n - deleted:
                ledger.delete_record(record, round=1, reason="base as good")
    return folder
