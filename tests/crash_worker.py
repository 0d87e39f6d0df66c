"""Sends N generator calls through `CachedGenerator` into a ledger, for tests/test_ledger_crash.py.

The test SIGKILLs this process midway and runs it again; the call log is the "server side" of the
calls, written before the ledger commits, so it shows every call that was paid for, twice or not.

    python tests/crash_worker.py RUN_DIR CALL_LOG [--n 1000] [--batch-size 1]
"""

from __future__ import annotations

import argparse

from t2i_evolve.data import CachedGenerator, Ledger
from t2i_evolve.world import GrammarPrompts, ProceduralTeacher, TeacherConfig, parse, scene_skills


def teacher(call_log: str | None = None) -> ProceduralTeacher:
    """The shapes-world strong teacher, with transient faults so retries happen during the crash test.

    Its `call_log` is the "server side": one JSON line per answered call, appended with O_APPEND.
    """
    return ProceduralTeacher(TeacherConfig(transient_error_rate=0.02), call_log=call_log)


def requests(n: int) -> list[tuple[str, int]]:
    return list(zip(GrammarPrompts().sample(n, seed=0), range(n)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("call_log")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()

    with Ledger(args.run_dir) as ledger:
        generator = CachedGenerator(teacher(args.call_log), ledger, batch_size=args.batch_size, backoff_s=0, retries=6)
        todo = requests(args.n)
        for start in range(0, len(todo), 50):
            prompts, seeds = zip(*todo[start : start + 50])
            for prompt, seed, image in zip(prompts, seeds, generator.generate(prompts, seeds)):
                scene = parse(prompt)
                ledger.add_record(prompt=prompt, generator=generator.id, seed=seed, image=image,
                                  spec=scene.to_json(), skills=scene_skills(scene))


if __name__ == "__main__":
    main()
