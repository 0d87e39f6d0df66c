"""Sends N pairwise comparisons through `OpenAIJudge` with a ledger, for tests/test_openai_judge.py.

The test SIGKILLs this process midway and runs it again; the server's /stats (requests per ledger key)
shows which requests were sent, and how often. On success it prints the verdicts as one JSON line.

    python tests/judge_crash_worker.py RUN_DIR BASE_URL [--n 300] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import json

from t2i_evolve.data import Ledger
from t2i_evolve.endpoints import EndpointConfig
from t2i_evolve.judges import OpenAIJudge, OpenAIJudgeConfig
from t2i_evolve.world import GrammarPrompts, ProceduralTeacher, TeacherConfig


def pairs(n: int):
    """(strong render, no-count render, prompt) per prompt: verdicts that are not all ties."""
    strong, weak = ProceduralTeacher(), ProceduralTeacher(TeacherConfig(id="no-count", deficit="count"))
    return [(strong.draw(p, i)[0], weak.draw(p, i)[0], p) for i, p in enumerate(GrammarPrompts().sample(n, seed=5))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("base_url")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    endpoint = EndpointConfig(base_url=args.base_url, model="pixel", timeout_s=5, backoff_s=0.01,
                              max_concurrency=args.concurrency)
    with Ledger(args.run_dir) as ledger, OpenAIJudge(OpenAIJudgeConfig(endpoint=endpoint), ledger) as judge:
        verdicts = judge.compare_many(pairs(args.n))
    print(json.dumps([v.winner for v in verdicts]))


if __name__ == "__main__":
    main()
