"""Flux folders (random-init, built from configs): flow matching over 2 x 2 latent patches, T5's states and CLIP's pooled
vector, guidance read as an input (dev) or none (schnell). Our sampler draws what diffusers' Flux pipeline draws from
the same weights and noise; such a folder saves as one diffusers loads, learns under the flow-matching loss, trains
LoRA on its three parts, goes through the evolve recipe and draws as a local teacher with its family's settings."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import FluxPipeline
from transformers import T5Config, T5EncoderModel

from builders import build_tiny_flux, check_learns_and_trains_lora, copy_with_index, diffusers_pipeline
from t2i_evolve.errors import UserError
from t2i_evolve.generators import LocalPipelineTeacher
from t2i_evolve.models import SamplerConfig, T2IModel, flux, make_scheduler, sample_pixels
from t2i_evolve.models.sampler import initial_noise
from t2i_evolve.train import TrainConfig, Trainer, TrainingSet
from t2i_evolve.world import GrammarPrompts, ProceduralTeacher

PROMPTS = ["a red circle", "two blue squares left of a green star"]


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory):
    """A Flux-schnell-style folder: no guidance input, an unshifted schedule."""
    return build_tiny_flux(tmp_path_factory.mktemp("schnell") / "tiny-schnell", guidance_embeds=False)


@pytest.mark.parametrize("variant, guidance", [("dev", 3.5), ("dev", 1.0), ("schnell", 1.0), ("schnell", 4.0),
                                               ("schnell", 0.0)])  # (its usual 0.0: no guidance at all)
def test_our_sampler_draws_what_the_flux_pipeline_draws(variant, guidance, flux_dir, schnell_dir):
    """Patches as tokens at their positions, T5's states and CLIP's pooled vector, the guidance dev reads (schnell:
    classifier-free guidance against the empty prompt, the pipeline's `true_cfg_scale`, above 1 alone), and the
    pipeline's noise levels shifted for the image's size, on the same noise."""
    model = T2IModel.from_pretrained(flux_dir if variant == "dev" else schnell_dir)
    assert model.is_flux and model.is_flow and not model.is_sdxl and model.embeds_guidance == (variant == "dev")
    assert model.max_length == 24 + flux.T5_TOKENS[variant] == model.tokenize(PROMPTS).shape[1]  # CLIP's, T5's
    ours = (sample_pixels(model, PROMPTS, [0, 1], SamplerConfig(steps=3, guidance=guidance)) + 1) / 2
    pipeline = diffusers_pipeline(model)
    pipeline.set_progress_bar_config(disable=True)
    cfg = {"true_cfg_scale": guidance, "negative_prompt": ""} if variant == "schnell" and guidance > 1.0 else {}
    with torch.no_grad():
        theirs = pipeline(PROMPTS, num_inference_steps=3, guidance_scale=guidance, height=model.resolution,
                          width=model.resolution, latents=flux.pack(initial_noise(model, [0, 1])), output_type="pt",
                          max_sequence_length=flux.T5_TOKENS[variant], **cfg).images
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)
    other = (sample_pixels(model, PROMPTS[::-1], [0, 1], SamplerConfig(steps=3, guidance=guidance)) + 1) / 2
    assert (other - ours).abs().max() > 1e-3  # (a model deaf to its text would pass the comparison too)


def test_patches_go_back_where_they_came_from_and_sizes_shift_the_schedule(flux_dir):
    latents = torch.randn(2, 4, 6, 8)
    tokens = flux.pack(latents)
    assert tokens.shape == (2, 12, 16) and torch.equal(flux.unpack(tokens, 6, 8), latents)
    assert torch.equal(tokens[0, 5, :4], latents[0, 0, 2:4, 2:4].reshape(-1))  # patch row 1, column 1; channel 0 first
    assert flux.image_positions(6, 8, torch.device("cpu"), torch.float32)[5].tolist() == [0, 1, 1]
    with pytest.raises(UserError, match="even sides"):
        flux.pack(torch.zeros(1, 4, 5, 6))
    model = T2IModel.from_pretrained(flux_dir)
    small, large = (make_scheduler(model, "ddim", 4, side).sigmas[1].item() for side in (32, 256))
    assert 0 < small < large < 1  # more tokens, more of the steps at high noise (as the pipeline shifts them)


def test_a_flux_folder_saves_as_diffusers_loads_it_learns_and_trains_lora_on_its_three_parts(flux_dir, tmp_path):
    assert set(T2IModel.from_pretrained(flux_dir).trainable_parts()) == {"unet", "text_encoder", "text_encoder_2"}
    check_learns_and_trains_lora(flux_dir, tmp_path, t5_part="text_encoder_2")
    pipeline = FluxPipeline.from_pretrained(tmp_path / "lora" / "model")  # a folder diffusers loads
    assert type(pipeline.transformer).__name__ == "FluxTransformer2DModel" and pipeline.transformer.config.guidance_embeds
    assert T2IModel.from_pretrained(tmp_path / "lora" / "model").resolution == 32  # (its config's sample size, kept)


def test_evolve_trains_a_flux_base_and_a_flux_folder_is_a_local_teacher(flux_dir, schnell_dir, tmp_path):
    from evolve_worker import small_config
    from t2i_evolve.recipes.evolve import run_evolve

    summary = run_evolve(small_config(str(tmp_path), base_model=str(flux_dir), rounds=1, seed_prompts=12,
                                      eval_prompts=4, ema_decay=None, lora={"rank": 2}))
    assert sum(summary["rounds"][0]["ops"].values()) > 0 and summary["final_score"] is not None
    trained = T2IModel.from_pretrained(tmp_path / "rounds" / "001" / "model")
    base = dict(T2IModel.from_pretrained(flux_dir).unet.named_parameters())
    changed = [n for n, p in trained.unet.named_parameters() if not torch.equal(p, base[n])]
    assert trained.is_flux and changed and all(".to_" in n for n in changed)  # adapters merged into attention

    for folder, steps, guidance in ((flux_dir, 28, 3.5), (schnell_dir, 4, 1.0)):  # each variant's usual settings
        teacher = LocalPipelineTeacher(folder, sampler={"batch_size": 2})
        assert teacher.config.runner == "t2i-evolve" and ":flow-euler-" in teacher.id
        assert (teacher.sampler.config.steps, teacher.sampler.config.guidance) == (steps, guidance)
    images = LocalPipelineTeacher(schnell_dir).generate(PROMPTS, [0, 1])
    assert [image.size for image in images] == [(32, 32)] * 2


def test_a_flux_folder_it_would_misread_is_one_line(flux_dir, sd3_dir, tmp_path):
    wide = shutil.copytree(flux_dir, tmp_path / "wide")  # (a T5 of 32-wide states, the transformer reads 64)
    config = T5Config.from_pretrained(wide / "text_encoder_2")
    config.d_model = 32
    T5EncoderModel(config).save_pretrained(wide / "text_encoder_2")
    with pytest.raises(UserError, match="reads pooled vectors 32 wide and text 64 wide; its text encoders give 32 "
                                        "\\(CLIP\\) and 32 \\(T5\\)"):
        T2IModel.from_pretrained(wide)

    ddpm = copy_with_index(flux_dir, tmp_path / "ddpm", scheduler=["diffusers", "DDPMScheduler"])
    with pytest.raises(UserError, match="DDPMScheduler noise schedule is not supported yet for this model \\(Flux trains"):
        T2IModel.from_pretrained(ddpm)

    pixels = copy_with_index(flux_dir, tmp_path / "no-vae", vae=[None, None])
    with pytest.raises(UserError, match="Flux draws a VAE's latents, and model_index.json names no vae"):
        T2IModel.from_pretrained(pixels)

    odd = T2IModel.from_pretrained(flux_dir)
    with pytest.raises(UserError, match="Flux draws latents of even sides; 9 x 9"):
        sample_pixels(odd, PROMPTS[:1], [0], SamplerConfig(steps=1, resolution=18))


def test_a_run_resumed_from_its_checkpoint_ends_with_the_weights_of_an_unbroken_one(flux_dir, tmp_path):
    """T5 trains with dropout (0.1), drawn from torch's global generator: seeded from the step, so a run resumed
    from a checkpoint draws what the unbroken one drew (it did not: every part ended up to 0.007 apart)."""
    from safetensors.torch import load_file

    shapes = TrainingSet.from_generator(ProceduralTeacher(), GrammarPrompts().sample(8, seed=4))
    run = dict(model=str(flux_dir), batch_size=4, lr=1e-3, warmup_steps=0, ema_decay=None, checkpoint_every=2,
               tracker="none")
    Trainer(TrainConfig(**run, output_dir=str(tmp_path / "unbroken"), steps=4), shapes).run()
    for steps in (2, 4):  # stopped at its checkpoint, then the same run on
        Trainer(TrainConfig(**run, output_dir=str(tmp_path / "resumed"), steps=steps), shapes).run()
    for part in ("transformer", "text_encoder", "text_encoder_2"):
        unbroken, resumed = (load_file(next((tmp_path / name / "model" / part).glob("*.safetensors")))
                             for name in ("unbroken", "resumed"))
        assert unbroken.keys() == resumed.keys()
        assert all(torch.equal(unbroken[name], resumed[name]) for name in unbroken), part
