"""The model adapter, the tiny shapes-world model and the sampler, on random weights (no hub, no GPU)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from t2i_evolve.errors import ConfigError, UserError
from t2i_evolve.models import (
    PromptEmbeds,
    Sampler,
    SamplerConfig,
    T2IModel,
    TinyModelConfig,
    init_tiny_model,
    longest_prompt_tokens,
    resolve_device,
    sample_pixels,
    to_pil,
    to_pixels,
)
from t2i_evolve.protocols import Generator
from t2i_evolve.world.render import render

PROMPTS = ["a red circle", "two big blue squares left of a small green star", "three yellow triangles"]
FAST = SamplerConfig(steps=6)


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> T2IModel:
    return T2IModel.from_pretrained(tiny_dir)


def test_tiny_folder_is_diffusers_style_and_safetensors_only(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["vae"] == [None, None]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    weights = [p for p in tiny_dir.rglob("*") if p.suffix in {".safetensors", ".bin", ".pt", ".ckpt", ".pth"}]
    assert sorted(p.parent.name for p in weights) == ["text_encoder", "unet"]
    assert all(p.suffix == ".safetensors" for p in weights)
    with pytest.raises(UserError, match="not empty"):
        init_tiny_model(tiny_dir)


def test_tiny_model_shapes_and_schedule(tiny):
    assert tiny.vae is None and tiny.resolution == 32 and tiny.latent_shape() == (3, 32, 32)
    assert tiny.prediction_type == "v_prediction"
    assert tiny.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert tiny.max_length == longest_prompt_tokens() == 18
    pixels = to_pixels([render(p, seed=0)[0] for p in PROMPTS])
    assert torch.equal(tiny.decode(tiny.encode_images(pixels)), pixels)  # pixel space: identity
    assert set(tiny.trainable_parts()) == {"unet", "text_encoder"}


def test_tokenizer_covers_the_grammar(tiny):
    ids = tiny.tokenize(PROMPTS + ["Three BIG cyan stars above two magenta circles right of an orange square"])
    tok = tiny.tokenizer
    assert (ids[:, 0] == tok.bos_token_id).all() and (ids == tok.eos_token_id).sum(1).eq(1).all()
    assert not (ids[:3] == tok.unk_token_id).any()
    assert (ids[3] == tok.unk_token_id).sum() == 1  # "orange" is not a grammar colour
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tiny.text_encoder.config.eos_token_id == tok.eos_token_id


def test_pooled_text_is_the_eos_state(tiny):
    prompts = ["a red circle", "two blue stars above a big green square", ""]
    ids = tiny.tokenize(prompts)
    eos = (ids == tiny.tokenizer.eos_token_id).int().argmax(1)
    assert len(set(eos.tolist())) == 3
    with torch.no_grad():
        text = tiny.encode_prompts(prompts)
    assert text.hidden.shape == (3, 18, 64) and text.pooled.shape == (3, 64)
    torch.testing.assert_close(text.pooled, text.hidden[torch.arange(3), eos])


def _arrays(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_sampler_is_deterministic_per_prompt_and_seed(tiny):
    """Bitwise per (prompt, seed) at one batch size, whatever the other items and their order.

    Across batch sizes CPU kernels round differently (about 1e-6), so a value may move by one level.
    """
    sampler = Sampler(tiny, FAST)
    assert isinstance(sampler, Generator)
    seeds = [0, 1, 2]
    together = _arrays(sampler.generate(PROMPTS, seeds))
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in sampler.generate(PROMPTS[:1], [0]))
    reordered = _arrays(sampler.generate(PROMPTS[::-1], seeds[::-1])[::-1])
    assert np.array_equal(together, reordered)
    others = _arrays(sampler.generate([PROMPTS[0], "a cyan star", "two red stars"], [0, 5, 6]))
    assert np.array_equal(together[0], others[0]) and not np.array_equal(together[1], others[1])
    alone = _arrays([sampler.generate([p], [s])[0] for p, s in zip(PROMPTS, seeds)])
    chunked = _arrays(Sampler(tiny, FAST.model_copy(update={"batch_size": 2})).generate(PROMPTS, seeds))
    assert np.abs(together - alone).max() <= 1 and np.abs(together - chunked).max() <= 1
    assert not np.array_equal(together[0], _arrays(sampler.generate(PROMPTS[:1], [7]))[0])


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
def test_dpm_solver_and_guidance_run(tiny):
    config = SamplerConfig(scheduler="dpm++", steps=4, guidance=2.0)
    sampler = Sampler(tiny, config)
    assert sampler.id == "model:dpm++-4-cfg2"
    images = sampler.generate(PROMPTS[:2], [0, 1])
    assert [im.size for im in images] == [(32, 32)] * 2


def _unet_grad_calls(model, run):
    """Run `run()` and return, per UNet call, whether it recorded gradients."""
    calls = []
    handle = model.unet.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    try:
        out = run()
    finally:
        handle.remove()
    return out, calls


def test_gradients_flow_through_the_last_k_steps_only(tiny):
    tiny.unet.zero_grad(set_to_none=True)
    tiny.text_encoder.zero_grad(set_to_none=True)
    out, calls = _unet_grad_calls(tiny, lambda: sample_pixels(tiny, PROMPTS[:2], [0, 1], FAST, grad_steps=2))
    assert calls == [False] * 4 + [True] * 2
    assert out.shape == (2, 3, 32, 32) and out.requires_grad
    out.mean().backward()
    for part in tiny.trainable_parts().values():
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0
    unet_grad = tiny.unet.conv_in.weight.grad.clone()

    tiny.unet.zero_grad(set_to_none=True)
    tiny.text_encoder.zero_grad(set_to_none=True)
    out = sample_pixels(tiny, PROMPTS[:2], [0, 1], FAST, grad_steps=2, checkpoint=True)
    out.mean().backward()
    torch.testing.assert_close(tiny.unet.conv_in.weight.grad, unet_grad)
    tiny.unet.zero_grad(set_to_none=True)
    tiny.text_encoder.zero_grad(set_to_none=True)

    out, calls = _unet_grad_calls(tiny, lambda: sample_pixels(tiny, PROMPTS[:2], [0, 1], FAST, grad_steps=0))
    assert calls == [False] * 6 and not out.requires_grad
    with pytest.raises(ValueError, match="grad_steps"):
        sample_pixels(tiny, PROMPTS[:1], [0], FAST, grad_steps=7)


def test_save_and_reload_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "copy")
    again = T2IModel.from_pretrained(tmp_path / "copy")
    for name, value in tiny.unet.state_dict().items():
        assert torch.equal(value, again.unet.state_dict()[name])
    with torch.no_grad():
        torch.testing.assert_close(again.encode_prompts(PROMPTS).pooled, tiny.encode_prompts(PROMPTS).pooled)


def test_bad_folders_are_user_errors(tiny_dir, tmp_path):
    with pytest.raises(UserError, match="not found"):
        T2IModel.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(UserError, match="model_index.json"):
        T2IModel.from_pretrained(tiny_dir / "unet")

    missing = shutil.copytree(tiny_dir, tmp_path / "missing")
    shutil.rmtree(missing / "text_encoder")
    with pytest.raises(UserError, match="missing part 'text_encoder'"):
        T2IModel.from_pretrained(missing)

    pickled = shutil.copytree(tiny_dir, tmp_path / "pickled")
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    with pytest.raises(UserError, match="unet/ has no .safetensors") as info:
        T2IModel.from_pretrained(pickled)
    assert "\n" not in str(info.value)
    index = json.loads((pickled / "model_index.json").read_text())  # a factory class is no way past that check
    (pickled / "model_index.json").write_text(json.dumps(index | {"unet": ["diffusers", "AutoModel"]}))
    with pytest.raises(UserError, match="names AutoModel for 'unet', which is not a Module class"):
        T2IModel.from_pretrained(pickled)

    corrupt = shutil.copytree(tiny_dir, tmp_path / "corrupt")
    (corrupt / "text_encoder" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(UserError, match="cannot load text_encoder"):
        T2IModel.from_pretrained(corrupt)


def test_devices_by_name(tiny_dir):
    """"auto" takes a GPU when there is one; a device this machine lacks is one clear line, before any work."""
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert T2IModel.from_pretrained(tiny_dir, "auto").device.type == expected
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(UserError, match="CUDA devices here"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")  # one past the last


def test_folder_resolution_reads_configs_only(tiny, tiny_dir, sd_dir, tmp_path):
    assert T2IModel.folder_resolution(tiny_dir) == tiny.resolution == 32
    assert T2IModel.folder_resolution(sd_dir) == T2IModel.from_pretrained(sd_dir).resolution == 32  # 16 latents x 2
    no_weights = shutil.copytree(sd_dir, tmp_path / "no-weights")
    for weights in no_weights.rglob("*.safetensors"):
        weights.unlink()  # a recipe asking its teachers for a size must not need (or load) the weights
    assert T2IModel.folder_resolution(no_weights) == 32
    with pytest.raises(UserError, match="model_index.json"):
        T2IModel.folder_resolution(tmp_path)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="norm_num_groups"):
        TinyModelConfig.from_dict({"norm_num_groups": 7})
    with pytest.raises(ConfigError, match="max_length"):
        TinyModelConfig.from_dict({"max_length": 12})


# -- a Stable-Diffusion-style latent model, built from configs ------------------------------------------


def test_stable_diffusion_style_folder_trains_and_samples(sd_dir):
    model = T2IModel.from_pretrained(sd_dir)
    assert model.latent_scale == 2 and model.resolution == 32 and model.max_length == 24
    assert model.prediction_type == "epsilon"
    assert not model.scheduler.config.clip_sample  # DDPM's default would clip latents to [-1, 1]
    pixels = to_pixels([render(p, seed=0)[0] for p in PROMPTS])
    with torch.no_grad():
        latents = model.encode_images(pixels)
        assert latents.shape == (3, 4, 16, 16)
        assert model.decode(latents).shape == (3, 3, 32, 32)
    text = model.encode_prompts(PROMPTS)
    assert isinstance(text, PromptEmbeds) and text.hidden.shape == (3, 24, 32)

    params = [p for part in model.trainable_parts().values() for p in part.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(4):
        loss = model.denoising_loss(latents, model.encode_prompts(PROMPTS), generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.vae.parameters())

    images = Sampler(model, SamplerConfig(steps=3)).generate(PROMPTS[:2], [0, 1])
    assert [(im.size, im.mode) for im in images] == [((32, 32), "RGB")] * 2
    assert to_pil(to_pixels(images))[0].tobytes() == images[0].tobytes()
