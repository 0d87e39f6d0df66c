"""Users' own prompts in `evolve` (`prompts_file`): the held-out split, the seed set, the run's copy of the file,
one-line refusals for parts that cannot read real-world prompts, and the win-rate score that a real base on open
prompts is measured by (the run's judge, base vs teacher, every call cached)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from t2i_evolve.cli import main
from t2i_evolve.data import CachedJudge, Ledger
from t2i_evolve.endpoints import EndpointConfig
from t2i_evolve.errors import ConfigError, UserError
from t2i_evolve.eval.held_out import held_out_prompts
from t2i_evolve.judges import OpenAIJudge, OpenAIJudgeConfig
from t2i_evolve.prompts.sets import read_prompt_file
from t2i_evolve.protocols import Comparison, ImageScore
from t2i_evolve.recipes.evolve import run_evolve
from t2i_evolve.recipes.parts import JudgeSpec, TeacherSpec, stable_seed
from t2i_evolve.world import GrammarPrompts, GrammarSlice

sys.path.insert(0, str(Path(__file__).parent))
from evolve_worker import (OPEN, OpenTeacher, OpenWriter, ScriptedJudge, ledger_state,  # noqa: E402
                           run_worker, small_config)
from fake_openai import FakeOpenAI  # noqa: E402

def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_prompt_file_is_read_as_distinct_prompts_and_bad_ones_are_one_line_errors(tmp_path):
    path = _write(tmp_path / "p.txt", ["# my prompts", "", "  a red circle  ", "a blue square", "a red circle", "\t"])
    assert read_prompt_file(path) == ["a red circle", "a blue square"]
    (tmp_path / "bom.txt").write_bytes("\ufeffa red circle\r\na blue square\r\n".encode())
    assert read_prompt_file(tmp_path / "bom.txt") == ["a red circle", "a blue square"]  # Windows-saved
    (tmp_path / "latin.txt").write_bytes(b"a red circle\na caf\xe9 table\n")
    bad = {tmp_path / "missing.txt": "not found", tmp_path: "a folder", tmp_path / "latin.txt": r"not UTF-8 text \(line 2\)",
           _write(tmp_path / "empty.txt", ["# nothing", ""]): "holds no prompts"}
    for path, message in bad.items():
        with pytest.raises(UserError, match=message) as error:
            read_prompt_file(path)
        assert "\n" not in str(error.value)


def test_evolve_on_a_file_of_grammar_prompts_holds_some_out_draws_the_rest_and_keeps_a_copy(tmp_path):
    prompts = list(dict.fromkeys(GrammarPrompts(GrammarSlice(max_groups=2)).sample(60, seed=5)))[:32]
    path = _write(tmp_path / "mine.txt", ["# ours"] + prompts)
    run_dir = tmp_path / "run"
    config = small_config(str(run_dir), prompts_file=str(path), rounds=1, seed_prompts=40)
    summary = run_evolve(config)
    held_out = set(held_out_prompts(config))
    with Ledger(run_dir, create=False) as ledger:
        seeds = [rec.prompt for rec in ledger.records(None, round=0)]
        calls = ledger.call_count()
    assert len(held_out) == 8 and held_out < set(prompts)
    assert sorted(seeds) == sorted(set(prompts) - held_out)  # all the rest, once each (fewer than seed_prompts)
    assert "skills" in summary["rounds"][0] and summary["held_out_metric"] == "pixel"  # shapes-world prompts: exact
    assert read_prompt_file(run_dir / "prompts.txt") == prompts

    _write(path, ["# ours"] + prompts + ["a green star"])  # changed under the run: its split would change
    for changed, message in [(config.updated(None, rounds=2), "holds other prompts"),
                             (config.updated(None, prompts_file=None), "has no prompts_file")]:
        with pytest.raises(UserError, match=message) as error:
            run_evolve(changed)
        assert "prompts.txt" in str(error.value)
    with Ledger(run_dir, create=False) as ledger:
        assert ledger.call_count() == calls  # refused before any call
    again = run_evolve(config.updated(None, prompts_file=str(run_dir / "prompts.txt")))  # the copy resumes it
    assert again["teacher_calls"] == summary["teacher_calls"] and again["final_score"] == summary["final_score"]


def test_a_grammar_run_is_not_resumed_from_a_file_and_one_that_spent_nothing_may_change_its_file(tmp_path):
    from t2i_evolve.prompts.sets import keep_prompts_copy

    spent, fresh = tmp_path / "spent", tmp_path / "fresh"
    spent.mkdir(), fresh.mkdir()
    keep_prompts_copy(spent, None, replace=True)  # started on grammar prompts
    with pytest.raises(UserError, match="started from the shapes grammar's prompts"):
        keep_prompts_copy(spent, _write(tmp_path / "a.txt", ["a red circle", "a blue square"]))
    keep_prompts_copy(fresh, tmp_path / "a.txt", replace=True)
    keep_prompts_copy(fresh, _write(tmp_path / "b.txt", ["a green star"]), replace=True)  # nothing spent: afresh
    assert read_prompt_file(fresh / "prompts.txt") == ["a green star"]
    keep_prompts_copy(fresh, None, replace=True)
    assert not (fresh / "prompts.txt").exists()


def test_open_prompts_are_refused_in_one_line_by_parts_that_read_shapes_only(tmp_path):
    path = _write(tmp_path / "open.txt", OPEN)
    vlm = JudgeSpec(kind="openai", endpoint=EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m"))
    drawing = [TeacherSpec(kind="openai", endpoint=EndpointConfig(base_url="http://127.0.0.1:9/v1", model="t"))]
    cases = {"the pixel judge": {}, "gallery teachers": {"judge": vlm}, "grammar writer": {"judge": vlm, "teachers": drawing},
             "held_out_metric pixel": {"judge": vlm, "teachers": drawing, "evolve": False, "held_out_metric": "pixel"}}
    for part, fields in cases.items():
        run_dir = tmp_path / part.replace(" ", "_")
        with pytest.raises(UserError, match=part) as error:
            run_evolve(small_config(str(run_dir), prompts_file=str(path), **fields))
        assert "18 prompts outside the shapes grammar" in str(error.value)
        assert any(f"(e.g. {prompt!r})" in str(error.value) for prompt in OPEN)
        assert not run_dir.exists()  # before any file
    with pytest.raises(ConfigError, match="rare_words"):
        run_evolve(small_config(str(tmp_path / "rare"), prompts_file=str(path), rare_words=["yellow"]))
    with pytest.raises(UserError, match="would hold out all of them"):
        run_evolve(small_config(str(tmp_path / "few"), prompts_file=str(path), eval_prompts=18))


def test_cli_names_a_missing_prompts_file_in_one_line(tmp_path, capsys):
    config = tmp_path / "evolve.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nprompts_file: {tmp_path / 'nope.txt'}\n")
    code = main(["evolve", "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "nope.txt: not found" in err and "\n" not in err


def test_open_prompts_run_end_to_end_scored_by_the_judge_against_the_teacher_and_resume_paying_nothing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    teacher_log, judge_log = run_dir / "teacher.jsonl", run_dir / "judge.jsonl"
    config = small_config(str(run_dir), prompts_file=str(_write(tmp_path / "open.txt", OPEN)), eval_prompts=6,
                          seed_prompts=12)

    def go():
        with Ledger(run_dir) as ledger:
            judge = CachedJudge(ScriptedJudge(judge_log), ledger, backoff_s=0)
            return run_evolve(config, teachers=[OpenTeacher(teacher_log)], judge=judge, writer=OpenWriter())

    summary = go()
    held_out = held_out_prompts(config)
    expected = sum(0.5 for p in held_out if stable_seed(p) % 3 == 0) / len(held_out)  # ScriptedJudge: tie or teacher
    assert [row["score"] for row in summary["rounds"]] == [expected, expected]  # win rate, every round
    assert summary["held_out_metric"] == "win_rate"
    assert all(sum(row["verdicts"].values()) == 6 for row in summary["rounds"])
    drawn = [json.loads(line)["prompt"] for line in teacher_log.read_text().splitlines()]
    assert sorted(p for p in drawn if p in held_out) == sorted(held_out)  # the references: drawn once each
    with Ledger(run_dir, create=False) as ledger:
        records = ledger.records(None)
        assert not {rec.prompt for rec in records} & set(held_out)  # and never trained on
        assert {"expand", "delete"} <= {op.op for op in ledger.ops()}  # the set evolved on open prompts
    judged = [json.loads(line)["prompt"] for line in judge_log.read_text().splitlines()]
    assert sum(p in held_out for p in judged) == 2 * len(held_out)  # one comparison per prompt per round
    assert summary["judge_calls"] == len(judged)  # the held-out comparisons count as judge calls

    again = go()  # a rerun: every round done, nothing asked or drawn again
    assert again["rounds"] == summary["rounds"]
    assert len(teacher_log.read_text().splitlines()) == len(drawn)
    assert len(judge_log.read_text().splitlines()) == len(judged)


def test_a_vlm_judge_asks_one_whole_prompt_question_about_an_open_prompt(tmp_path):
    with FakeOpenAI(chat_reply=lambda body: "1: yes") as server:
        judge = OpenAIJudge(OpenAIJudgeConfig(endpoint=EndpointConfig(base_url=server.base_url, model="vlm")))
        score = judge.score(Image.new("RGB", (32, 32)), "a sleepy cat on a sofa")
        sent = json.dumps(server.requests[-1]["body"])
    assert score.score == 1.0 and [a.question.text for a in score.answers] == ['Does this image show "a sleepy cat on '
                                                                               'a sofa"?']
    assert "a sleepy cat on a sofa" in sent


class _Drawer:
    def __init__(self, color):
        self.color, self.round = color, None

    def generate(self, prompts, seeds):
        return [Image.new("RGB", (32, 32), self.color) for _ in prompts]


class _Judge:
    """Prefers the redder image; `fail`: an exception to raise, or 'silent' for no verdict at all."""

    id, round = "redness", None

    def __init__(self, fail=None):
        self.fail = fail

    def compare(self, image_a, image_b, prompt):
        if isinstance(self.fail, Exception):
            raise self.fail
        if self.fail == "silent":
            return None
        a, b = image_a.getpixel((0, 0))[0], image_b.getpixel((0, 0))[0]
        return Comparison("a" if a > b else "b" if b > a else "tie")

    def score(self, image, prompt):
        if isinstance(self.fail, Exception):
            raise self.fail
        return None if self.fail == "silent" else ImageScore(image.getpixel((0, 0))[0] / 200, ())


def test_the_win_rate_counts_wins_and_half_ties_vqa_averages_scores_and_a_spent_budget_leaves_the_round_unscored():
    from t2i_evolve.errors import BudgetExhausted
    from t2i_evolve.eval.held_out import HeldOutScore

    prompts = OPEN[:4]
    for base, teacher, expected in [((200, 0, 0), (10, 0, 0), 1.0), ((10, 0, 0), (200, 0, 0), 0.0),
                                    ((50, 0, 0), (50, 0, 0), 0.5)]:
        row = HeldOutScore(prompts, judge=_Judge(), teachers={"t": _Drawer(teacher)}).score(_Drawer(base), 1)
        assert row["score"] == expected and sum(row["verdicts"].values()) == 4
    vqa = HeldOutScore(prompts, "vqa", judge=_Judge())  # absolute: no teacher drawn
    assert vqa.score(_Drawer((50, 0, 0)), 1)["score"] == 0.25 and vqa.score(_Drawer((150, 0, 0)), 2)["score"] == 0.75
    for fail in (BudgetExhausted("the judge budget (10 calls) is spent"), "silent"):
        for metric in ("win_rate", "vqa"):
            scorer = HeldOutScore(prompts, metric, judge=_Judge(fail), teachers={"t": _Drawer((1, 0, 0))})
            row = scorer.score(_Drawer((2, 0, 0)), 1)
            assert "score" not in row and row["unscored"].startswith("held-out prompts:")
    with pytest.raises(UserError, match="pixel scores shapes-world prompts only"):
        HeldOutScore(prompts, "pixel")


WORDS = (("sleepy", "striped", "tiny", "golden", "muddy", "paper"), ("fox", "kettle", "drone", "owl", "tram", "cactus"),
         ("under a bridge", "in the snow", "on a rooftop", "beside a pond", "in a library", "at a market"))


def _scripted_llm_and_vlm(body: dict) -> str:
    """One server for the writer (variations, new structures, questions) and the judge (VQA, pairwise)."""
    content = body["messages"][-1]["content"]
    text = content if isinstance(content, str) else " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    h = stable_seed(json.dumps(body, sort_keys=True))
    if "yes/no questions that together check" in text:
        return json.dumps([{"id": 1, "question": "Is the main object there?", "skill": "entity", "parents": []},
                           {"id": 2, "question": "Is it where the prompt says?", "skill": "spatial", "parents": [1]}])
    if "Answer each of the" in text:
        count = int(text.split("Answer each of the ")[1].split()[0])
        return "\n".join(f"{i}: yes" for i in range(1, count + 1))
    if "Which image follows" in text:
        return ("second", "tie", "first")[h % 3]
    return json.dumps([f"a {WORDS[0][(h + i) % 6]} {WORDS[1][(h // 7 + 2 * i) % 6]} {WORDS[2][(h // 49 + 3 * i) % 6]}"
                       for i in range(3)])


def test_the_cli_evolves_open_prompts_with_an_llm_writer_a_vlm_judge_and_a_local_teacher(tmp_path, capsys):
    """... and the quality gate's scores and the writer's question lists go out together, not one at a time (at
    10,000 seed prompts and a second a request: hours): the server has several of each in flight at once."""
    assert main(["init-model", str(tmp_path / "teacher")]) == 0
    run_dir = tmp_path / "run"
    lock, in_flight, most = threading.Lock(), Counter(), Counter()

    def slow_reply(body: dict) -> str:
        text = json.dumps(body)
        kind = "questions" if "yes/no questions that together check" in text else "vqa" if "Answer each of" in text else ""
        with lock:
            in_flight[kind] += 1
            most[kind] = max(most[kind], in_flight[kind])
        time.sleep(0.05)
        with lock:
            in_flight[kind] -= 1
        return _scripted_llm_and_vlm(body)

    with FakeOpenAI(chat_reply=slow_reply) as server:
        endpoint = f"{{base_url: '{server.base_url}', backoff_s: 0, timeout_s: 10"
        (tmp_path / "evolve.yaml").write_text("\n".join([
            f"output_dir: {run_dir}", f"prompts_file: {_write(tmp_path / 'open.txt', OPEN)}", "seed_prompts: 8",
            "eval_prompts: 4", "rounds: 1", "steps_per_round: 4", "batch_size: 4", "sample_all_below: 100",
            "tiny_model: {block_out_channels: [16, 16, 32]}", "sampler: {steps: 2}", "min_teacher_score: 0.5",
            f"teachers: [{{kind: local, path: {tmp_path / 'teacher'}, sampler: {{steps: 2}}, device: cpu}}]",
            f"judge: {{kind: openai, endpoint: {endpoint}, model: vlm}}}}",
            f"writer: {{kind: openai, endpoint: {endpoint}, model: llm}}}}"]) + "\n")
        assert main(["evolve", "--config", str(tmp_path / "evolve.yaml"), "--json"]) == 0, capsys.readouterr().err
        summary = json.loads((run_dir / "summary.json").read_text())
        sent = [r["body"] for r in server.requests]
        assert main(["evolve", "--config", str(tmp_path / "evolve.yaml")]) == 0  # a rerun: done, nothing sent
        assert len(server.requests) == len(sent)
    row = summary["rounds"][0]
    assert 0 <= row["score"] <= 1 and sum(row["verdicts"].values()) == 4  # the win rate on the 4 held-out prompts
    texts = [json.dumps(body) for body in sent]
    asked_questions = [t for t in texts if "yes/no questions that together check" in t]
    vqa = [t for t in texts if "Is it where the prompt says?" in t]
    assert asked_questions and vqa  # the gate asked the judge the writer's questions
    assert most["questions"] > 1 and most["vqa"] > 1, most
    with Ledger(run_dir, create=False) as ledger:
        records = ledger.records(None)
    assert {rec.op for rec in records} >= {"seed", "expand"}
    assert all(rec.prompt in OPEN for rec in records if rec.op == "seed")
    assert any(rec.prompt.split()[1] in WORDS[0] for rec in records if rec.op == "expand")  # the LLM's variations


def test_the_judge_command_takes_any_prompt_to_a_vlm_and_only_grammar_prompts_to_the_pixel_judge(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    assert main(["judge", str(image), "--prompt", "a sleepy cat on a sofa"]) == 2
    assert "sleepy" in capsys.readouterr().err  # the pixel judge: the word it cannot read, in one line
    with FakeOpenAI(chat_reply=lambda body: "1: no") as server:
        code = main(["judge", str(image), "--prompt", "a sleepy cat on a sofa", "--endpoint", server.base_url,
                     "--model", "vlm", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["score"] == 0.0
    assert [a["question"] for a in result["answers"]] == ['Does this image show "a sleepy cat on a sofa"?']


def test_eval_scores_a_model_on_your_prompts_with_a_vlm_judge_asking_the_writers_questions(tmp_path, capsys):
    assert main(["init-model", str(tmp_path / "model")]) == 0
    prompts = _write(tmp_path / "open.txt", OPEN[:5])
    args = ["eval", str(tmp_path / "model"), "--prompts-file", str(prompts), "--steps", "2", "--device", "cpu", "--json"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "5 prompts outside the shapes grammar" in err and "--judge" in err and "\n" not in err
    with FakeOpenAI(chat_reply=_scripted_llm_and_vlm) as server:
        endpoint = f"endpoint: {{base_url: '{server.base_url}', backoff_s: 0, timeout_s: 10, model: %s}}\n"
        (tmp_path / "judge.yaml").write_text("kind: openai\n" + endpoint % "vlm")
        (tmp_path / "writer.yaml").write_text("kind: openai\n" + endpoint % "llm")
        assert main(args + ["--judge", str(tmp_path / "judge.yaml"), "--writer", str(tmp_path / "writer.yaml")]) == 0
        sent = [json.dumps(r["body"]) for r in server.requests]
    result = json.loads(capsys.readouterr().out)
    assert result["score"] == 1.0 and result["prompts"] == result["judged"] == 5 and result["judge"] == "openai:vlm"
    assert result["asked"]["entity"] == result["asked"]["spatial"] == 5  # per skill: the writer's skills
    assert result["skills"]["entity"] == result["skills"]["spatial"] == 1.0 and result["asked"]["color"] == 0
    assert sum("yes/no questions that together check" in body for body in sent) == 5  # one question list a prompt
    assert sum("Is it where the prompt says?" in body for body in sent) == 5  # asked of each image


@pytest.fixture(scope="module")
def open_reference(tmp_path_factory) -> Path:
    """An uninterrupted open-prompt run of the worker: the ledger every interrupted one must end with."""
    run_dir = tmp_path_factory.mktemp("open") / "reference"
    done = run_worker(run_dir, "--open")
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir


@pytest.mark.parametrize("kill", [("--kill-after", "3"),  # round 1: 2 held-out comparisons answered, the 3rd in flight
                                  ("--kill-at-draw", "2")],  # the seed set, after the 6 held-out references
                         ids=["scoring", "drawing-after-the-references"])
def test_sigkill_while_scoring_open_prompts_then_rerun_pays_no_call_twice(open_reference, tmp_path, kill):
    run_dir = tmp_path / "killed"
    killed = run_worker(run_dir, "--open", *kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    held_out = set(held_out_prompts(small_config(str(run_dir), prompts_file=str(run_dir / "open.txt"), eval_prompts=6)))
    log = run_dir / "judge_calls.jsonl"
    judged = [json.loads(line)["prompt"] for line in log.read_text().splitlines()] if log.exists() else []
    drawn = [json.loads(line)["prompt"] for line in (run_dir / "teacher_calls.jsonl").read_text().splitlines()]
    if kill[0] == "--kill-after":
        assert [p in held_out for p in judged] == [True] * 2  # it died scoring
    else:  # it died drawing the seed set: the references drawn first (and not paid again), nothing judged yet
        assert not judged and sorted(drawn) == sorted(held_out)
    assert not (run_dir / "summary.json").exists()
    assert run_worker(run_dir, "--open").returncode == 0
    assert ledger_state(run_dir) == ledger_state(open_reference)
    for log in ("teacher_calls.jsonl", "judge_calls.jsonl"):  # the "server side": answered calls
        assert (run_dir / log).read_text().count("\n") == (open_reference / log).read_text().count("\n"), log
    summary, reference = (json.loads((d / "summary.json").read_text()) for d in (run_dir, open_reference))
    assert [r["score"] for r in summary["rounds"]] == [r["score"] for r in reference["rounds"]]


def test_vqa_with_the_exact_judge_is_the_exact_score_skill_by_skill():
    from t2i_evolve.eval.held_out import HeldOutScore, held_out_score
    from t2i_evolve.judges import PixelJudge
    from t2i_evolve.world import default_gallery

    prompts = list(dict.fromkeys(GrammarPrompts(GrammarSlice(max_groups=2)).sample(40, seed=3)))[:24]
    model = {t.id: t for t in default_gallery(32)}["no-count"]  # a "model" that misses counts
    exact = held_out_score(model, prompts)
    vqa = HeldOutScore(prompts, "vqa", judge=PixelJudge()).score(model, 1)
    assert exact["score"] < 0.95 and exact["skills"]["count"] < 0.5
    assert vqa["score"] == pytest.approx(exact["score"]) and vqa["skills"] == pytest.approx(exact["skills"])
    assert vqa["asked"] == exact["asked"]


def test_the_real_model_example_config_validates_and_names_a_missing_base_in_one_line(tmp_path):
    from t2i_evolve.recipes.evolve import EvolveConfig

    config = EvolveConfig.from_yaml(Path(__file__).resolve().parents[1] / "docs" / "evolve-real-models.yaml")
    assert config.judge.kind == config.writer.kind == "openai" and config.teachers[0].kind == "local"
    prompts = _write(tmp_path / "open.txt", OPEN)
    with pytest.raises(UserError) as error:  # its parts read open prompts: it gets as far as the missing base
        run_evolve(config.updated(None, output_dir=str(tmp_path / "run"), prompts_file=str(prompts), eval_prompts=6,
                                  base_model=str(tmp_path / "sdxl-base")))
    assert "sdxl-base" in str(error.value) and "\n" not in str(error.value)


def test_the_papers_pixart_config_validates_with_its_settings_and_names_a_missing_base_in_one_line(tmp_path):
    from t2i_evolve.recipes.evolve import EvolveConfig

    config = EvolveConfig.from_yaml(Path(__file__).resolve().parents[1] / "docs" / "evolve-pixart.yaml")
    assert (config.lr, config.weight_decay, config.warmup_steps, config.ema_decay) == (2e-5, 0.03, 1000, 0.9999)
    assert not config.train_text_encoder and len(config.teachers) == 2 and config.judge.temperature == 0.2
    assert all(teacher.offload for teacher in config.teachers)
    assert config.round_training()["weight_decay"] == 0.03  # (reaches each round's trainer)
    with pytest.raises(UserError) as error:
        run_evolve(config.updated(None, output_dir=str(tmp_path / "run"), eval_prompts=6, seed_prompts=12,
                                  prompts_file=str(_write(tmp_path / "open.txt", OPEN)),
                                  base_model=str(tmp_path / "PixArt-XL-2-512x512")))
    assert "PixArt-XL-2-512x512" in str(error.value) and "\n" not in str(error.value)


class SpellingWriter(OpenWriter):
    """Proposes the held-out prompts themselves, spelled otherwise ("A sleepy cat on a sofa."), as an LLM might."""

    def __init__(self, held_out):
        self.held_out = held_out

    def variations(self, prompt, k, *, seed):
        return [f" {p[0].upper()}{p[1:]}." for p in self.held_out[:k]] + super().variations(prompt, 1, seed=seed)


def test_a_held_out_prompt_in_another_spelling_is_never_drawn_for_training(tmp_path):
    config = small_config(str(tmp_path / "run"), prompts_file=str(_write(tmp_path / "open.txt", OPEN)), eval_prompts=6,
                          seed_prompts=12, rounds=1)
    held_out = held_out_prompts(config)
    with Ledger(tmp_path / "run") as ledger:
        run_evolve(config, teachers=[OpenTeacher(tmp_path / "t.jsonl")], writer=SpellingWriter(held_out),
                   judge=CachedJudge(ScriptedJudge(), ledger, backoff_s=0))
    from t2i_evolve.prompts.sets import prompt_key

    with Ledger(tmp_path / "run", create=False) as ledger:
        records = ledger.records(None)
    assert any(rec.op == "expand" for rec in records)  # the writer's other variations were drawn
    assert not {prompt_key(rec.prompt) for rec in records} & {prompt_key(p) for p in held_out}


def test_the_held_out_references_must_fit_the_teacher_budget_before_any_call(tmp_path):
    config = small_config(str(tmp_path / "run"), prompts_file=str(_write(tmp_path / "open.txt", OPEN)), eval_prompts=6,
                          seed_prompts=12, max_teacher_calls=5)
    with Ledger(tmp_path / "run") as ledger, pytest.raises(UserError, match="cannot pay for the 6 held-out reference"):
        run_evolve(config, teachers=[OpenTeacher(tmp_path / "t.jsonl")], writer=OpenWriter(),
                   judge=CachedJudge(ScriptedJudge(), ledger, backoff_s=0))
    assert not (tmp_path / "t.jsonl").exists()  # not one image paid for


def test_a_rounds_plan_keeps_room_for_its_held_out_comparisons_under_max_judge_calls(tmp_path):
    config = small_config(str(tmp_path / "run"), prompts_file=str(_write(tmp_path / "open.txt", OPEN)), eval_prompts=6,
                          seed_prompts=12, max_judge_calls=12, mutate_rate=0.0)
    with Ledger(tmp_path / "run") as ledger:
        summary = run_evolve(config, teachers=[OpenTeacher(tmp_path / "t.jsonl")], writer=OpenWriter(),
                             judge=CachedJudge(ScriptedJudge(), ledger, backoff_s=0))
    first = summary["rounds"][0]
    assert first["ops"]["judged"] == 6 and sum(first["verdicts"].values()) == 6  # 6 scored + 6 judged = the cap
    assert summary["judge_calls"] <= 12 and summary["stopped"]


def test_with_random_flips_a_held_out_prompts_mirror_is_not_drawn_from_the_file():
    from t2i_evolve.prompts.sets import PromptKeys, set_prompts
    from t2i_evolve.train import mirror_prompt

    pool = [f"a {thing} left of a {other}" for thing in ("cat", "dog", "owl") for other in ("tree", "car", "hat")]
    held_out = ["a cat right of a tree", "a dog right of a car"]
    exclude = PromptKeys(held_out + [mirror_prompt(p) for p in held_out])
    drawn = set_prompts(None, pool, 100, 0, exclude)
    assert len(drawn) == len(pool) - 2 and "a cat left of a tree" not in drawn and "a dog left of a car" not in drawn
