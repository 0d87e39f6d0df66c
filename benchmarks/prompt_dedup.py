"""What an LLM writer's near-duplicate check costs as its pool grows (`prompts/dedup.py`, `Deduper`).

Every prompt an LLM writes is kept only if its ROUGE-L against every seed prompt and every earlier output is at
most the threshold (0.7, self-instruct's). At EvolveDirector's scale a writer has written tens of thousands of
prompts, and a round asks it thousands of times (one request per expanded record). This times building the pool
and checking new prompts against it, with shapes-world grammar prompts (a small vocabulary: most prompts share
tokens, the hard case for the token index) and with prompts of a larger vocabulary.

    python benchmarks/prompt_dedup.py [--pools 1000,10000,91000] [--checks 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import time

from t2i_evolve.prompts import Deduper
from t2i_evolve.world import GrammarPrompts

WORDS = ("cat dog bird horse cow sheep car truck bus bicycle boat plane chair table sofa bed lamp clock vase book "
         "cup bowl apple banana orange pizza cake tree flower grass mountain river lake beach city street house "
         "red blue green yellow purple white black brown wooden metal glass small large old young happy sleeping "
         "running sitting standing next to on under behind in front of near a the two three with and").split()


def open_prompts(n: int, seed: int) -> list[str]:
    """Prompts of 6-16 words from a vocabulary of about 80 (a stand-in for an LLM's captions)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))) for _ in range(n)]


def measure(kind: str, pool_size: int, checks: int) -> dict:
    make = (lambda n, seed: GrammarPrompts().sample(n, seed=seed)) if kind == "grammar" else open_prompts
    pool, new = make(pool_size, 1), make(checks, 2)
    started = time.perf_counter()
    deduper = Deduper(pool)
    built = time.perf_counter() - started
    started = time.perf_counter()
    kept = sum(deduper.is_new(prompt) for prompt in new)
    return {"prompts": kind, "pool": pool_size, "build_s": built,
            "check_ms": (time.perf_counter() - started) / checks * 1000, "new": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", default="1000,10000,91000", help="Pool sizes, comma-separated.")
    parser.add_argument("--checks", type=int, default=50, help="New prompts checked against each pool.")
    parser.add_argument("--json", action="store_true", help="Print one JSON line.")
    args = parser.parse_args()
    rows = [measure(kind, int(n), args.checks) for kind in ("grammar", "open") for n in args.pools.split(",")]
    if args.json:
        print(json.dumps({"checks": args.checks, "rows": rows}))
        return
    print("| prompts | pool | build the pool | check one new prompt | new of the checked |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['prompts']} | {row['pool']:,} | {row['build_s']:.2f} s | {row['check_ms']:.1f} ms | "
              f"{row['new']} of {args.checks} |")


if __name__ == "__main__":
    main()
