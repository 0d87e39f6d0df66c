"""PixArt-alpha folders (EvolveDirector's own base; random-init, built from configs): our sampler draws what
diffusers' PixArt pipeline draws from the same weights and noise, and such a folder loads, saves, learns, trains
with LoRA on its T5 encoder and goes through the evolve recipe."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
import socket

import diffusers
from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline
from transformers import T5Config, T5EncoderModel

from builders import build_tiny_pixart, fixed_loss
from t2i_evolve.errors import UserError
from t2i_evolve.models import SamplerConfig, T2IModel, sample_pixels
from t2i_evolve.models.sampler import initial_noise
from t2i_evolve.train import LoraSettings, TrainConfig, Trainer, TrainingSet
from t2i_evolve.world import GrammarPrompts, ProceduralTeacher

PROMPTS = ["A Red circle ", "two blue squares left of a green star"]  # (its pipeline lowercases and strips)


@pytest.fixture(scope="module")
def pixart(pixart_dir) -> T2IModel:
    return T2IModel.from_pretrained(pixart_dir)


@pytest.fixture(scope="module")
def shapes() -> TrainingSet:
    return TrainingSet.from_generator(ProceduralTeacher(), GrammarPrompts().sample(8, seed=4))


@pytest.mark.parametrize("variant", ["alpha-512", "alpha-1024", "sigma"])
@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_our_sampler_draws_what_the_pixart_pipeline_draws(variant, guidance, pixart_dir, tmp_path):
    """T5 states under their mask, cut where each pipeline cuts them (alpha 120 tokens, sigma 300), the empty prompt
    as the unconditional branch, the resolution and aspect-ratio embeddings of a model of latent side 128, the
    variance half of the output left out, and DPM-Solver++."""
    folder = {"alpha-512": pixart_dir, "alpha-1024": tmp_path / "sizes", "sigma": tmp_path / "sigma"}[variant]
    if variant != "alpha-512":
        build_tiny_pixart(folder, additional_conditions=variant == "alpha-1024",
                          pipeline="PixArtSigmaPipeline" if variant == "sigma" else "PixArtAlphaPipeline")
    model = T2IModel.from_pretrained(folder)
    assert model.size_conditioning == (variant == "alpha-1024")
    assert model.pipeline_class == ("PixArtSigmaPipeline" if variant == "sigma" else "PixArtAlphaPipeline")
    assert model.max_length == (300 if variant == "sigma" else 120)
    config = SamplerConfig(scheduler="dpm++", steps=3, guidance=guidance)
    ours = (sample_pixels(model, PROMPTS, [0, 1], config) + 1) / 2
    scheduler = DPMSolverMultistepScheduler.from_config(model.scheduler.config, timestep_spacing="trailing",
                                                        algorithm_type="dpmsolver++")
    pipeline = getattr(diffusers, model.pipeline_class)(tokenizer=model.tokenizer, text_encoder=model.text_encoder,
                                                       vae=model.vae, transformer=model.unet, scheduler=scheduler)
    with torch.no_grad():  # (the pipeline's own prompt length)
        theirs = pipeline(PROMPTS, num_inference_steps=3, guidance_scale=guidance, latents=initial_noise(model, [0, 1]),
                          height=model.resolution, width=model.resolution, output_type="pt", clean_caption=False,
                          use_resolution_binning=False).images
    assert ours.shape == theirs.shape == (2, 3, model.resolution, model.resolution)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)
    other = (sample_pixels(model, PROMPTS[::-1], [0, 1], config) + 1) / 2  # (a model deaf to its text would pass too)
    assert (other - ours).abs().max() > 1e-3


def test_a_pixart_folder_loads_encodes_and_saves_as_pixart(pixart, pixart_dir, tmp_path, capsys):
    assert pixart.is_pixart and not pixart.is_sdxl and pixart.pipeline_class == "PixArtAlphaPipeline"
    assert set(pixart.trainable_parts()) == {"unet", "text_encoder"} and pixart.resolution == 32
    assert T2IModel.folder_resolution(pixart_dir) == 32
    text = pixart.encode_prompts(["a red circle", "A RED circle", ""])
    assert text.hidden.shape == (3, pixart.max_length, 32) and text.pooled.shape == (3, 0)
    assert text.mask.sum(1).tolist()[2] == 1 and text.mask.sum(1)[0] > 1  # EOS alone for the empty prompt
    torch.testing.assert_close(text.hidden[0], text.hidden[1])
    dropped = pixart.encode_tokens(pixart.tokenize(["a red circle"] * 2), drop=torch.tensor([True, False]))
    torch.testing.assert_close(dropped.hidden[0], pixart.encode_empty(1).hidden[0])  # dropout: what guidance samples
    assert torch.equal(dropped.mask[0], text.mask[2]) and torch.equal(dropped.mask[1], text.mask[0])

    published = T2IModel.from_pretrained(build_tiny_pixart(tmp_path / "published", as_published=True))
    assert published.is_pixart and T2IModel.reads(tmp_path / "published")  # (the hub's folders name the class so)
    torch.testing.assert_close(published.encode_prompts(PROMPTS).hidden, pixart.encode_prompts(PROMPTS).hidden)

    saved = T2IModel.from_pretrained(pixart.save_pretrained(tmp_path / "copy"))
    index = json.loads((tmp_path / "copy" / "model_index.json").read_text())
    assert "unet" not in index and index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"] and saved.is_pixart
    pipeline = PixArtAlphaPipeline.from_pretrained(tmp_path / "copy")  # a folder diffusers loads as it was
    assert type(pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    config = SamplerConfig(steps=2, guidance=2.0)
    assert torch.equal(sample_pixels(saved, PROMPTS, [3, 4], config), sample_pixels(pixart, PROMPTS, [3, 4], config))

    from t2i_evolve.cli import main
    out = tmp_path / "x.png"
    assert main(["sample", str(pixart_dir), "a red circle", "--out", str(out), "--steps", "2", "--guidance", "3",
                 "--device", "cpu"]) == 0 and out.is_file()


def test_a_pixart_folder_learns_and_trains_lora_on_its_transformer_and_t5(pixart_dir, pixart, shapes, tmp_path,
                                                                         monkeypatch, capsys):
    full = TrainConfig(model=str(pixart_dir), output_dir=str(tmp_path / "full"), steps=30, batch_size=8, lr=2e-3,
                       warmup_steps=0, ema_decay=None, caption_dropout=0, tracker="none")
    monkeypatch.setattr("t2i_evolve.train.trainer.LARGE_TEXT_ENCODER", 1000)  # (T5-XXL's 4.7B, here a tiny T5)
    Trainer(full, shapes).run()
    said = capsys.readouterr().err
    assert "training all 0.0B weights of text_encoder (T5EncoderModel): train_text_encoder: false trains" in said
    before, after = fixed_loss(pixart, shapes), fixed_loss(T2IModel.from_pretrained(tmp_path / "full" / "model"), shapes)
    assert after < 0.7 * before, (before, after)

    lora = TrainConfig(model=str(pixart_dir), output_dir=str(tmp_path / "lora"), steps=3, batch_size=4, lr=1e-2,
                       warmup_steps=0, lora=LoraSettings(rank=4), caption_dropout=0.5, random_flip=True, ema_decay=None,
                       mixed_precision="bf16", gradient_checkpointing=True, tracker="none")  # (as on a GPU)
    Trainer(lora, shapes).run()
    saved = T2IModel.from_pretrained(tmp_path / "lora" / "model")
    assert _same_files(pixart_dir / "vae", tmp_path / "lora" / "model" / "vae")  # only read: copied as it was
    projections = {"unet": ("to_q", "to_k", "to_v", "to_out.0"), "text_encoder": ("q", "k", "v", "o")}  # T5's names
    for part, names in projections.items():
        before = dict(getattr(pixart, part).named_parameters())
        changed = [n for n, p in getattr(saved, part).named_parameters() if not torch.equal(p, before[n])]
        assert changed and all(n.rsplit(".", 1)[0].endswith(tuple(f".{t}" for t in names)) for n in changed), part


def test_under_bf16_what_is_only_read_is_held_in_bf16_and_saved_as_it_was(pixart_dir, shapes, tmp_path):
    """EvolveDirector's setting: the transformer trains, T5 is only read. Held in bf16 (autocast computes in it
    anyway) it takes half the memory, and the saved folder has its original float32 files, not bf16 ones (the VAE's
    copied too)."""
    config = TrainConfig(model=str(pixart_dir), output_dir=str(tmp_path), steps=2, batch_size=4, warmup_steps=0,
                         train_text_encoder=False, mixed_precision="bf16", ema_decay=None, tracker="none")
    trainer = Trainer(config, shapes)
    assert trainer.frozen == ["vae", "text_encoder"]
    assert trainer.model.text_encoder.dtype == torch.bfloat16 and trainer.model.vae.dtype == torch.float32  # (small)
    assert next(trainer.model.unet.parameters()).dtype == torch.float32  # (what trains keeps float32 weights)
    trainer.run()
    for part in ("vae", "text_encoder"):
        assert _same_files(pixart_dir / part, tmp_path / "model" / part), part
    saved = T2IModel.from_pretrained(tmp_path / "model")
    assert saved.text_encoder.dtype == torch.float32 and saved.is_pixart
    again = saved.save_pretrained(tmp_path / "model", unchanged_from=tmp_path / "model", unchanged=["vae"])
    assert _same_files(pixart_dir / "vae", again / "vae")  # (saved over the folder it was read from: kept)


def _same_files(a, b) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_evolve_trains_a_pixart_base_with_its_text_encoder_frozen(pixart_dir, pixart, tmp_path):
    """The recipe over a PixArt base as the paper trains it (the transformer only): each round's model is a
    PixArt folder, its T5 untouched."""
    from evolve_worker import small_config
    from t2i_evolve.recipes.evolve import run_evolve

    summary = run_evolve(small_config(str(tmp_path), base_model=str(pixart_dir), rounds=1, seed_prompts=12,
                                      eval_prompts=4, train_text_encoder=False, ema_decay=None))
    assert summary["rounds"][0]["ops"]["expand"] + summary["rounds"][0]["ops"]["delete"] > 0
    model = T2IModel.from_pretrained(tmp_path / "rounds" / "001" / "model")
    assert model.is_pixart
    assert all(torch.equal(p, dict(pixart.text_encoder.named_parameters())[n]) for n, p in model.text_encoder.named_parameters())
    assert any(not torch.equal(p, dict(pixart.unet.named_parameters())[n]) for n, p in model.unet.named_parameters())


def test_a_pixart_model_wrapped_for_several_processes_still_draws_as_pixart(tmp_path):
    """A trainer on several GPUs replaces `unet` by its DistributedDataParallel wrapper (here in a one-process gloo
    group): the model still reads as PixArt, with its size conditioning."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = T2IModel.from_pretrained(build_tiny_pixart(tmp_path / "sizes", additional_conditions=True))
    text = model.encode_prompts(PROMPTS)
    noisy = initial_noise(model, [0, 1])
    alone = model.predict(noisy, 500, text)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        inner = model.unet
        model.unet = DistributedDataParallel(inner)
        model.unet.config = inner.config  # (as the trainer does)
        assert model.is_pixart and model.size_conditioning and model.max_length == 120
        torch.testing.assert_close(model.predict(noisy, 500, model.encode_prompts(PROMPTS)), alone)
    finally:
        dist.destroy_process_group()


def test_a_pixart_folder_as_the_hub_ships_it_reads_its_sentencepiece_tokenizer(pixart_dir, tmp_path):
    """PixArt repos carry T5's tokenizer as a SentencePiece model (spiece.model), not a tokenizer.json."""
    import sentencepiece

    folder = shutil.copytree(pixart_dir, tmp_path / "hub-layout")
    shutil.rmtree(folder / "tokenizer")
    (folder / "tokenizer").mkdir()
    corpus = ["a red circle left of two blue squares", "three green stars above a yellow triangle"] * 20
    spiece = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=spiece, vocab_size=30,
                                             model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                             minloglevel=2, hard_vocab_limit=False)  # T5's special ids
    (folder / "tokenizer" / "spiece.model").write_bytes(spiece.getvalue())
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 24, "extra_ids": 0}))
    model = T2IModel.from_pretrained(folder)
    words = sentencepiece.SentencePieceProcessor(model_proto=spiece.getvalue()).encode("a red circle")
    assert model.tokenize(["A red circle"])[0, :len(words) + 1].tolist() == words + [1]  # then EOS
    assert model.encode_prompts(["a red circle"]).hidden.isfinite().all()


def test_a_folder_it_cannot_read_is_one_line(pixart_dir, sd_dir, tmp_path):
    hunyuan = shutil.copytree(pixart_dir, tmp_path / "hunyuan")
    index = json.loads((hunyuan / "model_index.json").read_text())
    (hunyuan / "model_index.json").write_text(json.dumps(index | {"transformer": ["diffusers", "HunyuanDiT2DModel"]}))
    with pytest.raises(UserError, match="a HunyuanDiT2DModel denoiser is not supported yet"):
        T2IModel.from_pretrained(hunyuan)
    with pytest.raises(UserError, match="not supported yet"):
        T2IModel.folder_resolution(hunyuan)
    assert not T2IModel.reads(hunyuan)

    edm = shutil.copytree(pixart_dir, tmp_path / "edm")  # (Playground v2.5's schedule)
    index = json.loads((edm / "model_index.json").read_text())
    (edm / "model_index.json").write_text(json.dumps(index | {"scheduler": ["diffusers", "EDMDPMSolverMultistepScheduler"]}))
    with pytest.raises(UserError, match="a EDMDPMSolverMultistepScheduler noise schedule is not supported yet"):
        T2IModel.from_pretrained(edm)
    assert not T2IModel.reads(edm)

    unet_over_t5 = shutil.copytree(sd_dir, tmp_path / "unet-over-t5")  # (DeepFloyd IF's layout)
    index = json.loads((unet_over_t5 / "model_index.json").read_text())
    (unet_over_t5 / "model_index.json").write_text(json.dumps(index | {"text_encoder": ["transformers", "T5EncoderModel"]}))
    with pytest.raises(UserError, match="a UNet over a T5EncoderModel \\(DeepFloyd IF\\) is not supported yet"):
        T2IModel.from_pretrained(unet_over_t5)

    inpainting = shutil.copytree(sd_dir, tmp_path / "inpainting")  # (SD's inpainting UNet: image and mask channels in)
    config = json.loads((inpainting / "unet" / "config.json").read_text())
    (inpainting / "unet" / "config.json").write_text(json.dumps(config | {"in_channels": 9}))
    with pytest.raises(UserError, match="a UNet of 9 input channels for 4 output ones \\(inpainting"):
        T2IModel.from_pretrained(inpainting)
    numbered = shutil.copytree(sd_dir, tmp_path / "numbered")  # a part named by a number, not [library, class]
    (numbered / "model_index.json").write_text(json.dumps(json.loads((sd_dir / "model_index.json").read_text()) | {"vae": 5}))
    with pytest.raises(UserError, match="names no known class for 'vae': 5"):
        T2IModel.from_pretrained(numbered)

    narrow = shutil.copytree(pixart_dir, tmp_path / "narrow")
    config = T5Config.from_pretrained(narrow / "text_encoder")
    config.d_model = 16
    T5EncoderModel(config).save_pretrained(narrow / "text_encoder")
    with pytest.raises(UserError, match="reads text states 32 wide; its text encoder \\(T5EncoderModel\\) gives 16"):
        T2IModel.from_pretrained(narrow)
