"""Questions about an image of any prompt (DSG): the strict reader of an LLM's question list, the LLM writer
asking for them (re-asks, fallback, cache), and a VLM judge asking them, parents applied."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from t2i_evolve.data import Ledger
from t2i_evolve.endpoints import EndpointConfig
from t2i_evolve.prompts import OpenAIPromptWriter, OpenAIPromptWriterConfig
from t2i_evolve.prompts.questions import parse_question_list
from t2i_evolve.recipes.parts import JudgeSpec
from t2i_evolve.world import questions_for

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeOpenAI  # noqa: E402

CAT = "a black cat asleep on a red sofa"
WRITTEN = [{"id": 1, "question": "Is there a cat?", "skill": "entity", "parents": []},
           {"id": 2, "question": "Is the cat  black?", "skill": "color", "parents": [1]},
           {"id": 3, "question": "Is there a sofa?", "skill": "entity", "parents": []},
           {"id": 4, "question": "Is the cat on the sofa?", "skill": "spatial", "parents": [1, 3]}]


def test_a_question_list_is_read_from_the_ways_llms_wrap_it_and_parents_become_indices():
    for reply in (json.dumps(WRITTEN), f"Sure!\n```json\n{json.dumps(WRITTEN)}\n```", json.dumps({"questions": WRITTEN}),
                  "Here they are: " + json.dumps(WRITTEN) + " Hope this helps."):
        questions = parse_question_list(reply, 12)
        assert [q.text for q in questions] == ["Is there a cat?", "Is the cat black?", "Is there a sofa?",
                                               "Is the cat on the sofa?"]
        assert [q.parents for q in questions] == [(), (0,), (), (0, 2)]
        assert [q.skill for q in questions] == ["entity", "color", "entity", "spatial"]
    plain = parse_question_list(json.dumps([{"question": "Is there a cat?", "skill": "feline"},
                                            {"question": "Is it black?", "parents": [1]}]), 12)
    assert [(q.skill, q.parents) for q in plain] == [("other", ()), ("other", (0,))]  # ids by position
    assert len(parse_question_list(json.dumps(WRITTEN), 2)) == 2  # at most `limit`


def test_a_question_list_with_one_bad_item_is_refused_whole():
    later = [dict(WRITTEN[0], parents=[2]), WRITTEN[1]]  # a parent that comes later: a cycle
    for bad in (later, [WRITTEN[0], dict(WRITTEN[1], id=1)], [WRITTEN[0], dict(WRITTEN[1], question="")],
                [dict(WRITTEN[0], id=True)], [WRITTEN[0], dict(WRITTEN[1], parents=[9])], ["Is there a cat?"], [],
                [dict(WRITTEN[0], question="x" * 301)], [dict(WRITTEN[0], parents="1")]):
        assert parse_question_list(json.dumps(bad), 12) is None, bad
    assert parse_question_list("1. Is there a cat?\n2. Is it black?", 12) is None
    assert parse_question_list(None, 12) is None


_ITEM = st.fixed_dictionaries({"question": st.one_of(st.text(max_size=40), st.integers())},
                               optional={"id": st.one_of(st.integers(0, 6), st.booleans(), st.text(max_size=2)),
                                         "skill": st.one_of(st.sampled_from(["entity", "color", "Spatial "]), st.text(max_size=8)),
                                         "parents": st.one_of(st.lists(st.integers(0, 6), max_size=3), st.text(max_size=3))})


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.lists(_ITEM, max_size=8).map(json.dumps)), st.integers(1, 8))
def test_reading_questions_never_raises_and_what_it_reads_is_a_valid_dsg_list(reply, limit):
    questions = parse_question_list(reply, limit)
    if questions is None:
        return
    assert 0 < len(questions) <= limit
    assert all(q.text.strip() == q.text and q.text and all(p < i for p in q.parents) for i, q in enumerate(questions))
    assert all(q.skill == q.skill.strip().lower() for q in questions)


def _config(server, **fields) -> OpenAIPromptWriterConfig:
    endpoint = EndpointConfig(base_url=server.base_url, model="fake-llm", backoff_s=0.0, timeout_s=5.0)
    return OpenAIPromptWriterConfig(endpoint=endpoint, **fields)


def _chat(server) -> list[dict]:
    return [r["body"] for r in server.requests if r["path"].endswith("/chat/completions")]


def test_the_llm_writes_questions_once_per_prompt_reasks_a_bad_reply_and_falls_back_to_the_whole_prompt(tmp_path):
    with FakeOpenAI() as server, Ledger(tmp_path / "run") as ledger:
        writer = OpenAIPromptWriter(_config(server, max_reasks=1, temperature=0.9), ledger=ledger)
        assert writer.questions("two red circles left of a blue square") == questions_for(
            "two red circles left of a blue square") and not _chat(server)  # the grammar's own list: no request
        server.chat.extend(["I cannot list questions.", json.dumps(WRITTEN)])
        questions = writer.questions(CAT)
        assert [q.text for q in questions][-1] == "Is the cat on the sofa?" and writer.unparsed_replies == 1
        sent = _chat(server)
        assert [body["temperature"] for body in sent] == [0.0, 0.9] and CAT in sent[0]["messages"][-1]["content"]
        assert writer.questions(CAT) == questions and len(_chat(server)) == 2  # kept per prompt
        server.chat.extend(["no", "still no"])
        assert [q.text for q in writer.questions("a teapot")] == ['Does this image show "a teapot"?']
        again = OpenAIPromptWriter(_config(server, max_reasks=1, temperature=0.9), ledger=ledger)
        assert again.questions(CAT) == questions and len(_chat(server)) == 4  # a rerun: from the ledger's cache


def test_a_vlm_judge_asks_the_written_questions_and_applies_their_parents(tmp_path):
    def reply(body):
        text = body["messages"][-1]["content"]
        if isinstance(text, str) and "yes/no questions that together check" in text:
            return json.dumps(WRITTEN)
        return "1: no\n2: yes\n3: yes\n4: yes"  # no cat: "is the cat black?" and "on the sofa?" count as no

    with FakeOpenAI(chat_reply=reply) as server, Ledger(tmp_path / "run") as ledger:
        writer = OpenAIPromptWriter(_config(server), ledger=ledger)
        endpoint = EndpointConfig(base_url=server.base_url, model="vlm", backoff_s=0.0, timeout_s=5.0)
        judge = JudgeSpec(kind="openai", endpoint=endpoint).build(ledger, None, writer.questions)
        score = judge.score(Image.new("RGB", (32, 32)), CAT)
        asked = json.dumps(_chat(server)[-1])
    assert [a.question.text for a in score.answers] == [q["question"].replace("  ", " ") for q in WRITTEN]
    assert "Is the cat on the sofa?" in asked
    assert score.score == 0.25  # only "is there a sofa?" holds: the cat's questions need a cat


def test_world_questions_prints_what_the_writer_asks_about_any_prompt(tmp_path, capsys):
    from t2i_evolve.cli import main

    with FakeOpenAI(chat_reply=lambda body: json.dumps(WRITTEN)) as server:
        (tmp_path / "writer.yaml").write_text(f"kind: openai\nendpoint: {{base_url: '{server.base_url}', model: llm, "
                                              "backoff_s: 0}\n")
        assert main(["world", "questions", CAT, "--writer", str(tmp_path / "writer.yaml"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [(q["question"], q["skill"], q["parents"]) for q in printed][-1] == ("Is the cat on the sofa?", "spatial", [0, 2])
    assert main(["world", "questions", CAT]) == 2  # the grammar's own questions: shapes-world prompts only
    assert "cannot read 'black'" in capsys.readouterr().err
