"""What `keep_freed_memory` (t2i_evolve/allocator.py) buys: training steps and sampling, with it and without.

Each measurement is a fresh process (malloc's settings are per process) that trains the shipped quick base
(`bases/yellow-blind-seed-6`) through our `Trainer` on strong-teacher images, then samples held-out-sized batches
at guidance, one thread. `--concurrent 2` runs two such processes at once, as `evolve_efficiency.py --jobs 2` runs
its arms on a 2-core machine; kept and default alternate pair by pair, so the machine's drift hits both. Reported:
median seconds per training step and per sampled image, and the kernel's share (system time, minor page faults).
Fresh short processes gain more than long ones (RESULTS.md, 46th session: 1.14-1.25x here, 1.07-1.10x for a whole
benchmark arm side by side): this measures the mechanism; a run's own wall time says what it buys.

    python benchmarks/allocator.py [--pairs 3] [--concurrent 2] [--steps 40] [--images 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = Path(__file__).parent / "bases" / "yellow-blind-seed-6"


def measure(steps: int, images: int) -> dict:
    """One process's numbers (run as `allocator.py --child`): training, then sampling."""
    import torch

    from t2i_evolve.allocator import keep_freed_memory
    from t2i_evolve.models import Sampler, SamplerConfig, T2IModel
    from t2i_evolve.train import TrainConfig, Trainer, TrainingSet
    from t2i_evolve.world import GrammarPrompts, ProceduralTeacher

    kept = keep_freed_memory()
    torch.set_num_threads(1)
    prompts = GrammarPrompts().sample(256, seed=0)
    data = TrainingSet.from_images(prompts, ProceduralTeacher().generate(prompts, list(range(len(prompts)))))
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(model=str(BASE), output_dir=tmp, steps=steps + 3, batch_size=16, warmup_steps=0,
                             checkpoint_every=10**9, log_every=10**9, tracker="none")
        trainer = Trainer(config, data)

        def train_steps(n: int) -> None:  # (as `Trainer.run` takes them, without its logging and checkpoints)
            for _ in range(n):
                trainer._train_step()
                trainer.step += 1

        train_steps(3)  # warm-up, untimed
        train = timed(lambda: train_steps(steps))
    sampler = Sampler(T2IModel.from_pretrained(str(BASE), "cpu"), SamplerConfig(steps=10, guidance=1.5))
    sampler.generate(prompts[:4], list(range(4)))
    sample = timed(lambda: sampler.generate(prompts[:images], list(range(images))))
    return {"kept": kept, "step_s": train["wall_s"] / steps, "train_sys_share": train["sys_s"] / train["cpu_s"],
            "train_faults_per_step": train["faults"] / steps, "image_s": sample["wall_s"] / images,
            "sample_sys_share": sample["sys_s"] / sample["cpu_s"]}


def timed(work) -> dict:
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    work()
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"wall_s": wall, "sys_s": system, "cpu_s": user + system, "faults": after.ru_minflt - before.ru_minflt}


def run_processes(kept: bool, concurrent: int, steps: int, images: int) -> list[dict]:
    """`concurrent` measuring processes at once, with malloc kept (or left as glibc sets it)."""
    env = os.environ | {"T2I_EVOLVE_MALLOC": "keep" if kept else "default", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--child", "--steps", str(steps), "--images", str(images)]
    children = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(concurrent)]
    results = []
    for child in children:
        output, _ = child.communicate()
        if child.returncode:
            sys.exit(f"a measuring process failed (exit {child.returncode})")
        results.append(json.loads(output.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.pairs, args.concurrent, args.steps, args.images) < 1:
        parser.error("--pairs, --concurrent, --steps and --images: at least 1 each")
    if args.child:
        print(json.dumps(measure(args.steps, args.images)))
        return
    runs = {False: [], True: []}
    for _ in range(args.pairs):  # alternating, so drift in the machine's speed hits both
        for kept in (False, True):
            runs[kept] += run_processes(kept, args.concurrent, args.steps, args.images)
    if not all(run["kept"] for run in runs[True]):
        sys.exit("keep_freed_memory changed nothing here (not glibc, or GLIBC_TUNABLES sets malloc): nothing to compare")
    rows = {("kept" if kept else "default"): {key: statistics.median(run[key] for run in runs[kept])
                                              for key in ("step_s", "train_sys_share", "train_faults_per_step",
                                                          "image_s", "sample_sys_share")} for kept in runs}
    print(f"\n{args.pairs} pairs of {args.concurrent} processes at once, one thread each (medians)\n"
          "| malloc | s / training step | kernel share | page faults / step | s / sampled image | kernel share |\n"
          "|---|---|---|---|---|---|", file=sys.stderr)
    for name, row in rows.items():
        print(f"| {name} | {row['step_s']:.3f} | {row['train_sys_share']:.1%} | {row['train_faults_per_step']:,.0f} | "
              f"{row['image_s']:.3f} | {row['sample_sys_share']:.1%} |", file=sys.stderr)
    speedup = {"training": rows["default"]["step_s"] / rows["kept"]["step_s"],
               "sampling": rows["default"]["image_s"] / rows["kept"]["image_s"]}
    print(f"kept is {speedup['training']:.2f}x as fast at training, {speedup['sampling']:.2f}x at sampling",
          file=sys.stderr)
    if args.json:
        print(json.dumps({"pairs": args.pairs, "concurrent": args.concurrent, "rows": rows, "speedup": speedup}))


if __name__ == "__main__":
    main()
