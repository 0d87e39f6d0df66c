"""The evolve recipe: every operation recorded with its parent, SIGKILL + rerun, the judge's checks and gate."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2i_evolve.data import CachedJudge, Ledger
from t2i_evolve.protocols import Comparison
from t2i_evolve.eval.held_out import held_out_prompts
from t2i_evolve.generators.local_pipeline import FamilySampler
from t2i_evolve.models import SamplerConfig
from t2i_evolve.recipes.evolve import EvolveConfig, run_evolve

sys.path.insert(0, str(Path(__file__).parent))
from evolve_worker import ScriptedJudge, ledger_state, run_worker, small_config, tensorboard_scalars  # noqa: E402

from t2i_evolve.recipes.parts import stable_seed  # noqa: E402


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted run of the worker: the ledger every interrupted run must end with."""
    run_dir = tmp_path_factory.mktemp("evolve") / "reference"
    done = run_worker(run_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir


def test_every_operation_is_recorded_with_round_parent_and_reason(reference_run, capsys):
    with Ledger(reference_run, create=False) as ledger:
        records = {r.id: r for r in ledger.records(None)}
        ops = ledger.ops()
        stats = ledger.stats()
    kinds = {(o.round, o.op) for o in ops}
    assert (0, "seed") in kinds
    for r in (1, 2):
        assert {(r, "delete"), (r, "expand"), (r, "mutate"), (r, "judge")} <= kinds, kinds
    for record in records.values():
        if record.op in ("expand", "mutate"):
            parent = records[record.parent]
            assert parent.round < record.round and record.reason
            if record.op == "expand":  # the parent's teacher alone draws its variations
                assert record.generator == parent.generator
                memorized = "trained prompt but scored" in record.reason  # a tie that failed the deletion check
                assert parent.judge["base_vs_teacher"] == ("tie" if memorized else "b")
            else:
                assert parent.status == "deleted" and parent.deleted_round == record.round
    held_out = set(held_out_prompts(small_config(str(reference_run))))
    assert held_out and not held_out & {r.prompt for r in records.values()}  # no teacher drew a held-out prompt
    deleted = [r for r in records.values() if r.status == "deleted"]
    assert deleted and all(r.deleted_reason and r.judge["base_vs_teacher"] == "tie" for r in deleted)
    assert all(r.judge["unseen_score"] >= 0.5 for r in deleted)  # the deletion check let these go, and
    kept = [r for r in records.values() if r.op == "expand" and "trained prompt but scored 0.00" in r.reason]
    assert kept and all(records[r.parent].judge["base_vs_teacher"] == "tie" for r in kept)  # expanded these ties
    # ledger stats: per-round operation counts and per-round calls of the teacher and the judge
    by_round = {(row["round"], row["op"]): row["count"] for row in stats["ops"]}
    assert by_round[(1, "expand")] == sum(1 for r in records.values() if r.round == 1 and r.op == "expand")
    callers = {(row["caller"], row["round"]) for row in stats["calls"]}
    assert {("strong", 0), ("strong", 1), ("scripted", 1), ("scripted", 2)} <= callers
    from t2i_evolve.cli import main  # without --json: a table of them, a row per round

    capsys.readouterr()
    assert main(["ledger", "stats", str(reference_run)]) == 0
    shown = capsys.readouterr().out
    row_1 = next(line for line in shown.splitlines() if line.startswith("│ 1 "))
    assert f"│ {by_round[(1, 'expand')]} " in row_1 and "delete" in shown and "strong" in shown
    summary = json.loads((reference_run / "summary.json").read_text())
    assert [row["round"] for row in summary["rounds"]] == [1, 2]
    assert summary["rounds"][1]["teacher_calls"] > summary["rounds"][0]["teacher_calls"]  # expansions were drawn
    # the rounds are one training run: round 2 carried on from round 1's last step (6) to step 12
    assert [p.name for p in sorted((reference_run / "rounds" / "002" / "checkpoints").glob("step-*"))][-1] == "step-0000012"
    report = (reference_run / "report.html").read_text()
    assert "<polyline" in report and "Held-out samples before and after" in report and report.count("<img") >= 4


def test_a_records_history_keeps_each_rounds_verdict_its_lineage_and_what_it_bought(reference_run, capsys):
    """`ledger history`: a record judged in both rounds shows both verdicts (the record holds only the last), a
    variation of a variation traces back to its seed prompt, and a parent lists what it bought and why."""
    from t2i_evolve.cli import main
    from t2i_evolve.data.history import describe_result, record_history

    with Ledger(reference_run, create=False) as ledger:
        records = {r.id: r for r in ledger.records(None)}
        judged = Counter(op.record_id for op in ledger.ops() if op.op == "judge")
        twice = next(i for i, n in judged.items() if n == 2)
        story = record_history(ledger, twice)
        grandchild = next(r for r in records.values() if r.parent and records[r.parent].parent)
        chain = record_history(ledger, grandchild.id)["lineage"]
    verdicts = [e for e in story["events"] if e["op"] == "judge"]
    assert [e["round"] for e in verdicts] == [1, 2] and verdicts[-1]["reason"] == describe_result(records[twice].judge)
    assert all(e["reason"].startswith("base_vs_teacher ") and "score_teacher" in e["reason"] for e in verdicts)
    root = records[records[grandchild.parent].parent]
    assert [r["id"] for r in chain] == [root.id, grandchild.parent] and root.op == "seed"
    parent = records[grandchild.parent]
    capsys.readouterr()
    assert main(["ledger", "history", str(reference_run), f"#{parent.id}"]) == 0
    shown = capsys.readouterr().out
    assert f"from #{root.id} {root.prompt!r} (seed, round 0)" in shown
    assert f"-> #{grandchild.id} {grandchild.prompt!r}" in shown and f"by {grandchild.op}: {grandchild.reason}" in shown
    assert main(["ledger", "history", str(reference_run), root.prompt.upper(), "--json"]) == 0  # by prompt
    by_prompt = json.loads(capsys.readouterr().out)
    assert [h["record"]["id"] for h in by_prompt] == [r.id for r in records.values() if r.prompt == root.prompt]
    assert main(["ledger", "history", str(reference_run), f"  {root.prompt.capitalize()}.", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == by_prompt  # any spelling the run takes for the same prompt
    for which, expected in [("#99999", "99999 in"), ("99999", "'99999' in"), ("a purple cow", "'a purple cow' in"),
                            ("9" * 30, "'999"), ("²", "'²'")]:
        assert main(["ledger", "history", str(reference_run), which]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: no record {expected}") and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("kill", [("--kill-after", "40"),  # round 1 judged the 24 seed records: dies in round 2
                                  ("--kill-after", "27"),  # round 1 compared them and checks its ties' variations
                                  ("--kill-at-draw", "3"),  # after round 1's verdicts, drawing its expansions
                                  ("--kill-at-draw", "10")],  # drawing round 2's 5 mutations, its expansions drawn
                         ids=["judging", "checking", "expanding", "mutating"])
def test_sigkill_mid_round_then_rerun_pays_no_call_twice_and_ends_with_the_same_ledger(reference_run, tmp_path, kill):
    run_dir = tmp_path / "killed"
    killed = run_worker(run_dir, *kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with Ledger(run_dir, create=False) as ledger:
        caller = "scripted" if kill[0] == "--kill-after" else "strong"
        pending = ledger.calls(caller=caller, status="pending")  # the call in flight when it died
        assert pending and (kill[1] != "27" or pending[0].request["method"] == "score")
        drawn = {rec.op for rec in ledger.records(None, round=2)}
        assert kill[1] != "10" or drawn == {"expand"}  # (the picks are made again from what the set held before)
        assert not (run_dir / "summary.json").exists()
    resumed = run_worker(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ledger_state(run_dir) == ledger_state(reference_run)
    assert "evolve rounds 2/2: score " in resumed.stderr  # (not a terminal: a line a round, as it ends)
    for log in ("teacher_calls.jsonl", "judge_calls.jsonl"):  # the "server side": answered calls
        assert (run_dir / log).read_text().count("\n") == (reference_run / log).read_text().count("\n"), log


def test_sigkill_while_the_quality_gate_scores_then_rerun_pays_no_call_twice(tmp_path, capsys):
    """The gate on, 30 teacher calls, then rounds that buy nothing (`train_past_teacher_budget`). Killed at the
    judge's 10th call (round 0, scoring the seed images), again while it scores round 1's expansions, the
    last images the budget paid for (some recorded, some not), and while the teacher draws those (all four in
    flight, the budget's last calls): each rerun pays no answered call twice and ends with the uninterrupted
    run's ledger, those images all recorded though the budget is spent when it starts again (a call sent again
    after a crash counts once against it)."""
    from t2i_evolve.cli import main

    reference, flags = tmp_path / "reference", ("--gate", "--teacher-budget", "30")
    assert run_worker(reference, *flags).returncode == 0
    expanded = {rec.prompt for rec in Ledger(reference, create=False).records(None, round=1) if rec.op == "expand"}
    judged = [json.loads(line) for line in (reference / "judge_calls.jsonl").read_text().splitlines()]
    gating = [n for n, call in enumerate(judged, 1) if call.get("method") == "score" and call["prompt"] in expanded]
    assert len(gating) >= 3 and json.loads((reference / "summary.json").read_text())["teacher_calls"] == 30
    for kill in (("--kill-after", "10"), ("--kill-after", str(gating[1])), ("--kill-at-draw", "3")):
        run_dir = tmp_path / f"killed{''.join(kill)}"
        killed = run_worker(run_dir, *flags, *kill)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        drawing = kill[0] == "--kill-at-draw"
        with Ledger(run_dir, create=False) as ledger:
            in_flight = ledger.calls(caller="strong" if drawing else "scripted", status="pending")
            assert in_flight and (kill[1] != "10" or not ledger.records(round=1))
            assert not drawing or len(in_flight) == 4 and ledger.call_totals(["strong"])[0] == 30
        resumed = run_worker(run_dir, *flags)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        records, ops = ledger_state(run_dir)
        assert (records, ops) == ledger_state(reference)
        with Ledger(run_dir, create=False) as ledger:
            assert ledger.call_totals(["strong"])[0] == 30 and ledger.interrupted_calls() == len(in_flight)
        assert main(["ledger", "stats", str(run_dir)]) == 0
        assert f"{len(in_flight)} calls sent again after a crash" in capsys.readouterr().out
        assert any(op[1] == "reject" for op in ops) and any(r[5] == "active" for r in records)
        for log in ("teacher_calls.jsonl", "judge_calls.jsonl"):
            assert (run_dir / log).read_text().count("\n") == (reference / log).read_text().count("\n"), log


def test_judge_first_trains_each_round_on_what_its_verdicts_bought_and_resumes_after_sigkill(tmp_path):
    """`judge_first`: round 1 judges the base and buys before it trains, and nothing is bought after the last
    round's training. Killed while judging the base (judge call 27, a deletion check: no step trained yet),
    the rerun pays no call twice and ends with the uninterrupted run's ledger."""
    reference, run_dir = tmp_path / "reference", tmp_path / "killed"
    assert run_worker(reference, "--judge-first").returncode == 0
    summary = json.loads((reference / "summary.json").read_text())
    rows = summary["rounds"]
    with Ledger(reference, create=False) as ledger:
        seeds = ledger.records(None, round=0)
        bought = ledger.records(None, round=1)
        kept = [rec for rec in seeds if rec.deleted_round != 1]
    # round 1 trained on the seeds its verdicts kept and the images they bought, not on the 24 seeds
    assert bought and rows[0]["ops"]["judged"] == len(seeds) and rows[0]["active"] == len(kept) + len(bought)
    assert summary["teacher_calls"] == rows[-1]["teacher_calls"] == rows[-1]["teacher_calls_after"]  # none untrained
    killed = run_worker(run_dir, "--judge-first", "--kill-after", "27")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run_dir / "rounds" / "001" / "checkpoints").exists()
    resumed = run_worker(run_dir, "--judge-first")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ledger_state(run_dir) == ledger_state(reference)
    for log in ("teacher_calls.jsonl", "judge_calls.jsonl"):
        assert (run_dir / log).read_text().count("\n") == (reference / log).read_text().count("\n"), log


def test_sigkill_while_the_base_draws_again_then_rerun_pays_no_call_twice(reference_run, tmp_path):
    """`base_draws: 2`: round 1's "teacher better" verdicts and failed deletion checks are judged again on a
    fresh draw of the base (the scripted judge answers by prompt, so none is overturned: more calls, the same
    decisions). Killed at the judge's 30th call, among the fresh draws after round 1's 24 verdicts, the rerun
    pays no call twice and ends with the uninterrupted run's ledger."""
    reference, run_dir = tmp_path / "reference", tmp_path / "killed"
    assert run_worker(reference, "--draws", "2").returncode == 0
    rows = json.loads((reference / "summary.json").read_text())["rounds"]
    one_draw = json.loads((reference_run / "summary.json").read_text())["rounds"]
    assert rows[0]["ops"]["redrawn"] == 0 and rows[0]["ops"]["expand"] == one_draw[0]["ops"]["expand"] > 0
    assert rows[0]["judge_calls"] > one_draw[0]["judge_calls"] + 16  # a fresh look for each costly verdict
    killed = run_worker(run_dir, "--draws", "2", "--kill-after", "30")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with Ledger(run_dir, create=False) as ledger:
        pending = ledger.calls(caller="scripted", status="pending")
        assert pending and pending[0].request["method"] == "compare" and not ledger.records(round=1)
    resumed = run_worker(run_dir, "--draws", "2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ledger_state(run_dir) == ledger_state(reference)
    for log in ("teacher_calls.jsonl", "judge_calls.jsonl"):
        assert (run_dir / log).read_text().count("\n") == (reference / log).read_text().count("\n"), log


def test_prior_images_are_the_bases_own_the_judge_passed_trained_at_their_share_and_resume_after_sigkill(tmp_path):
    """`prior_images: 16`: before round 1 the base draws 16 random prompts (none held out) and the judge scores
    each; the images it passes (its score, by prompt hash, fails a quarter) make about `prior_share` (0.3) of
    every round's training rows, for no teacher call. Killed while the judge scores them (its 6th call) and
    rerun, the run pays no call twice and ends with the uninterrupted run's ledger and prior images."""
    from t2i_evolve.prompts import GrammarPromptWriter
    from t2i_evolve.recipes.evolve import Run
    from t2i_evolve.recipes.parts import cached_teachers, prior_images
    from t2i_evolve.world import ProceduralTeacher

    reference, run_dir = tmp_path / "reference", tmp_path / "killed"
    assert run_worker(reference, "--prior", "16").returncode == 0
    prior = json.loads((reference / "prior" / "prior.json").read_text())
    passed = [row["prompt"] for row in prior["kept"]]
    config = small_config(str(reference), prior_images=16)
    judged = [json.loads(line) for line in (reference / "judge_calls.jsonl").read_text().splitlines()][:16]
    assert prior["judged"] == 16 and [c.get("method") for c in judged] == ["score"] * 16
    assert Counter(passed) == Counter(c["prompt"] for c in judged if stable_seed(c["prompt"], "gate") % 4)
    assert 4 <= len(passed) < 16 and not set(passed) & set(held_out_prompts(config))
    with Ledger(reference) as ledger:  # the prior is read back from the run folder: no base is drawn again
        run = Run(config, ledger, cached_teachers([ProceduralTeacher()], ledger), config.judge.build(ledger),
                  GrammarPromptWriter(config.grammar), reference, held_out=held_out_prompts(config))
        run.prior = prior_images(run, lambda: pytest.fail("the prior was drawn again"))
        data, active = run.training_set(), [rec.prompt for rec in ledger.records()]
    from_prior = data.image_rows() >= len(active)  # the prior's images come after the active records'
    assert Counter(p for p, prior_row in zip(data.prompts, from_prior) if prior_row) == Counter(
        {p: n * (int(from_prior.sum()) // len(passed)) for p, n in Counter(passed).items()})  # repeated whole
    assert abs(from_prior.float().mean().item() - 0.3) < 0.1
    killed = run_worker(run_dir, "--prior", "16", "--kill-after", "6")
    assert killed.returncode == -signal.SIGKILL and not (run_dir / "prior" / "prior.json").exists()
    resumed = run_worker(run_dir, "--prior", "16")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ledger_state(run_dir) == ledger_state(reference)
    assert json.loads((run_dir / "prior" / "prior.json").read_text()) == prior
    from t2i_evolve.errors import UserError
    with pytest.raises(UserError, match=r"was started with another config \(prior_images: 16 -> 8"):
        run_evolve(small_config(str(run_dir), prior_images=8))  # another prior in the same folder: said, not mixed
    for log in ("teacher_calls.jsonl", "judge_calls.jsonl"):
        assert (run_dir / log).read_text().count("\n") == (reference / log).read_text().count("\n"), log


class AlwaysTie:
    """A judge that finds the base as good as its teacher on every prompt."""

    id = "always-tie"

    def compare(self, image_a, image_b, prompt):
        return Comparison("tie", 1.0, 1.0)


@pytest.mark.parametrize("judge_first", [False, True])
def test_a_run_stops_cleanly_once_the_judge_has_deleted_every_record_and_a_rerun_stays_stopped(tmp_path, judge_first):
    """Every record deleted, none mutated: nothing is left to train on, so the run stops (judging first, before
    round 1 trains at all) with a clear reason, and the same command run again does no more."""
    config = small_config(str(tmp_path), rounds=3, mutate_rate=0.0, judge_first=judge_first)
    summary = run_evolve(config, judge=AlwaysTie())
    assert summary["stopped"].startswith("every record deleted")
    assert [row["round"] for row in summary["rounds"]] == ([] if judge_first else [1])
    with Ledger(tmp_path, create=False) as ledger:
        assert ledger.count() == 0 and len(ledger.records("deleted")) == 24
    again = run_evolve(config, judge=AlwaysTie())
    assert again["rounds"] == summary["rounds"] and again["stopped"] == summary["stopped"]
    assert again["teacher_calls"] == summary["teacher_calls"] == 24


def test_a_run_stopped_early_is_scored_even_when_only_its_last_round_would_be(tmp_path):
    """`eval_every_round: false` scores after the last round; a run that stops before it (every record
    deleted) is scored on the model it ended with, so its summary and metrics have a final score."""
    config = small_config(str(tmp_path), rounds=3, mutate_rate=0.0, eval_every_round=False)
    summary = run_evolve(config, judge=AlwaysTie())
    assert summary["stopped"].startswith("every record deleted") and [row["round"] for row in summary["rounds"]] == [1]
    assert summary["final_score"] is not None and summary["rounds"][0]["skills"]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["score"] == summary["final_score"]


def test_a_set_emptied_at_the_teacher_budget_trains_on_what_it_bought_for_the_rounds_left(tmp_path):
    """With `train_past_teacher_budget` the run was given its rounds whatever it spent: a set the judge empties once
    the budget is spent does not end it; rounds 2 and 3 train on the deleted records (and judge nothing)."""
    config = small_config(str(tmp_path), rounds=3, mutate_rate=0.0, max_teacher_calls=24, train_past_teacher_budget=True)
    summary = run_evolve(config, judge=AlwaysTie())
    assert summary["stopped"] is None and [row["round"] for row in summary["rounds"]] == [1, 2, 3]
    assert [row["active"] for row in summary["rounds"]] == [24, 0, 0] and summary["teacher_calls"] == 24
    assert [row["ops"]["judged"] for row in summary["rounds"]] == [24, 0, 0]
    weights = [load_file(tmp_path / "rounds" / f"{r:03d}" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
               for r in (1, 3)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # rounds 2 and 3 trained
    again = run_evolve(config, judge=AlwaysTie())
    assert again["rounds"] == summary["rounds"] and again["teacher_calls"] == 24


class FakeBase:
    """A base that draws a prompt as its teacher does where `draws(prompt)`, and a blank canvas elsewhere."""

    def __init__(self, teacher, draws):
        self.teacher, self.draws = teacher, draws

    def generate(self, prompts, seeds):
        from PIL import Image

        drawn = self.teacher.generate(prompts, seeds)
        return [image if self.draws(p) else Image.new("RGB", image.size, "white") for image, p in zip(drawn, prompts)]


def test_the_judge_finds_the_concept_a_pretrained_base_misses_and_buys_only_that(tmp_path):
    """EvolveDirector's regime: a base that draws the world but one color. The judge deletes the records it
    draws, expands the ones it misses, and with `writer.keep: [color]` every variation keeps the missed color,
    so each teacher call after the seed set buys that concept; no held-out prompt is ever drawn, and a record
    whose variations are all held out is counted as `unexpanded`."""
    from t2i_evolve.recipes.evolve import Run
    from t2i_evolve.recipes.parts import WriterSpec, cached_teachers
    from t2i_evolve.world import ProceduralTeacher, TeacherConfig

    teacher = ProceduralTeacher(TeacherConfig())
    config = small_config(str(tmp_path), max_groups=1, max_count=1, p_size=0.3, seed_prompts=48, mutate_rate=0.0,
                          variations=3, eval_prompts=12, eval_draws=3, writer=WriterSpec(keep=["color"]))
    held_out = held_out_prompts(config)
    assert len(held_out) == 36 and all(held_out.count(p) == 3 for p in held_out)

    class HeldOutWriter:  # a writer with nothing left to offer: its every variation is a held-out prompt
        def variations(self, prompt, k, *, seed):
            return held_out[:k]

    for name, writer in [("keep-color", config.writer.build(config.grammar)), ("held-out", HeldOutWriter())]:
        with Ledger(tmp_path / name) as ledger:
            run = Run(config, ledger, cached_teachers([teacher], ledger), config.judge.build(ledger), writer,
                      tmp_path / name, held_out)
            run.seed_set()
            seeds = ledger.records(None, round=0)
            ops = run.evolve_set(1, FakeBase(teacher, lambda prompt: "yellow" not in prompt))
            bought = ledger.records(None, round=1)
            missed = {rec.id for rec in seeds if "yellow" in rec.prompt}
            assert missed and ops["judged"] == len(seeds) == 48
            deleted = {rec.id for rec in ledger.records(None, round=0) if rec.status == "deleted"}
            assert deleted == {rec.id for rec in seeds} - missed
            assert not {rec.prompt for rec in bought} & set(held_out)
        if name == "keep-color":
            assert ops["expand"] == len(bought) > 0 and ops["unexpanded"] == 0
            assert all("yellow" in rec.prompt and rec.parent in missed for rec in bought)
        else:  # the judge wants more of what the base misses, but no prompt can be bought: said, not silent
            assert ops["expand"] == len(bought) == 0 and ops["unexpanded"] == len(missed)


def test_mutations_find_a_concept_the_long_tailed_seed_set_lacks_and_expansions_buy_it(tmp_path):
    """Users' long tail: no seed prompt names yellow (`rare_weight: 0`), and the base draws everything but
    yellow. The judge deletes the whole seed set; each deletion mutates into a prompt of another structure,
    which the writer draws with any color, so some are yellow; the next round the judge finds the base
    wrong on exactly those, and every expansion keeps their color: the set grows where the base is weak."""
    from t2i_evolve.recipes.evolve import Run
    from t2i_evolve.recipes.parts import WriterSpec, cached_teachers
    from t2i_evolve.world import ProceduralTeacher, TeacherConfig

    teacher = ProceduralTeacher(TeacherConfig())
    config = small_config(str(tmp_path), max_groups=1, max_count=1, p_size=0.3, seed_prompts=40, mutate_rate=1.0,
                          rare_words=["yellow"], rare_weight=0.0, eval_prompts=12, writer=WriterSpec(keep=["color"]))
    base = FakeBase(teacher, lambda prompt: "yellow" not in prompt)
    with Ledger(tmp_path) as ledger:
        run = Run(config, ledger, cached_teachers([teacher], ledger), config.judge.build(ledger),
                  config.writer.build(config.grammar), tmp_path, held_out_prompts(config))
        run.seed_set()
        assert len(ledger.records(None, round=0)) == 40 and not any("yellow" in r.prompt for r in ledger.records(None))
        first = run.evolve_set(1, base)
        assert first["delete"] == 40 and first["expand"] == 0 and first["mutate"] > 30  # (less any held out)
        found = {rec.id for rec in ledger.records(None, round=1) if "yellow" in rec.prompt}
        assert found and all(rec.op == "mutate" for rec in ledger.records(None, round=1))
        second = run.evolve_set(2, base)
        bought = [rec for rec in ledger.records(None, round=2) if rec.op == "expand"]
        assert second["judged"] == first["mutate"] and second["delete"] == first["mutate"] - len(found)
        assert bought and all("yellow" in rec.prompt and rec.parent in found for rec in bought)


def test_least_seen_mutations_show_the_judge_more_of_what_the_seed_set_never_named(tmp_path):
    """The same long tail (no yellow seed prompt, a base blind to yellow). Mutations drawn at the writer's odds
    reach yellow one time in six at best; with `mutate_candidates` each is the least-seen of several, and yellow,
    never seen, is picked until it is as common as the rest: more mutations the judge then finds the base wrong on
    (and expands) the round after."""
    from t2i_evolve.recipes.evolve import Run
    from t2i_evolve.recipes.parts import WriterSpec, cached_teachers
    from t2i_evolve.world import ProceduralTeacher, TeacherConfig

    teacher = ProceduralTeacher(TeacherConfig())
    base = FakeBase(teacher, lambda prompt: "yellow" not in prompt)
    for seed in (0, 1):
        yellow, mutated = {}, {}
        for m in (1, 8):
            config = small_config(str(tmp_path), max_groups=1, max_count=1, p_size=0.3, seed_prompts=24, seed=seed,
                                  mutate_rate=1.0, mutate_candidates=m, rare_words=["yellow"], rare_weight=0.0,
                                  eval_prompts=24, eval_draws=8, writer=WriterSpec(keep=["color"]))
            run_dir = tmp_path / f"{seed}-{m}"
            with Ledger(run_dir) as ledger:
                run = Run(config, ledger, cached_teachers([teacher], ledger), config.judge.build(ledger),
                          config.writer.build(config.grammar), run_dir, held_out_prompts(config))
                run.seed_set()
                assert run.evolve_set(1, base)["delete"] == 24
                mutations = [rec for rec in ledger.records(None, round=1) if rec.op == "mutate"]
                yellow[m], mutated[m] = {rec.id for rec in mutations if "yellow" in rec.prompt}, len(mutations)
                run.evolve_set(2, base)  # the judge finds the base wrong on exactly the yellow ones: expanded
                lost = {rec.id for rec in mutations if ledger.record(rec.id).judge["base_vs_teacher"] == "b"}
                bought = {rec.parent for rec in ledger.records(None, round=2) if rec.op == "expand"}
                assert lost == yellow[m] and bought and bought <= lost
        assert len(yellow[8]) >= len(yellow[1]) + 3 and len(yellow[8]) >= 0.3 * mutated[8], (seed, yellow, mutated)


def test_a_mutation_the_writer_draws_from_the_held_out_prompts_is_asked_again(tmp_path):
    """A held-out prompt is never drawn, so a mutation that lands on one is asked for again (a few times),
    not lost: a small slice holds out most prompts of some structures, and the set would shrink."""
    from t2i_evolve.recipes.evolve import Run
    from t2i_evolve.recipes.parts import cached_teachers
    from t2i_evolve.world import ProceduralTeacher, TeacherConfig

    teacher = ProceduralTeacher(TeacherConfig())
    config = small_config(str(tmp_path), max_groups=1, max_count=1, seed_prompts=6, mutate_rate=1.0, eval_prompts=6)
    held_out = held_out_prompts(config)
    fresh = [p for p in config.writer.build(config.grammar).sample(40, seed=1) if p not in held_out]

    class Writer:  # every other answer is a held-out prompt; `always_held_out`: every answer
        def __init__(self, always_held_out):
            self.asked, self.always_held_out = 0, always_held_out

        def new_structures(self, prompts, k, *, seed):
            self.asked += 1
            return [held_out[0] if self.always_held_out or self.asked % 2 else fresh[self.asked]]

    for always in (False, True):
        writer = Writer(always)
        with Ledger(tmp_path / str(always)) as ledger:
            run = Run(config, ledger, cached_teachers([teacher], ledger), config.judge.build(ledger), writer,
                      tmp_path / str(always), held_out)
            run.seed_set()
            ops = run.evolve_set(1, FakeBase(teacher, lambda prompt: True))
            mutations = [rec.prompt for rec in ledger.records(None, round=1) if rec.op == "mutate"]
        assert ops["delete"] == 6 and not set(mutations) & set(held_out)
        assert (ops["mutate"], writer.asked) == ((0, 18) if always else (6, 12))


def test_the_deletion_check_keeps_what_the_base_memorized_and_deletes_what_it_learned(tmp_path):
    """The judge finds the base as good as its teacher on the prompts it trained on. A base that memorized
    them (it draws its training prompts right and nothing else) passes that verdict, so the paper's loop
    deletes its whole set. With `min_unseen_score` the base must also draw a fresh variation of the prompt:
    the memorizing base's records stay and are expanded, a base that learned the skills has them deleted."""
    from t2i_evolve.prompts import GrammarPromptWriter
    from t2i_evolve.recipes.evolve import Run
    from t2i_evolve.recipes.parts import cached_teachers
    from t2i_evolve.world import ProceduralTeacher, TeacherConfig

    teacher = ProceduralTeacher(TeacherConfig())
    Base = partial(FakeBase, teacher)
    outcomes = {}
    for base_kind, check in [("memorized", None), ("memorized", 1.0), ("learned", 1.0)]:
        run_dir = tmp_path / f"{base_kind}-{check}"
        config = small_config(str(run_dir), min_unseen_score=check, variations=1, mutate_rate=0.0)
        with Ledger(run_dir) as ledger:
            run = Run(config, ledger, cached_teachers([teacher], ledger), config.judge.build(ledger),
                      GrammarPromptWriter(config.grammar), run_dir, held_out=[])
            run.seed_set()
            trained = {rec.prompt for rec in ledger.records()}
            ops = run.evolve_set(1, Base(lambda p: base_kind == "learned" or p in trained))
            expanded = [rec for rec in ledger.records(None, round=1) if rec.op == "expand"]
            judged = [rec for rec in ledger.records(None, round=0) if rec.judge]
        outcomes[base_kind, check] = ops, expanded, judged
    ops, expanded, judged = outcomes["memorized", None]
    assert ops["judged"] == 24 and ops["delete"] >= 20  # ties on its own prompts: the set is deleted
    ops, expanded, judged = outcomes["memorized", 1.0]
    assert ops["delete"] == 0 and ops["memorized"] == outcomes["memorized", None][0]["delete"]
    assert len(expanded) == ops["expand"] == 24 and all("trained prompt but scored" in r.reason for r in expanded)
    checked = [r for r in judged if "unseen_score" in r.judge]
    assert len(checked) == ops["memorized"] and all(r.judge["unseen_score"] < 1 and r.judge["unseen_prompt"]
                                                    not in trained for r in checked)
    ops, expanded, judged = outcomes["learned", 1.0]
    assert ops["memorized"] == 0 and ops["delete"] >= 20 and not any("trained prompt" in r.reason for r in expanded)


def test_a_second_opinion_keeps_a_noisy_judge_from_buying_what_the_base_already_draws(tmp_path):
    """A base that draws every prompt as its teacher does: each 'teacher better' or 'memorized' verdict is a
    judge error, and each buys variations. Behind serve-judge at 15% errors, `confirm_votes: 5` asks those
    verdicts again (sampled, the first ask reused) and the majority overturns most of them: far fewer
    expansions, and only the costly verdicts asked again."""
    from t2i_evolve.endpoints import EndpointConfig
    from t2i_evolve.judges.server import JudgeServer, JudgeServerConfig
    from t2i_evolve.prompts import GrammarPromptWriter
    from t2i_evolve.recipes.evolve import Run
    from t2i_evolve.recipes.parts import JudgeSpec, cached_teachers
    from t2i_evolve.world import ProceduralTeacher, TeacherConfig

    teacher = ProceduralTeacher(TeacherConfig())
    outcomes = {}
    with JudgeServer(JudgeServerConfig(error_rate=0.15, seed=5)) as server:
        endpoint = EndpointConfig(base_url=server.url, model="pixel-judge", backoff_s=0.0, max_concurrency=8)
        for confirm in (None, 5):
            run_dir = tmp_path / f"confirm-{confirm}"
            config = small_config(str(run_dir), min_unseen_score=1.0, variations=1, mutate_rate=0.0, seed_prompts=40,
                                  confirm_votes=confirm, judge=JudgeSpec(kind="openai", endpoint=endpoint,
                                                                         temperature=0.7))
            before = server.stats()["total"]
            with Ledger(run_dir) as ledger:
                run = Run(config, ledger, cached_teachers([teacher], ledger), config.judge.build(ledger),
                          GrammarPromptWriter(config.grammar), run_dir, held_out=[])
                run.seed_set()
                ops = run.evolve_set(1, FakeBase(teacher, lambda p: True))
            outcomes[confirm] = ops, server.stats()["total"] - before
    (noisy, noisy_asks), (confirmed, confirmed_asks) = outcomes[None], outcomes[5]
    assert noisy["judged"] == confirmed["judged"] == 40
    wrong = noisy["expand"] + noisy["unexpanded"]  # expansions a perfect judge would not have made
    assert wrong >= 8 and confirmed["expand"] + confirmed["unexpanded"] <= wrong / 2, (noisy, confirmed)
    assert confirmed["overturned"] > 0 and "overturned" not in noisy
    # four more asks per costly first verdict (its first ask reused), not five asks per verdict: at most 40
    # comparisons and 40 checks, then the noisy run's costly verdicts and the checks of the overturned ones
    assert noisy_asks < confirmed_asks <= 80 + 4 * (wrong + confirmed["overturned"]) < 5 * 80, confirmed_asks


class UnluckyBase:
    """A base that never draws yellow and, like any diffusion model, draws the rest right on some seeds only
    (odd ones here): one image of it says "teacher better" about prompts it usually gets right."""

    def __init__(self, teacher):
        self.teacher = teacher

    def generate(self, prompts, seeds):
        from PIL import Image

        drawn = self.teacher.generate(prompts, seeds)
        return [Image.new("RGB", image.size, "white") if "yellow" in p or seed % 2 == 0 else image
                for image, p, seed in zip(drawn, prompts, seeds)]


def test_fresh_draws_of_the_base_spend_the_budget_on_the_skill_it_lacks_not_on_unlucky_images(tmp_path):
    """With one image per verdict, the unlucky draws of prompts the base gets right on a retry are judged
    "teacher better" (or, for the deletion check, memorized) and buy variations beside the yellow ones.
    `base_draws: 3` judges those verdicts again on new draws: the unlucky ones are overturned and deleted,
    every yellow record still buys its variations, and only the costly verdicts cost more judge calls."""
    from t2i_evolve.recipes.evolve import Run
    from t2i_evolve.recipes.parts import WriterSpec, cached_teachers
    from t2i_evolve.world import ProceduralTeacher, TeacherConfig

    teacher = ProceduralTeacher(TeacherConfig())
    outcomes = {}
    for draws in (1, 3):
        run_dir = tmp_path / f"draws-{draws}"
        config = small_config(str(run_dir), max_groups=1, max_count=1, p_size=0.3, seed_prompts=48, mutate_rate=0.0,
                              variations=2, min_unseen_score=1.0, base_draws=draws, writer=WriterSpec(keep=["color"]))
        with Ledger(run_dir) as ledger:
            run = Run(config, ledger, cached_teachers([teacher], ledger), config.judge.build(ledger),
                      config.writer.build(config.grammar), run_dir, held_out=[])
            run.seed_set()
            ops = run.evolve_set(1, UnluckyBase(teacher))
            seeds = ledger.records(None, round=0)
            outcomes[draws] = dict(
                ops=ops, yellow={rec.id for rec in seeds if "yellow" in rec.prompt},
                parents={rec.parent for rec in ledger.records(None, round=1) if rec.op == "expand"},
                deleted={rec.id for rec in seeds if rec.status == "deleted"}, judge_calls=run.spent.judge_calls(),
                fresh={rec.id for rec in seeds if rec.judge.get("on_a_fresh_draw")})
    one, three = outcomes[1], outcomes[3]
    yellow = one["yellow"]
    assert yellow and yellow == three["yellow"] and one["ops"]["judged"] == three["ops"]["judged"] == 48
    assert one["parents"] > yellow and one["ops"]["memorized"] > 0  # one draw: unlucky images buy too
    assert "redrawn" not in one["ops"] and three["ops"]["redrawn"] > 0
    assert three["parents"] == yellow and three["ops"]["memorized"] == 0  # three: the yellow records alone
    assert len(three["fresh"]) == three["ops"]["redrawn"] and three["fresh"] <= three["deleted"] and not one["fresh"]
    assert len(three["deleted"]) == 48 - len(yellow) > len(one["deleted"])
    assert three["ops"]["expand"] < one["ops"]["expand"]
    assert one["judge_calls"] < three["judge_calls"] < 3 * one["judge_calls"]  # fresh draws for costly verdicts only


def test_confirm_votes_needs_a_judge_that_samples(tmp_path):
    from t2i_evolve.errors import UserError

    from t2i_evolve.endpoints import EndpointConfig
    from t2i_evolve.recipes.parts import JudgeSpec

    with pytest.raises(UserError, match="confirm_votes needs a judge that samples"):
        run_evolve(small_config(str(tmp_path / "pixel"), confirm_votes=3))  # the pixel judge is exact
    voting = JudgeSpec(kind="openai", endpoint=EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m"), votes=3,
                       temperature=0.7)  # (never asked: the check comes before any call)
    with pytest.raises(UserError, match=r"confirm_votes \(3\) asks again: more than the judge's own votes \(3\)"):
        run_evolve(small_config(str(tmp_path / "voting"), confirm_votes=3, judge=voting))


@pytest.mark.parametrize("votes, reask, kept", [(2, "a", 12), (3, "tie", 0)], ids=["split", "majority-tie"])
def test_a_split_second_opinion_keeps_the_record_and_buys_nothing(tmp_path, votes, reask, kept):
    """`confirm_votes: 2`: the first ask says the teacher draws better, the second says the base does; no
    majority either way is no evidence to buy variations on, nor to delete the record on. At 3, two re-asks that
    find the images alike are a majority: the record is deleted, as the paper deletes a tie."""
    from t2i_evolve.judges.openai_judge import ChatJudge, ChatJudgeConfig
    from t2i_evolve.prompts import GrammarPromptWriter
    from t2i_evolve.recipes.evolve import Run
    from t2i_evolve.recipes.parts import cached_teachers
    from t2i_evolve.world import ProceduralTeacher

    class SecondOpinionJudge(ChatJudge):  # the first ask favours the teacher's image (b), each re-ask `reask`
        id, samples, votes = "second-opinion", True, 1

        def _complete(self, requests, conversations, keys):
            wanted = ["b" if request.get("vote", 0) == 0 else reask for request in requests]
            return ["tie" if w == "tie" else "first" if r["order"][0] == w else "second"
                    for r, w in zip(requests, wanted)]

    class OtherSeeds:  # the base: the teacher's drawing on other seeds
        def generate(self, prompts, seeds):
            return teacher.generate(prompts, [seed + 1 for seed in seeds])

    run_dir, teacher = tmp_path / "run", ProceduralTeacher()
    config = small_config(str(run_dir), seed_prompts=12, variations=1, confirm_votes=votes, mutate_rate=0.0,
                          eval_prompts=0)
    with Ledger(run_dir) as ledger:
        run = Run(config, ledger, cached_teachers([teacher], ledger), SecondOpinionJudge(ChatJudgeConfig(), ledger),
                  GrammarPromptWriter(config.grammar), run_dir, held_out=[])
        run.seed_set()
        ops = run.evolve_set(1, OtherSeeds())
        assert (ops["overturned"], ops["judged"], ops["delete"], ops["expand"]) == (12, 12, 12 - kept, 0)
        assert ledger.count() == kept
        verdicts = {rec.judge["base_vs_teacher"] for rec in ledger.records(None)}
    assert verdicts == ({"split vote"} if kept else {"tie"})


def test_replay_trains_on_deleted_records_at_their_share_and_never_on_rejected_ones(tmp_path):
    """`replay_share: 0.4`: the records the judge deleted make about 0.4 of the round's training rows beside
    every active record; an image the quality gate rejected (wrong) is never replayed; at 0 (the paper)
    the round trains on the active records alone."""
    from t2i_evolve.prompts import GrammarPromptWriter
    from t2i_evolve.recipes.evolve import Run
    from t2i_evolve.recipes.parts import cached_teachers
    from t2i_evolve.world import ProceduralTeacher

    sets = {}
    for share in (0.0, 0.4):
        config = small_config(str(tmp_path / str(share)), replay_share=share)
        with Ledger(tmp_path / str(share)) as ledger:
            run = Run(config, ledger, cached_teachers([ProceduralTeacher()], ledger), config.judge.build(ledger),
                      GrammarPromptWriter(config.grammar), tmp_path / str(share), held_out=[])
            run.seed_set()
            records = ledger.records()
            for rec in records[:6]:
                ledger.delete_record(rec.id, round=1, reason="base as good")
            ledger.delete_record(records[6].id, round=1, op="reject", reason="wrong image")
            sets[share] = run.training_set(), [r.prompt for r in records[7:]], [r.prompt for r in records[:6]]
            for rec in records[7:]:  # none active (`train_past_teacher_budget` trains on): the deleted, once each
                ledger.delete_record(rec.id, round=2, reason="base as good")
            assert Counter(run.training_set().prompts) == Counter(r.prompt for r in records[:6] + records[7:])
    data, active, deleted = sets[0.0]
    assert Counter(data.prompts) == Counter(active)
    data, active, deleted = sets[0.4]
    rows = Counter(data.prompts)  # each set repeated whole: some whole copies of each, the rejected image in none
    combos = [(own, theirs) for own in range(1, 5) for theirs in range(1, 5)
              if rows == Counter({p: n * own for p, n in Counter(active).items()})
              + Counter({p: n * theirs for p, n in Counter(deleted).items()})]
    assert len(combos) == 1, combos
    own, theirs = combos[0]
    assert abs(theirs * len(deleted) / len(data) - 0.4) < 0.1 and len(data.images) == len(active) + len(deleted)
    from t2i_evolve.errors import UserError
    from t2i_evolve.train import evolving_set
    with pytest.raises(UserError, match="no active records"), Ledger(tmp_path / "empty") as empty:
        evolving_set(empty, replay_share=0.4)  # nothing to train on: said, not an empty batch


def test_uniform_baseline_trains_on_the_seed_set_only(tmp_path):
    summary = run_evolve(small_config(str(tmp_path / "uniform"), evolve=False, rounds=1))
    with Ledger(tmp_path / "uniform", create=False) as ledger:
        assert {o.op for o in ledger.ops()} == {"seed"}
    assert summary["teacher_calls"] == 24 and summary["judge_calls"] == 0
    assert 0 <= summary["final_score"] <= 1


def test_a_training_replicate_buys_the_same_images_and_trains_other_weights(tmp_path):
    """`train_seed` (the benchmark's `--train-seeds`): a replicate's data is the run's (prompts and draws are
    seeded by `seed`), its batch order and noise are not; `train_seed` equal to `seed` is the run itself."""
    from t2i_evolve.models import T2IModel
    names = {"run": None, "same": 0, "replicate": 1000}
    for name, train_seed in names.items():
        run_evolve(small_config(str(tmp_path / name), evolve=False, rounds=1, steps_per_round=3, eval_prompts=0,
                                train_seed=train_seed))
    data, weights = {}, {}
    for name in names:
        with Ledger(tmp_path / name, create=False) as ledger:
            data[name] = [(r.prompt, r.seed, ledger.load_image(r.image_path).tobytes()) for r in ledger.records(None)]
        weights[name] = dict(T2IModel.from_pretrained(tmp_path / name / "rounds" / "001" / "model").unet.named_parameters())
    assert data["run"] == data["same"] == data["replicate"] and len(data["run"]) == 24
    assert all(torch.equal(weights["run"][k], weights["same"][k]) for k in weights["run"])
    assert not all(torch.equal(weights["run"][k], weights["replicate"][k]) for k in weights["run"])


def test_an_epoch_cap_trains_a_small_set_for_fewer_steps_and_the_rounds_stay_one_run(tmp_path, monkeypatch):
    """`max_epochs_per_round: 1`: round 1 has 24 records, 8 a step (batches of 4, 2 accumulated), so it trains 3
    steps, not 6; the judge then expands the set past 48 records and round 2 trains its full 6, carrying on from
    step 3. The rounds train as a GPU would be told to (bf16 autocast, checkpointed activations), and the base is
    asked for in bfloat16 to be sampled."""
    from t2i_evolve.eval.report import read_jsonl
    from t2i_evolve.models import T2IModel
    from t2i_evolve.train import TrainConfig

    loaded, load = [], T2IModel.from_pretrained.__func__  # the dtypes models are asked for (loaded in float32 all
    monkeypatch.setattr(T2IModel, "from_pretrained", classmethod(  # the same: a CPU's bfloat16 convolutions are slow)
        lambda cls, path, device="cpu", dtype=torch.float32: loaded.append(dtype) or load(cls, path, device)))
    gpu_settings = {"mixed_precision": "bf16", "gradient_checkpointing": True, "grad_accum": 2}
    summary = run_evolve(small_config(str(tmp_path), max_epochs_per_round=1.0, mutate_rate=0.0, batch_size=4,
                                      dtype="bfloat16", **gpu_settings))
    steps = [max(row["step"] for row in read_jsonl(tmp_path / "rounds" / f"{r:03d}" / "metrics.jsonl")) for r in (1, 2)]
    assert summary["rounds"][1]["active"] > 48 and steps == [3, 9]
    for r in (1, 2):
        trained = TrainConfig.from_yaml(tmp_path / "rounds" / f"{r:03d}" / "config.yaml")
        assert trained.model_dump(include=set(gpu_settings)) == gpu_settings
    assert loaded.count("bfloat16") == 2 and torch.float32 in loaded  # each round's model sampled; trained in fp32
    # spent checkpoints are gone (round 1's, and round 2's but its last, which a third round would carry on from)
    assert not (tmp_path / "rounds" / "001" / "checkpoints").exists()
    assert [p.name for p in (tmp_path / "rounds" / "002" / "checkpoints").glob("step-*")] == ["step-0000009"]


def test_an_llm_writer_rerun_remembers_what_it_wrote_in_earlier_rounds(tmp_path):
    """A new process (a rerun) reads the writer's earlier outputs from the ledger, so a reply that repeats
    them is dropped as a near-copy, as it would have been in the first process."""
    from fake_openai import FakeOpenAI

    from t2i_evolve.endpoints import EndpointConfig
    from t2i_evolve.prompts import OpenAIPromptWriter, OpenAIPromptWriterConfig

    same = json.dumps(["two red circles left of a blue square", "three green stars", "a cyan triangle above a red star",
                       "two yellow squares and a magenta circle", "a blue star below two green circles"])
    run_dir = tmp_path / "llm"
    with FakeOpenAI(chat_reply=lambda body: same) as server:
        def run(rounds: int) -> dict:
            ledger = Ledger(run_dir)
            writer = OpenAIPromptWriter(OpenAIPromptWriterConfig(endpoint=EndpointConfig(
                base_url=server.base_url, model="llm", backoff_s=0.0), max_reasks=0), ledger=ledger)
            judge = CachedJudge(ScriptedJudge(), ledger, backoff_s=0)
            return run_evolve(small_config(str(run_dir), rounds=rounds, mutate_rate=0.0), judge=judge, writer=writer)

        first = run(1)
        second = run(2)  # a new writer, as after a restart
    assert first["rounds"][0]["ops"]["expand"] > 0
    assert second["rounds"][1]["ops"]["expand"] == 0  # every reply repeats what round 1 already wrote
    with Ledger(run_dir, create=False) as ledger:
        written = [r.prompt for r in ledger.records(None) if r.op == "expand"]
    assert written and len(written) == len(set(written)) == first["rounds"][0]["ops"]["expand"]


def test_the_quality_gate_rejects_every_wrong_teacher_image_and_trains_on_the_rest(tmp_path):
    """Two teachers with overlapping blind spots: the tournament's winner is still wrong on prompts both
    miss. With `min_teacher_score` the judge rejects those (kept, logged with the score), the rest train."""
    from t2i_evolve.judges import PixelJudge
    from t2i_evolve.recipes.parts import TeacherSpec

    teachers = [TeacherSpec(id="no-color", p=1.0, blind_to=["red", "green", "blue", "yellow"]),
                TeacherSpec(id="no-shape", p=1.0, blind_to=["circle", "square"])]
    run_dir = tmp_path / "gated"
    summary = run_evolve(small_config(str(run_dir), rounds=1, teachers=teachers, min_teacher_score=1.0))
    judge = PixelJudge()
    with Ledger(run_dir, create=False) as ledger:
        records = ledger.records(None)
        rejects = [o for o in ledger.ops() if o.op == "reject"]
        score_calls = [c for c in ledger.calls(caller=judge.id) if c.request["method"] == "score"]
        scores = {r.id: judge.score(ledger.load_image(r.image_path), r.prompt).score for r in records}
    rejected = [r for r in records if r.deleted_op == "reject"]
    kept = [r for r in records if r.status == "active"]
    assert rejected and kept and {o.record_id for o in rejects} == {r.id for r in rejected}
    assert all(scores[r.id] < 1.0 and "min_teacher_score 1" in r.deleted_reason for r in rejected)
    assert all(scores[r.id] == 1.0 for r in kept)
    assert len(records) <= len(score_calls) <= summary["teacher_calls"]  # a score per image, counted as judge calls
    assert summary["rounds"][0]["ops"]["reject"] == sum(o.round == 1 for o in rejects)
    assert summary["judge_calls"] >= len(records)


def test_the_quality_gate_says_what_is_wrong_in_one_line(tmp_path):
    from t2i_evolve.errors import UserError
    from t2i_evolve.recipes.parts import TeacherSpec

    blind = small_config(str(tmp_path / "blind"), rounds=1, min_teacher_score=1.0,
                         teachers=[TeacherSpec(id="no-color", p=1.0)])  # every color wrong: nothing passes
    with pytest.raises(UserError, match="rejected all 24 seed images"):
        run_evolve(blind)

    class PairwiseOnly:
        id, compare = "pairwise", ScriptedJudge.compare

    for setting in ({"min_teacher_score": 0.5}, {"prior_images": 8}):  # both need a VQA score, before any call
        with pytest.raises(UserError, match=f"{next(iter(setting))} needs a judge that scores one image"):
            run_evolve(small_config(str(tmp_path / "pairwise"), **setting), judge=PairwiseOnly())


def test_until_pass_tournament_keeps_every_prompt_a_teacher_draws_right_for_fewer_calls(tmp_path):
    """Teachers draw in order until one's image passes the gate: the same prompts are kept as when every
    teacher draws every prompt, with fewer teacher calls and no pairwise comparison."""
    from t2i_evolve.errors import UserError
    from t2i_evolve.recipes.parts import TeacherSpec

    specs = [TeacherSpec(id="no-shape", p=1.0, blind_to=["circle", "square"]),
             TeacherSpec(id="no-color", p=1.0, blind_to=["red", "green", "blue", "yellow"])]
    runs = {}
    for mode in ("all", "until_pass"):
        run_dir = tmp_path / mode
        summary = run_evolve(small_config(str(run_dir), rounds=1, evolve=False, teachers=specs,
                                          min_teacher_score=1.0, tournament=mode))
        with Ledger(run_dir, create=False) as ledger:
            kept = sorted((r.prompt, r.seed) for r in ledger.records())
            compares = [c for c in ledger.calls(caller="pixel") if c.request["method"] == "compare"]
        runs[mode] = summary["teacher_calls"], kept, len(compares)
    (calls_all, kept_all, compares_all), (calls_lazy, kept_lazy, compares_lazy) = runs["all"], runs["until_pass"]
    assert kept_lazy == kept_all and kept_all
    assert calls_all == 48 and 24 < calls_lazy < 48  # second teacher asked only where the first was rejected
    assert compares_lazy == 0 < compares_all
    with pytest.raises(UserError, match="set min_teacher_score"):
        run_evolve(small_config(str(tmp_path / "no-gate"), teachers=specs, tournament="until_pass"))


def test_an_image_that_passes_the_gate_wins_the_tournament_whatever_the_pairwise_verdict(tmp_path):
    """A pairwise judge that always keeps the first teacher's image: where that image fails the gate and the
    other teacher's passes, the one that passes is kept, so no prompt a teacher drew right is lost."""
    from t2i_evolve.data import CachedJudge
    from t2i_evolve.judges import PixelJudge
    from t2i_evolve.protocols import Comparison
    from t2i_evolve.recipes.parts import TeacherSpec

    class StubbornJudge(PixelJudge):
        def compare(self, image_a, image_b, prompt):
            return Comparison("b", 0.0, 1.0)  # the challenger (a) never wins

    specs = [TeacherSpec(id="no-color", p=1.0, blind_to=["red", "green", "blue", "yellow"]),
             TeacherSpec(id="no-shape", p=1.0, blind_to=["circle", "square"])]
    run_dir = tmp_path / "stubborn"
    config = small_config(str(run_dir), rounds=1, evolve=False, teachers=specs, min_teacher_score=1.0)
    run_evolve(config, judge=CachedJudge(StubbornJudge(), Ledger(run_dir), backoff_s=0))
    judge, no_shape = PixelJudge(), specs[1].build(32)
    with Ledger(run_dir, create=False) as ledger:
        seeds = ledger.records(None, round=0)
    right_by_no_shape = [r for r in seeds if judge.score(no_shape.generate([r.prompt], [r.seed])[0], r.prompt).score == 1]
    assert right_by_no_shape and all(r.status == "active" for r in right_by_no_shape)  # none lost
    assert any(r.generator == "no-shape" for r in right_by_no_shape)  # won without the pairwise verdict


def test_lora_rounds_carry_one_adapter_on_the_base_and_save_it_merged_once(tmp_path):
    """Every round carries on training adapters over the base's own weights (its checkpoint holds both) and
    saves the base plus exactly its adapters' B @ A, merged once: no other weight moves, in any round."""
    from t2i_evolve.models import T2IModel
    from t2i_evolve.train.lora import DEFAULT_TARGETS
    summary = run_evolve(small_config(str(tmp_path), evolve=False, lora={"rank": 2}, ema_decay=None))
    assert len(summary["rounds"]) == 2
    base = dict(T2IModel.from_pretrained(tmp_path / "base").unet.named_parameters())
    for r in (1, 2):
        saved = dict(T2IModel.from_pretrained(tmp_path / "rounds" / f"{r:03d}" / "model").unet.named_parameters())
        if r == 1:  # its checkpoints are deleted once round 2's model is saved: its model moved only adapted layers
            changed = [n for n in base if not torch.equal(saved[n], base[n])]
            assert changed and all(any(f".{t}.weight" in n for t in DEFAULT_TARGETS["unet"]) for n in changed)
            continue
        checkpoint = load_file(sorted((tmp_path / "rounds" / f"{r:03d}" / "checkpoints").glob("step-*"))[-1]
                               / "model.safetensors")  # the UNet's state: base layers and adapters
        adapted = [k.removesuffix(".lora_A.default.weight") for k in checkpoint if k.endswith(".lora_A.default.weight")]
        assert adapted
        for layer in adapted:
            torch.testing.assert_close(checkpoint[f"{layer}.base_layer.weight"], base[f"{layer}.weight"])
            delta = checkpoint[f"{layer}.lora_B.default.weight"] @ checkpoint[f"{layer}.lora_A.default.weight"]
            assert delta.abs().max() > 0
            torch.testing.assert_close(saved[f"{layer}.weight"], base[f"{layer}.weight"] + delta)
        untouched = [n for n in base if not any(n.startswith(layer + ".") for layer in adapted)]
        assert all(torch.equal(saved[n], base[n]) for n in untouched)


def test_only_the_last_rounds_models_are_kept_when_asked_and_a_rerun_with_more_rounds_goes_on(tmp_path):
    """A real base writes GBs of weights a round: `keep_round_models` deletes the older rounds' folders, which no
    later round reads (each carries on from the last round's model and checkpoint)."""
    def kept():
        return [r for r in range(1, 5) if (tmp_path / "rounds" / f"{r:03d}" / "model" / "model_index.json").is_file()]

    run_evolve(small_config(str(tmp_path), rounds=3, keep_round_models=1, evolve=False))
    assert kept() == [3]
    summary = run_evolve(small_config(str(tmp_path), rounds=4, keep_round_models=2, evolve=False))
    assert [row["round"] for row in summary["rounds"]] == [1, 2, 3, 4] and kept() == [3, 4]


def test_the_readme_evolve_yaml_loads_and_shows_the_defaults():
    """README's evolve.yaml says its values are the defaults: a default changed in the code, or a field renamed,
    fails here rather than misleading a user who copies the file."""
    import re

    import yaml

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```yaml\n# evolve\.yaml[^\n]*\n(.*?)```", readme, re.S).group(1)
    assert EvolveConfig(**yaml.safe_load(block)) == EvolveConfig()


def test_a_run_folder_resumes_only_under_its_own_config_or_more_rounds(reference_run, tmp_path):
    """Rerun under another config, a run that has spent calls would mix two runs in one ledger: refused in one
    line naming what changed, the folder untouched. More rounds (or budget) is a resume: it goes on."""
    from t2i_evolve.errors import UserError

    before = ledger_state(reference_run)
    with pytest.raises(UserError, match=r"was started with another config \(variations: 2 -> 3"):
        run_evolve(small_config(str(reference_run), min_unseen_score=0.5, mutate_candidates=3, variations=3))
    with pytest.raises(UserError, match=r"has started 2 rounds: rerun it with rounds >= 2"):  # its ledger has round 2's
        run_evolve(small_config(str(reference_run), min_unseen_score=0.5, mutate_candidates=3, rounds=1))
    assert ledger_state(reference_run) == before
    longer = tmp_path / "longer"
    shutil.copytree(reference_run, longer)
    # (a sampler leaving out what versions before family samplers wrote, their values still: the same config)
    config = small_config(str(longer), min_unseen_score=0.5, mutate_candidates=3, rounds=3, sampler={"steps": 3})
    summary = run_evolve(config, judge=CachedJudge(ScriptedJudge(), Ledger(longer), backoff_s=0))
    assert [row["round"] for row in summary["rounds"]] == [1, 2, 3]
    assert EvolveConfig.from_yaml(longer / "evolve.yaml").sampler == FamilySampler(**SamplerConfig(steps=3).model_dump())
    # TensorBoard: each round's row once (rounds 1-2 logged by the first run, 3 by this one), at its own round; the
    # loss of every round's steps in one folder, one curve; the settings once, not once per round
    scores = tensorboard_scalars(longer / "tensorboard" / "rounds", "round/score")
    assert scores == [(row["round"], pytest.approx(row["score"])) for row in summary["rounds"]]
    assert tensorboard_scalars(longer / "tensorboard" / "rounds", "score_vs_teacher_calls") == sorted(
        (row["teacher_calls"], pytest.approx(row["score"])) for row in summary["rounds"])  # (report.html's curve)
    loss_steps = [step for step, _ in tensorboard_scalars(longer / "tensorboard" / "train", "loss")]
    assert loss_steps == sorted(set(loss_steps)) and loss_steps[-1] == 18 and min(loss_steps) <= 6
    assert len(list((longer / "tensorboard" / "train").glob("*/hparams.yml"))) == 1
    records, ops = ledger_state(longer)
    drawn = [[rec[:5] + rec[6:9] for rec in state] for state in (records[:len(before[0])], before[0])]
    assert drawn[0] == drawn[1] and any(op[0] == 3 for op in ops)  # what rounds 1-2 drew, as it was


def test_a_real_base_is_judged_at_its_familys_usual_settings_and_its_run_folder_keeps_them(sd_dir, sdxl_dir, tmp_path):
    """A real base judged at the tiny model's settings (10 DDIM steps, no guidance) would draw poorly and the judge
    would buy every prompt: what `sampler` leaves out is the base's family's usual, as a local teacher's. The run
    folder's evolve.yaml writes every field out, so the same command again resumes, drawing as it started."""
    from t2i_evolve.errors import UserError
    from t2i_evolve.generators.local_pipeline import FAMILY_SAMPLERS
    from t2i_evolve.recipes.parts import base_sampling

    assert base_sampling(EvolveConfig()) == SamplerConfig(steps=10)  # the shapes model: what its benchmarks measured
    assert base_sampling(EvolveConfig(base_model=str(sdxl_dir))) == FAMILY_SAMPLERS["sdxl"]
    base = shutil.copytree(sd_dir, tmp_path / "sd")
    config = small_config(str(tmp_path / "run"), base_model=str(base), sampler={"steps": 3}, max_teacher_calls=2)
    usual = SamplerConfig(scheduler="dpm++", steps=3, guidance=7.5)  # SD's, but the steps given
    assert base_sampling(config) == usual
    assert run_evolve(config)["teacher_calls"] == 2  # (stopped at the budget: paid for something)
    assert EvolveConfig.from_yaml(tmp_path / "run" / "evolve.yaml").sampler == FamilySampler(**usual.model_dump())
    assert run_evolve(config)["stopped"].startswith("teacher budget spent")  # resumed: not "another config"
    base.rename(tmp_path / "moved")  # gone when rerun: named so, not taken for another config's sampler
    with pytest.raises(UserError, match=r"base_model .*sd is not a model folder \(no model_index.json\)$"):
        run_evolve(config)


def test_a_run_folder_from_before_family_samplers_resumes_under_the_config_that_started_it(sd_dir, tmp_path):
    """Versions before family defaults wrote `sampler` out for every teacher: a gallery teacher's is dropped (it never
    sampled), so such a folder resumes under its own config; a local teacher's old default is a change: refused."""
    import yaml

    from t2i_evolve.config import check_resumed_config
    from t2i_evolve.errors import UserError
    from t2i_evolve.recipes.evolve import RESUMABLE_CHANGES
    from t2i_evolve.recipes.parts import TeacherSpec

    def started_with(config):
        config.save(tmp_path / "evolve.yaml")
        old = yaml.safe_load((tmp_path / "evolve.yaml").read_text())
        for teacher in old["teachers"]:
            teacher["sampler"] = SamplerConfig().model_dump()  # as those versions wrote it
        (tmp_path / "evolve.yaml").write_text(yaml.safe_dump(old))
        return tmp_path / "evolve.yaml"

    gallery = small_config(str(tmp_path / "run"))
    check_resumed_config(started_with(gallery), gallery, RESUMABLE_CHANGES)
    local = small_config(str(tmp_path / "run"), teachers=[TeacherSpec(kind="local", path=str(sd_dir))])
    with pytest.raises(UserError, match=r"started with another config \(teachers\[0\]\.sampler"):
        check_resumed_config(started_with(local), local, RESUMABLE_CHANGES)


def test_a_folder_another_command_filled_is_refused_not_taken_over(reference_run, tmp_path):
    """An imported set, or a finished evolve run given to the demo: the command would take those records for its
    own set and write its summary and report over the other run's. One line, before anything is written."""
    from PIL import Image

    from t2i_evolve.demo import DemoConfig, run_demo
    from t2i_evolve.errors import UserError

    imported = tmp_path / "imported"
    with Ledger(imported) as ledger:
        ledger.add_record(prompt="a red circle", generator="import", image=Image.new("RGB", (32, 32)), op="import")
    with pytest.raises(UserError, match=r"is a ledger of records that no run made \(an import\)"):
        run_evolve(small_config(str(imported)))
    assert sorted(p.name for p in imported.iterdir()) == ["images", "ledger.sqlite"]
    before = sorted(p.name for p in reference_run.iterdir())
    with pytest.raises(UserError, match="is an evolve run's folder: choose a new output folder"):
        run_demo(DemoConfig(output_dir=str(reference_run), minutes=0.05, train_images=8, eval_prompts=2))
    assert sorted(p.name for p in reference_run.iterdir()) == before


def test_a_judge_that_answers_nothing_stops_the_run_in_one_line(tmp_path):
    """Every comparison failed after its retries (a server down, a wrong address): the run stops with the
    judge's last error, not a round of 'unjudged' that looks like a run."""
    from t2i_evolve.errors import TransientError, UserError

    class DownJudge:
        id = "down"

        def compare(self, image_a, image_b, prompt):
            raise TransientError("connection refused")

    judge = CachedJudge(DownJudge(), Ledger(tmp_path / "run"), retries=1, backoff_s=0)
    with pytest.raises(UserError, match=r"answered none of round 1's 24 comparisons .*connection refused"):
        run_evolve(small_config(str(tmp_path / "run"), rounds=1), judge=judge)


def test_a_judge_that_answers_nothing_readable_stops_the_run_and_the_rerun_after_the_fix_asks_again(tmp_path):
    """A VLM endpoint serving the wrong model (or a broken chat template) answers every comparison with text that
    is no verdict: the run stops in one line. Those replies are answers in the ledger, but the rerun against the
    fixed endpoint asks them again (it would otherwise read the same unreadable replies forever, the teachers'
    images paid for stuck in the folder), and the seed images are not drawn again."""
    from fake_openai import FakeOpenAI

    from t2i_evolve.endpoints import EndpointConfig
    from t2i_evolve.errors import UserError
    from t2i_evolve.recipes.parts import JudgeSpec

    with FakeOpenAI(chat_reply=lambda body: "I cannot see any images.") as server:
        endpoint = EndpointConfig(base_url=server.base_url, model="vlm", backoff_s=0, timeout_s=10)
        config = small_config(str(tmp_path / "run"), rounds=1, seed_prompts=6, mutate_rate=0.0,
                              judge=JudgeSpec(kind="openai", endpoint=endpoint, reasks=0))
        with pytest.raises(UserError, match=r"answered none of round 1's 6 comparisons \(last error: unreadable replies\)"):
            run_evolve(config)
        asked = server.count("/chat/completions")
        server.chat_reply = lambda body: "second"  # (the teacher's image, shown second or first, is better)
        summary = run_evolve(config)
        assert server.count("/chat/completions") > asked and summary["rounds"][0]["ops"]["judged"] == 6
    with Ledger(tmp_path / "run", create=False) as ledger:
        assert [c.attempts for c in ledger.calls(caller="strong") if c.round == 0] == [1] * 6  # drawn once


def test_teachers_that_draw_nothing_stop_the_run_in_one_line(tmp_path):
    """Every seed draw failed (a server refusing the size asked, a server down): the run stops with the
    teachers' last error, not an empty set that reads as 'every record deleted'."""
    from t2i_evolve.errors import RequestRefused, UserError
    from t2i_evolve.world import ProceduralTeacher

    class RefusingTeacher(ProceduralTeacher):
        def outcomes(self, prompts, seeds):
            return [RequestRefused("HTTP 400: size 32x32 is not supported") for _ in prompts]

    with pytest.raises(UserError, match=r"drew none of the seed prompts .*size 32x32 is not supported"):
        run_evolve(small_config(str(tmp_path / "run"), rounds=1), teachers=[RefusingTeacher()],
                   judge=CachedJudge(ScriptedJudge(), Ledger(tmp_path / "run"), backoff_s=0))


def test_with_random_flips_the_mirror_of_a_held_out_prompt_is_held_out_too(tmp_path):
    """A record of "A left of B" is also trained as its mirror image, "A right of B": a right picture of that
    prompt. Were it held out, the run would be scored on a prompt it trained on."""
    from t2i_evolve.recipes.evolve import Run
    from t2i_evolve.recipes.parts import cached_teachers
    from t2i_evolve.train import mirror_prompt
    from t2i_evolve.world import ProceduralTeacher

    for flip in (False, True):
        config = small_config(str(tmp_path / "run"), random_flip=flip, eval_prompts=64)
        held_out = held_out_prompts(config)
        mirrored = {mirror_prompt(p) for p in held_out} - set(held_out)
        assert mirrored  # the slice has spatial prompts
        with Ledger(tmp_path / "run") as ledger:
            run = Run(config, ledger, cached_teachers([ProceduralTeacher()], ledger), config.judge.build(ledger),
                      config.writer.build(config.grammar), tmp_path / "run", held_out)
        assert all(p in run.held_out for p in mirrored) == flip and all(p in run.held_out for p in held_out)


def test_a_base_left_by_a_start_that_failed_a_check_is_not_reused_by_another_config(tmp_path):
    """A first start made `out/base` and then failed a config check; the corrected config, with another
    model size, trains a base of that size (it silently trained the first one)."""
    from t2i_evolve.errors import UserError
    from t2i_evolve.models import TinyModelConfig

    out = tmp_path / "run"
    with pytest.raises(UserError, match="confirm_votes"):
        run_evolve(small_config(str(out), confirm_votes=3))
    fixed = small_config(str(out), rounds=1, tiny_model=TinyModelConfig(block_out_channels=(8, 8, 16)))
    run_evolve(fixed, judge=CachedJudge(ScriptedJudge(), Ledger(out), backoff_s=0))
    for folder in (out / "base", out / "rounds" / "001" / "model"):
        assert json.loads((folder / "unet" / "config.json").read_text())["block_out_channels"] == [8, 8, 16]


def test_a_seed_too_large_for_torch_is_refused_before_any_call(tmp_path):
    from t2i_evolve.errors import ConfigError

    for field in ("seed", "train_seed"):
        with pytest.raises(ConfigError, match=field):
            EvolveConfig.from_dict({"output_dir": str(tmp_path), field: 35184372088832})
