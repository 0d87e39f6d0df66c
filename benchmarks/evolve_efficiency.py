"""Does the evolve recipe save teacher calls? Shapes world, same model, same training steps, side by side.

1. Data efficiency: held-out score vs teacher calls for uniform data (random grammar prompts, no judge, several
   dataset sizes) and for evolve (runs capped at several teacher-call budgets, each trained as long as the uniform
   arms). Reports the calls each needs to reach the uniform runs' best score (less `--tolerance`, the noise of that
   score), and the saving (uniform calls / evolve calls). `--control` adds evolve with a judge that always prefers
   the teacher: the growing set without the verdicts. `--part1-teachers gallery`: part 2's imperfect teachers
   instead of the strong one (uniform buys each prompt from one at random; evolve through the tournament and the
   quality gate).
2. Best of several teachers: gallery teachers that each lack a different skill. Students trained on
   (a) one teacher's images, (b) the judge's pick per prompt (a tournament), same prompts and steps; every
   student keeps only the images the judge scores at least `--min-teacher-score` (the recipe's quality gate:
   where both teachers miss a prompt, the tournament's winner is still wrong).
3. Judge noise (not in --quick): with part 1, the evolve run again with its judge behind
   `serve-judge --error-rate e`; with part 2, the student of the judge's picks again, its tournament and
   quality gate judged through that noisy server (error 0 is the in-process judge's student of part 2).
   `--confirm-votes n`: the noisy evolve runs ask a verdict that would buy teacher images again, to n votes.
4. Cost: judge calls and wall time per evolve round; and every arm's last held-out score per skill.

    python benchmarks/evolve_efficiency.py --quick --json           # 1 and 2 in 11-16 min (below); JSON line
    python benchmarks/evolve_efficiency.py --seeds 0,1,2 --jobs 2     # arms side by side, one core each
    python benchmarks/evolve_efficiency.py --preset long-tail-redraw --seeds 6 --jobs 2  # floor 1's regime (below)
    python benchmarks/evolve_efficiency.py --preset best-of-teachers --jobs 2           # floor 2's budget

`--preset long-tail` is EvolveDirector's regime, where floor 1 was measured (RESULTS.md, 12th-20th sessions; an
hour a seed on 2 cores): every arm starts from a base pretrained on one-object prompts by a teacher that never draws
yellow right, seed sets hold yellow at users' long-tail odds, variations keep the color the base missed, evolve
deletes only what the base also draws in an unseen variation, caps of 50 and 100 calls. `long-tail-redraw` adds
`base_draws: 3` (a verdict that buys stands only if the base loses on three draws), caps of 60 (a fifth of 300)
and 200, `--train-seeds 3` (each part-1 arm the mean of three runs), `--mutate-candidates 8` (each mutation the
least-seen of eight new prompts): 95 minutes a seed. `long-tail-12-seeds`: the 12th-18th sessions' runs.
`--quick` (`--preset quick`): part 1 of the rarer tail (yellow in one seed prompt in a hundred) from the base
`--preset long-tail-redraw --seeds 6` pretrained (`bases/yellow-blind-seed-6`, seed 6 only), one run an arm of
5 x 150 steps, evolve capped at 60 calls; part 2 on a fresh model at 2 x 50 steps, only run end to end (floor 2:
`--preset best-of-teachers`). Two arms at a time, the longest first. Flags given with a preset override it. Every
score is the pixel judge's DSG score on held-out prompts of the same slice, never trained on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from pydantic import ValidationError

from t2i_evolve.data import Ledger
from t2i_evolve.endpoints import EndpointConfig
from t2i_evolve.errors import ConfigError, UserError
from t2i_evolve.eval.held_out import held_out_prompts, held_out_score
from t2i_evolve.judges import PixelJudge
from t2i_evolve.models import Sampler, SamplerConfig, T2IModel, TinyModelConfig
from t2i_evolve.protocols import Comparison
from t2i_evolve.recipes.evolve import EvolveConfig, run_evolve
from t2i_evolve.recipes.parts import JudgeSpec, TeacherSpec, WriterSpec, base_sampling, stable_seed

sys.path.insert(0, str(Path(__file__).parent))  # run as a script or imported: its report module beside it
from evolve_report import (calls_to_reach, final_skills, finite_json, pool_replicates, print_table,  # noqa: E402
                           summarize, uniform_to_match)
from side_by_side import finite, numbers, run_arms  # noqa: E402

# Systematic blind spots (each teacher never draws some words right, the rest always), as real models have: the
# judge can route each prompt to a teacher that knows its words. Random deficits (`id:p`) hit every prompt instead.
DEFICIT_TEACHERS = "no-color:1:red/green/blue/yellow,no-shape:1:circle/square"

# Named settings (`--preset`, the module docstring says what each is), each a set of flag defaults; the key
# of each is a flag's name (`preset_flags_unknown` checks). long-tail is long-tail-12-seeds (the twelfth to
# eighteenth sessions' setting) changed to 24 seed prompts, 10 rounds of 75 steps and caps of 50 and 100 calls.
LONG_TAIL_12_SEEDS = {
    "parts": "1", "max_groups": 1, "max_count": 1, "p_size": 0.3, "eval_prompts": 24, "eval_draws": 8,
    "writer_keeps": "color", "rounds": 5, "steps_per_round": 150, "uniform_sizes": "100,300,1000",
    "evolve_budgets": "100", "evolve_seed_prompts": 12, "min_unseen_score": 1.0, "mutate_rate": 1.0,
    "rare_words": "yellow", "rare_weight": 0.2, "replay_share": 0.5, "lr": 1e-3,
    "pretrain": "no-color:1:yellow", "pretrain_images": 3000, "pretrain_steps": 6000}
LONG_TAIL = LONG_TAIL_12_SEEDS | {"evolve_seed_prompts": 24, "rounds": 10, "steps_per_round": 75,
                                  "evolve_budgets": "50,100"}
# --quick's part 2: a fresh model, two-object prompts, 2 x 50 steps: it only runs end to end (RESULTS.md, 34th-46th)
QUICK_PART2 = {"base": None, "rounds": 2, "steps_per_round": 50, "guidance": 1.0, "lr": 2e-3,
               "eval_prompts": 128, "eval_draws": 1, "max_groups": 2, "max_count": 3, "p_size": 0.0,
               "rare_words": [], "rare_weight": 1.0, "writer_keeps": []}
PRESETS = {
    "long-tail": LONG_TAIL,
    # where floor 1 was last measured (RESULTS.md, 27th-30th sessions): fresh draws, two caps, three runs an arm,
    # mutations aimed at the words the set lacks (30th; --mutate-candidates 1: the 27th-29th sessions' runs)
    "long-tail-redraw": LONG_TAIL | {"base_draws": 3, "evolve_budgets": "60,200", "train_seeds": 3, "mutate_candidates": 8},
    "long-tail-12-seeds": LONG_TAIL_12_SEEDS,
    # part 2 where floor 2 was measured (RESULTS.md, sixth session): 1,000 prompts, 8 x 750 steps of 16 per student
    "best-of-teachers": {"parts": "2", "rounds": 8, "multi_prompts": 1000},
}
# --quick: floor 1's regime without its 25 minutes of pretraining (module docstring); a cap of 60, a fifth of 300,
# as in long-tail-redraw. At 5 x 100 steps uniform's data no longer lifts the base (RESULTS.md, 34th session).
QUICK_BASE = Path(__file__).parent / "bases" / "yellow-blind-seed-6"
PRESETS["quick"] = PRESETS["long-tail-redraw"] | {
    "parts": "1,2", "seeds": "6", "base": str(QUICK_BASE), "pretrain": None, "rare_weight": 0.05, "rounds": 5,
    "steps_per_round": 150, "evolve_budgets": "60", "train_seeds": 1, "control": False, "jobs": 2}


def base_config(args, out: Path, seed: int, **fields) -> EvolveConfig:
    """The settings every arm shares: model, slice, rounds, steps per round, evaluation."""
    shared = {"output_dir": str(out), "seed": seed, "rounds": args.rounds, "steps_per_round": args.steps_per_round,
              "base_model": args.base_for.get(seed, args.base), "lr": args.lr, "lr_schedule": args.lr_schedule,
              "random_flip": args.random_flip, "warmup_steps": args.warmup_steps, "eval_prompts": args.eval_prompts,
              "lora": None if args.lora_rank is None else {"rank": args.lora_rank},  # as `main` checks it
              "eval_draws": args.eval_draws, "sample_share": args.sample_share, "sample_all_below": args.sample_all_below,
              "max_groups": args.max_groups, "max_count": args.max_count, "p_size": args.p_size,
              "rare_words": args.rare_words, "rare_weight": args.rare_weight,
              "writer": WriterSpec(keep=args.writer_keeps), "sampler": SamplerConfig(steps=10, guidance=args.guidance)}
    return EvolveConfig(**(shared | fields))


def arm(config: EvolveConfig, **parts) -> dict:
    started, summary = time.perf_counter(), run_evolve(config, **parts)
    rows = summary["rounds"]
    return {"final_score": summary["final_score"], "calls": summary["teacher_calls"],
            "judge_calls": summary["judge_calls"], "wall_s": time.perf_counter() - started,
            "curve": [(row["teacher_calls"], row["score"]) for row in rows if "score" in row],
            "rounds": [{k: row.get(k) for k in ("round", "teacher_calls", "judge_calls", "active", "ops", "score",
                                                "skills", "wall_s")} for row in rows]}


def base_score_arm(args, root: Path, seed: int) -> float | None:
    """The base's own held-out score, scored as every arm is (none for a fresh base): a target the base
    already reaches makes any saving vacuous, so the benchmark says so."""
    config = base_config(args, root, seed)
    if config.base_model is None:
        return None
    sampler = Sampler(T2IModel.from_pretrained(config.base_model, config.device), base_sampling(config))
    return held_out_score(sampler, held_out_prompts(config))["score"]


def pretrain_arm(args, root: Path, seed: int) -> str:
    """The base every arm of one seed starts from (`--pretrain`): a fresh tiny model trained on
    `--pretrain-images` images of the pretrain teacher (one blind to a color, say), never on the seed's
    held-out prompts. EvolveDirector's regime: a base that already draws most of the world and misses a
    concept, which the judge can find by deleting the rest. Its rate decays (cosine): at a constant 2e-3,
    one seed's 6,000 steps diverged near the end (RESULTS.md). The base depends on the threads it trained with
    (float sums in another order drift over 6,000 steps): seeds pretrained one at a time use every core, side by
    side (`--jobs`) they share them, so the line it prints names the count. Returns its model folder."""
    (tid, (p, blind)), = args.pretrain.items()
    config = base_config(args, root / "pretrain", seed, base_model=None, lr=2e-3, lr_schedule="cosine", rounds=1,
                         evolve=False, rare_words=[], random_flip=False, lora=None,  # blind; no tail, flips, LoRA
                         steps_per_round=args.pretrain_steps, seed_prompts=args.pretrain_images,
                         teachers=[TeacherSpec(id=tid, p=p, blind_to=blind)])
    summary = run_evolve(config)
    print(f"seed {seed}: pretrained base scores {summary['final_score']:.3f} "
          f"{summary['rounds'][-1].get('skills')} ({torch.get_num_threads()} threads)", file=sys.stderr)
    return str(root / "pretrain" / "rounds" / "001" / "model")


def uniform_arm(args, root: Path, seed: int, n: int, **fields) -> dict:
    """n random grammar prompts drawn once, no judge: by the strong teacher, or with `--part1-teachers
    gallery` each by one of part 2's teachers picked at random (what buying from several APIs without a
    judge gives)."""
    parts = {}
    if args.gallery_part1:
        parts["teachers"] = [AnyOneTeacher([spec.build(student_resolution(args)) for spec in teacher_specs(args)])]
    return arm(base_config(args, root / f"uniform-{n}", seed, evolve=False, seed_prompts=n, eval_every_round=False,
                           **fields), **parts)


def evolve_arm(args, root: Path, seed: int, budget: int, parts: dict | None = None, **fields) -> dict:
    """An evolve run that buys at most `budget` teacher images (0: no cap) and then trains on, so it gets
    the uniform arms' training compute whatever it spent. `parts` go to `run_evolve`, `fields` to the config.
    With `--part1-teachers gallery` it buys from part 2's teachers through the tournament and quality gate."""
    cap = {"max_teacher_calls": budget, "train_past_teacher_budget": True} if budget else {}
    fields = {"min_unseen_score": args.min_unseen_score, "max_epochs_per_round": args.max_epochs_per_round,
              "mutate_rate": args.mutate_rate, "mutate_candidates": args.mutate_candidates,
              "replay_share": args.replay_share, "judge_first": args.judge_first, "prior_images": args.prior_images,
              "prior_share": args.prior_share, "base_draws": args.base_draws} | fields
    if args.gallery_part1:
        fields = {"teachers": teacher_specs(args), "min_teacher_score": args.min_teacher_score,
                  "tournament": "until_pass"} | fields
    return arm(base_config(args, root / evolve_name(args, budget), seed,
                           seed_prompts=args.evolve_seed_prompts, **cap, **fields), **(parts or {}))


class AnyOneTeacher:
    """Several teachers as one, no judge: each (prompt, seed) is drawn by one of them, picked by a stable
    hash, so a rerun pays the same calls. The uniform baseline when the teachers are imperfect."""

    def __init__(self, teachers: list):
        self.teachers = teachers
        self.id = "any-of-" + "+".join(t.id for t in teachers)

    def generate(self, prompts, seeds):
        picks = [stable_seed(prompt, seed) % len(self.teachers) for prompt, seed in zip(prompts, seeds)]
        images = [None] * len(prompts)
        for t, teacher in enumerate(self.teachers):
            idx = [i for i, pick in enumerate(picks) if pick == t]
            for i, image in zip(idx, teacher.generate([prompts[i] for i in idx], [seeds[i] for i in idx])):
                images[i] = image
        return images


def student_arm(args, root: Path, seed: int, name: str, specs: list[TeacherSpec], judge_error: float = 0.0) -> dict:
    """A student of `specs`' images for the same prompts (several teachers: the judge's tournament picks).
    Also scores the images it trained on with the exact judge: how clean its data was, beside how well it
    learned from it. `judge_error` > 0: the tournament and gate ask `serve-judge --error-rate judge_error`
    (`--judge-votes` times per verdict)."""
    out = root / f"student-{name}"
    config = partial(base_config, args, out, seed, teachers=specs, evolve=False, seed_prompts=args.multi_prompts,
                     eval_every_round=False, min_teacher_score=args.min_teacher_score or None)
    if judge_error:
        with served_judge(judge_error, seed, args.judge_votes) as judge:
            result = arm(config(judge=judge))
    else:
        result = arm(config())
    ledger, judge = Ledger(out), PixelJudge()
    trained_on = ledger.records()  # active: what the judge's gate (--min-teacher-score) let through
    result["data_score"] = statistics.fmean(judge.score(ledger.load_image(rec.image_path), rec.prompt).score
                                            for rec in trained_on)
    result["data_images"] = len(trained_on)
    return result


@contextmanager
def served_judge(rate: float, seed: int, votes: int = 1, sampled: bool = False):
    """A `JudgeSpec` for the pixel judge behind `serve-judge --error-rate rate` (each VQA answer flipped, each
    pairwise verdict replaced at that rate), served while the block runs. `votes` > 1 (or `sampled`): the
    judge samples (temperature > 0, a seed a vote), so the errors of a verdict's votes are independent."""
    from t2i_evolve.judges.server import JudgeServer, JudgeServerConfig

    with JudgeServer(JudgeServerConfig(error_rate=rate, seed=seed)) as server:
        endpoint = EndpointConfig(base_url=server.url, model="pixel-judge", max_concurrency=8)
        yield JudgeSpec(kind="openai", endpoint=endpoint, votes=votes, temperature=0.7 if votes > 1 or sampled else 0.0)


def noise_arm(args, root: Path, seed: int, rate: float) -> dict:
    """The evolve arm (largest budget) with its judge behind `serve-judge --error-rate rate`."""
    with served_judge(rate, seed, args.judge_votes, sampled=bool(args.confirm_votes)) as judge:
        return evolve_arm(args, root / noise_name("noise", rate, args), seed, args.evolve_budgets[-1], judge=judge,
                          confirm_votes=args.confirm_votes)


def evolve_name(args, budget: int) -> str:
    """The run folder of an evolve arm: its cap, and its deletion check and epoch cap when it has them."""
    check = "" if args.min_unseen_score is None else f"-unseen-{args.min_unseen_score:g}"
    epochs = "" if args.max_epochs_per_round is None else f"-epochs-{args.max_epochs_per_round:g}"
    mutate = "" if args.mutate_rate == 0.1 else f"-mutate-{args.mutate_rate:g}"
    mutate += f"-least-seen-of-{args.mutate_candidates}" if args.mutate_candidates > 1 else ""
    replay = f"-replay-{args.replay_share:g}" if args.replay_share else ""
    first = "-judge-first" if args.judge_first else ""
    prior = f"-prior-{args.prior_images}-{args.prior_share:g}" if args.prior_images else ""
    draws = f"-draws-{args.base_draws}" if args.base_draws > 1 else ""
    return f"evolve-{budget or 'uncapped'}{check}{epochs}{mutate}{replay}{first}{prior}{draws}"


def noise_name(arm: str, rate: float, args) -> str:
    """The arm (and run folder) of a noisy judge: its error rate, and its votes when it votes."""
    confirm = f"-confirm-{args.confirm_votes}" if args.confirm_votes and arm == "noise" else ""
    return f"{arm}-{rate}" + (f"-votes-{args.judge_votes}" if args.judge_votes > 1 else "") + confirm


def plan_arms(args, root: Path, seed: int, parts: set[int]) -> dict[str, tuple]:
    """Every training run of one seed, as name -> (function, arguments): they are independent, so
    `run_arms` can run them side by side."""
    arms = {}
    if 1 in parts:
        arms["base"] = (base_score_arm, (args, root, seed))
        for k in range(args.train_seeds):  # k > 0: the same arm under another training seed, `pool_replicates`
            at, tag, more = (root, "", {}) if k == 0 else (root / f"train-{k}", f"@{k}", {"train_seed": seed + 1000 * k})
            arms |= {f"uniform-{n}{tag}": (partial(uniform_arm, **more), (args, at, seed, n)) for n in args.uniform_sizes}
            arms |= {f"evolve-{b}{tag}": (partial(evolve_arm, **more), (args, at, seed, b)) for b in args.evolve_budgets}
        if args.control:  # the largest cap (0, no cap, when there is none)
            arms["control"] = (partial(evolve_arm, min_unseen_score=None, prior_images=0),  # (its judge cannot score)
                               (args, root / "control", seed, max(args.evolve_budgets), {"judge": TeacherAlwaysBetter()}))
    if 2 in parts:  # (and part 3 with it) with part 2's settings: its own under --quick (`QUICK_PART2`)
        specs, p2 = teacher_specs(args), args.part2
        arms |= {f"student-{spec.id}": (student_arm, (p2, root, seed, spec.id, [spec])) for spec in specs}
        arms["student-judged"] = (student_arm, (p2, root, seed, "judged", specs))
    if 3 in parts and 1 in parts:
        arms |= {noise_name("noise", rate, args): (noise_arm, (args, root, seed, rate)) for rate in args.judge_errors}
    if 3 in parts and 2 in parts:  # error 0 is part 2's own student-judged
        arms |= {noise_name("student-judged-noise", rate, args):
                 (student_arm, (p2, root, seed, noise_name("judged-noise", rate, args), specs, rate))
                 for rate in args.judge_errors if rate}
    return arms


def arm_cost(key: tuple[int, str]) -> tuple[int, int]:
    """A rank of an arm's (seed, name) run time, for `run_arms` to start the longest first: evolve runs (they
    judge too), then uniform's, the largest set first (it draws the most), part 2's students (fewer steps under
    --quick), the base's score."""
    name = key[1]
    size = int(name.removeprefix("uniform-").split("@")[0]) if name.startswith("uniform-") else 0
    return (0 if name == "base" else 1 if name.startswith("student") else 2 if size else 3), size


def data_efficiency(args, arms: dict) -> dict:
    uniform = {n: arms[f"uniform-{n}"] for n in args.uniform_sizes}
    # The target is the best uniform score less the tolerance, for both arms: on a flat, noisy curve the
    # arg-max size is chance, and counting it as what uniform "needs" would credit evolve with noise.
    best = max(uniform[n]["final_score"] for n in uniform)
    target = best - args.tolerance
    best_n = min(n for n in uniform if uniform[n]["final_score"] >= target)
    # A saving in calls is only measurable where uniform needs more than its smallest set to reach the target:
    # where that set scores within the noise of the best, the ratio says nothing about the judge. The best, not
    # the largest: at fixed steps a larger set gets fewer passes, and on some bases 1,000 images score below
    # 300, yet uniform still needs its 300 calls (until the 29th session this compared largest with smallest).
    sizes = sorted(uniform)
    gain = best - uniform[sizes[0]]["final_score"]
    runs = {budget: arms[f"evolve-{budget}"] for budget in args.evolve_budgets}
    calls_to_target = calls_to_reach(runs.values(), target)
    evolved = runs[args.evolve_budgets[-1]]
    base = arms["base"]  # (a target the base reaches untrained: "saving" what no training needs)
    result = {"base_score": base,
        "uniform": {"final_score": best, "calls": best_n, "target": target,
                    "by_size": {n: uniform[n]["final_score"] for n in uniform},
                    "replicates": {n: uniform[n].get("replicates") for n in uniform},  # with --train-seeds
                    "gain_smallest_to_best": gain, "rises_with_data": gain > 2 * args.tolerance,
                    "largest_below_target": uniform[sizes[-1]]["final_score"] < target,
                    "target_above_base": base is None or target > base},
        "evolve": {"calls_to_uniform_final": calls_to_target, "final_score": evolved["final_score"],
                   "calls": evolved["calls"], "curve": evolved["curve"], "rounds": evolved["rounds"],
                   "by_budget": {budget or "none": {"final_score": run["final_score"], "calls": run["calls"],
                                                    "curve": run["curve"], "replicates": run.get("replicates")}
                                 for budget, run in runs.items()}},
        "saving": best_n / calls_to_target if calls_to_target else None,
        "uniform_to_evolve_final": uniform_to_match({n: uniform[n]["final_score"] for n in uniform}, runs, args.tolerance),
        "skills": {name: final_skills(run["rounds"]) for name, run in arms.items() if isinstance(run, dict)},
    }
    if "control" in arms:
        run = arms["control"]
        result["control_no_judge"] = {"cap": max(args.evolve_budgets) or None, "final_score": run["final_score"],
                                      "calls": run["calls"], "curve": run["curve"]}
    return result


class TeacherAlwaysBetter:
    """The control judge: says "teacher better" to every pair, so the set grows by variations of every
    record judged and nothing is deleted. What evolve gains over this comes from the judge's verdicts;
    what this gains over uniform comes from the growing set of variations alone."""

    id = "always-teacher"

    def compare(self, image_a, image_b, prompt: str) -> Comparison:
        return Comparison("b", 0.0, 1.0)


def student_resolution(args) -> int:
    """Teachers draw at the students' size (what the students are taught from), as in run_evolve."""
    return T2IModel.folder_resolution(args.base) if args.base else TinyModelConfig().resolution


def teacher_specs(args) -> list[TeacherSpec]:
    return [TeacherSpec(id=tid, p=p, blind_to=blind) for tid, (p, blind) in args.teachers.items()]


def multi_teacher(args, root: Path, seed: int, arms: dict) -> dict:
    specs = teacher_specs(args)
    picked = arms["student-judged"]
    held_out = held_out_prompts(base_config(args, root, seed))  # the prompts every student is scored on
    teachers = {spec.id: held_out_score(spec.build(student_resolution(args)), held_out)["score"] for spec in specs}
    return {"student": picked["final_score"], "teachers": teachers,
            "single_teacher_students": {spec.id: arms[f"student-{spec.id}"]["final_score"] for spec in specs},
            **{field: {name.removeprefix("student-"): arms[name][key] for name in arms if name.startswith("student-")}
               for field, key in (("training_data", "data_score"), ("training_images", "data_images"))},
            "teacher_calls": picked["calls"], "judge_calls": picked["judge_calls"]}


def multi_teacher_noise(args, arms: dict) -> dict:
    """The judge's-picks student at each judge error rate: its score, how many images the noisy gate kept,
    and how right they were (the exact judge's mean score of them; 1.0: no wrong image got through)."""
    results = {}
    for rate in args.judge_errors:
        run = arms["student-judged" if not rate else noise_name("student-judged-noise", rate, args)]
        results[str(rate)] = {"student": run["final_score"], "training_images": run["data_images"],
                              "training_data": run["data_score"], "judge_calls": run["judge_calls"]}
    return results


def judge_noise(args, arms: dict, target: float, uniform_calls: int) -> dict:
    """The saving at each judge error rate, against the same uniform arms."""
    results = {}
    for rate in args.judge_errors:
        run = arms[noise_name("noise", rate, args)]
        reached = calls_to_reach([run], target)
        results[str(rate)] = {"final_score": run["final_score"], "calls": run["calls"],
                              "calls_to_uniform_final": reached, "saving": uniform_calls / reached if reached else None}
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Parts 1 and 2 in 11-16 minutes on 2 cores (the VM's "
                        "speed varies): part 1 from the shipped seed-6 base (`--preset quick`, flags override it).")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="Named flag defaults (module docstring); "
                                                                  "flags given with it override them.")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps-per-round", type=int, default=750, help="Of batch 16. 4 x 750 = 48,000 views an "
                        "arm: where more uniform data lifts a fresh model by about three times its noise (RESULTS.md).")
    parser.add_argument("--uniform-sizes", default="50,150,500,1500", help="Comma-separated sizes of the uniform arm.")
    parser.add_argument("--evolve-seed-prompts", type=int, default=30)
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, help="Part 1 also runs evolve with a "
                        "judge that always says 'teacher better' (the largest cap): the set without the verdicts. "
                        "On unless --quick or --part1-teachers gallery.")
    parser.add_argument("--evolve-budgets", default="300,150,0", help="Comma-separated teacher-call caps of the "
                        "evolve arms, each trained as long as the uniform arms (0: no cap; the last is part 3's).")
    parser.add_argument("--sample-share", type=float, default=0.2)
    parser.add_argument("--sample-all-below", type=int, default=40)
    parser.add_argument("--multi-prompts", type=int, default=300)
    parser.add_argument("--part1-teachers", default="strong", choices=["strong", "gallery"],
                        help="Part 1's teachers. strong: one that draws every prompt right (the judge can only "
                             "save calls on prompts the base already draws). gallery: part 2's imperfect "
                             "teachers; uniform buys each prompt from one at random, evolve through the judge's "
                             "tournament (until_pass) and quality gate (--min-teacher-score).")
    parser.add_argument("--min-teacher-score", type=float, default=1.0,
                        help="Part 2's students train only on teacher images the judge scores at least this "
                             "(the recipe's quality gate; 0: every image, the paper's tournament alone).")
    parser.add_argument("--min-unseen-score", type=float, default=None,
                        help="Evolve's deletion check (`min_unseen_score`): a record is deleted only if the base "
                             "also draws an unseen variation of its prompt this well (default: off, the paper).")
    parser.add_argument("--teachers", default=DEFICIT_TEACHERS,
                        help="Part 2's gallery teachers as id:p (the chance its skill breaks) or id:p:word/word "
                             "(breaks only on those color or shape words: a systematic blind spot), comma-separated.")
    parser.add_argument("--guidance", type=float, default=1.5, help="Classifier-free guidance when sampling the "
                        "base (held-out score, judged samples).")
    parser.add_argument("--eval-prompts", type=int, default=256, help="Held-out prompts.")
    parser.add_argument("--max-groups", type=int, default=2, help="Prompts of 1 to this many object groups.")
    parser.add_argument("--max-count", type=int, default=3, help="Objects per group, at most (1 to 3).")
    parser.add_argument("--p-size", type=float, default=0.0, help="Share of groups with a size word.")
    parser.add_argument("--eval-draws", type=int, default=1, help="Images per held-out prompt (for a small slice).")
    parser.add_argument("--writer-keeps", default="", help="What evolve's variations keep of each group: color, "
                                                           "shape or color,shape (default: neither; `writer.keep`).")
    parser.add_argument("--max-epochs-per-round", type=float, default=None,
                        help="Evolve's `max_epochs_per_round`: at most this many passes over the set a round.")
    parser.add_argument("--judge-first", action="store_true",
                        help="Evolve's `judge_first`: each round judges the model it starts from, then trains.")
    parser.add_argument("--random-flip", action="store_true", help="Arms (not the pretraining) flip images.")
    parser.add_argument("--lora-rank", type=int, default=None, help="Arms (not the pretraining) train LoRA adapters.")
    parser.add_argument("--base-draws", type=int, default=1, help="Evolve's `base_draws`: a verdict that buys "
                        "stands only if the base loses on this many draws.")
    parser.add_argument("--rare-words", default="", help="Comma-separated colors or shapes kept at --rare-weight "
                        "odds in every seed set (uniform's data, evolve's seeds): users' long tail; held-out is even.")
    parser.add_argument("--rare-weight", type=float, default=1.0)
    parser.add_argument("--mutate-rate", type=float, default=0.1, help="Evolve's chance of a new prompt per deletion.")
    parser.add_argument("--mutate-candidates", type=int, default=1, help="Evolve's `mutate_candidates`: of this many "
                        "new prompts per mutation, the one naming what the set has seen least.")
    parser.add_argument("--replay-share", type=float, default=0.0, help="Evolve's share of training on deleted records.")
    parser.add_argument("--prior-images", type=int, default=0, help="Evolve's `prior_images` (and `prior_share`):")
    parser.add_argument("--prior-share", type=float, default=0.3, help="the base's own images the judge passed.")
    parser.add_argument("--pretrain", default=None, help="Every arm starts from a base pretrained per seed on this "
                        "teacher, id:p[:word/word] (no-color:1:yellow: it never saw yellow drawn right); fine-tune at --lr 3e-4.")
    parser.add_argument("--pretrain-images", type=int, default=1500)
    parser.add_argument("--pretrain-steps", type=int, default=1500, help="Of batch 16.")
    parser.add_argument("--judge-errors", default="0,0.1,0.2")
    parser.add_argument("--judge-votes", type=int, default=1, help="Part 3: the noisy judge asks each verdict this "
                        "many times (sampled, a seed each), the majority deciding (`votes` of the openai judge).")
    parser.add_argument("--confirm-votes", type=int, default=None, help="Part 3 with part 1: the noisy evolve runs ask "
                        "a verdict that buys teacher images again, to this many votes (`confirm_votes`).")
    parser.add_argument("--train-seeds", type=int, default=1, help="Part 1's uniform and evolve arms (not the "
                        "control) each train this many times (same data, another `train_seed`) and count as their "
                        "mean: a target and a curve less at the mercy of one run's luck (RESULTS.md, 27th session).")
    parser.add_argument("--tolerance", type=finite, default=0.02, help="Score both arms must reach: the best uniform "
                        "score less this (about one standard error of the held-out score at 128 prompts).")
    parser.add_argument("--base", default=None, help="Model folder every arm starts from (default: a fresh tiny model "
                        "per seed); e.g. the demo's trained model.")
    parser.add_argument("--lr", type=float, default=2e-3, help="Learning rate of every arm (fine-tune a trained "
                                                                 "--base at about 1e-4 to 3e-4).")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--lr-schedule", default="constant_with_warmup", choices=["constant_with_warmup", "cosine"],
                        help="Over each arm's whole training (its rounds are one run).")
    parser.add_argument("--parts", default="1,2,3", help="Comma-separated parts to run (1-3).")
    parser.add_argument("--jobs", type=int, default=1, help="Arms run side by side in this many processes, each "
                        "with its share of the cores (2 on a 2-core CPU: one thread each; 8 or more on a GPU).")
    parser.add_argument("--out", default=None, help="Keep run folders here (default: a temp folder).")
    parser.add_argument("--json", action="store_true")
    return parser


def preset_flags_unknown(parser: argparse.ArgumentParser, preset: str) -> set[str]:
    """A preset's keys that name no flag: `set_defaults` would ignore them, and a run that its name says is
    reproducible would quietly use another setting."""
    return set(PRESETS[preset]) - set(vars(parser.parse_args([])))


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """The flags over a preset's defaults, checked (a bad one: one line, before any arm trains), as arms read
    them: lists, sets, `base_for` (filled by pretraining), `part2` (part 2's settings; --quick: `QUICK_PART2`)."""
    known = parser.parse_known_args(argv)[0]
    if known.quick and known.preset not in (None, "quick"):
        parser.error(f"--preset {known.preset} is a full run (an hour or more on 2 cores, RESULTS.md); not with --quick")
    preset = "quick" if known.quick else known.preset
    if preset:
        if unknown := preset_flags_unknown(parser, preset):
            parser.error(f"--preset {preset}: no such flag {sorted(unknown)}")
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    args.quick = preset == "quick"
    if args.quick and args.seeds != "6":
        parser.error(f"--quick: its base ({QUICK_BASE.name}) was pretrained for seed 6 alone (other seeds' held-out "
                     f"prompts were in its training), not --seeds {args.seeds}; other seeds: --preset long-tail-redraw")
    args.gallery_part1 = args.part1_teachers == "gallery"
    if args.gallery_part1 and args.control:
        parser.error("--control: the always-'teacher better' judge has no quality gate; not with --part1-teachers gallery")
    args.control = not args.gallery_part1 if args.control is None else args.control
    args.uniform_sizes = numbers(parser, "--uniform-sizes", args.uniform_sizes, int, low=1)
    args.judge_errors = numbers(parser, "--judge-errors", args.judge_errors, float, high=1)
    args.evolve_budgets = numbers(parser, "--evolve-budgets", args.evolve_budgets, int)
    args.teachers = parse_teachers(parser, "--teachers", args.teachers)
    args.pretrain = parse_teachers(parser, "--pretrain", args.pretrain) if args.pretrain else None
    if args.pretrain and len(args.pretrain) > 1:
        parser.error("--pretrain: one teacher")
    args.writer_keeps = [word for word in args.writer_keeps.split(",") if word]
    args.rare_words = [word for word in args.rare_words.split(",") if word]
    checked = {"max_count": args.max_count, "eval_draws": args.eval_draws, "writer": {"keep": args.writer_keeps},
               "max_epochs_per_round": args.max_epochs_per_round, "min_unseen_score": args.min_unseen_score,
               "min_teacher_score": args.min_teacher_score, "steps_per_round": args.pretrain_steps,
               "seed_prompts": args.pretrain_images, "rare_words": args.rare_words, "rare_weight": args.rare_weight,
               "mutate_rate": args.mutate_rate, "mutate_candidates": args.mutate_candidates,
               "replay_share": args.replay_share, "base_draws": args.base_draws,
               "prior_images": args.prior_images, "prior_share": args.prior_share,
               "lora": None if args.lora_rank is None else {"rank": args.lora_rank}}
    try:  # what every arm's config takes, checked before any arm trains
        EvolveConfig(**checked)
    except ValidationError as e:
        field, *inner = e.errors()[0]["loc"]  # a nested field's flag names its key: lora.rank -> --lora-rank
        flag = {"writer": "writer-keeps", "steps_per_round": "pretrain-steps", "seed_prompts": "pretrain-images"}.get(
            field, "_".join(map(str, [field, *inner])))
        parser.error(f"--{flag.replace('_', '-')}: {e.errors()[0]['msg']}")
    for flag, value in (("train-seeds", args.train_seeds), ("judge-votes", args.judge_votes), ("eval-prompts", args.eval_prompts)):
        if value < 1:
            parser.error(f"--{flag}: at least 1, not {value}")
    if args.confirm_votes is not None and args.confirm_votes <= args.judge_votes:
        parser.error(f"--confirm-votes: more than --judge-votes ({args.judge_votes}), not {args.confirm_votes}")
    args.seeds = numbers(parser, "--seeds", args.seeds, int)
    args.parts = parts = set(numbers(parser, "--parts", args.parts, int, low=1, high=4))
    if args.gallery_part1 and {1, 3} <= parts:
        parser.error("part 3 with part 1 reruns evolve with the strong teacher: not with --part1-teachers gallery")
    if 3 in parts and not parts & {1, 2}:
        parser.error("part 3 reruns part 1's evolve arm or part 2's judged student with a noisy judge: add part 1 or 2")
    args.base_for = {}
    args.part2 = argparse.Namespace(**vars(args) | QUICK_PART2) if args.quick else args
    return args


def main() -> None:
    parser = build_parser()
    args = parse_args(parser)
    seeds, parts = args.seeds, args.parts
    started = time.perf_counter()
    per_seed = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        try:
            if args.pretrain:  # every arm of a seed starts from its pretrained base
                args.base_for = run_arms({seed: (pretrain_arm, (args, root / f"seed-{seed}", seed))
                                          for seed in seeds}, min(args.jobs, len(seeds)))
            planned = {(seed, name): job for seed in seeds
                       for name, job in plan_arms(args, root / f"seed-{seed}", seed, parts).items()}
            done = run_arms(planned, args.jobs, cost=arm_cost)
        except UserError as e:  # a bad --base and the like: one line, as the CLI prints it
            parser.exit(2, f"{parser.prog}: error: {e}{'' if args.out else ' (with --out, a rerun keeps the arms that finished)'}\n")
        for seed in seeds:
            arms = pool_replicates({name: result for (s, name), result in done.items() if s == seed})
            result = {"seed": seed, "arm_wall_s": {name: round(run["wall_s"], 1) for name, run in arms.items()
                                                   if isinstance(run, dict) and "wall_s" in run}}  # what --quick spends
            if 1 in parts:
                result |= data_efficiency(args, arms)
            if 2 in parts:
                result["multi_teacher"] = multi_teacher(args.part2, root / f"seed-{seed}", seed, arms)
            if 3 in parts and 1 in parts:
                result["judge_noise"] = judge_noise(args, arms, result["uniform"]["target"], result["uniform"]["calls"])
            if 3 in parts and 2 in parts:
                result["multi_teacher"]["judge_noise"] = multi_teacher_noise(args, arms)
            per_seed.append(result)
            print(f"seed {seed}: {json.dumps(result)}", file=sys.stderr)
    line = summarize(per_seed, time.perf_counter() - started)
    print_table(line, per_seed)
    if args.quick and 2 in parts:  # part 2's floors are not the issue's: say so beside them, not only in README
        print("--quick: part 2 only runs end to end: at its budget training, not data, sets its scores (floor 2: --preset "
              "best-of-teachers)", file=sys.stderr)
    if args.json:
        print(json.dumps(finite_json(line), allow_nan=False))


def parse_teachers(parser, flag: str, text: str) -> dict[str, tuple[float, list[str]]]:
    """'no-color:0.9,no-shape:1:circle/square' -> {id: (p, blind words)}, each checked by building it."""
    try:
        teachers = {tid: (float(p), blind[0].split("/") if blind else [])
                    for tid, p, *blind in (item.split(":") for item in text.split(","))}
        for tid, (p, blind) in teachers.items():
            TeacherSpec(id=tid, p=p, blind_to=blind).build()
    except ConfigError as e:
        parser.error(f"{flag}: {e}")
    except ValueError:
        parser.error(f"{flag}: expected id:p[:word/word],... (e.g. no-color:0.9,no-shape:1:circle/square), not {text!r}")
    return teachers


if __name__ == "__main__":
    main()
