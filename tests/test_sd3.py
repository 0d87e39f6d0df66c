"""Stable Diffusion 3 folders (random-init, built from configs): flow matching, two CLIP encoders and T5 (or zeros in
its place). Our sampler draws what diffusers' SD3 pipeline draws from the same weights and noise; such a folder
saves as one diffusers loads, learns under the flow-matching loss, trains LoRA on its four parts and goes through the
evolve recipe."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection

from builders import check_learns_and_trains_lora, copy_with_index
from t2i_evolve.errors import UserError
from t2i_evolve.models import SamplerConfig, T2IModel, sample_pixels
from t2i_evolve.models.sampler import initial_noise
from t2i_evolve.train import LoraSettings, TrainConfig, Trainer, TrainingSet
from t2i_evolve.world import GrammarPrompts, ProceduralTeacher

PROMPTS = ["a red circle", "two blue squares left of a green star"]


def without_t5(sd3_dir, folder):
    """The folder with no T5 (SD3 runs without it: zeros where its states would be)."""
    shutil.copytree(sd3_dir, folder)
    for part in ("text_encoder_3", "tokenizer_3"):
        shutil.rmtree(folder / part)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"text_encoder_3": [None, None], "tokenizer_3": [None, None]}))
    return folder


@pytest.mark.parametrize("t5", [True, False], ids=["with-t5", "without-t5"])
@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_our_sampler_draws_what_the_sd3_pipeline_draws(t5, guidance, sd3_dir, tmp_path):
    """Both CLIPs' penultimate states padded beside T5's, their pooled projections, the empty prompt's embedding
    for guidance, and the flow-matching Euler steps, on the same noise."""
    model = T2IModel.from_pretrained(sd3_dir if t5 else without_t5(sd3_dir, tmp_path / "no-t5"))
    assert model.is_sd3 and model.is_flow and not model.is_sdxl and (model.text_encoder_3 is not None) == t5
    config = SamplerConfig(steps=3, guidance=guidance)
    ours = (sample_pixels(model, PROMPTS, [0, 1], config) + 1) / 2
    pipeline = StableDiffusion3Pipeline(
        transformer=model.unet, scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config),
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2,
        tokenizer_2=model.tokenizer_2, text_encoder_3=model.text_encoder_3, tokenizer_3=model.tokenizer_3)
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipeline(PROMPTS, num_inference_steps=3, guidance_scale=guidance, latents=initial_noise(model, [0, 1]),
                          height=model.resolution, width=model.resolution, output_type="pt").images
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)
    other = (sample_pixels(model, PROMPTS[::-1], [0, 1], config) + 1) / 2  # (a model deaf to its text would pass too)
    assert (other - ours).abs().max() > 1e-3


def test_an_sd3_folder_saves_as_diffusers_loads_it_learns_and_trains_lora_on_its_four_parts(sd3_dir, tmp_path):
    assert set(T2IModel.from_pretrained(sd3_dir).trainable_parts()) == {"unet", "text_encoder", "text_encoder_2",
                                                                         "text_encoder_3"}
    check_learns_and_trains_lora(sd3_dir, tmp_path, t5_part="text_encoder_3")
    pipeline = StableDiffusion3Pipeline.from_pretrained(tmp_path / "lora" / "model")  # a folder diffusers loads
    assert type(pipeline.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert type(pipeline.text_encoder_3).__name__ == "T5EncoderModel"


def test_lora_targets_that_name_no_layer_of_a_text_encoder_are_one_line(sd3_dir, tmp_path):
    """CLIP's names given for every text encoder: SD3's T5 has none of them."""
    shapes = TrainingSet.from_generator(ProceduralTeacher(), GrammarPrompts().sample(4, seed=4))
    config = TrainConfig(model=str(sd3_dir), output_dir=str(tmp_path), steps=1, batch_size=2, tracker="none",
                         lora=LoraSettings(rank=2, text_encoder_targets=["q_proj", "v_proj"]))
    with pytest.raises(UserError, match="lora targets \\['q_proj', 'v_proj'\\] match no layer of text_encoder_3 "
                                        "\\(T5EncoderModel\\): name its own \\(T5's: q, k, v, o"):
        Trainer(config, shapes)


def test_evolve_trains_an_sd3_base(sd3_dir, tmp_path):
    from evolve_worker import small_config
    from t2i_evolve.recipes.evolve import run_evolve

    summary = run_evolve(small_config(str(tmp_path), base_model=str(sd3_dir), rounds=1, seed_prompts=12,
                                      eval_prompts=4, ema_decay=None, lora={"rank": 2}))
    assert sum(summary["rounds"][0]["ops"].values()) > 0 and summary["final_score"] is not None
    trained, base = (T2IModel.from_pretrained(folder) for folder in (tmp_path / "rounds" / "001" / "model", sd3_dir))
    assert trained.is_sd3
    changed = [n for n, p in trained.unet.named_parameters() if not torch.equal(p, dict(base.unet.named_parameters())[n])]
    assert changed and all(".to_" in n for n in changed)  # the round's adapters, merged into the attention layers


def test_an_sd3_folder_it_would_misread_is_one_line(sd3_dir, tmp_path):
    shifting = shutil.copytree(sd3_dir, tmp_path / "shifting")  # (Flux's schedule)
    config = json.loads((shifting / "scheduler" / "scheduler_config.json").read_text())
    (shifting / "scheduler" / "scheduler_config.json").write_text(json.dumps(config | {"use_dynamic_shifting": True}))
    with pytest.raises(UserError, match="SD3 with a flow-matching schedule that shifts dynamically \\(Flux's\\) is not"):
        T2IModel.from_pretrained(shifting)

    ddpm = copy_with_index(sd3_dir, tmp_path / "ddpm", scheduler=["diffusers", "DDPMScheduler"])
    with pytest.raises(UserError, match="DDPMScheduler noise schedule is not supported yet for this model \\(SD3 trains"):
        T2IModel.from_pretrained(ddpm)

    half = without_t5(sd3_dir, tmp_path / "half-t5")  # (T5's encoder back, its tokenizer not)
    shutil.copytree(sd3_dir / "text_encoder_3", half / "text_encoder_3")
    index = json.loads((half / "model_index.json").read_text())
    (half / "model_index.json").write_text(json.dumps(index | {"text_encoder_3": ["transformers", "T5EncoderModel"]}))
    with pytest.raises(UserError, match="needs both text_encoder_3 and tokenizer_3, or neither"):
        T2IModel.from_pretrained(half)

    narrow = shutil.copytree(sd3_dir, tmp_path / "narrow")  # (a second CLIP projecting to 16, not 32)
    config = CLIPTextModelWithProjection.from_pretrained(narrow / "text_encoder_2").config
    config.projection_dim = 16
    CLIPTextModelWithProjection(config).save_pretrained(narrow / "text_encoder_2")
    with pytest.raises(UserError, match="reads pooled vectors 64 wide .* its text encoders give 48"):
        T2IModel.from_pretrained(narrow)
