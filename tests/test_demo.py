"""The demo's run folder and the model commands, at a tiny budget (the real demo is timed in RESULTS.md)."""

import json

import pytest
import yaml

from t2i_evolve.cli import main
from t2i_evolve.data import Ledger
from t2i_evolve.demo import DemoConfig, run_demo, short_training_note
from t2i_evolve.errors import UserError


def test_demo_writes_its_run_folder_and_resumes_without_paying_twice(tmp_path):
    config = DemoConfig(output_dir=str(tmp_path / "demo"), minutes=0.05, train_images=48, eval_prompts=6,
                        geneval_scale=0.02)
    summary = run_demo(config)
    out = tmp_path / "demo"
    for name in ("demo.yaml", "config.yaml", "ledger.sqlite", "metrics.jsonl", "report.html", "summary.json"):
        assert (out / name).exists(), name
    assert list((out / "checkpoints").glob("step-*")) and (out / "model" / "model_index.json").exists()
    assert set(summary) >= {"before", "after", "wall_s", "train_images", "slice", "phases"}
    assert set(summary["after"]["skills"]) == {"color", "shape", "count", "spatial", "binding", "size"}
    assert set(summary["after"]["geneval"]["tasks"]) == {"single_object", "two_object", "counting", "colors",
                                                         "position", "color_attr"}
    assert summary["train_images"] == 48 and summary["slice"] == "1-2 groups, no size words"
    assert json.loads((out / "summary.json").read_text()) == summary
    html = (out / "report.html").read_text()
    assert html.count("<img") >= 12 and "Training loss" in html and "GenEval" in html
    assert "<tr><td>size</td><td>- (0 asked)</td><td>- (0 asked)</td></tr>" in html  # no size words: no score
    losses = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert ("<svg" in html) == (len(losses) >= 2)  # a loaded machine may fit only one logged step in the budget

    note = short_training_note(summary, config.minutes)  # a 3-second budget: too few steps, and it says so
    assert f"only {summary['train_steps']} steps" in note and "--minutes" in note
    calls, plan = Ledger(out).stats()["calls"], yaml.safe_load((out / "config.yaml").read_text())
    again = run_demo(config)  # rerun: teacher images come from the ledger's cache, training resumes
    assert Ledger(out).stats()["calls"] == calls
    # the same training run, however fast the machine is now: steps (and so the schedule) planned once
    assert yaml.safe_load((out / "config.yaml").read_text()) == plan
    other = config.model_copy(update={"train_images": 32, "minutes": 0.1})  # its data and model would mix with ours
    with pytest.raises(UserError, match=r"started with another config \(minutes: 0.05 -> 0.1; train_images: 48 -> 32"):
        run_demo(other)
    assert yaml.safe_load((out / "demo.yaml").read_text())["train_images"] == 48

    plan = json.loads((out / "train_plan.json").read_text())  # its planned steps all trained (not cut by time)
    (out / "train_plan.json").write_text(json.dumps(plan | {"steps": again["train_steps"]}))
    last = run_demo(config)  # nothing left to train: the run's timings stand (they were this rerun's, advice and all)
    assert (last["wall_s"], last["phases"], last["train_steps"]) == (again["wall_s"], again["phases"],
                                                                    again["train_steps"])


def test_the_short_training_note_asks_for_the_budget_this_machine_needs():
    # 100 steps took 60 s of a 120 s demo: 800 steps and a margin need 9.6 min of training, 10.6 in all
    slow = {"train_steps": 100, "wall_s": 120.0, "phases": {"train_s": 60.0}}
    assert short_training_note(slow, 2.0).endswith("--minutes 11") and "(a busy or slow machine)" in short_training_note(
        slow, 2.0)
    # a 1-minute budget whose evaluations (at 30 sampling steps, say) took 150 s of 165: the cause is named
    drawn_long = {"train_steps": 24, "wall_s": 165.0, "phases": {"train_s": 15.0}}
    assert "(its evaluations and teacher draws took 2.5 min)" in short_training_note(drawn_long, 1.0)
    assert short_training_note(slow | {"train_steps": 1500}, 9.5) is None


def test_model_commands(tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["init-model", str(model)]) == 0
    assert main(["sample", str(model), "two red circles", "--out", str(tmp_path / "x.png"), "--steps", "2"]) == 0
    assert (tmp_path / "x.png").exists() and "note" not in capsys.readouterr().out
    assert main(["sample", str(model), "two red Cats, a cat", "--out", str(tmp_path / "c.png"), "--steps", "2"]) == 0
    assert "knows only its grammar's words, not 'cats', 'cat':" in capsys.readouterr().out
    assert main(["eval", str(model), "--prompts", "4", "--steps", "2", "--dtype", "bfloat16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"score", "skills", "asked"} and 0 <= result["score"] <= 1
    assert main(["sample", str(tmp_path / "nowhere"), "a red circle", "--out", str(tmp_path / "y.png")]) == 2


def test_train_command_from_yaml(tmp_path, capsys):
    run = tmp_path / "run"
    demo = DemoConfig(output_dir=str(run), minutes=0.02, train_images=16, eval_prompts=4, geneval_scale=0)
    run_demo(demo)
    assert "GenEval" not in (run / "report.html").read_text()  # geneval_scale 0: no section of zeros
    config = tmp_path / "train.yaml"
    settings = {"model": str(run / "base"), "data": str(run), "output_dir": str(tmp_path / "t"), "steps": 2,
                "batch_size": 4, "log_every": 1}
    config.write_text(yaml.safe_dump(settings))
    (tmp_path / "t").mkdir()  # as an attempt killed before its first checkpoint leaves it: rows logged again
    (tmp_path / "t" / "config.yaml").write_text(yaml.safe_dump(settings))  # (saved as a run starts)
    (tmp_path / "t" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    assert main(["train", "--config", str(config)]) == 0
    assert (tmp_path / "t" / "model" / "model_index.json").exists()
    assert list((tmp_path / "t").rglob("events.out.tfevents.*")), "tensorboard is the default tracker"
    logged = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2] and 9.0 not in [row["loss"] for row in logged]
    capsys.readouterr()  # fields over the file's on the command line: more steps resume; another lr does not
    assert main(["train", "--config", str(config), "steps=3", "lr=0.05"]) == 2
    assert "started with another config (lr: 0.001 -> 0.05)" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "steps=lots"]) == 2
    assert "'steps=lots' (command line): field 'steps'" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "steps=3"]) == 0
    logged = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2, 3]
    assert f"training 3/3: loss {logged[-1]['loss']:.4f}" in capsys.readouterr().err  # (a log: a line a metrics row)
    no_file = [f"model={run / 'base'}", f"data={run}", f"output_dir={tmp_path / 'u'}", "steps=1", "tracker=none"]
    assert main(["train", *no_file]) == 0 and (tmp_path / "u" / "model" / "model_index.json").exists()
    config.write_text("model: x\nsteps: lots\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "field 'steps'" in capsys.readouterr().err
