"""Stable Diffusion and SDXL folders (random-init, built from configs): our sampler draws what diffusers' own
pipelines draw from the same weights, noise and settings, and an SDXL folder trains, LoRA included."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModelWithProjection

from builders import diffusers_pipeline
from t2i_evolve.errors import UserError
from t2i_evolve.models import SamplerConfig, T2IModel, sample_pixels
from t2i_evolve.models.sampler import initial_noise
from t2i_evolve.train import LoraSettings, TrainConfig, Trainer, TrainingSet
from t2i_evolve.world import GrammarPrompts, ProceduralTeacher

PROMPTS = ["a red circle", "two blue squares left of a green star"]


@pytest.fixture(scope="module")
def sdxl(sdxl_dir) -> T2IModel:
    return T2IModel.from_pretrained(sdxl_dir)


@pytest.mark.parametrize("folder", ["sd_dir", "sdxl_dir"])
@pytest.mark.parametrize("guidance", [1.0, 3.0, 0.5])  # (0.5: as 1, no guidance, as diffusers decides it)
def test_our_sampler_draws_what_the_diffusers_pipeline_draws(folder, guidance, request):
    """Text conditioning (SDXL: both encoders' penultimate states, the pooled projection, size ids), the
    unconditional branch (SDXL: zeros) and the DDIM loop, checked against diffusers on the same noise."""
    model = T2IModel.from_pretrained(request.getfixturevalue(folder))
    config = SamplerConfig(scheduler="ddim", steps=3, guidance=guidance)
    ours = (sample_pixels(model, PROMPTS, [0, 1], config) + 1) / 2
    with torch.no_grad():
        theirs = diffusers_pipeline(model)(
            PROMPTS, num_inference_steps=3, guidance_scale=guidance, latents=initial_noise(model, [0, 1]),
            height=model.resolution, width=model.resolution, output_type="pt").images
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)
    if guidance == 1.0:  # (and the prompts matter: a model deaf to its text would pass the check above as well)
        other = (sample_pixels(model, PROMPTS[::-1], [0, 1], config) + 1) / 2
        assert (other - ours).abs().max() > 1e-3


def test_an_sdxl_folder_loads_encodes_and_saves_as_sdxl(sdxl, sdxl_dir, tmp_path):
    assert sdxl.is_sdxl and sdxl.zeros_for_empty_prompt and sdxl.pipeline_class == "StableDiffusionXLPipeline"
    assert set(sdxl.trainable_parts()) == {"unet", "text_encoder", "text_encoder_2"}
    ids = sdxl.tokenize(PROMPTS)
    assert ids.shape == (2, 2, sdxl.max_length)  # a row of ids per tokenizer
    text = sdxl.encode_prompts(PROMPTS)
    assert text.hidden.shape == (2, sdxl.max_length, 64) and text.pooled.shape == (2, 16)  # 32 + 32 wide; projected
    empty = sdxl.encode_empty(2)
    assert not empty.hidden.any() and not empty.pooled.any()  # as diffusers' SDXL pipeline samples guidance
    dropped = sdxl.encode_tokens(ids, drop=torch.tensor([True, False]))
    assert not dropped.hidden[0].any() and torch.equal(dropped.hidden[1], text.hidden[1])  # dropout: what it samples

    saved = T2IModel.from_pretrained(sdxl.save_pretrained(tmp_path / "copy"))
    index = json.loads((tmp_path / "copy" / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["force_zeros_for_empty_prompt"] is True and saved.is_sdxl
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]  # its own, though training reads it as DDPM's
    pipeline = StableDiffusionXLPipeline.from_pretrained(tmp_path / "copy")  # a folder diffusers loads as it was
    assert type(pipeline.scheduler).__name__ == "PNDMScheduler" and pipeline.config.force_zeros_for_empty_prompt
    config = SamplerConfig(steps=2, guidance=2.0)
    assert torch.equal(sample_pixels(saved, PROMPTS, [3, 4], config), sample_pixels(sdxl, PROMPTS, [3, 4], config))

    keeps_empty = shutil.copytree(sdxl_dir, tmp_path / "keeps-empty")
    index = json.loads((keeps_empty / "model_index.json").read_text())
    (keeps_empty / "model_index.json").write_text(json.dumps(index | {"force_zeros_for_empty_prompt": False}))
    model = T2IModel.from_pretrained(keeps_empty)
    assert torch.equal(model.encode_empty(1).hidden, model.encode_prompts([""]).hidden)


def test_an_sdxl_folder_trains_with_lora_on_both_text_encoders(sdxl_dir, sdxl, tmp_path):
    prompts = GrammarPrompts().sample(8, seed=4)
    data = TrainingSet.from_generator(ProceduralTeacher(), prompts)
    config = TrainConfig(model=str(sdxl_dir), output_dir=str(tmp_path), steps=4, batch_size=4, lr=1e-2, warmup_steps=0,
                         lora=LoraSettings(rank=4), caption_dropout=0.5, random_flip=True, ema_decay=None,
                         mixed_precision="bf16", gradient_checkpointing=True, tracker="none")  # (as on a GPU)
    trainer = Trainer(config, data)
    assert set(trainer.modules) == {"unet", "text_encoder", "text_encoder_2"}
    trainer.run()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(loss) for loss in losses)  # through SDXL's conditioning, dropout and flips
    saved = T2IModel.from_pretrained(tmp_path / "model")
    assert saved.is_sdxl
    for part in ("unet", "text_encoder", "text_encoder_2"):
        before = dict(getattr(sdxl, part).named_parameters())
        changed = [n for n, p in getattr(saved, part).named_parameters() if not torch.equal(p, before[n])]
        assert changed and all(any(t in n for t in ("to_", "q_proj", "k_proj", "v_proj", "out_proj")) for n in changed), part


def test_an_sdxl_folder_that_lacks_a_half_is_one_line(sd_dir, sdxl_dir, tmp_path):
    """SDXL's UNet wants the pooled vector and sizes that only a second text encoder gives, and the reverse."""
    unet_only = shutil.copytree(sd_dir, tmp_path / "unet-only")
    shutil.rmtree(unet_only / "unet")
    shutil.copytree(sdxl_dir / "unet", unet_only / "unet")
    with pytest.raises(UserError, match="needs both a second text encoder .* this folder has no text_encoder_2"):
        T2IModel.from_pretrained(unet_only)

    encoder_only = shutil.copytree(sdxl_dir, tmp_path / "encoder-only")
    shutil.rmtree(encoder_only / "unet")
    shutil.copytree(sd_dir / "unet", encoder_only / "unet")
    with pytest.raises(UserError, match="has a text_encoder_2 but no size conditioning"):
        T2IModel.from_pretrained(encoder_only)

    no_tokenizer = shutil.copytree(sdxl_dir, tmp_path / "no-tokenizer")
    index = json.loads((no_tokenizer / "model_index.json").read_text())
    (no_tokenizer / "model_index.json").write_text(json.dumps(index | {"tokenizer_2": [None, None]}))
    with pytest.raises(UserError, match="no 'tokenizer_2', which every model needs"):
        T2IModel.from_pretrained(no_tokenizer)

    wide = shutil.copytree(sdxl_dir, tmp_path / "wide-projection")
    encoder = CLIPTextModelWithProjection.from_pretrained(wide / "text_encoder_2")
    config = encoder.config
    config.projection_dim = 24
    CLIPTextModelWithProjection(config).save_pretrained(wide / "text_encoder_2")
    with pytest.raises(UserError, match="the UNet expects 64 added features, text_encoder_2's pooled vector \\(24\\)"):
        T2IModel.from_pretrained(wide)
