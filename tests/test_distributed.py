"""Training as several processes, as `accelerate launch` starts them on several GPUs: here `torchrun` on CPUs,
where accelerate shares the work through gloo. One code path: what holds here holds for the GPUs' processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from builders import build_teacher_ledger
from evolve_worker import small_config
from t2i_evolve.cli import main
from t2i_evolve.errors import UserError
from t2i_evolve.models import T2IModel
from t2i_evolve.data import Ledger
from t2i_evolve.recipes.evolve import run_evolve
from t2i_evolve.train import TrainConfig, Trainer, TrainingSet

STEPS = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A run folder whose ledger holds 32 teacher images."""
    return build_teacher_ledger(tmp_path_factory.mktemp("data"), 32, seed=7)


def _launch(config: Path) -> subprocess.Popen:
    """`torchrun` with two processes, in a session of its own: a SIGKILL of the group kills the whole job, as a
    node that goes down would."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "t2i_evolve.cli", "train", "--config", str(config)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=os.environ | {"OMP_NUM_THREADS": "1"})


def _config(tmp_path: Path, name: str, model: Path, data: Path, **more) -> Path:
    settings = {"model": str(model), "data": str(data), "output_dir": str(tmp_path / name), "steps": STEPS,
                "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "lr_schedule": "linear", "schedule_steps": 12,
                "checkpoint_every": 2, "log_every": 1, "tracker": "none"} | more
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _finish(process: subprocess.Popen) -> tuple[str, str]:
    try:
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, err[-3000:]
    return out, err


def test_two_processes_train_one_run_and_a_sigkilled_job_resumes_to_the_same_weights(tiny_dir, data_dir, tmp_path):
    """Two processes train one run (each its share of every batch; one logs, saves and speaks): killed as a whole
    after its second checkpoint and launched again, the job ends with the uninterrupted job's weights."""
    straight = _launch(_config(tmp_path, "straight", tiny_dir, data_dir))
    killed = _launch(_config(tmp_path, "killed", tiny_dir, data_dir))
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "killed" / "checkpoints" / "step-0000004").exists():
            assert killed.poll() is None, killed.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "model").exists()
    out, _ = _finish(straight)
    # resumed with an evaluation at the end (the main process alone: the other waits for it, not at a sync)
    _finish(_launch(_config(tmp_path, "killed", tiny_dir, data_dir, eval_every=STEPS)))

    assert out.count("model in") == 1  # the main process speaks; the other trains
    checkpoint = tmp_path / "straight" / "checkpoints" / f"step-{STEPS:07d}"
    assert (checkpoint / "random_states_1.pkl").exists()  # a second process trained (and its RNG was saved)
    for folder in ("straight", "killed"):
        rows = [json.loads(line) for line in (tmp_path / folder / "metrics.jsonl").read_text().splitlines()]
        steps = [row["step"] for row in rows if "loss" in row]
        assert steps == list(range(1, STEPS + 1)), folder  # one row a step (rows after the checkpoint: rewritten)
        assert [row["eval"]["images"] > 0 for row in rows if "eval" in row] == [True] * (folder == "killed")
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(tmp_path / "straight" / "model" / part), load_file(tmp_path / "killed" / "model" / part)
        assert a.keys() == b.keys()
        for key in a:
            assert (a[key] - b[key]).abs().max() <= 1e-6, (part, key)
    unet = "unet/diffusion_pytorch_model.safetensors"
    base, trained = load_file(tiny_dir / unet), load_file(tmp_path / "straight" / "model" / unet)
    assert any((base[key] - trained[key]).abs().max() > 1e-4 for key in base)  # (it trained)

    # Restarted as one process (a job back on fewer GPUs): its batches go on from image 64 of the stream (8 steps
    # of 2 x 4), and its learning rate from step 8 of the schedule (accelerate counts it in steps x processes)
    config = TrainConfig.from_yaml(tmp_path / "straight.yaml").model_copy(update={"steps": 12})
    trainer = Trainer(config, TrainingSet.from_ledger(Ledger(data_dir, read_only=True)))
    trainer.run()
    assert trainer.images_trained() == 64 + 4 * 4
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    linear = {row["step"]: 1e-3 * (12 - row["step"]) / (12 - 2) for row in rows}
    assert all(row["lr"] == pytest.approx(linear[row["step"]]) for row in rows if row["step"] >= 2), rows
    state = json.loads((tmp_path / "straight" / "checkpoints" / "step-0000012" / "trainer_state.json").read_text())
    assert (state["images"], state["processes"]) == (80, 1)


def test_commands_that_pay_for_calls_refuse_to_run_as_several_processes(tmp_path, monkeypatch, capsys):
    """Under a launcher each process would run the whole loop and pay for every call again: one line, no folder."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in ("evolve", "demo"):
        assert main([command, "--out", str(tmp_path / command)]) == 2
        err = capsys.readouterr().err
        assert f"{command} runs as one process" in err and "Traceback" not in err
        assert not (tmp_path / command).exists()


def test_the_parts_a_model_names_unused_are_exactly_those_no_gradient_reaches(sd_dir, sdxl_dir, pixart_dir, sd3_dir):
    """Several processes sync every trainable weight's gradient each step, and wait for one that never comes:
    the trainer freezes what `unused_parts` names (SDXL reads its first text encoder's penultimate states)."""
    for folder in (sd_dir, sdxl_dir, pixart_dir, sd3_dir):
        model = T2IModel.from_pretrained(folder)
        for part in model.trainable_parts().values():
            part.requires_grad_(True)
        text = model.encode_tokens(model.tokenize(["a red circle left of a blue square"]))
        (text.hidden.sum() + text.pooled.sum()).backward()
        for name, part in model.trainable_parts().items():
            if name != "unet":  # (the text's gradients only)
                unused = {id(p) for sub in model.unused_parts(name) for p in sub.parameters()}
                assert {id(p) for p in part.parameters() if p.grad is None} == unused, (folder.name, name)
                assert bool(unused) == (model.is_sdxl and name == "text_encoder")


def test_evolve_trains_each_round_as_the_processes_its_launcher_starts_and_resumes_without_them(tmp_path):
    """`train_launcher`: the loop, its ledger and its calls stay in one process; each round trains as two (here
    `torchrun` on CPUs; `accelerate launch --multi_gpu` on GPUs), carrying on from the last round's checkpoint.
    The epoch cap counts both processes' images: round 1's 24 records at 2 x 4 a step are 3 steps (one process's
    4 a step would be 6, past steps_per_round)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    config = small_config(str(tmp_path / "run"), train_launcher=launcher, prior_images=8, min_prior_score=0.0,
                          replay_share=0.2, steps_per_round=4, batch_size=4, max_epochs_per_round=1.0)
    summary = run_evolve(config)
    rounds = tmp_path / "run" / "rounds"
    assert len(summary["rounds"]) == 2
    last = sorted((rounds / "002" / "checkpoints").glob("step-*"))[-1]  # (round 1's: dropped once round 2 went on)
    assert (last / "random_states_1.pkl").exists()  # two processes trained the round
    ends = [0]
    for r in (1, 2):
        steps = [json.loads(line)["step"] for line in (rounds / f"{r:03d}" / "metrics.jsonl").read_text().splitlines()]
        assert min(steps) > ends[-1] and steps[-1] <= ends[-1] + 4  # round 2 went on from round 1's last step
        ends.append(steps[-1])
        manifest = json.loads((rounds / f"{r:03d}" / "training_set.json").read_text())
        assert any("prior" in path for path in manifest["images"])  # the judged prior images, mixed in
    assert ends[1] == 3
    again = run_evolve(config.model_copy(update={"train_launcher": ["no-such-launcher"]}))  # trained: not launched
    assert again["rounds"] == summary["rounds"]

    failing = small_config(str(tmp_path / "failing"), train_launcher=["false"])
    with pytest.raises(UserError, match=r"round 1's training under `false` failed \(exit 1"):
        run_evolve(failing)
    with pytest.raises(UserError, match="cannot start `no-such-launcher`"):
        run_evolve(failing.model_copy(update={"train_launcher": ["no-such-launcher"]}))
