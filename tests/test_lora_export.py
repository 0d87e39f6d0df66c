"""Adapters written as diffusers' LoRA file beside the merged model: diffusers' own pipeline over the base, with
`load_lora_weights`, draws what our sampler draws from the merged model; a family whose format cannot hold every
adapted part gets no file, and never keeps an earlier one."""

from __future__ import annotations

import errno
import functools

import pytest
import safetensors.torch
import torch
from builders import diffusers_pipeline
from t2i_evolve.models import SamplerConfig, T2IModel, flux, sample_pixels
from t2i_evolve.models.sampler import initial_noise
from t2i_evolve.train import LoraSettings, TrainConfig, Trainer, TrainingSet
from t2i_evolve.train.lora import ADAPTER_FILE
from t2i_evolve.world import GrammarPrompts, ProceduralTeacher

PROMPTS = ["a red circle", "two blue squares left of a green star"]


@pytest.fixture(scope="module")
def shapes():
    return TrainingSet.from_generator(ProceduralTeacher(), GrammarPrompts().sample(8, seed=4))


def pipeline_call(model: T2IModel, guidance: float) -> dict:
    """The keywords that make `diffusers_pipeline(model)` draw PROMPTS as our sampler does: 3 steps, seeds 0 and 1
    (Flux: its latents packed, T5 at dev's length)."""
    noise, extra = initial_noise(model, [0, 1]), {}
    if model.is_flux:
        noise, extra = flux.pack(noise), {"max_sequence_length": flux.T5_TOKENS["dev"]}
    return dict(num_inference_steps=3, guidance_scale=guidance, latents=noise, height=model.resolution,
                width=model.resolution, output_type="pt", **extra)


@pytest.mark.parametrize("folder, text_encoders, text_targets", [
    ("sd_dir", True, None), ("sdxl_dir", True, None), ("flux_dir", False, None),
    ("sd_dir", True, ["fc1", "fc2"])])  # (CLIP's feed-forward layers alone: diffusers reads them in its own naming)
def test_diffusers_loads_the_adapters_onto_the_base_and_draws_what_the_merged_model_draws(folder, text_encoders,
                                                                                        text_targets, shapes, request,
                                                                                        tmp_path):
    base_dir = request.getfixturevalue(folder)
    lora = LoraSettings(rank=4, alpha=8, **({"text_encoder_targets": text_targets} if text_targets else {}))
    config = TrainConfig(model=str(base_dir), output_dir=str(tmp_path), steps=3, batch_size=4, lr=1e-2,
                         warmup_steps=0, lora=lora, train_text_encoder=text_encoders, ema_decay=None, tracker="none")
    Trainer(config, shapes).run()
    written = safetensors.torch.load_file(tmp_path / "lora" / ADAPTER_FILE)
    encoders = {key.split(".")[0] for key in written} - {"unet", "transformer"}
    assert encoders == ({"text_encoder", "text_encoder_2"} if folder == "sdxl_dir" else {"text_encoder"} if text_encoders
                        else set())
    # CLIP's layers under `text_model.`, as diffusers' own files and transformers 4 name them (5 flattens CLIPTextModel)
    assert all(key.split(".")[1] == "text_model" for key in written if key.split(".")[0] in encoders)

    guidance = 3.5 if folder == "flux_dir" else 3.0
    merged = T2IModel.from_pretrained(tmp_path / "model")
    ours = (sample_pixels(merged, PROMPTS, [0, 1], SamplerConfig(steps=3, guidance=guidance)) + 1) / 2
    base = T2IModel.from_pretrained(base_dir)
    pipeline, call = diffusers_pipeline(base), pipeline_call(base, guidance)
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        before = pipeline(PROMPTS, **call).images
        pipeline.load_lora_weights(tmp_path / "lora")
        after = pipeline(PROMPTS, **call).images
    assert (before.float() - ours).abs().max() > 1e-2  # (the adapters change what is drawn)
    torch.testing.assert_close(ours, after.float(), atol=2e-4, rtol=0)


def test_adapters_a_format_cannot_hold_get_no_file_not_even_an_earlier_one(flux_dir, shapes, tmp_path):
    """Flux's LoRA files hold its transformer's and CLIP's adapters, not T5's: the merged model alone, and a file
    left by an earlier save (here planted) is removed, never left beside a model it did not make."""
    run = dict(model=str(flux_dir), output_dir=str(tmp_path), batch_size=4, lr=1e-2, warmup_steps=0,
               lora=LoraSettings(rank=4), ema_decay=None, tracker="none")
    Trainer(TrainConfig(**run, steps=2), shapes).run()
    assert not (tmp_path / "lora" / ADAPTER_FILE).exists() and (tmp_path / "model" / "model_index.json").is_file()
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / ADAPTER_FILE).write_bytes(b"an earlier save's")
    Trainer(TrainConfig(**run, steps=3), shapes).run()  # (the same run, on to more steps)
    assert not (tmp_path / "lora" / ADAPTER_FILE).exists()


def test_a_round_whose_adapters_the_disk_cut_short_is_trained_again_and_leaves_no_half_file(sd_dir, shapes, tmp_path,
                                                                                            monkeypatch):
    """The disk fills while an evolve round writes its LoRA file: no half file under the name diffusers loads, and no
    model_index.json (which tells a rerun the round is done), so the rerun saves both."""
    import diffusers

    from t2i_evolve.train.rounds import train_round

    real_save = diffusers.StableDiffusionPipeline.save_lora_weights.__func__

    @functools.wraps(real_save)  # (its signature: what the export reads to know where each part's adapters go)
    def fill_the_disk(cls, folder, **keywords):
        (folder / keywords["weight_name"]).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    settings = dict(batch_size=4, lr=1e-2, warmup_steps=0, lora=LoraSettings(rank=4), ema_decay=None, tracker="none")
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "save_lora_weights", classmethod(fill_the_disk))
    with pytest.raises(OSError, match="No space left"):
        train_round(tmp_path / "rounds", 1, sd_dir, lambda: shapes, 2, **settings)
    model = tmp_path / "rounds" / "001" / "model"
    assert not (model / "model_index.json").exists() and not (model.parent / "lora" / ADAPTER_FILE).exists()
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "save_lora_weights", classmethod(real_save))
    assert train_round(tmp_path / "rounds", 1, sd_dir, lambda: shapes, 2, **settings) == model
    assert (model / "model_index.json").is_file() and safetensors.torch.load_file(model.parent / "lora" / ADAPTER_FILE)


def test_lora_targets_peft_cannot_adapt_say_so_and_alpha_must_be_positive(sd_dir):
    from pydantic import ValidationError

    from t2i_evolve.errors import UserError
    from t2i_evolve.train.lora import add_lora

    unet = T2IModel.from_pretrained(sd_dir).unet
    with pytest.raises(UserError, match=r"name a LayerNorm in unet \(UNet2DConditionModel\), which LoRA cannot adapt: "
                                        r"name linear or convolution layers \(its attention's: to_q, to_k"):
        add_lora(unet, LoraSettings(rank=2, unet_targets=["norm1"]), "unet")
    with pytest.raises(UserError, match=r"match no layer of unet \(UNet2DConditionModel\): name its own \(its attent"):
        add_lora(unet, LoraSettings(rank=2, unet_targets=["no_such_layer"]), "unet")
    with pytest.raises(ValidationError, match="greater than 0"):
        LoraSettings(rank=2, alpha=0)


def test_a_run_killed_between_its_adapters_and_its_model_leaves_no_model_vouched_for(sd_dir, shapes, tmp_path,
                                                                                    monkeypatch):
    """Rerun to more steps and killed after writing the new adapters but before the new model: the earlier model's
    model_index.json is gone first, so no folder vouches for an old model beside new adapters."""
    from t2i_evolve.train import trainer as trainer_module

    run = dict(model=str(sd_dir), output_dir=str(tmp_path), batch_size=4, lr=1e-2, warmup_steps=0,
               lora=LoraSettings(rank=4), ema_decay=None, tracker="none")
    Trainer(TrainConfig(**run, steps=2), shapes).run()
    assert (tmp_path / "model" / "model_index.json").is_file()

    def killed(model):
        raise KeyboardInterrupt  # (as a kill between the two writes)

    monkeypatch.setattr(trainer_module, "merged_copy", killed)
    with pytest.raises(KeyboardInterrupt):
        Trainer(TrainConfig(**run, steps=3), shapes).run()
    assert (tmp_path / "lora" / ADAPTER_FILE).is_file() and not (tmp_path / "model" / "model_index.json").exists()
