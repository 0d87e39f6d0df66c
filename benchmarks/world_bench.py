"""Shapes-world benchmark: pixel-judge accuracy (clean and degraded renders), deficit teachers, throughput.

    python benchmarks/world_bench.py                  # 2,000 prompts, tables on stdout
    python benchmarks/world_bench.py --markdown       # the same tables as Markdown (benchmarks/RESULTS.md)
    python benchmarks/world_bench.py --quick --json   # smoke run; one JSON line on stdout, tables on stderr

Judge accuracy is the share of a prompt's questions (raw answers, before the DSG parent rule) on which
`PixelJudge.answer` on the pixels agrees with `answer_checks` on the ground-truth objects of the render.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np
from PIL import Image
from rich import box
from rich.console import Console
from rich.table import Table

from t2i_evolve.eval import evaluate
from t2i_evolve.judges import PixelJudge
from t2i_evolve.judges.segment import find_objects
from t2i_evolve.protocols import SKILLS
from t2i_evolve.world import GrammarPrompts, ProceduralTeacher, TeacherConfig, default_gallery, parse, questions_for, scene_skills
from t2i_evolve.world.questions import answer_checks
from t2i_evolve.world.render import degrade, seeded_rng

FLOOR = 0.995  # the floor for judge accuracy on the strong teacher's images
LOSS_FLOOR = 30.0  # points a deficit teacher must lose on its own skill
# name -> (Gaussian blur radius px, noise std 0-255, off-color shift +-per channel, jitter +-degrees)
CONDITIONS: dict[str, tuple[float, float, int, float]] = {
    "clean": (0, 0, 0, 0),
    "blur 0.7": (0.7, 0, 0, 0),
    "noise 12": (0, 12, 0, 0),
    "off-color 25": (0, 0, 25, 0),
    "jitter 6deg": (0, 0, 0, 6),
    "combined (b.5 n8 c15)": (0.5, 8, 15, 0),
    "combined + jitter 3deg": (0.5, 8, 15, 3),
}
EXAMPLES_PER_SKILL = 2


def corrupt(image: Image.Image, objects: list, spec: tuple, rng: np.random.Generator):
    """Degrade a render like a small generator would; returns (image, ground truth, clipped?).

    Jitter rotates the whole image about its centre (PIL: counter-clockwise, bilinear, white fill) and
    the true object centres with it, so spatial truth stays right; extents (sizes) are unchanged.
    """
    blur, noise, shift, jitter = spec
    res, clipped = image.width, False
    if jitter:
        angle = float(rng.uniform(-jitter, jitter))
        image = image.rotate(angle, resample=Image.BILINEAR, fillcolor=(255, 255, 255))
        c, s, m = math.cos(math.radians(angle)), math.sin(math.radians(angle)), res / 2
        objects = [replace(o, cx=m + c * (o.cx - m) + s * (o.cy - m), cy=m - s * (o.cx - m) + c * (o.cy - m)) for o in objects]
        reach = abs(c) + abs(s)  # half-extent of the rotated bounding box, per half-extent
        clipped = any(min(o.cx, o.cy) < o.extent / 2 * reach or max(o.cx, o.cy) > res - o.extent / 2 * reach for o in objects)
    if shift:
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-shift, shift + 1, 3)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return degrade(image, rng, blur=blur, noise=noise), objects, clipped


def describe(objects) -> str:
    return "; ".join(f"{o.color} {o.shape} @({o.cx:.1f},{o.cy:.1f}) e{o.extent:.1f}" for o in objects)


def judge_accuracy(name: str, renders, prompts, seeds, judge: PixelJudge) -> dict:
    right, asked, roots, failures = defaultdict(int), defaultdict(int), defaultdict(int), defaultdict(list)
    exact = clipped = clipped_wrong = 0
    for prompt, seed, (image, truth_objects) in zip(prompts, seeds, renders):
        image, truth_objects, clip = corrupt(image, truth_objects, CONDITIONS[name], seeded_rng("world-bench", name, seed))
        questions = questions_for(prompt)
        judged = judge.answer(image, prompt, questions)
        truth = answer_checks(questions, truth_objects, image.width)
        exact += judged == truth
        clipped += clip
        clipped_wrong += clip and judged != truth
        shown = False
        for q, j, t in zip(questions, judged, truth):
            for key in ("all", q.skill):
                asked[key] += 1
                right[key] += j == t
            # A root error: the judge disagrees here although it agrees on every parent question.
            if j == t or any(judged[p] != truth[p] for p in q.parents):
                continue
            roots[q.skill] += 1
            if not shown and len(failures[q.skill]) < EXAMPLES_PER_SKILL:
                shown = True
                failures[q.skill].append({
                    "prompt": prompt, "seed": seed, "question": q.text, "skill": q.skill, "truth": t,
                    "judged": j, "truth_objects": describe(truth_objects), "judged_objects": describe(find_objects(image)),
                })
    return {
        "overall": right["all"] / asked["all"],
        "skills": {s: right[s] / asked[s] if asked[s] else None for s in SKILLS},
        "asked": {s: asked[s] for s in SKILLS},
        "wrong": asked["all"] - right["all"],
        "root_wrong": {s: roots[s] for s in SKILLS if roots[s]},
        "images_exact": exact / len(prompts),
        "clipped_images": clipped,
        "clipped_images_wrong": int(clipped_wrong),
        "failures": [failures[s][k] for k in range(EXAMPLES_PER_SKILL) for s in SKILLS if len(failures[s]) > k],
    }


def deficit_teachers(prompts, seed: int, judge: PixelJudge) -> dict:
    rows = {t.id: evaluate(t, judge, prompts, seed=seed).summary() for t in default_gallery()}
    strong = rows["strong"]["skills"]
    for tid, row in rows.items():
        row["loss"] = {s: 100 * (strong[s] - row["skills"][s]) for s in SKILLS}
        if tid != "strong":
            own = tid.removeprefix("no-")
            row["own_skill"] = own
            row["own_loss_ok"] = row["loss"][own] >= LOSS_FLOOR
            row["own_is_worst"] = max(row["loss"], key=row["loss"].get) == own
    return rows


def ledger_rate(renders, prompts, seeds, n: int) -> dict:
    try:
        from t2i_evolve.data import Ledger
    except ImportError as e:  # the ledger is optional for this benchmark
        return {"records_per_s": None, "note": f"n/a: {e}"}
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(tmp)
        start = time.perf_counter()
        for prompt, seed, (image, _) in list(zip(prompts, seeds, renders))[:n]:
            ledger.add_record(prompt=prompt, generator="strong", seed=seed, image=image,
                              spec=parse(prompt).to_json(), skills=scene_skills(parse(prompt)))
        elapsed = time.perf_counter() - start
        assert ledger.count() == n
        ledger.close()
    return {"records_per_s": n / elapsed, "records": n, "note": "one durable commit per record (PNG + fsync, SQLite synchronous=FULL)"}


def machine(load: float) -> dict:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    import torch
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "load_1m_at_start": load}


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def tables(result: dict, console: Console, style) -> None:
    m = result["machine"]
    console.print(f"Machine: {m['cpus']} x {m['cpu']}, Python {m['python']}, torch {m['torch']}; "
                  f"load avg {m['load_1m_at_start']:.2f} at start (throughput drops under load); "
                  f"{result['prompts']} prompts, seed {result['seed']}, {result['runtime_s']:.0f} s")
    t = Table(title="1-2. Pixel-judge accuracy vs ground truth (% of questions agreeing)", box=style)
    for col in ["condition", "overall", *SKILLS, "images exact", "wrong q", "root errors", "clipped imgs (wrong)"]:
        t.add_column(col, justify="left" if col == "condition" else "right")
    for name, r in result["judge"].items():
        roots = " ".join(f"{k}:{v}" for k, v in r["root_wrong"].items()) or "-"
        clip = f"{r['clipped_images']} ({r['clipped_images_wrong']})" if CONDITIONS[name][3] else "-"
        t.add_row(name, pct(r["overall"]), *(pct(r["skills"][s]) for s in SKILLS), pct(r["images_exact"]), str(r["wrong"]), roots, clip)
    asked = result["judge"]["clean"]["asked"]
    t.add_row("questions asked", "", *(str(asked[s]) for s in SKILLS), "", "", "", "")
    console.print(t)
    floor = result["floor"]
    console.print(f"Floor: clean accuracy {pct(floor['accuracy'])}% >= {100 * FLOOR:.1f}% over {result['prompts']} prompts: "
                  f"{'PASS' if floor['pass'] else 'FAIL'}")
    t = Table(title="3. Deficit teachers: judged skill score % (loss in points vs strong)", box=style)
    for col in ["teacher", "DSG score", *SKILLS, f"own loss >= {LOSS_FLOOR:.0f}", "own loss largest"]:
        t.add_column(col, justify="left" if col == "teacher" else "right")
    for tid, r in result["teachers"].items():
        cells = [pct(r["skills"][s]) + ("" if tid == "strong" else f" ({-r['loss'][s]:+.1f})") for s in SKILLS]
        checks = ["", ""] if tid == "strong" else ["PASS" if r["own_loss_ok"] else "FAIL", "PASS" if r["own_is_worst"] else "FAIL"]
        t.add_row(tid, pct(r["score"]), *cells, *checks)
    console.print(t)
    t = Table(title="4. Throughput (one process, single-threaded)", box=style)
    t.add_column("what"), t.add_column("per second", justify="right"), t.add_column("note")
    tp = result["throughput"]
    t.add_row("renders (strong teacher draw)", f"{tp['renders_per_s']:.0f}", f"{result['prompts']} prompts, 32 px")
    t.add_row("judged images (PixelJudge.score)", f"{tp['judged_per_s']:.0f}", "segment + questions + DSG score")
    lr = tp["ledger"]
    t.add_row("ledger records (add_record + PNG)", "n/a" if lr["records_per_s"] is None else f"{lr['records_per_s']:.0f}", lr["note"])
    console.print(t)
    console.print("Example root disagreements, one per image (truth vs judged objects):")
    for name, r in result["judge"].items():
        for f in r["failures"][:4]:
            console.print(f"  [{name}] {f['prompt']!r} seed {f['seed']}: {f['question']} truth={f['truth']} judged={f['judged']}\n"
                          f"      truth:  {f['truth_objects']}\n      judged: {f['judged_objects']}", markup=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 150 prompts")
    parser.add_argument("--json", action="store_true", help="one JSON line on stdout; tables go to stderr")
    parser.add_argument("--markdown", action="store_true", help="tables as Markdown")
    args = parser.parse_args()
    n = 150 if args.quick else args.prompts
    console = Console(stderr=args.json, highlight=False, width=200)
    started, load = time.perf_counter(), os.getloadavg()[0]
    prompts = GrammarPrompts().sample(n, seed=args.seed)
    seeds = [args.seed + i for i in range(n)]
    judge, teacher = PixelJudge(), ProceduralTeacher(TeacherConfig())
    judge.score(*teacher.draw(prompts[0], seeds[0])[:1], prompts[0])  # builds the shape prototypes (cached)

    t0 = time.perf_counter()
    renders = [teacher.draw(p, s) for p, s in zip(prompts, seeds)]
    renders_per_s = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for p, (image, _) in zip(prompts, renders):
        judge.score(image, p)
    judged_per_s = n / (time.perf_counter() - t0)

    result = {"prompts": n, "seed": args.seed, "judge": {}}
    for name in CONDITIONS:
        with console.status(f"judging {name}"):
            result["judge"][name] = judge_accuracy(name, renders, prompts, seeds, judge)
    clean = result["judge"]["clean"]["overall"]
    result["floor"] = {"value": FLOOR, "accuracy": clean, "pass": clean >= FLOOR}
    with console.status("deficit teachers"):
        result["teachers"] = deficit_teachers(prompts, args.seed, judge)
    with console.status("ledger"):
        ledger = ledger_rate(renders, prompts, seeds, min(n, 500))
    result["throughput"] = {"renders_per_s": renders_per_s, "judged_per_s": judged_per_s, "ledger": ledger}
    result["runtime_s"] = time.perf_counter() - started
    result["machine"] = machine(load)
    tables(result, console, box.MARKDOWN if args.markdown else box.SIMPLE_HEAD)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
