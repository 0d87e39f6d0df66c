"""Sets larger than memory: training images read from their files batch by batch (`ImageFiles`), and a round
judged and drawn a few records at a time."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from builders import build_teacher_ledger

from t2i_evolve.cli import main
from t2i_evolve.data import Ledger
from t2i_evolve.errors import UserError
from t2i_evolve.train import ImageFiles, TrainConfig, Trainer, TrainingSet, evolving_set
from t2i_evolve.world import ProceduralTeacher


@pytest.fixture(scope="module")
def ledger_dir(tmp_path_factory):
    """A run folder of 24 teacher images: 16 active, 8 deleted by the judge (replayable)."""
    return build_teacher_ledger(tmp_path_factory.mktemp("ledger"), 24, seed=11, deleted=8)


def test_a_set_past_the_memory_limit_holds_paths_and_reads_the_same_pixels(ledger_dir):
    with Ledger(ledger_dir) as ledger:
        held = evolving_set(ledger, replay_share=0.3)
        read = evolving_set(ledger, replay_share=0.3, max_memory_gb=0)
    assert isinstance(held.images, torch.Tensor) and isinstance(read.images, ImageFiles)
    assert all(not isinstance(item, torch.Tensor) for item in read.images.items)  # nothing decoded is kept
    assert read.prompts == held.prompts and len(read.images) == len(held.images) == 24
    rows = torch.arange(len(held))
    assert torch.equal(read.pixels(rows), held.pixels(rows))
    # joined with a set held in memory (the judged prior images): each row still its own image
    prior = TrainingSet.from_generator(ProceduralTeacher(), ["a red circle"] * 3)
    mixed_read, mixed_held = read.mixed_with(prior, 0.3), held.mixed_with(prior, 0.3)
    assert isinstance(mixed_read.images, ImageFiles)
    everything = torch.arange(len(mixed_held))
    assert torch.equal(mixed_read.pixels(everything), mixed_held.pixels(everything))


def test_training_from_files_matches_training_from_memory_reading_each_batch_once(tiny_dir, ledger_dir, tmp_path,
                                                                                   monkeypatch):
    """The same weights, losses and all; the next batch is read while this one trains, and never read twice."""
    reads = []
    read = ImageFiles._read
    monkeypatch.setattr(ImageFiles, "_read", lambda self, item: reads.append(item) or read(self, item))
    weights = {}
    for name, memory in (("held", 4.0), ("read", 0.0)):
        with Ledger(ledger_dir) as ledger:
            data = TrainingSet.from_ledger(ledger, max_memory_gb=memory)
        config = TrainConfig(model=str(tiny_dir), output_dir=str(tmp_path / name), steps=5, batch_size=4,
                             checkpoint_every=100, log_every=1, tracker="none", random_flip=True)
        Trainer(config, data).run()
        weights[name] = load_file(tmp_path / name / "model" / "unet" / "diffusion_pytorch_model.safetensors")
        rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        weights[name + " losses"] = [json.loads(row)["loss"] for row in rows]
    assert weights["held losses"] == weights["read losses"]
    assert all(torch.equal(weights["held"][key], weights["read"][key]) for key in weights["held"])
    assert len(reads) == (5 + 1) * 4  # five batches, and the sixth read ahead


def test_an_image_gone_since_the_set_was_made_is_one_line_naming_it(tiny_dir, ledger_dir, tmp_path, capsys):
    run = shutil.copytree(ledger_dir, tmp_path / "run")
    with Ledger(run) as ledger:
        data = TrainingSet.from_ledger(ledger, max_memory_gb=0)
        gone = ledger.run_dir / ledger.records()[0].image_path
    gone.unlink()
    config = TrainConfig(model=str(tiny_dir), output_dir=str(tmp_path / "t"), steps=8, batch_size=4, tracker="none")
    with pytest.raises(UserError, match=f"image not found: {gone}"):
        Trainer(config, data).run()

    # read before training: a missing file and one of another size, each a line from `train`, no traceback
    with Ledger(run) as ledger:
        records = ledger.records()
    Image.new("RGB", (16, 16)).save(run / records[1].image_path)
    settings = {"model": str(tiny_dir), "data": str(run), "output_dir": str(tmp_path / "cli"), "steps": 2,
                "max_image_memory_gb": 0}
    (tmp_path / "train.yaml").write_text(json.dumps(settings))
    assert main(["train", "--config", str(tmp_path / "train.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read training image {gone}" in err and "Traceback" not in err
    gone.write_bytes((ledger_dir / records[0].image_path).read_bytes())
    assert main(["train", "--config", str(tmp_path / "train.yaml")]) == 2
    err = capsys.readouterr().err
    assert "training images differ in size: 15 at 32x32, 1 at 16x16" in err, err


def test_a_round_judges_and_draws_a_few_records_at_a_time_and_ends_with_the_same_ledger(tmp_path, monkeypatch):
    """A real round judges thousands of records: their base and teacher images are held `AT_A_TIME` at once (here
    8 of a round's records, and its expansions 8 prompts at a time), and the run ends as one that held them all."""
    from evolve_worker import ledger_state, small_config

    from t2i_evolve.data import CachedGenerator
    from t2i_evolve.judges import evidence
    from t2i_evolve.models import Sampler
    from t2i_evolve.recipes import evolve

    def counted(generate, asked):  # (the most images one call was asked for)
        return lambda self, prompts, *args, **kwargs: asked.append(len(prompts)) or generate(self, prompts, *args,
                                                                                                  **kwargs)

    summaries, base, teacher = {}, Sampler.generate, CachedGenerator.generate
    for name, at_a_time in (("all", 10_000), ("chunked", 8)):
        monkeypatch.setattr(evidence, "AT_A_TIME", at_a_time)
        monkeypatch.setattr(evolve, "AT_A_TIME", at_a_time)
        summaries[name] = {"base": [], "teacher": []}
        monkeypatch.setattr(Sampler, "generate", counted(base, summaries[name]["base"]))
        config = small_config(str(tmp_path / name), mutate_rate=0.5, seed_prompts=8)  # (the seed set: one call)
        monkeypatch.setattr(CachedGenerator, "generate", counted(teacher, summaries[name]["teacher"]))
        summaries[name]["summary"] = evolve.run_evolve(config)
    assert max(summaries["all"]["base"]) > 8 and max(summaries["all"]["teacher"]) > 8
    assert max(summaries["chunked"]["base"]) == max(summaries["chunked"]["teacher"]) == 8
    assert ledger_state(tmp_path / "all") == ledger_state(tmp_path / "chunked")
    ops = {name: [row["ops"] for row in summaries[name]["summary"]["rounds"]] for name in ("all", "chunked")}
    assert ops["all"] == ops["chunked"] and ops["all"][0]["expand"] > 8
