"""`t2i-evolve demo`: the whole loop on the shapes world in a few minutes on a CPU.

init the tiny model -> the strong teacher draws training data into a ledger -> sample held-out prompts
(before) -> train -> sample them again (after) -> judge both -> run folder with config, ledger,
checkpoints, metrics.jsonl, report.html and summary.json. Rerunning the same command resumes: teacher
calls come from the ledger's cache and training from its last checkpoint.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from .config import MAX_PROMPTS, Config, PathText, check_resumed_config
from .data import CachedGenerator, Ledger, check_run_folder, claim_run_folder, release_run_folder
from .eval import ScoreBoard, evaluate, suite_prompts
from .eval.report import image_grid, read_jsonl, score_table, svg_curve, write_report
from .files import read_json, write_atomically
from .judges import PixelJudge
from .models import Sampler, SamplerConfig, T2IModel, TinyModelConfig, init_tiny_model
from .progress import progress_bar
from .train import BatchSize, EmaDecay, LearningRate, Seed, SnrGamma, TrainConfig, Trainer, TrainingSet, WarmupSteps
from .world import GrammarPrompts, GrammarSlice, ProceduralTeacher, parse, scene_skills
from .world.suites import geneval_suite


class DemoConfig(Config):
    """The demo's settings; defaults chosen by measurement (benchmarks/learning_curve.py, RESULTS.md)."""

    output_dir: PathText = "runs/demo"
    minutes: float = Field(9.5, gt=0, allow_inf_nan=False, description="Wall-clock budget of the whole demo; "
                                                                       "training gets the rest.")
    min_groups: int = 1
    max_groups: int = 2
    p_size: float = Field(0.0, ge=0, le=1, description="Share of groups with a size word (0: none).")
    train_images: int = Field(8000, ge=1, le=MAX_PROMPTS)
    eval_prompts: int = Field(160, ge=1, le=MAX_PROMPTS)
    geneval_scale: float = Field(0.3, ge=0, le=1, description="Share of GenEval's 553 prompts judged after training.")
    seed: Seed = 0
    model: TinyModelConfig = TinyModelConfig()
    # Guidance 1.5 measured +0.035 on the demo's trained model (two sampling seeds, 160 prompts) over none;
    # DDIM 20 steps or DPM-Solver++ gave nothing over DDIM 10 (RESULTS.md).
    sampler: SamplerConfig = SamplerConfig(steps=10, guidance=1.5)
    batch_size: BatchSize = 16
    lr: LearningRate = 2e-3
    snr_gamma: SnrGamma | None = 5.0
    warmup_steps: WarmupSteps = 100
    lr_schedule: Literal["constant_with_warmup", "cosine", "linear"] = "cosine"
    ema_decay: EmaDecay = 0.995
    caption_dropout: float = Field(0.1, ge=0, le=1)

    @property
    def slice_name(self) -> str:
        sizes = "no size words" if self.p_size == 0 else f"size words in {self.p_size:.0%} of groups"
        return f"{self.min_groups}-{self.max_groups} groups, {sizes}"


RESUMABLE_CHANGES = {"output_dir", "eval_prompts", "geneval_scale", "sampler"}  # what only the evaluations read


def run_demo(config: DemoConfig) -> dict:
    started = time.perf_counter()
    out = check_run_folder(config.output_dir, "demo")  # (not an evolve run's, nor an import's)
    if (out / "base" / "model_index.json").exists():  # a folder a demo started: resumed only by the same demo
        check_resumed_config(out / "demo.yaml", config, RESUMABLE_CHANGES)
    claim_run_folder(out, "demo")
    config.save(out / "demo.yaml")
    prompts_source = GrammarPrompts(GrammarSlice(min_groups=config.min_groups, max_groups=config.max_groups,
                                                 p_size=config.p_size))
    train_prompts = prompts_source.sample(config.train_images, seed=config.seed)
    seen = set(train_prompts)
    held_out = [p for p in prompts_source.sample(4 * config.eval_prompts, seed=config.seed + 1) if p not in seen]
    held_out = held_out[: config.eval_prompts]

    phases: dict[str, float] = {}
    tick = time.perf_counter()
    base = out / "base"
    if not (base / "model_index.json").exists():
        init_tiny_model(base, config.model, seed=config.seed, overwrite=True)  # (a save a kill cut short)
    ledger = Ledger(out)
    _draw_teacher_data(ledger, train_prompts)
    phases["teacher_data_s"], tick = time.perf_counter() - tick, time.perf_counter()
    judge = PixelJudge()

    before, before_grid = _judge_model(T2IModel.from_pretrained(base), judge, held_out, config, "before")
    phases["eval_before_s"], tick = time.perf_counter() - tick, time.perf_counter()
    steps, train_minutes = _training_plan(out, config, base, started, phases["eval_before_s"], len(held_out))
    train = TrainConfig(
        model=str(base), output_dir=str(out), steps=steps, lr_schedule=config.lr_schedule,
        batch_size=config.batch_size, lr=config.lr,
        warmup_steps=config.warmup_steps, ema_decay=config.ema_decay, caption_dropout=config.caption_dropout,
        snr_gamma=config.snr_gamma, checkpoint_every=500, log_every=5, seed=config.seed, tracker="none",
        max_minutes=train_minutes,
    )
    trainer, trained_now = Trainer(train, TrainingSet.from_ledger(ledger)), []
    with progress_bar("training", None) as advance:
        trainer.run(lambda step, m: (trained_now.append(step),
                                     advance(1, status=f"step {step} loss {m.get('loss', float('nan')):.4f}")))
    phases["train_s"], tick = time.perf_counter() - tick, time.perf_counter()

    after_model = T2IModel.from_pretrained(out / "model")
    after, after_grid = _judge_model(after_model, judge, held_out, config, "after")
    geneval = _geneval(after_model, judge, config)
    phases["eval_after_s"] = time.perf_counter() - tick
    summary = {
        "before": before.summary(),
        "after": {**after.summary(), "geneval": geneval},
        "wall_s": time.perf_counter() - started,
        "train_images": ledger.count(),
        "train_steps": trainer.step,
        "images_seen": trainer.step * config.batch_size,
        "slice": config.slice_name,
        "eval_prompts": len(held_out),
        "phases": phases,
    }
    earlier = read_json(out / "summary.json")
    if not trained_now and earlier:  # a finished run evaluated again: its timings (and the advice on them) stand
        summary |= {key: earlier[key] for key in ("wall_s", "phases") if key in earlier}
    write_atomically(out / "summary.json", json.dumps(summary, indent=2))
    _write_report(out, held_out, before_grid, after_grid, summary)
    ledger.close()
    release_run_folder(out)
    return summary


# Below this many steps the demo's model has barely started learning: the held-out gains in RESULTS.md
# came from 1,200-2,600 steps on an idle 2-core machine.
FEW_STEPS = 800


def short_training_note(summary: dict, minutes: float) -> str | None:
    """One line for a demo whose time budget bought too few steps to show a gain (a busy or slow machine;
    the demo trains for a fixed time, not a fixed number of steps), with the budget that would buy enough at
    the speed this run measured. None when training had enough steps."""
    steps, train_s = summary["train_steps"], summary["phases"]["train_s"]
    if steps >= FEW_STEPS:
        return None
    rest = summary["wall_s"] - train_s  # (the evaluations and teacher draws: more steps or prompts, more of it)
    needed = (rest + 1.2 * FEW_STEPS * train_s / max(steps, 1)) / 60
    why = (f"its evaluations and teacher draws took {rest / 60:.1f} min" if rest > 30 * minutes
           else "a busy or slow machine")
    return (f"note: training fit only {steps} steps into the {minutes:g}-minute budget ({why}), "
            f"too few to show the demo's gain; rerun with a new --out and --minutes {max(needed, minutes + 1):.0f}")


def _training_plan(out: Path, config: DemoConfig, base: Path, started: float, eval_s: float, n_eval: int):
    """Steps and minutes of training: planned once per run folder and kept in `train_plan.json`, so a rerun
    after a crash resumes the same training run (the same schedule to the same step), however fast the
    machine is then. Training gets what is left of `minutes` once the evaluations after it are paid for
    (estimated from the one before), in steps at this machine's speed, so the learning rate can decay to zero
    by the end (a cosine schedule ends short runs better than a constant one); the minutes stay as a backstop."""
    plan_file, asked = out / "train_plan.json", config.model_dump(mode="json", exclude=RESUMABLE_CHANGES)
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    if {k: v for k, v in plan.get("config", {}).items() if k not in RESUMABLE_CHANGES} == asked:  # (older plans: all)
        return plan["steps"], plan["train_minutes"]
    after_cost = eval_s * (1 + round(553 * config.geneval_scale) / n_eval) * 1.15 + 10
    train_minutes = max(0.1, config.minutes - (time.perf_counter() - started + after_cost) / 60)
    steps = max(1, int(train_minutes * 60 / _seconds_per_step(base, config.batch_size)))
    write_atomically(plan_file, json.dumps({"steps": steps, "train_minutes": train_minutes, "config": asked}))
    return steps, train_minutes


def _seconds_per_step(model_dir: Path, batch_size: int) -> float:
    """Time a few forward + backward passes of the model on a dummy batch (a full step measured ~13% faster
    than 1.1x this, so the plain time is the estimate: optimizer and EMA cost about what warm-up saves)."""
    model = T2IModel.from_pretrained(model_dir)
    pixels = torch.zeros(batch_size, 3, model.resolution, model.resolution)
    ids = model.tokenize(["a red circle left of two blue squares"] * batch_size)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        model.denoising_loss(pixels, model.encode_tokens(ids)).backward()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def _draw_teacher_data(ledger: Ledger, prompts: list[str]) -> None:
    """The strong teacher draws every training prompt once; cached, so a rerun pays nothing again."""
    teacher = CachedGenerator(ProceduralTeacher(), ledger, batch_size=64)
    chunk = 256
    with progress_bar("teacher data", len(prompts)) as advance:
        for start in range(0, len(prompts), chunk):
            batch = prompts[start : start + chunk]
            seeds = list(range(start, start + len(batch)))
            images = teacher.generate(batch, seeds)
            with ledger.transaction():
                for prompt, seed, image in zip(batch, seeds, images):
                    if image is not None:
                        scene = parse(prompt)
                        ledger.add_record(prompt=prompt, generator=teacher.id, seed=seed, image=image,
                                          spec=scene.to_json(), skills=scene_skills(scene))
            advance(len(batch))


def _judge_model(model: T2IModel, judge: PixelJudge, prompts: list[str], config: DemoConfig, label: str):
    sampler = Sampler(model, config.sampler)
    with progress_bar(f"judging {label}", len(prompts)) as advance:
        board = evaluate(sampler, judge, prompts, seed=10_000, progress=advance, keep=16)
    return board, board.images


def _geneval(model: T2IModel, judge: PixelJudge, config: DemoConfig) -> dict:
    if config.geneval_scale <= 0:
        return {}
    prompts, tasks = suite_prompts(geneval_suite(seed=0, scale=config.geneval_scale))
    with progress_bar("GenEval tasks", len(prompts)) as advance:
        board: ScoreBoard = evaluate(Sampler(model, config.sampler), judge, prompts, seed=20_000, tasks=tasks,
                                     progress=advance)
    return board.summary()["geneval"]


def _write_report(out: Path, prompts: list[str], before, after, summary: dict) -> None:
    metrics = read_jsonl(out / "metrics.jsonl")
    losses = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    geneval = summary["after"].get("geneval") or {}
    tasks = "".join(f"<tr><td>{t}</td><td>{v:.3f}</td></tr>" for t, v in geneval.get("tasks", {}).items())
    write_report(out / "report.html", "t2i-evolve demo", [
        ("Held-out prompts", image_grid(prompts, {"before": before, "after": after})),
        ("Judge score per skill", score_table({"before": summary["before"], "after": summary["after"]})),
        *([("GenEval-style tasks (after)", f"<table>{tasks}<tr><td>overall</td><td>{geneval['overall']:.3f}</td>"
                                           "</tr></table>")] if geneval else []),  # (none with geneval_scale 0)
        ("Training loss", svg_curve(losses, label="step")),
        ("Run", f"<pre>{html.escape(json.dumps({k: v for k, v in summary.items() if k not in ('before', 'after')}, indent=2))}</pre>"),
    ])
