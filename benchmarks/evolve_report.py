"""The JSON line and tables of `evolve_efficiency.py`: means over seeds, the issue's floors, markdown rows."""

from __future__ import annotations

import math
import statistics
import sys

from t2i_evolve.protocols import SKILLS


def mean_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def mean_of_all(values):
    """The mean, or None unless every value is there (a seed that never reached the target has no saving: a mean
    of the others would read as the saving of all)."""
    return None if not values or any(v is None for v in values) else statistics.fmean(values)


def as_count(mean: float | None) -> int | None:
    """A mean of call or image counts, as a count."""
    return None if mean is None else round(mean)


def finite_json(value):
    """`value` with every NaN or infinity replaced by None: JSON has no such numbers (`json.dumps` would write
    `NaN`, which a strict parser refuses)."""
    if isinstance(value, dict):
        return {key: finite_json(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def final_skills(rounds: list[dict]) -> dict[str, float] | None:
    """The per-skill held-out scores of an arm's last evaluation (None if it was never evaluated)."""
    return next((row["skills"] for row in reversed(rounds) if row.get("skills")), None)


def print_skills(per_seed: list[dict], out) -> None:
    """Each arm's last held-out score per skill: which skills the judge's data bought, and which the arm
    lost on the way (a skill no held-out prompt asks scores 0 in every arm and is left out)."""
    for r in per_seed:
        arms = {name: skills for name, skills in r.get("skills", {}).items() if skills}
        shown = [s for s in SKILLS if any(skills.get(s) for skills in arms.values())]
        if not shown:
            continue
        print(f"\n| seed {r['seed']}: arm, last evaluation | " + " | ".join(shown) + " |\n|---|"
              + "---|" * len(shown), file=out)
        for name, skills in arms.items():
            print(f"| {name} | " + " | ".join(f"{skills[s]:.3f}" for s in shown) + " |", file=out)


def summarize(per_seed: list[dict], wall_s: float) -> dict:
    """The issue's JSON line: means over seeds (per-seed values under `seeds`). Every key of the issue's line is
    there: null for a part not run, and `saving` and `calls_to_uniform_final` null unless every counted seed (one
    whose uniform arms rise with data above its base: the table flags the others) reached uniform's best."""
    line, floors = {"uniform": None, "evolve": None, "saving": None, "multi_teacher": None}, {}
    if "uniform" in per_seed[0]:
        counted = [r for r in per_seed if r["uniform"]["rises_with_data"] and r["uniform"]["target_above_base"]]
        line = {
        "uniform": {"final_score": mean_or_none([r["uniform"]["final_score"] for r in per_seed]),
                    "calls": as_count(mean_or_none([r["uniform"]["calls"] for r in per_seed]))},
        "evolve": {"calls_to_uniform_final": as_count(mean_of_all([r["evolve"]["calls_to_uniform_final"]
                                                                   for r in counted])),
                   "final_score": mean_or_none([r["evolve"]["final_score"] for r in per_seed]),
                   "calls": as_count(mean_or_none([r["evolve"]["calls"] for r in per_seed]))},
        "saving": mean_of_all([r["saving"] for r in counted]),
        "multi_teacher": None}
        floors = {"uniform_rises_with_data": all(r["uniform"]["rises_with_data"] for r in per_seed),
                  "saving_at_least_5": all(r["saving"] is not None and r["saving"] >= 5 for r in per_seed),
                  "target_above_base": all(r["uniform"]["target_above_base"] for r in per_seed)}
    if "multi_teacher" in per_seed[0]:
        mt = [r["multi_teacher"] for r in per_seed]
        line["multi_teacher"] = {
            "student": mean_or_none([m["student"] for m in mt]),
            "teachers": {t: mean_or_none([m["teachers"][t] for m in mt]) for t in mt[0]["teachers"]},
            "single_teacher_students": {t: mean_or_none([m["single_teacher_students"][t] for m in mt])
                                        for t in mt[0]["single_teacher_students"]},
            "training_data": {t: mean_or_none([m["training_data"][t] for m in mt]) for t in mt[0]["training_data"]},
            "training_images": {t: as_count(mean_or_none([m["training_images"][t] for m in mt]))
                                for t in mt[0]["training_images"]}}
        if "judge_noise" in mt[0]:
            line["multi_teacher"]["judge_noise"] = {
                rate: {key: mean_or_none([m["judge_noise"][rate][key] for m in mt])
                       for key in ("student", "training_images", "training_data")} for rate in mt[0]["judge_noise"]}
        mt = line["multi_teacher"]
        floors |= {"student_beats_every_teacher": all(mt["student"] > s for s in mt["teachers"].values()),
                   "student_beats_every_single_teacher_student":
                       all(mt["student"] > s for s in mt["single_teacher_students"].values())}
        if "judge_noise" in mt:
            floors["noisy_judge_student_beats_every_teacher"] = {
                rate: all(res["student"] > s for s in mt["teachers"].values()) for rate, res in mt["judge_noise"].items()}
    return line | {"floors": floors, "seeds": per_seed, "wall_s": wall_s}


def calls_to_reach(runs, target: float) -> int | None:
    """The fewest teacher calls behind a model that reached `target`, over every round of every evolve
    run (a round is scored on the model trained on the calls made before it, with less training than a
    uniform arm's final model had, which favours uniform)."""
    reached = [calls for run in runs for calls, score in run["curve"] if score >= target]
    return min(reached) if reached else None


def uniform_to_match(by_size: dict[int, float], runs: dict, tolerance: float) -> dict:
    """The same curves read the other way, as EvolveDirector counts its saving (the data uniform needs to reach
    what evolve reached): per evolve cap, the fewest uniform calls scoring within `tolerance` of that arm's final
    score. Where no uniform size gets there, uniform needs more than its largest, and the ratio is a lower bound
    (`at_least`). At the same training steps, as every arm here; more steps might let uniform get further."""
    largest = max(by_size)
    matched = {}
    for budget, run in runs.items():
        needed = min((n for n, score in by_size.items() if score >= run["final_score"] - tolerance), default=None)
        matched[budget or "none"] = {"final_score": run["final_score"], "calls": run["calls"], "uniform_calls": needed,
                                     "saving": (needed or largest) / run["calls"], "at_least": needed is None}
    return matched


def pool_replicates(arms: dict) -> dict:
    """Each arm trained under several training seeds (`name`, `name@1`, ...; `--train-seeds`) as one arm
    under its name: its final score, each round's score and per-skill scores are the replicates' means, and
    each round's teacher calls the most any replicate had spent (so a pooled curve never claims a score on
    fewer calls than one of its runs bought). `replicates` keeps each run's final score."""
    groups = {}
    for name, result in arms.items():
        groups.setdefault(name.split("@")[0], []).append(result)
    return {name: pooled(runs) if len(runs) > 1 else runs[0] for name, runs in groups.items()}


def pooled(runs: list[dict]) -> dict:
    rounds = []
    for rows in zip(*(run["rounds"] for run in runs)):  # as far as the shortest run went
        row = rows[0] | {"teacher_calls": max(r["teacher_calls"] for r in rows)}
        if all(r.get("score") is not None for r in rows):
            row["score"] = statistics.fmean(r["score"] for r in rows)
            row["skills"] = {s: statistics.fmean(r["skills"][s] for r in rows) for s in rows[0]["skills"]}
        rounds.append(row)
    return {"final_score": statistics.fmean(run["final_score"] for run in runs),
            "calls": max(run["calls"] for run in runs), "judge_calls": max(run["judge_calls"] for run in runs),
            "wall_s": sum(run["wall_s"] for run in runs), "rounds": rounds,
            "curve": [(row["teacher_calls"], row["score"]) for row in rounds if row.get("score") is not None],
            "replicates": [run["final_score"] for run in runs]}


def runs(replicates: list[float] | None) -> str:
    """Each training replicate's final score, after their mean (`--train-seeds`); nothing for one run."""
    return f" (runs: {' / '.join(f'{score:.3f}' for score in replicates)})" if replicates else ""


def print_table(line: dict, per_seed: list[dict]) -> None:
    out = sys.stderr
    if line["uniform"]:
        print("\n| arm | teacher calls | held-out score |\n|---|---|---|", file=out)
        for r in per_seed:
            if r.get("base_score") is not None:
                print(f"| seed {r['seed']} base, untrained | 0 | {r['base_score']:.3f} |", file=out)
            for n, score in r["uniform"]["by_size"].items():
                print(f"| seed {r['seed']} uniform {n} prompts | {n} | {score:.3f}{runs(r['uniform']['replicates'][n])} |",
                      file=out)
            for budget, run in r["evolve"]["by_budget"].items():
                for i, (calls, score) in enumerate(run["curve"], 1):
                    print(f"| seed {r['seed']} evolve, cap {budget}, round {i} | {calls} | {score:.3f} |", file=out)
                if run["replicates"]:
                    print(f"| seed {r['seed']} evolve, cap {budget}, last round | | {runs(run['replicates'])} |", file=out)
            if "control_no_judge" in r:
                for i, (calls, score) in enumerate(r["control_no_judge"]["curve"], 1):
                    print(f"| seed {r['seed']} control (no judge), round {i} | {calls} | {score:.3f} |", file=out)
        print(f"\nsaving (uniform calls / evolve calls to reach the target score): {line['saving']}", file=out)
        for r in per_seed:  # the flag lines below say why a base is not counted
            largest = max(r["uniform"]["by_size"])
            flagged = not (r["uniform"]["rises_with_data"] and r["uniform"]["target_above_base"])
            for budget, m in r["uniform_to_evolve_final"].items():
                needs = f"{m['uniform_calls']} calls" if m["uniform_calls"] else f"more than its {largest}"
                cap = "uncapped" if budget == "none" else f"capped at {budget}"
                print(f"seed {r['seed']}: evolve {cap} ends at {m['final_score']:.3f} on {m['calls']} "
                      f"calls; uniform within the tolerance of it needs {needs}: "
                      f"{'at least ' if m['at_least'] else ''}{m['saving']:.1f}x"
                      f"{' (not counted: this base is flagged below)' if flagged else ''}", file=out)
        if not line["floors"]["uniform_rises_with_data"]:
            print("uniform's score does not rise with its data (best vs smallest size within 2 x tolerance): at "
                  "this training budget there are no teacher calls for the judge to save; train longer", file=out)
        for r in per_seed:
            if not r["uniform"]["target_above_base"]:
                print(f"seed {r['seed']}: the base scores {r['base_score']:.3f} untrained, at or above the target "
                      f"{r['uniform']['target']:.3f}: its saving is vacuous; use a rate at which uniform data teaches it",
                      file=out)
            if r["uniform"].get("largest_below_target"):
                print(f"seed {r['seed']}: uniform's largest set scores below the target (the same steps, fewer passes "
                      f"over it): the calls uniform needs are its best size's, {r['uniform']['calls']}", file=out)
        print_skills(per_seed, out)
        print("\n| cost: evolve round | judge calls (total) | teacher calls (start of round) | ops | wall s |"
              "\n|---|---|---|---|---|", file=out)
        for r in per_seed:
            for row in r["evolve"]["rounds"]:
                print(f"| seed {r['seed']} round {row['round']} | {row['judge_calls']} | {row['teacher_calls']} | "
                      f"{row['ops']} | {row['wall_s']:.0f} |", file=out)
    if "judge_noise" in per_seed[0]:
        print("\n| judge error rate | final score | teacher calls | calls to target | saving |\n|---|---|---|---|---|",
              file=out)
        for r in per_seed:
            for rate, res in r["judge_noise"].items():
                print(f"| seed {r['seed']} error {rate} | {res['final_score']:.3f} | {res['calls']} | "
                      f"{res['calls_to_uniform_final']} | {res['saving'] and round(res['saving'], 1)} |", file=out)
    if "judge_noise" in per_seed[0].get("multi_teacher", {}):
        print("\n| judge error rate | student of the judge's picks | images the gate kept | their exact score | "
              "judge calls |\n|---|---|---|---|---|", file=out)
        for r in per_seed:
            for rate, res in r["multi_teacher"]["judge_noise"].items():
                print(f"| seed {r['seed']} error {rate} | {res['student']:.3f} | {res['training_images']} | "
                      f"{res['training_data']:.3f} | {res['judge_calls']} |", file=out)
    mt = line.get("multi_teacher")
    if mt:
        print("\n| multi-teacher | held-out score | its training images (kept by the gate) | their mean judged "
              "score |\n|---|---|---|---|", file=out)
        for t, s in mt["teachers"].items():
            print(f"| teacher {t} | {s:.3f} | | |", file=out)
        rows = [(f"student of {t}", s, t) for t, s in mt["single_teacher_students"].items()]
        for label, s, t in rows + [("student of the judge's picks", mt["student"], "judged")]:
            print(f"| {label} | {s:.3f} | {mt['training_images'][t]:.0f} | {mt['training_data'][t]:.3f} |", file=out)
    for r in per_seed:  # (each arm on one worker: their sum over --jobs is about the wall time)
        print(f"seed {r['seed']} arms, wall s: " + ", ".join(f"{name} {s:.0f}" for name, s in r["arm_wall_s"].items()),
              file=out)
    print(f"\nfloors: {line['floors']}\nwall time {line['wall_s']:.0f} s", file=out)
