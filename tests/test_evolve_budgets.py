"""The evolve recipe's budgets: teacher calls, teacher price and judge calls (every vote, every check, the
gate and the tournament) stop a run cleanly or cap what a round judges; a served judge with faults completes."""

from __future__ import annotations

import html
import sys
from collections import Counter
from pathlib import Path

import pytest

from t2i_evolve.data import CachedJudge, Ledger
from t2i_evolve.recipes.evolve import run_evolve
from t2i_evolve.recipes.parts import stable_seed

sys.path.insert(0, str(Path(__file__).parent))
from evolve_worker import ScriptedJudge, small_config, tensorboard_scalars  # noqa: E402


def test_teacher_budget_stops_the_run_cleanly_and_a_rerun_with_more_budget_goes_on(tmp_path):
    run_dir = tmp_path / "budget"
    judge = CachedJudge(ScriptedJudge(), Ledger(run_dir), backoff_s=0)
    first = run_evolve(small_config(str(run_dir), max_teacher_calls=30), judge=judge)
    assert first["stopped"] and "teacher budget" in first["stopped"]
    assert first["teacher_calls"] <= 30
    # it ran out while round 1 expanded: what the round changed until then is reported, as the ledger holds it
    stopped_round, = first["rounds"]
    with Ledger(run_dir) as ledger:
        assert stopped_round["ops"] == dict(Counter(op.op.replace("judge", "judged") for op in ledger.ops(round=1)))
    assert stopped_round["ops"]["delete"] > 0 and stopped_round["ops"]["expand"] > 0
    report = (run_dir / "report.html").read_text()
    assert "Stopped early" in report and html.escape(first["stopped"]) in report
    second = run_evolve(small_config(str(run_dir), max_teacher_calls=60), judge=judge)
    assert 30 < second["teacher_calls"] <= 60
    assert ("Stopped early" in (run_dir / "report.html").read_text()) == bool(second["stopped"])
    # TensorBoard: the stopped round logged as it was reported, and not again when the rerun finished it
    assert [step for step, _ in tensorboard_scalars(run_dir / "tensorboard" / "rounds", "ops/judged")] == [
        row["round"] for row in second["rounds"]]
    assert tensorboard_scalars(run_dir / "tensorboard" / "rounds", "round/teacher_calls_after")[0] == (
        1, stopped_round["teacher_calls_after"])


def test_past_the_teacher_budget_the_rounds_go_on_without_buying(tmp_path):
    run_dir = tmp_path / "train-on"
    from t2i_evolve.prompts import GrammarPromptWriter

    class CountingWriter(GrammarPromptWriter):
        asked = 0

        def variations(self, prompt, k, *, seed):
            CountingWriter.asked += 1
            return super().variations(prompt, k, seed=seed)

    config = small_config(str(run_dir), rounds=3, max_teacher_calls=30, train_past_teacher_budget=True)
    judge = CachedJudge(ScriptedJudge(), Ledger(run_dir), backoff_s=0)
    summary = run_evolve(config, judge=judge, writer=CountingWriter(config.grammar))
    rounds = summary["rounds"]
    assert summary["stopped"] is None and [row["round"] for row in rounds] == [1, 2, 3]
    assert summary["teacher_calls"] <= 30 and rounds[-1]["teacher_calls"] == summary["teacher_calls"]
    assert rounds[0]["ops"]["expand"] == 30 - 24  # the budget ran out in round 1's expansions
    assert CountingWriter.asked == rounds[0]["ops"]["judged"] - rounds[0]["ops"]["delete"]  # not asked after it
    for row in rounds[1:]:  # later rounds still judge the set (and may delete from it) but buy nothing
        assert row["ops"]["judged"] > 0 and row["ops"]["expand"] == row["ops"]["mutate"] == 0
        assert row["ops"]["unexpanded"] == row["ops"]["judged"] - row["ops"]["delete"] > 0  # the verdicts unbought
    assert all((run_dir / "rounds" / f"{r:03d}" / "model" / "model_index.json").exists() for r in (1, 2, 3))


def test_teacher_price_budget_stops_the_run_before_it_spends_more(tmp_path):
    run_dir = tmp_path / "price"
    judge = CachedJudge(ScriptedJudge(), Ledger(run_dir), backoff_s=0)
    summary = run_evolve(small_config(str(run_dir), max_teacher_price=1.1), judge=judge)  # 0.04 per image
    assert summary["stopped"] and "price" in summary["stopped"]
    assert 24 < summary["teacher_calls"] <= 27 and summary["teacher_price"] <= 1.1 + 1e-9


def test_judge_budget_stops_the_run_cleanly_and_reports_the_round_it_trained(tmp_path):
    """The budget runs out judging round 3, after its training: that round's score is the run's final
    score, and a rerun with more budget judges it (not trained again) and goes on."""
    run_dir = tmp_path / "judge-budget"
    judge = CachedJudge(ScriptedJudge(), Ledger(run_dir), backoff_s=0)
    summary = run_evolve(small_config(str(run_dir), rounds=3, max_judge_calls=30), judge=judge)
    rounds = summary["rounds"]
    assert summary["stopped"] and "judge budget" in summary["stopped"]
    assert summary["judge_calls"] == 30 and [row["round"] for row in rounds] == [1, 2, 3]
    assert "ops" not in rounds[-1] and summary["final_score"] == rounds[-1]["score"] is not None
    more = run_evolve(small_config(str(run_dir), rounds=3, max_judge_calls=1000), judge=judge)
    assert more["stopped"] is None and more["judge_calls"] > 30 and all("ops" in row for row in more["rounds"])
    assert more["rounds"][-1]["score"] == rounds[-1]["score"]  # the same model: round 3 trained once


def test_judge_budget_counts_the_deletion_check(tmp_path):
    """Each tie costs a second judge call (the base's unseen variation scored): a round judges only the
    records whose worst case, comparison and check, fits the budget."""
    run_dir = tmp_path / "check-budget"
    judge = CachedJudge(ScriptedJudge(), Ledger(run_dir), backoff_s=0)
    summary = run_evolve(small_config(str(run_dir), max_judge_calls=30, min_unseen_score=0.5), judge=judge)
    assert summary["judge_calls"] <= 30 and summary["rounds"][0]["ops"]["judged"] == 15  # of 24: 15 x 2 = 30
    assert summary["rounds"][0]["ops"]["over_judge_budget"] == 24 - 15  # said, not a silently smaller sample
    with Ledger(run_dir, create=False) as ledger:
        assert [c for c in ledger.calls(caller="scripted") if c.request["method"] == "score"]  # checks were made


def test_judge_budget_holds_with_the_quality_gate_and_a_tournament(tmp_path):
    """The gate's scores and the tournament's comparisons count too: a round judges only as many records as
    their worst case fits, so the run never asks more than max_judge_calls; too small for the seed set, it
    stops before paying any teacher."""
    from t2i_evolve.recipes.parts import TeacherSpec

    teachers = [TeacherSpec(id="no-color", p=1.0, blind_to=["red", "green", "blue", "yellow"]),
                TeacherSpec(id="no-shape", p=1.0, blind_to=["circle", "square"])]
    gated = dict(rounds=3, teachers=teachers, min_teacher_score=1.0)
    summary = run_evolve(small_config(str(tmp_path / "capped"), max_judge_calls=100, **gated))
    rounds = summary["rounds"]  # uncapped, these rounds ask 83, 127 and 191 calls in all
    assert summary["judge_calls"] <= 100 and rounds[0]["ops"]["judged"] == rounds[0]["active"]
    assert 0 < rounds[1]["ops"]["judged"] < rounds[1]["active"]  # what fits the cap, worst case, is judged
    tiny = run_evolve(small_config(str(tmp_path / "tiny"), max_judge_calls=50, **gated))  # 24 seeds x (2 + 1)
    assert "judge budget too small" in tiny["stopped"] and tiny["teacher_calls"] == tiny["judge_calls"] == 0


def test_judge_budget_counts_the_seed_set_before_the_prior_images(tmp_path):
    """The gate scores each of the 24 seed images (24 calls), then the prior images would ask 30 more: 54
    calls do not fit a cap of 40, so the run stops before drawing the prior instead of passing the cap."""
    summary = run_evolve(small_config(str(tmp_path), min_teacher_score=0.5, prior_images=30, max_judge_calls=40),
                         judge=CachedJudge(ScriptedJudge(), Ledger(tmp_path), backoff_s=0))
    assert "judge budget too small" in summary["stopped"] and summary["judge_calls"] <= 40
    assert not (tmp_path / "prior" / "prior.json").exists() and summary["rounds"] == []


def test_a_run_against_serve_judge_with_faults_completes(tmp_path):
    from t2i_evolve.endpoints import EndpointConfig
    from t2i_evolve.judges.server import JudgeServer, JudgeServerConfig
    from t2i_evolve.recipes.parts import JudgeSpec

    faults = JudgeServerConfig(fault_rate=0.3, error_rate=0.1, hang_s=1.0, seed=3)
    with JudgeServer(faults) as server:
        endpoint = EndpointConfig(base_url=server.url, model="pixel-judge", timeout_s=0.5, backoff_s=0.0,
                                  max_concurrency=4)
        config = small_config(str(tmp_path / "served"), judge=JudgeSpec(kind="openai", endpoint=endpoint, reasks=1))
        summary = run_evolve(config)
        served = server.stats()["total"]
        capped = run_evolve(config.model_copy(update={"output_dir": str(tmp_path / "capped"), "rounds": 1,
                                                      "max_judge_calls": 20}))  # retries and re-asks count too
        served_capped = server.stats()["total"] - served
    assert capped["judge_calls"] == served_capped <= 20 and "spent" in capped["stopped"]
    assert [row["round"] for row in summary["rounds"]] == [1, 2] and summary["stopped"] is None
    with Ledger(tmp_path / "served", create=False) as ledger:
        judge_calls = [c for c in ledger.calls() if c.caller not in ("strong",)]
    assert judge_calls and all(c.status in ("done", "failed") for c in judge_calls)
    assert sum(c.attempts for c in judge_calls) == served > len(judge_calls)  # faults were retried, and counted
    judged = sum(row["ops"]["judged"] for row in summary["rounds"])
    assert judged > 0 and {"delete", "expand"} <= {op for row in summary["rounds"] for op, n in row["ops"].items() if n}


def test_an_endpoint_that_is_down_or_serves_another_model_stops_the_run_before_anything_is_paid(tmp_path):
    """A misspelled judge model was found only at round 1's first comparison, once the teachers had drawn the whole
    seed set (and the fix was then refused as another config): the server's model list is read first. A writer
    whose server is not up says so in one line too; nothing is paid, and the rerun with the fix runs."""
    from t2i_evolve.endpoints import EndpointConfig
    from t2i_evolve.errors import UserError
    from t2i_evolve.judges.server import JudgeServer, JudgeServerConfig
    from t2i_evolve.recipes.parts import JudgeSpec, WriterSpec

    with JudgeServer(JudgeServerConfig()) as server:
        wrong = JudgeSpec(kind="openai", endpoint=EndpointConfig(base_url=server.url, model="Qwen/Qwen2-VL-7B"))
        with pytest.raises(UserError, match=r"^judge: .* does not serve model 'Qwen/Qwen2-VL-7B' \(it serves "
                                            r"'pixel-judge'; .*judge.endpoint.check_model=false\)$"):
            run_evolve(small_config(str(tmp_path / "run"), judge=wrong))
        down = WriterSpec(kind="openai", endpoint=EndpointConfig(base_url="http://127.0.0.1:9/v1", model="llm"))
        with pytest.raises(UserError, match=r"^writer: no answer from http://127.0.0.1:9.*is the server running"):
            run_evolve(small_config(str(tmp_path / "run"), writer=down))
        with Ledger(tmp_path / "run", create=False) as ledger:
            assert ledger.call_count() == 0
        right = JudgeSpec(kind="openai", endpoint=EndpointConfig(base_url=server.url, model="pixel-judge"))
        assert run_evolve(small_config(str(tmp_path / "run"), judge=right, rounds=1))["rounds"][0]["ops"]["judged"]


def test_judge_budget_counts_every_vote(tmp_path):
    """A judge asking 3 votes per verdict (serve-judge, 20% errors, temperature > 0) costs 3 calls a verdict:
    the gate and the cap count them all, so the run stays inside max_judge_calls."""
    from t2i_evolve.endpoints import EndpointConfig
    from t2i_evolve.judges.server import JudgeServer, JudgeServerConfig
    from t2i_evolve.recipes.parts import JudgeSpec, TeacherSpec

    teachers = [TeacherSpec(id="no-color", p=1.0, blind_to=["red", "green", "blue", "yellow"]),
                TeacherSpec(id="no-shape", p=1.0, blind_to=["circle", "square"])]
    with JudgeServer(JudgeServerConfig(error_rate=0.2, seed=0)) as server:
        endpoint = EndpointConfig(base_url=server.url, model="pixel-judge", max_concurrency=8)
        judge = JudgeSpec(kind="openai", endpoint=endpoint, votes=3, temperature=0.7)
        summary = run_evolve(small_config(str(tmp_path / "voted"), teachers=teachers, min_teacher_score=1.0,
                                          judge=judge, max_judge_calls=250))
        served = server.stats()["total"]
    rounds = summary["rounds"]  # uncapped: 279 calls; the seed set alone may need 24 x 3 verdicts x 3 votes
    assert served == summary["judge_calls"] <= 250 and summary["judge_calls"] % 3 == 0
    assert 0 < rounds[-1]["ops"]["judged"] < rounds[-1]["active"]  # what fits at 3 x its verdicts, worst case


def test_a_run_stopped_at_the_teacher_budget_and_launched_again_keeps_its_rounds(tmp_path):
    """`until_pass`: the second teacher never drew the seed prompts the first drew right. Launched again
    with the same command after the budget stopped it, the run must not count those undrawn images as
    still to buy (it once stopped in the seed set and rewrote its summary with no rounds)."""
    from t2i_evolve.recipes.parts import TeacherSpec

    config = small_config(str(tmp_path / "run"), min_teacher_score=0.5, tournament="until_pass", max_teacher_calls=40,
                          teachers=[TeacherSpec(id="strong"), TeacherSpec(id="no-color", p=1.0)])
    judge = CachedJudge(ScriptedJudge(), Ledger(tmp_path / "run"), backoff_s=0)
    first = run_evolve(config, judge=judge)
    assert first["stopped"] and "teacher budget" in first["stopped"] and first["rounds"]
    again = run_evolve(config, judge=judge)
    timeless = [[{k: v for k, v in row.items() if k != "wall_s"} for row in run["rounds"]] for run in (first, again)]
    assert timeless[0] == timeless[1] and again["stopped"] == first["stopped"]
    assert again["teacher_calls"] == first["teacher_calls"] <= 40


def test_a_missing_api_key_is_one_line_before_any_work(tmp_path, monkeypatch):
    """A judge, writer or teacher endpoint whose key variable is unset fails before the seed set is drawn,
    not when round 1's training is done and the judge is first asked."""
    from t2i_evolve.endpoints import EndpointConfig
    from t2i_evolve.errors import ConfigError
    from t2i_evolve.recipes.parts import JudgeSpec, WriterSpec

    monkeypatch.delenv("T2I_EVOLVE_TEST_KEY", raising=False)
    endpoint = EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="T2I_EVOLVE_TEST_KEY")
    for part in ({"judge": JudgeSpec(kind="openai", endpoint=endpoint)},
                 {"writer": WriterSpec(kind="openai", endpoint=endpoint)}):
        with pytest.raises(ConfigError, match="T2I_EVOLVE_TEST_KEY"):
            run_evolve(small_config(str(tmp_path / "run"), **part))
        assert not (tmp_path / "run").exists()


def test_teacher_retries_never_take_the_run_past_its_cap(tmp_path):
    """A teacher whose first try at every other image fails: the retries count against `max_teacher_calls`
    as every request sent does, so at the cap the last batch's retries are not sent (those images fail) instead
    of overshooting it; launched again with the same command, nothing more is sent and the ledger is the same."""
    from t2i_evolve.world import ProceduralTeacher

    class FlakyTeacher(ProceduralTeacher):
        sent = 0

        def generate(self, prompts, seeds):
            FlakyTeacher.sent += len(prompts)
            images = super().generate(prompts, seeds)
            return [None if stable_seed(prompt, seed, FlakyTeacher.sent) % 2 else image  # first tries and retries
                    for prompt, seed, image in zip(prompts, seeds, images)]

    run_dir = tmp_path / "flaky"
    config = small_config(str(run_dir), max_teacher_calls=45)
    judge = CachedJudge(ScriptedJudge(), Ledger(run_dir), backoff_s=0)
    first = run_evolve(config, teachers=[FlakyTeacher()], judge=judge)
    assert first["stopped"] and "teacher budget" in first["stopped"]
    assert FlakyTeacher.sent == first["teacher_calls"] <= 45
    records = sorted((rec.prompt, rec.seed, rec.status) for rec in Ledger(run_dir).records(None))
    sent = FlakyTeacher.sent
    again = run_evolve(config, teachers=[FlakyTeacher()], judge=judge)
    assert FlakyTeacher.sent == sent and again["teacher_calls"] == first["teacher_calls"]
    assert sorted((rec.prompt, rec.seed, rec.status) for rec in Ledger(run_dir).records(None)) == records


class AlwaysTie:
    """The base always as good as the teacher: round 1 deletes the whole set."""

    id = "tie"

    def compare(self, image_a, image_b, prompt):
        from t2i_evolve.protocols import Comparison

        return Comparison("tie", 1.0, 1.0)


@pytest.mark.parametrize("caps", [{"max_teacher_price": 24.5}, {"max_teacher_calls": 24, "max_judge_calls": 24}])
def test_past_a_spent_budget_an_emptied_set_trains_on(tmp_path, caps):
    """Past the teacher budget, a set the judge emptied trains on (`train_past_teacher_budget`): a price left
    below one image's price is a spent budget (it stopped the run as 'every record deleted'), and a spent judge
    budget does not stop a round that has nothing to judge (it stopped the run before round 3 trained)."""
    from t2i_evolve.recipes.parts import TeacherSpec

    config = small_config(str(tmp_path / "run"), rounds=3, mutate_rate=0.0, train_past_teacher_budget=True,
                          teachers=[TeacherSpec(price_per_call=1.0)], **caps)
    summary = run_evolve(config, judge=CachedJudge(AlwaysTie(), Ledger(tmp_path / "run"), backoff_s=0))
    assert summary["stopped"] is None and [row["round"] for row in summary["rounds"]] == [1, 2, 3]
    assert summary["rounds"][0]["ops"]["delete"] == 24 and summary["teacher_calls"] == 24


class FirstTryFails:
    """A teacher whose first try at each of `flaky` prompts (None: half of all, by hash) fails, as a dropped connection
    would, and whose retry draws it."""

    def __init__(self, id: str, flaky: set[str] | None = None):
        from t2i_evolve.world import ProceduralTeacher

        self.teacher, self.id, self.flaky, self.tried = ProceduralTeacher(), id, flaky, set()
        self.price_per_call, self.sent = 0.0, 0

    def generate(self, prompts, seeds):
        self.sent += len(prompts)
        images = self.teacher.generate(prompts, seeds)
        flaky = [stable_seed(p, s) % 2 == 0 if self.flaky is None else p in self.flaky for p, s in zip(prompts, seeds)]
        out = [None if (p, s) not in self.tried and fails else image
               for p, s, fails, image in zip(prompts, seeds, flaky, images)]
        self.tried |= set(zip(prompts, seeds))
        return out


def test_retries_leave_room_for_the_later_chunks_of_a_batch_that_fitted_the_cap(tmp_path, monkeypatch):
    """A seed set the cap pays for exactly, drawn 8 prompts at a time, half the first tries failing: the first
    chunks' retries would spend the later chunks' calls (the run stopped in its seed set, a rerun went on): they are
    not sent, every prompt gets its one try, and the run trains on the images drawn."""
    import t2i_evolve.recipes.evolve as evolve

    monkeypatch.setattr(evolve, "AT_A_TIME", 8)
    teacher = FirstTryFails("strong")
    config = small_config(str(tmp_path / "run"), evolve=False, rounds=1, steps_per_round=2, eval_prompts=0,
                          max_teacher_calls=24)
    summary = run_evolve(config, teachers=[teacher])
    assert summary["stopped"] is None and [row["round"] for row in summary["rounds"]] == [1]
    with Ledger(tmp_path / "run") as ledger:
        calls = ledger.calls(caller="strong")
        assert len(calls) == 24 and sum(call.attempts for call in calls) == 24 == teacher.sent  # one try each
        failed = sum(call.status == "failed" for call in calls)
        assert 0 < failed < 24 and ledger.count(None) == 24 - failed


def test_a_teachers_retries_leave_room_for_the_teachers_after_it(tmp_path):
    """Expansions drawn by their parents' teachers, one after the other, under a shared cap that pays for each
    draw once: the first teacher's failed first tries are not retried at the cost of the second's draws."""
    from t2i_evolve.generators.draws import draw_by_teacher
    from t2i_evolve.recipes.parts import cached_teachers

    prompts = ["a red circle", "a blue square", "a green star", "two red circles", "a cyan triangle", "a big red star"]
    flaky, steady = FirstTryFails("flaky", set(prompts)), FirstTryFails("steady", set())
    ids = ["flaky"] * 3 + ["steady"] * 3
    with Ledger(tmp_path / "run") as ledger:
        teachers = cached_teachers([flaky, steady], ledger, max_calls=6)
        images = draw_by_teacher(teachers, prompts, list(range(6)), ids, round=1, tries=[1] * 6)
        assert [image is not None for image in images] == [False] * 3 + [True] * 3
        assert (flaky.sent, steady.sent) == (3, 3)
        # with room for them (6 calls spent, 6 first tries, 3 retries), the same failures are retried
        more = cached_teachers([FirstTryFails("flaky", set(prompts)), steady], ledger, max_calls=15)
        again = draw_by_teacher(more, prompts, list(range(6, 12)), ids, round=1, tries=[1] * 6)
        assert all(image is not None for image in again)


def test_judge_first_stopped_at_the_teacher_budget_reports_what_it_judged_and_keeps_its_rounds(tmp_path):
    """judge_first judges a round's set before training it: a budget that runs out there stops the run with that
    round's verdicts in the ledger, untrained. The summary reports them, and a rerun may not drop that round."""
    from t2i_evolve.errors import UserError

    run_dir = tmp_path / "first"
    judge = CachedJudge(ScriptedJudge(), Ledger(run_dir), backoff_s=0)
    config = small_config(str(run_dir), rounds=3, judge_first=True, mutate_rate=0.0, max_teacher_calls=24 + 32)
    summary = run_evolve(config, judge=judge)
    assert summary["stopped"] and "teacher budget" in summary["stopped"]
    assert [row["round"] for row in summary["rounds"]] == [1]
    unfinished = summary["unfinished_round"]
    with Ledger(run_dir) as ledger:
        assert unfinished == {"round": 2, "ops": dict(Counter(op.op.replace("judge", "judged")
                                                              for op in ledger.ops(round=2)))}
    assert unfinished["ops"]["judged"] > 0
    with pytest.raises(UserError, match="has started 2 rounds"):
        run_evolve(config.model_copy(update={"rounds": 1}), judge=judge)


def test_a_judge_budget_that_cannot_pay_for_a_held_out_score_stops_before_any_call(tmp_path):
    """held_out_metric vqa: each scored round costs the judge eval_prompts calls; a cap below them stops the run
    before it draws its seed set, not after paying for it and training a round it cannot score."""
    run_dir = tmp_path / "vqa"
    judge = CachedJudge(ScriptedJudge(), Ledger(run_dir), backoff_s=0)
    config = small_config(str(run_dir), seed_prompts=6, eval_prompts=20, held_out_metric="vqa", max_judge_calls=15)
    summary = run_evolve(config, judge=judge)
    assert "judge budget too small" in summary["stopped"] and "held-out score" in summary["stopped"]
    assert summary["rounds"] == [] and summary["teacher_calls"] == summary["judge_calls"] == 0


def test_reference_images_that_spend_the_teacher_budget_stop_the_run_naming_it(tmp_path):
    """held_out_metric win_rate buys a reference image per held-out prompt first: a cap they spend leaves no seed
    image, which is said as a spent budget (a rerun with more goes on), not as a teacher that failed."""
    run_dir = tmp_path / "references"
    judge = CachedJudge(ScriptedJudge(), Ledger(run_dir), backoff_s=0)
    config = small_config(str(run_dir), eval_prompts=4, held_out_metric="win_rate", max_teacher_calls=4,
                          train_past_teacher_budget=True)
    summary = run_evolve(config, judge=judge)
    assert summary["stopped"] == "teacher budget spent before a seed image: 4 calls" and summary["rounds"] == []
    second = run_evolve(config.model_copy(update={"max_teacher_calls": 40, "rounds": 1}), judge=judge)
    assert second["stopped"] is None and 4 + 24 <= second["teacher_calls"] <= 40  # (the references not paid again)
    with Ledger(run_dir) as ledger:
        assert ledger.count(None, round=0) == 24


def test_a_round_without_a_held_out_score_keeps_no_judge_calls_back_for_one(tmp_path):
    """eval_every_round false: only the last round is scored, so the rounds before it judge what the cap allows
    without keeping back the score's calls (each round did, and a tight cap judged fewer records for nothing)."""
    run_dir = tmp_path / "unscored"
    judge = CachedJudge(ScriptedJudge(), Ledger(run_dir), backoff_s=0)
    config = small_config(str(run_dir), seed_prompts=6, eval_prompts=4, held_out_metric="vqa", eval_every_round=False,
                          mutate_rate=0.0, max_judge_calls=8)
    summary = run_evolve(config, judge=judge)
    assert summary["rounds"][0]["ops"]["judged"] == 6  # all six (8 - 4 kept back: four)
    assert summary["judge_calls"] <= 8
