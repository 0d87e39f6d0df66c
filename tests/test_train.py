import json
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from t2i_evolve.errors import UserError
from t2i_evolve.eval import evaluate
from t2i_evolve.judges import PixelJudge
from t2i_evolve.models import Sampler, SamplerConfig, T2IModel
from t2i_evolve.train import LoraSettings, TrainConfig, Trainer, TrainingSet, batch_indices
from t2i_evolve.train.trainer import mirror_prompt
from t2i_evolve.world import GrammarPrompts, GrammarSlice, ProceduralTeacher

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import train_worker  # noqa: E402
from forked import ForkedScript  # noqa: E402


def _teacher_set(n: int, seed: int, slice_=GrammarSlice()) -> TrainingSet:
    prompts = GrammarPrompts(slice_).sample(n, seed=seed)
    return TrainingSet.from_generator(ProceduralTeacher(), prompts)


def test_batches_are_a_function_of_position():
    a = batch_indices(40, 16, 50, seed=3)
    assert torch.equal(a, batch_indices(40, 16, 50, seed=3))
    epoch = torch.cat([batch_indices(p, 10, 50, seed=3) for p in range(0, 50, 10)])
    assert sorted(epoch.tolist()) == list(range(50))  # one epoch sees every example once
    assert not torch.equal(epoch, torch.cat([batch_indices(p, 10, 50, seed=3) for p in range(50, 100, 10)]))


def test_a_mixed_set_holds_whole_copies_of_each_set_at_about_the_share():
    small = TrainingSet(["a"] * 3, torch.zeros(3, 3, 4, 4, dtype=torch.uint8))
    large = TrainingSet(["b"] * 40, torch.ones(40, 3, 4, 4, dtype=torch.uint8))
    for own, other, share in [(small, large, 0.5), (large, small, 0.5), (small, large, 0.1), (large, small, 0.3)]:
        mixed = own.mixed_with(other, share)
        theirs = mixed.prompts.count(other.prompts[0])
        assert theirs % len(other) == 0 and (len(mixed) - theirs) % len(own) == 0  # whole copies
        assert abs(theirs / len(mixed) - share) < 0.15, (len(own), len(other), share, theirs / len(mixed))
        ones = int((mixed.pixels(torch.arange(len(mixed))).mean(dim=(1, 2, 3)) > -1).sum())  # each row's own image
        assert ones == (theirs if other is large else len(mixed) - theirs) and len(mixed.images) == 43  # no copies
    with pytest.raises(ValueError, match="between 0 and 1"):
        small.mixed_with(large, 1.0)


def test_loss_falls_and_judge_score_rises(tiny_dir, tmp_path):
    """A short run on strong-teacher data: the loss falls and the pixel judge sees the prompt drawn.

    One prompt, so a couple of thousand images suffice on a CPU (the whole grammar needs tens of
    thousands: the demo and benchmarks/learning_curve.py measure that); judged on seeds never trained on.
    """
    prompts = ["a red circle"] * 256
    data = TrainingSet.from_generator(ProceduralTeacher(), prompts)
    held_out = ["a red circle"] * 16
    judge, sampling = PixelJudge(), SamplerConfig(steps=10)

    def score(model_dir):
        return evaluate(Sampler(T2IModel.from_pretrained(model_dir), sampling), judge, held_out, seed=5000).summary()

    before = score(tiny_dir)
    config = TrainConfig(model=str(tiny_dir), output_dir=str(tmp_path), steps=160, batch_size=8, lr=2e-3,
                         snr_gamma=5.0, ema_decay=None, warmup_steps=10, log_every=10, checkpoint_every=1000,
                         tracker="none")
    Trainer(config, data).run()
    losses = [m["loss"] for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert losses[-1] < 0.6 * losses[0]
    after = score(tmp_path / "model")
    assert after["score"] >= before["score"] + 0.3, (before, after)
    assert after["skills"]["color"] > before["skills"]["color"]


def test_random_flip_pairs_each_mirrored_image_with_its_mirrored_prompt(tiny_dir, tmp_path):
    """Augmentation must keep the data true: a mirrored image of "A left of B" is "A right of B"."""
    prompt = "a red circle left of a blue square"
    image = ProceduralTeacher().generate([prompt], [0])[0]
    mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    judge = PixelJudge()
    assert mirror_prompt(prompt) == "a red circle right of a blue square" and mirror_prompt("leftover") == "leftover"
    assert mirror_prompt("Left of a car, a bus; RIGHT: a cat on the right") == "Right of a car, a bus; LEFT: a cat on the left"
    assert judge.score(mirrored, mirror_prompt(prompt)).score == 1.0 > judge.score(mirrored, prompt).score

    data = TrainingSet.from_images([prompt], [image])
    config = TrainConfig(model=str(tiny_dir), output_dir=str(tmp_path), steps=3, batch_size=8, random_flip=True,
                         caption_dropout=0.0, ema_decay=None, checkpoint_every=1000, tracker="none")
    trainer = Trainer(config, data)
    seen = {"ids": [], "pixels": []}
    for name, encode in [("ids", trainer.model.encode_tokens), ("pixels", trainer.model.encode_images)]:
        def record(x, name=name, encode=encode, **options):
            seen[name].append(x.detach().clone())
            return encode(x, **options)
        setattr(trainer.model, encode.__name__, record)
    trainer.run()
    ids, pixels = torch.cat(seen["ids"]), torch.cat(seen["pixels"])
    own, flipped = data.pixels(torch.zeros(1, dtype=torch.long)), data.pixels(torch.zeros(1, dtype=torch.long)).flip(-1)
    is_flipped = (pixels == flipped).flatten(1).all(1)
    assert ((pixels == own).flatten(1).all(1) | is_flipped).all()  # every row is the image or its mirror
    assert 0 < int(is_flipped.sum()) < len(pixels)  # both, at random
    expected = torch.where(is_flipped[:, None], trainer.model.tokenize([mirror_prompt(prompt)]),
                           trainer.model.tokenize([prompt]))
    assert torch.equal(ids, expected)


def _start(tiny_dir, out: Path, steps: int) -> ForkedScript:
    # two trainers share two cores: one thread each, no oversubscription
    return ForkedScript(HERE / "train_worker.py", str(tiny_dir), str(out), str(steps), env={"OMP_NUM_THREADS": "1"})


def _wait_for(path: Path, process: ForkedScript, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.output()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_sigkill_or_ctrl_c_and_resume_give_the_same_weights(tiny_dir, tmp_path):
    """Killed after its step-6 checkpoint, the run resumes from it; Ctrl-C (SIGINT) mid-way finishes its step,
    saves a checkpoint there (not only every 3 steps) and stops; both end with the uninterrupted run's weights."""
    steps = 10
    straight = _start(tiny_dir, tmp_path / "straight", steps)
    killed = _start(tiny_dir, tmp_path / "killed", steps)
    stopped = _start(tiny_dir, tmp_path / "stopped", steps)
    _wait_for(tmp_path / "killed" / "checkpoints" / "step-0000006", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "model").exists()
    resumed = _start(tiny_dir, tmp_path / "killed", steps)
    _wait_for(tmp_path / "stopped" / "checkpoints" / "step-0000003", stopped)
    stopped.send_signal(signal.SIGINT)
    assert stopped.wait(timeout=120) != 0 and "stopping after this step" in stopped.output()[1]
    logged = [json.loads(line)["step"] for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert (tmp_path / "stopped" / "checkpoints" / f"step-{logged[-1]:07d}").exists() and logged[-1] < steps
    assert not (tmp_path / "stopped" / "model").exists()
    restarted = _start(tiny_dir, tmp_path / "stopped", steps)
    for process in (straight, resumed, restarted):
        done = process.result(timeout=180)
        assert done.returncode == 0, done.stderr
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a = load_file(tmp_path / "straight" / "model" / part)
        for run in ("killed", "stopped"):
            b = load_file(tmp_path / run / "model" / part)
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))  # lines after the checkpoint were dropped, then rewritten


def test_corrupt_checkpoint_is_a_clear_error(tiny_dir, tmp_path):
    data = _teacher_set(16, seed=2)
    config = TrainConfig(model=str(tiny_dir), output_dir=str(tmp_path), steps=2, batch_size=4,
                         checkpoint_every=1, tracker="none")
    Trainer(config, data).run()
    (tmp_path / "checkpoints" / "step-0000002" / "model.safetensors").write_bytes(b"not a safetensors file")
    more = config.model_copy(update={"steps": 4})
    with pytest.raises(UserError, match="cannot resume from checkpoint .*step-0000002"):
        Trainer(more, data).run()
    (tmp_path / "checkpoints" / "step-0000002" / "trainer_state.json").write_text('{"images": 8}')  # (no step: was
    with pytest.raises(UserError, match="step-0000002: ValueError: its trainer_state.json is unreadable or names no"):
        Trainer(more, data).run()  # a KeyError's traceback)


def test_continuing_from_a_checkpoint_is_one_run_split_in_two(tiny_dir, tmp_path):
    """`continue_from` carries weights, AdamW moments, schedule and EMA on: 2 + 2 steps give the weights
    of 4 straight steps on the same data (a fresh optimizer would not: its first steps are full-size). The second
    part ends by `max_images` (8 past its start: 2 steps of 4), its `steps` far off."""
    data = _teacher_set(16, seed=6)
    common = {"model": str(tiny_dir), "batch_size": 4, "lr": 1e-2, "warmup_steps": 2, "schedule_steps": 4,
              "lr_schedule": "cosine", "checkpoint_every": 2, "tracker": "none"}
    Trainer(TrainConfig(output_dir=str(tmp_path / "straight"), steps=4, **common), data).run()
    Trainer(TrainConfig(output_dir=str(tmp_path / "first"), steps=2, **common), data).run()
    second = TrainConfig(output_dir=str(tmp_path / "second"), steps=100, max_images=8, model=str(tmp_path / "first" / "model"),
                         continue_from=str(tmp_path / "first" / "checkpoints" / "step-0000002"),
                         **{k: v for k, v in common.items() if k != "model"})
    Trainer(second, data).run()
    restarted = TrainConfig(output_dir=str(tmp_path / "restarted"), steps=2, model=str(tmp_path / "first" / "model"),
                            **{k: v for k, v in common.items() if k != "model"})
    Trainer(restarted, data).run()
    part = "unet/diffusion_pytorch_model.safetensors"
    straight, continued = load_file(tmp_path / "straight" / "model" / part), load_file(tmp_path / "second" / "model" / part)
    for key in straight:
        torch.testing.assert_close(straight[key], continued[key], rtol=1e-5, atol=1e-6)
    fresh = load_file(tmp_path / "restarted" / "model" / part)
    assert any(not torch.allclose(straight[k], fresh[k], rtol=1e-5, atol=1e-6) for k in straight)
    logged = [json.loads(line)["step"] for line in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [4]  # only its own steps: the first run's metrics stay in its own folder


def test_carried_on_from_another_runs_checkpoint_it_takes_the_weights_and_keeps_its_own_settings(tiny_dir, tmp_path,
                                                                                                 monkeypatch):
    """`continue_from` another run's checkpoint, with another set (an evolve round from the last round's): an epoch
    of the new set (`max_images`, as `max_epochs_per_round: 1` sets it) shows each of its images once, not the rest of
    one ordering and the start of another; an EMA the first run did not keep starts from the weights it left, not
    from `model`'s; the learning rate and weight decay are this config's, not the checkpoint's optimizer's."""
    from t2i_evolve.train import trainer as trainer_module

    first, second = _teacher_set(16, seed=6), _teacher_set(16, seed=7)
    common = {"batch_size": 4, "checkpoint_every": 6, "warmup_steps": 0, "log_every": 1, "tracker": "none"}
    Trainer(TrainConfig(model=str(tiny_dir), output_dir=str(tmp_path / "first"), steps=6, ema_decay=None, **common),
            first).run()  # 24 images: 8 into its second epoch
    checkpoint = str(tmp_path / "first" / "checkpoints" / "step-0000006")
    seen, real = [], trainer_module.batch_indices
    monkeypatch.setattr(trainer_module, "batch_indices", lambda *args: seen.append(real(*args)) or seen[-1])
    config = TrainConfig(model=str(tiny_dir), output_dir=str(tmp_path / "second"), steps=100, max_images=16, lr=1e-5,
                         weight_decay=0.5, continue_from=checkpoint, ema_decay=None, **common)
    trainer = Trainer(config, second)
    trainer.run()
    assert sorted(torch.cat(seen).tolist()) == list(range(16))
    assert {(group["lr"], group["weight_decay"]) for group in trainer.optimizer.param_groups} == {(1e-5, 0.5)}
    rows = [json.loads(line) for line in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in rows] == [pytest.approx(1e-5)] * 4
    still = config.model_copy(update={"output_dir": str(tmp_path / "third"), "steps": 6, "max_images": None,
                                      "ema_decay": 0.9})
    Trainer(still, second).run()  # no step more: its EMA is what it started from
    part = "unet/diffusion_pytorch_model.safetensors"
    saved, left = load_file(tmp_path / "third" / "model" / part), load_file(tmp_path / "first" / "model" / part)
    assert all(torch.equal(saved[key], left[key]) for key in left)


def test_tensorboard_shows_a_resumed_run_as_one_curve_and_its_settings_once(tiny_dir, tmp_path):
    """A run killed after its checkpoint at step 2 had logged steps 3-4: resumed, TensorBoard shows each step once
    (the killed attempt's past the checkpoint hidden) and the settings once. A run that carries on from another's
    checkpoint in a folder of its own logs its settings there."""
    from evolve_worker import tensorboard_scalars

    data = _teacher_set(16, seed=6)
    common = {"model": str(tiny_dir), "batch_size": 4, "checkpoint_every": 2, "log_every": 1, "tracker": "tensorboard"}
    Trainer(TrainConfig(output_dir=str(tmp_path / "run"), steps=4, **common), data).run()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000004")  # as if killed after logging step 4
    shutil.rmtree(tmp_path / "run" / "model")
    Trainer(TrainConfig(output_dir=str(tmp_path / "run"), steps=5, **common), data).run()
    assert [step for step, _ in tensorboard_scalars(tmp_path / "run" / "train", "loss")] == [1, 2, 3, 4, 5]
    assert len(list((tmp_path / "run" / "train").glob("*/hparams.yml"))) == 1
    Trainer(TrainConfig(output_dir=str(tmp_path / "next"), steps=6, **common,
                        continue_from=str(tmp_path / "run" / "checkpoints" / "step-0000005")), data).run()
    assert [step for step, _ in tensorboard_scalars(tmp_path / "next" / "train", "loss")] == [6]
    assert len(list((tmp_path / "next" / "train").glob("*/hparams.yml"))) == 1


def test_max_images_ends_a_run_resumed_on_another_number_of_processes_where_its_images_say(tiny_dir, tmp_path):
    """A checkpoint two processes saved at step 4 (32 images of 2 x 4): resumed as one process with max_images
    48, the run trains 4 more steps of 4 (48 in all), not the 12 one process alone would have needed."""
    data = _teacher_set(16, seed=6)
    common = {"model": str(tiny_dir), "output_dir": str(tmp_path), "batch_size": 4, "warmup_steps": 2,
              "checkpoint_every": 4, "tracker": "none", "steps": 100}
    Trainer(TrainConfig(max_images=16, **common), data).run()
    saved = tmp_path / "checkpoints" / "step-0000004" / "trainer_state.json"
    state = json.loads(saved.read_text())
    assert (state["step"], state["images"], state["processes"]) == (4, 16, 1)
    saved.write_text(json.dumps(state | {"processes": 2, "images": 32}))  # (as two processes would have saved it)
    shutil.rmtree(tmp_path / "model")
    trainer = Trainer(TrainConfig(max_images=48, **common), data)
    trainer.run()
    assert (trainer.step, trainer.images_trained()) == (8, 48)


def test_a_step_the_fp16_loss_scaler_skipped_is_no_ema_update(tiny_dir, tmp_path, monkeypatch):
    """With fp16 the loss scaler skips the optimizer step on overflowing gradients (often the first steps, while
    it finds its scale); the EMA must not count such a step (CPU has no fp16 scaler: the skip is simulated)."""
    from accelerate import Accelerator

    data = _teacher_set(8, seed=5)
    config = TrainConfig(model=str(tiny_dir), output_dir=str(tmp_path), steps=3, batch_size=4, ema_decay=0.9,
                         tracker="none")
    skipped = {2}  # the second step overflows
    trainer = Trainer(config, data)
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped",
                        property(lambda acc: trainer.step + 1 in skipped))
    trainer.run()
    assert trainer.ema.updates == 2


def test_trainers_of_other_mixed_precisions_run_one_after_another_in_one_process(tiny_dir, tmp_path):
    """accelerate keeps one mixed precision a process and refuses a second: a notebook, or a recipe after a
    benchmark arm, trains in bf16 after a run without it, and back."""
    data, losses = _teacher_set(8, seed=5), []
    for i, precision in enumerate(["no", "bf16", "no"]):
        trainer = Trainer(TrainConfig(model=str(tiny_dir), output_dir=str(tmp_path / str(i)), steps=1, batch_size=4,
                                      mixed_precision=precision, tracker="none"), data)
        losses.append(trainer.run()["loss"])
        assert trainer.accelerator.mixed_precision == precision
    assert losses[0] == losses[2] != losses[1]  # bf16 computed in bf16; the fp32 run after it as the first was


def test_checkpoints_hold_the_ema_as_safetensors_and_no_pickle_is_loaded(tiny_dir, tmp_path):
    """accelerate would pickle a registered EMA (and unpickle it on resume, which can run code): it is saved
    as safetensors beside the rest; a checkpoint with the old pickle is refused in one line, never loaded.
    A finished run resumed (its model/ lost) evaluates again without logging that evaluation twice."""
    data = _teacher_set(16, seed=4)
    config = TrainConfig(model=str(tiny_dir), output_dir=str(tmp_path), steps=2, batch_size=4, checkpoint_every=1,
                         ema_decay=0.9, tracker="none")
    trainer = Trainer(config, data, evaluate=lambda model, step: {"score": 0.5})
    trainer.run()
    checkpoint = tmp_path / "checkpoints" / "step-0000002"
    assert (checkpoint / "ema.safetensors").is_file() and not list(checkpoint.glob("custom_checkpoint_*"))
    shutil.rmtree(tmp_path / "model")
    resumed = Trainer(config, data, evaluate=lambda model, step: {"score": 0.5})
    resumed.run()
    for a, b in zip(trainer.ema.shadow, resumed.ema.shadow):
        assert torch.equal(a, b)
    assert resumed.ema.updates == trainer.ema.updates == 2
    evals = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(evals) == 1

    (checkpoint / "ema.safetensors").rename(checkpoint / "custom_checkpoint_0.pkl")
    with pytest.raises(UserError, match="its EMA is a pickle"):
        Trainer(config.model_copy(update={"steps": 3}), data).run()


def test_lora_adapters_start_from_the_config_seed(tiny_dir, tmp_path):
    """peft draws an adapter's start from torch's global generator: two trainers of one config start alike
    (whatever that generator holds), another seed starts elsewhere, and the global generator is left as it was."""
    def first_adapter(seed: int) -> torch.Tensor:
        torch.manual_seed(len(str(tmp_path)) + seed * 7)  # what else the process drew before differs
        config = TrainConfig(model=str(tiny_dir), output_dir=str(tmp_path / f"lora-{seed}"), steps=1, batch_size=4,
                             lora=LoraSettings(rank=4), seed=seed, tracker="none")
        trainer = Trainer(config, _teacher_set(8, seed=1))
        return next(p for n, p in trainer.model.unet.named_parameters() if "lora_A" in n).detach().clone()

    torch.manual_seed(5)
    state = torch.get_rng_state()
    first_adapter(1)
    torch.manual_seed(5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first_adapter(1), first_adapter(1)) and not torch.equal(first_adapter(1), first_adapter(2))


def test_lora_trains_only_the_adapters_and_saves_merged_weights(tiny_dir, tmp_path):
    base = T2IModel.from_pretrained(tiny_dir)
    config = TrainConfig(model=str(tiny_dir), output_dir=str(tmp_path), steps=3, batch_size=4, lr=1e-2,
                         warmup_steps=0, lora=LoraSettings(rank=4), ema_decay=None, tracker="none")
    trainer = Trainer(config, _teacher_set(16, seed=3))
    targets = {"unet": ("to_q", "to_k", "to_v", "to_out"), "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj")}
    for part in targets:  # both parts, as `train_text_encoder` defaults to
        trainable = {n for n, p in getattr(trainer.model, part).named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable), part
    trainer.run()
    saved = T2IModel.from_pretrained(tmp_path / "model")
    for part, names in targets.items():
        tuned, original = dict(getattr(trainer.model, part).named_parameters()), getattr(base, part).named_parameters()
        for name, param in original:
            wrapped = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            assert torch.equal(param, tuned.get(name, tuned.get(wrapped))), name  # base weights untouched
        assert any(p.abs().sum() > 0 for n, p in tuned.items() if "lora_B" in n), part
        before = dict(getattr(base, part).named_parameters())
        changed = [n for n, p in getattr(saved, part).named_parameters() if not torch.equal(p, before[n])]
        assert changed and all(any(t in n for t in names) for n in changed), part  # merged: only the targets moved


def test_stable_diffusion_style_folder_trains(sd_dir, tmp_path):
    config = TrainConfig(model=str(sd_dir), output_dir=str(tmp_path), steps=3, batch_size=4, warmup_steps=0,
                         lr=1e-3, checkpoint_every=2, gradient_checkpointing=True, tracker="none")
    Trainer(config, _teacher_set(8, seed=4), evaluate=lambda model, step: {"score": 0.5}).run()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1] == {"step": 3, "eval": {"score": 0.5}}
    model = T2IModel.from_pretrained(tmp_path / "model")
    assert model.vae is not None
    assert Sampler(model, SamplerConfig(steps=2)).generate(["a red circle"], [0])[0].size == (32, 32)


def test_nothing_to_train_is_an_error(tiny_dir, tmp_path):
    config = TrainConfig(model=str(tiny_dir), output_dir=str(tmp_path), train_unet=False, train_text_encoder=False)
    with pytest.raises(UserError, match="nothing to train"):
        Trainer(config, _teacher_set(4, seed=5))
