"""Does the win rate (the held-out score of a run on prompts outside the grammar) track the exact score?

A real base on its users' prompts is scored by `held_out_metric: win_rate`: the run's judge compares the base's
image of each held-out prompt with the first teacher's (a win 1, a tie 1/2). Here both metrics score the same
evolve run on the shapes world, where the exact one exists: the run is repeated with each metric (the held-out
score changes nothing the run decides, so both train the same models; the script checks that their ledgers
match), and each round's two scores are printed side by side with their rank correlation.

    python benchmarks/held_out_metrics.py [--rounds 4] [--steps 150] [--eval-prompts 128] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from t2i_evolve.data import Ledger
from t2i_evolve.recipes.evolve import EvolveConfig, run_evolve


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float | None:
    ra, rb = ranks(a), ranks(b)
    mean_a, mean_b = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(ra, rb))
    var = (sum((x - mean_a) ** 2 for x in ra) * sum((y - mean_b) ** 2 for y in rb)) ** 0.5
    return cov / var if var else None


def ledger_rows(run_dir: Path) -> list[tuple]:
    with Ledger(run_dir, create=False, read_only=True) as ledger:
        return [(r.prompt, r.seed, r.status, r.op) for r in ledger.records(None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150, help="steps_per_round")
    parser.add_argument("--eval-prompts", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs, wall = {}, {}
    with tempfile.TemporaryDirectory() as root:
        for metric in ("pixel", "win_rate"):
            config = EvolveConfig(output_dir=str(Path(root) / metric), rounds=args.rounds, steps_per_round=args.steps,
                                  eval_prompts=args.eval_prompts, seed=args.seed, held_out_metric=metric)
            tick = time.perf_counter()
            runs[metric] = run_evolve(config)
            wall[metric] = time.perf_counter() - tick
        same = ledger_rows(Path(root) / "pixel") == ledger_rows(Path(root) / "win_rate")
    exact = [row.get("score") for row in runs["pixel"]["rounds"]]
    win = [row.get("score") for row in runs["win_rate"]["rounds"]]
    verdicts = [row.get("verdicts", {}) for row in runs["win_rate"]["rounds"]]
    result = {"rounds": [{"round": i + 1, "exact": e, "win_rate": w, "verdicts": v}
                         for i, (e, w, v) in enumerate(zip(exact, win, verdicts))],
              "spearman": spearman(exact, win), "same_ledger": same,
              "teacher_calls": {m: runs[m]["teacher_calls"] for m in runs},
              "judge_calls": {m: runs[m]["judge_calls"] for m in runs}, "wall_s": wall}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'round':>5}  {'exact':>6}  {'win rate':>8}  base / tie / teacher")
    for row in result["rounds"]:
        v = row["verdicts"]
        print(f"{row['round']:>5}  {row['exact']:6.3f}  {row['win_rate']:8.3f}  {v.get('base')} / {v.get('tie')} / "
              f"{v.get('teacher')}")
    print(f"Spearman {result['spearman']}; same ledger: {same}; teacher calls {result['teacher_calls']}; judge calls "
          f"{result['judge_calls']}; wall {', '.join(f'{m} {s:.0f} s' for m, s in wall.items())}")
    if not same:
        sys.exit("the two runs' ledgers differ: the held-out score changed what the run decided")


if __name__ == "__main__":
    main()
