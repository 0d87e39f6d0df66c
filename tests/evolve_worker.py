"""Runs a small `evolve` recipe, for tests/test_evolve.py; the test may SIGKILL it mid-round.

The teacher's call log and the judge's call log are the "server side": one line per answered call,
appended before the ledger commits, so a call paid twice shows up twice.

    python tests/evolve_worker.py RUN_DIR [--kill-after N]   # SIGKILL itself at the judge's N-th call
    python tests/evolve_worker.py RUN_DIR --kill-at-draw N   # ... at the teacher's N-th batch of draws
    python tests/evolve_worker.py RUN_DIR --gate ...         # with the quality gate (the judge's calls count)
    python tests/evolve_worker.py RUN_DIR --prior 16 ...     # with 16 prior images (the judge scores them first)
    python tests/evolve_worker.py RUN_DIR --teacher-budget 30 ...  # 30 teacher calls, then rounds that buy nothing
    python tests/evolve_worker.py RUN_DIR --open ...         # real-world prompts from a file, scored by win rate
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
from pathlib import Path

from PIL import Image

from forked import run_script
from t2i_evolve.data import CachedJudge, Ledger
from t2i_evolve.models import SamplerConfig, TinyModelConfig
from t2i_evolve.protocols import Comparison, ImageScore
from t2i_evolve.recipes.evolve import EvolveConfig, run_evolve
from t2i_evolve.recipes.parts import stable_seed
from t2i_evolve.world import ProceduralTeacher, TeacherConfig


def run_worker(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """This script in a process of its own (the tests SIGKILL it; forked, without the imports), on one thread: as
    fast for the tiny model, and robust under load."""
    return run_script(Path(__file__), str(run_dir), *args, env={"OMP_NUM_THREADS": "1"})


def ledger_state(run_dir: Path) -> tuple[list, list]:
    """A run's records and operations, for comparing a killed-and-rerun run with an uninterrupted one."""
    with Ledger(run_dir, create=False) as ledger:
        records = [(r.id, r.prompt, r.generator, r.seed, r.image_path, r.status, r.round, r.op, r.parent,
                    r.deleted_round, r.judge) for r in ledger.records(None)]
        ops = [(o.round, o.op, o.record_id, o.parent, o.reason) for o in ledger.ops()]
    return records, ops


def small_config(run_dir: str, **overrides) -> EvolveConfig:
    """Two short rounds of a tiny model: seconds, not minutes (3 sampling steps: these tests check the
    loop's bookkeeping, not how well the base draws)."""
    fields = dict(output_dir=run_dir, tiny_model=TinyModelConfig(block_out_channels=(16, 16, 32)),
                  seed_prompts=24, rounds=2, steps_per_round=6, batch_size=8, eval_prompts=8,
                  sample_all_below=100, variations=2, mutate_rate=0.5, sampler=SamplerConfig(steps=3))
    return EvolveConfig(**(fields | overrides))


def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` in the TensorBoard event files of `folder`, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return sorted((e.step, e.value) for e in events.Scalars(tag))


class ScriptedJudge:
    """Says 'base as good' for a third of the prompts and 'teacher better' for the rest, by prompt
    hash, so every operation happens in a tiny run; logs each answered call and can SIGKILL itself."""

    id = "scripted"

    def __init__(self, call_log: Path | None = None, kill_after: int = -1):
        self.call_log, self.kill_after, self.calls = call_log, kill_after, 0

    def compare(self, image_a, image_b, prompt):
        self.calls += 1
        if self.calls == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        winner = "tie" if stable_seed(prompt) % 3 == 0 else "b"
        if self.call_log:
            with open(self.call_log, "a") as f:
                f.write(json.dumps({"prompt": prompt}) + "\n")
        return Comparison(winner, 1.0 if winner == "tie" else 0.2, 1.0)

    def score(self, image, prompt):
        """A VQA score (the quality gate's, the deletion check's): a quarter of the prompts fail, by hash."""
        self.calls += 1
        if self.calls == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.call_log:
            with open(self.call_log, "a") as f:
                f.write(json.dumps({"prompt": prompt, "method": "score"}) + "\n")
        return ImageScore(0.0 if stable_seed(prompt, "gate") % 4 == 0 else 1.0, ())


OPEN = [f"a {adj} {thing} on a {place}" for adj in ("sleepy", "striped", "tiny") for thing in ("cat", "teapot", "robot")
        for place in ("sofa", "beach")]  # 18 real-world prompts


class OpenTeacher:
    """Draws any prompt: a flat color set by the prompt's hash; logs every call (the 'server side') and can
    SIGKILL its process when asked for its `kill_at`-th batch."""

    id = "open-teacher"

    def __init__(self, log: Path, kill_at: int = -1):
        self.log, self.kill_at, self.batches = log, kill_at, 0

    def generate(self, prompts, seeds):
        self.batches += 1
        if self.batches == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        with open(self.log, "a") as f:
            f.writelines(json.dumps({"prompt": p, "seed": s}) + "\n" for p, s in zip(prompts, seeds))
        return [Image.new("RGB", (32, 32), tuple(stable_seed(p, s, c) % 256 for c in "rgb")) for p, s in zip(prompts, seeds)]


class OpenWriter:
    """An LLM's stand-in: variations and new structures of any prompt, seeded."""

    id = "open-writer"

    def variations(self, prompt, k, *, seed):
        return [f"{prompt} at dusk, take {seed % 97 + i}" for i in range(k)]

    def new_structures(self, prompts, k, *, seed):
        return [f"two lighthouses and a kite, take {seed % 89 + i}" for i in range(k)]


class KillingTeacher(ProceduralTeacher):
    """The strong teacher, SIGKILLing its process when asked for its `kill_at`-th batch of images."""

    def __init__(self, *args, kill_at: int = -1, **kwargs):
        super().__init__(*args, **kwargs)
        self.kill_at, self.batches = kill_at, 0

    def generate(self, prompts, seeds):
        self.batches += 1
        if self.batches == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().generate(prompts, seeds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--kill-after", type=int, default=-1)
    parser.add_argument("--kill-at-draw", type=int, default=-1)
    parser.add_argument("--gate", action="store_true", help="min_teacher_score 0.5: the judge scores every teacher image")
    parser.add_argument("--judge-first", action="store_true", help="judge_first: judge, then train, each round")
    parser.add_argument("--prior", type=int, default=0, help="prior_images: the judge scores the base's own first")
    parser.add_argument("--draws", type=int, default=1, help="base_draws: buying verdicts judged on fresh draws too")
    parser.add_argument("--teacher-budget", type=int, help="max_teacher_calls, and train on past it")
    parser.add_argument("--open", action="store_true", help="OPEN prompts from a file (win rate), OpenTeacher, OpenWriter")
    args = parser.parse_args()
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    teacher = KillingTeacher(TeacherConfig(transient_error_rate=0.05), call_log=run / "teacher_calls.jsonl",
                             kill_at=args.kill_at_draw)
    open_world = {}
    if args.open:
        teacher = OpenTeacher(run / "teacher_calls.jsonl", kill_at=args.kill_at_draw)
        (run / "open.txt").write_text("\n".join(OPEN) + "\n")
        open_world = {"prompts_file": str(run / "open.txt"), "eval_prompts": 6, "seed_prompts": 12}
    judge = CachedJudge(ScriptedJudge(run / "judge_calls.jsonl", args.kill_after), Ledger(run), backoff_s=0)
    # the deletion check on: ties cost a second call (a score of the base's unseen variation), a quarter fail;
    # each mutation the least-seen of three (what the set holds when a rerun mutates again must not change it)
    config = small_config(args.run_dir, min_teacher_score=0.5 if args.gate else None, min_unseen_score=0.5,
                          mutate_candidates=3, judge_first=args.judge_first, prior_images=args.prior, base_draws=args.draws,
                          max_teacher_calls=args.teacher_budget, train_past_teacher_budget=args.teacher_budget is not None,
                          **open_world)
    run_evolve(config, teachers=[teacher], judge=judge, writer=OpenWriter() if args.open else None)


if __name__ == "__main__":
    main()
