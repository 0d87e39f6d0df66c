"""OpenAIJudge against `serve-judge`: agreement with PixelJudge, behaviour under faults, throughput.

    python benchmarks/judge_endpoint_bench.py                 # 1,000 cases, tables on stdout
    python benchmarks/judge_endpoint_bench.py --markdown      # the same tables as Markdown (RESULTS.md)
    python benchmarks/judge_endpoint_bench.py --json          # one JSON line on stdout, tables on stderr
    python benchmarks/judge_endpoint_bench.py --quick         # 150 cases, smaller throughput runs, 30 vote prompts

Each part starts its own `t2i-evolve serve-judge` process on a free loopback port (so the server and the
client each get a core), and judges through a fresh ledger in a temp folder, as a recipe would.

1. Agreement (--error-rate 0): pairwise verdicts and VQA answers of OpenAIJudge against PixelJudge run
   in-process on the same images. Pairs are (strong teacher, deficit teacher) renders of one prompt,
   half of them swapped; VQA images come from the deficit teachers, so answers are not all yes.
2. Faults (--fault-rate 0.2: 429, 500, hangs past a 1 s client timeout, malformed replies): the batch
   must complete with every verdict recorded in the ledger, retries counted, and no exception.
3. Throughput (--latency 0.05 s per request): judged pairs per second at concurrency 1, 8 and 32; and
   again at --latency 0.5 s, where the server's CPU (the pixel judge scoring both images of a pair) is
   not the ceiling, so the scaling with concurrency shows in full.
4. Votes (--error-rate 0.1 and 0.2, temperature 0.7): the evolve recipe's quality gate (keep a teacher
   image only if the judge scores it 1.0) on images of two blind-spot teachers, asked with 1, 3 and 5
   votes: the share of the exactly right images it keeps, and how many of those it keeps are right.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

from rich import box
from rich.console import Console
from rich.table import Table

from t2i_evolve.data import Ledger
from t2i_evolve.judges import OpenAIJudge, OpenAIJudgeConfig, PixelJudge
from t2i_evolve.world import GrammarPrompts, default_gallery, questions_for

FLOOR = 0.995
LATENCY_S = 0.05
DEFICITS = ("no-color", "no-shape", "no-count", "no-spatial", "no-binding", "no-size")


@contextmanager
def serve_judge(*flags: str):
    """A `t2i-evolve serve-judge` subprocess on a free port; yields its base URL."""
    command = [sys.executable, "-m", "t2i_evolve.cli", "serve-judge", "--port", "0", *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        if " at " not in line:
            raise RuntimeError(f"serve-judge did not start: {line!r}")
        yield line.split(" at ")[1].split()[0]
    finally:
        process.terminate()
        process.wait(timeout=10)


def judge(url: str, ledger: Ledger | None, concurrency: int, **endpoint) -> OpenAIJudge:
    settings = {"base_url": url, "model": "pixel-judge", "max_concurrency": concurrency, "timeout_s": 10,
                "backoff_s": 0.05, "retries": 6, **endpoint}
    return OpenAIJudge(OpenAIJudgeConfig.from_dict({"endpoint": settings}), ledger)


def cases(n: int, seed: int = 0):
    """n pairwise cases (image_a, image_b, prompt) and n VQA cases (image, prompt, questions)."""
    teachers = {t.id: t for t in default_gallery()}
    strong = teachers["strong"]
    prompts = GrammarPrompts().sample(n, seed=seed)
    pairs, vqa = [], []
    for i, prompt in enumerate(prompts):
        weak = teachers[DEFICITS[i % len(DEFICITS)]]
        a, b = strong.draw(prompt, i)[0], weak.draw(prompt, i)[0]
        pairs.append((a, b, prompt) if i % 2 else (b, a, prompt))
        vqa.append((teachers[DEFICITS[(i + 3) % len(DEFICITS)]].draw(prompt, i)[0], prompt, questions_for(prompt)))
    return pairs, vqa


def agreement(pairs, vqa, concurrency: int) -> dict:
    pixel = PixelJudge()
    expected_pairs = [pixel.compare(*c).winner for c in pairs]
    expected_vqa = [pixel.answer(*c) for c in vqa]
    with serve_judge("--error-rate", "0") as url, tempfile.TemporaryDirectory() as tmp:
        with Ledger(tmp) as ledger, judge(url, ledger, concurrency) as vlm:
            start = time.perf_counter()
            verdicts = vlm.compare_many(pairs)
            answers = vlm.answer_many(vqa)
            seconds = time.perf_counter() - start
            stats = dict(vlm.stats)
    pair_ok = sum(v.winner == e for v, e in zip(verdicts, expected_pairs))
    q_total = sum(len(e) for e in expected_vqa)
    q_ok = sum(a == b for v, e in zip(answers, expected_vqa) for a, b in zip(v.answers or [None] * len(e), e))
    images_ok = sum(list(v.answers or []) == e for v, e in zip(answers, expected_vqa))
    return {
        "pairs": len(pairs), "pair_agreement": pair_ok / len(pairs),
        "pair_winners": {w: expected_pairs.count(w) for w in ("a", "b", "tie")},
        "orders_ba": sum(v.order == "ba" for v in verdicts),
        "vqa_images": len(vqa), "vqa_questions": q_total, "question_agreement": q_ok / q_total,
        "image_agreement": images_ok / len(vqa), "seconds": seconds, "stats": stats,
        "pass": pair_ok / len(pairs) >= FLOOR and q_ok / q_total >= FLOOR,
    }


def faults(pairs, vqa, concurrency: int) -> dict:
    pixel = PixelJudge()
    result: dict = {"pairs": len(pairs), "vqa_images": len(vqa), "crashed": None}
    with serve_judge("--fault-rate", "0.2", "--hang-s", "3", "--seed", "7") as url, \
            tempfile.TemporaryDirectory() as tmp, Ledger(tmp) as ledger:
        start = time.perf_counter()
        try:
            with judge(url, ledger, concurrency, timeout_s=1.0) as vlm:
                verdicts = vlm.compare_many(pairs)
                answers = vlm.answer_many(vqa)
        except Exception as e:  # the point of this part is that nothing gets here
            result["crashed"] = f"{type(e).__name__}: {e}"
            return result
        result["seconds"] = time.perf_counter() - start
        calls = ledger.calls(caller=vlm.id)
        server_stats = json.loads(_get(url.removesuffix("/v1") + "/stats"))
    statuses = [v.status for v in verdicts + answers]
    ok_pairs = [(v, c) for v, c in zip(verdicts, pairs) if v.status == "ok"]
    result.update({
        "verdicts": len(statuses), "ok": statuses.count("ok"), "unparseable": statuses.count("unparseable"),
        "failed": statuses.count("failed"),
        "ledger_rows": len(calls), "ledger_done": sum(c.status == "done" for c in calls),
        "attempts": sum(c.attempts for c in calls), "retries": sum(c.attempts - 1 for c in calls),
        "reasks": vlm.stats["reasks"], "transient": vlm.stats["transient"],
        "server_faults": server_stats["faults"], "server_requests": server_stats["total"],
        "pair_agreement_of_ok": sum(v.winner == pixel.compare(*c).winner for v, c in ok_pairs) / max(len(ok_pairs), 1),
    })
    result["pass"] = (result["crashed"] is None and result["ledger_done"] == result["ledger_rows"]
                      and result["retries"] > 0 and result["ok"] == result["verdicts"])
    return result


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def throughput(pairs, runs: dict[float, dict[int, int]]) -> list[dict]:
    """Pairs/s per (server latency, concurrency): {latency: {concurrency: pairs}}. Client CPU time per pair
    is measured too: the rest of each request's cost is the server's (the pixel judge on both images)."""
    rows = []
    for latency, levels in runs.items():
        with serve_judge("--latency", str(latency)) as url:
            for concurrency, n in levels.items():
                with tempfile.TemporaryDirectory() as tmp, Ledger(tmp) as ledger, \
                        judge(url, ledger, concurrency) as vlm:
                    vlm.compare_many(pairs[-1:])  # warm the client (imports, connection) outside the timing
                    start, cpu = time.perf_counter(), time.process_time()
                    verdicts = vlm.compare_many(pairs[:n])
                    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
                assert all(v.status == "ok" for v in verdicts)
                rows.append({"latency_s": latency, "concurrency": concurrency, "pairs": n, "seconds": seconds,
                             "pairs_per_s": n / seconds, "ideal_per_s": concurrency / latency,
                             "client_cpu_ms_per_pair": 1000 * cpu / n})
    return rows


def votes(n: int, concurrency: int) -> list[dict]:
    """The quality gate through a noisy judge, by votes per verdict (see the module doc, part 4)."""
    from t2i_evolve.recipes.parts import TeacherSpec

    prompts = GrammarPrompts().sample(n, seed=5)
    images = []
    for spec in (TeacherSpec(id="no-color", p=1.0, blind_to=["red", "green", "blue", "yellow"]),
                 TeacherSpec(id="no-shape", p=1.0, blind_to=["circle", "square"])):
        images += list(zip(spec.build().generate(prompts, list(range(n))), prompts))
    right = [PixelJudge().score(image, prompt).score == 1.0 for image, prompt in images]
    rows = []
    for rate in (0.1, 0.2):
        with serve_judge("--error-rate", str(rate)) as url:
            for k in (1, 3, 5):
                with OpenAIJudge(OpenAIJudgeConfig.from_dict({"endpoint": {
                        "base_url": url, "model": "pixel-judge", "max_concurrency": concurrency},
                        "votes": k, "temperature": 0.7})) as vlm:
                    passed = [s is not None and s.score >= 1.0 for s in vlm.score_many(images)]
                    sent = vlm.stats["sent"]
                kept_right = sum(p and r for p, r in zip(passed, right))
                rows.append({"error_rate": rate, "votes": k, "images": len(images), "right": sum(right),
                             "kept": sum(passed), "right_kept": kept_right / sum(right),
                             "precision": kept_right / max(sum(passed), 1), "requests": sent})
    return rows


def machine() -> dict:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "load_1m_at_start": os.getloadavg()[0]}


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def tables(result: dict, console: Console, style) -> None:
    m = result["machine"]
    console.print(f"Machine: {m['cpus']} x {m['cpu']}, Python {m['python']}; load avg {m['load_1m_at_start']:.2f} "
                  f"at start; {result['cases']} cases; {result['runtime_s']:.0f} s in all")
    a = result["agreement"]
    t = Table(title="1. OpenAIJudge via serve-judge --error-rate 0 vs PixelJudge in-process", box=style)
    for col in ("task", "cases", "agreement %", "floor", "note"):
        t.add_column(col, justify="left" if col in ("task", "note") else "right")
    w = a["pair_winners"]
    t.add_row("pairwise verdicts", str(a["pairs"]), pct(a["pair_agreement"]), "99.5",
              f"pixel winners a/b/tie {w['a']}/{w['b']}/{w['tie']}; {a['orders_ba']} shown as b-first")
    t.add_row("VQA answers (questions)", str(a["vqa_questions"]), pct(a["question_agreement"]), "99.5",
              f"{a['vqa_images']} images, one request each")
    t.add_row("VQA images all agreeing", str(a["vqa_images"]), pct(a["image_agreement"]), "", "")
    console.print(t)
    console.print(f"Agreement floor: {'PASS' if a['pass'] else 'FAIL'} ({a['seconds']:.1f} s for "
                  f"{a['pairs'] + a['vqa_images']} requests at concurrency {result['concurrency']})")
    f = result["faults"]
    t = Table(title="2. serve-judge --fault-rate 0.2 (429 / 500 / hang past 1 s timeout / malformed)", box=style)
    t.add_column("measure"), t.add_column("value", justify="right")
    if f["crashed"]:
        t.add_row("crashed", f["crashed"])
    else:
        for name, key in [("verdicts (pairs + VQA images)", "verdicts"), ("ok", "ok"), ("unparseable", "unparseable"),
                          ("failed after retries", "failed"), ("ledger rows (done / all)", None),
                          ("attempts counted in the ledger", "attempts"), ("retries (attempts - rows)", "retries"),
                          ("re-asks after malformed replies", "reasks"), ("requests the server saw", "server_requests")]:
            value = f"{f['ledger_done']} / {f['ledger_rows']}" if key is None else str(f[key])
            t.add_row(name, value)
        t.add_row("faults injected", ", ".join(f"{k}: {v}" for k, v in sorted(f["server_faults"].items())))
        t.add_row("pairwise agreement of ok verdicts %", pct(f["pair_agreement_of_ok"]))
        t.add_row("crashes", "0")
        t.add_row("wall time s", f"{f['seconds']:.1f}")
    console.print(t)
    console.print(f"Faults: {'PASS' if f.get('pass') else 'FAIL'}")
    t = Table(title="3. Throughput: judged pairs/s through OpenAIJudge.compare_many (ledger on)", box=style)
    for col in ("server latency s", "concurrency", "pairs", "seconds", "pairs/s", "ideal (c / latency)",
                "client CPU ms/pair"):
        t.add_column(col, justify="right")
    for r in result["throughput"]:
        t.add_row(f"{r['latency_s']:g}", str(r["concurrency"]), str(r["pairs"]), f"{r['seconds']:.2f}",
                  f"{r['pairs_per_s']:.1f}", f"{r['ideal_per_s']:.0f}", f"{r['client_cpu_ms_per_pair']:.1f}")
    console.print(t)
    if "votes" in result:
        t = Table(title="4. Votes: the quality gate (score 1.0) through serve-judge --error-rate e, temperature 0.7",
                  box=style)
        for col in ("error rate", "votes", "right images kept %", "kept that are right %", "requests"):
            t.add_column(col, justify="right")
        for r in result["votes"]:
            t.add_row(f"{r['error_rate']:g}", str(r["votes"]), f"{pct(r['right_kept'])} of {r['right']}",
                      f"{pct(r['precision'])} of {r['kept']}", str(r["requests"]))
        console.print(t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16, help="for the agreement and fault parts")
    parser.add_argument("--quick", action="store_true", help="150 cases, short throughput runs")
    parser.add_argument("--vote-prompts", type=int, default=300, help="prompts of part 4 (two images each)")
    parser.add_argument("--json", action="store_true", help="one JSON line on stdout; tables go to stderr")
    parser.add_argument("--markdown", action="store_true", help="tables as Markdown")
    args = parser.parse_args()
    n = 150 if args.quick else args.cases
    console = Console(stderr=args.json, highlight=False, width=160)
    started = time.perf_counter()
    result = {"machine": machine(), "cases": n, "concurrency": args.concurrency}
    pairs, vqa = cases(n)
    result["agreement"] = agreement(pairs, vqa, args.concurrency)
    half = max(n // 2, 1)
    result["faults"] = faults(pairs[:half], vqa[:half], args.concurrency)
    runs = {LATENCY_S: {1: 20, 8: 100, 32: 150}, 0.5: {1: 4, 8: 32, 32: 128}} if args.quick else \
        {LATENCY_S: {1: 60, 8: 300, 32: 600}, 0.5: {1: 10, 8: 80, 32: 256}}
    result["throughput"] = throughput(pairs, {lat: {c: min(k, n) for c, k in levels.items()}
                                              for lat, levels in runs.items()})
    result["votes"] = votes(30 if args.quick else args.vote_prompts, args.concurrency)
    result["runtime_s"] = time.perf_counter() - started
    tables(result, console, box.MARKDOWN if args.markdown else box.SIMPLE_HEAD)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    sys.exit(0 if result["agreement"]["pass"] and result["faults"].get("pass") else 1)


if __name__ == "__main__":
    main()
