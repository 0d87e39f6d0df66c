"""OpenAIJudge over real HTTP against serve-judge (the pixel judge behind an OpenAI-compatible server).

Covers: agreement with PixelJudge (text and structured replies, both image orders), faults (429, 500,
hangs, malformed replies) ending in recorded verdicts with counted retries, re-asks ending as
"unparseable", reruns that send nothing, SIGKILL mid-batch, the API key never leaking, the parsers on
arbitrary text, templates, the CLI.
"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import io
import json
import logging
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from hypothesis import given, settings
from hypothesis import strategies as st

from forked import ForkedScript, run_script
from t2i_evolve.cli import main
from t2i_evolve.data import Ledger
from t2i_evolve.errors import BudgetExhausted, ConfigError
from t2i_evolve.judges import OpenAIJudge, OpenAIJudgeConfig, PixelJudge, parse_pairwise, parse_vqa
from t2i_evolve.judges import vlm_format as fmt
from t2i_evolve.judges.server import JudgeServer, JudgeServerConfig
from t2i_evolve.protocols import Judge
from t2i_evolve.world import GrammarPrompts, ProceduralTeacher, TeacherConfig, questions_for

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("judge_crash_worker.py")
_spec = importlib.util.spec_from_file_location("judge_crash_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


@pytest.fixture(scope="module")
def server():
    with JudgeServer() as s:
        yield s


@pytest.fixture(scope="module")
def faulty_server():
    with JudgeServer(JudgeServerConfig(fault_rate=0.2, hang_s=1.5, seed=1)) as s:
        yield s


@pytest.fixture(scope="module")
def babbling_server():
    """Every reply is malformed prose."""
    with JudgeServer(JudgeServerConfig(fault_rate=1.0, faults=("malformed",))) as s:
        yield s


@pytest.fixture(scope="module")
def cases():
    """Pairs (strong render, no-count render) and single renders by deficit teachers, 24 prompts."""
    return worker.pairs(24)


@pytest.fixture(scope="module")
def vqa_cases():
    prompts = GrammarPrompts().sample(30, seed=11)
    teachers = [ProceduralTeacher(TeacherConfig(id=f"no-{s}", deficit=s)) for s in ("color", "spatial", "size")]
    return [(teachers[i % 3].draw(p, i)[0], p, questions_for(p)) for i, p in enumerate(prompts)]


def make_judge(url: str, ledger=None, *, key_env: str | None = None, **overrides) -> OpenAIJudge:
    endpoint = {"base_url": url, "model": "pixel", "api_key_env": key_env, "timeout_s": 1.0, "backoff_s": 0.01,
                "retries": 6, "max_concurrency": 8, **overrides.pop("endpoint", {})}
    return OpenAIJudge(OpenAIJudgeConfig.from_dict({"endpoint": endpoint, **overrides}), ledger)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def server_total(server: JudgeServer) -> int:
    return server.stats()["total"]


# --- agreement with the pixel judge -----------------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True])
def test_verdicts_agree_with_pixel_judge(server, cases, vqa_cases, structured):
    pixel = PixelJudge()
    with make_judge(server.url, structured=structured) as judge:
        assert isinstance(judge, Judge)
        pair_items = cases + [(b, a, p) for a, b, p in cases]
        verdicts = judge.compare_many(pair_items)
        assert [v.winner for v in verdicts] == [pixel.compare(a, b, p).winner for a, b, p in pair_items]
        assert {v.order for v in verdicts} == {"ab", "ba"}  # both orders shown, and un-swapped correctly
        assert {v.winner for v in verdicts} >= {"a", "b"}
        answers = judge.answer_many(vqa_cases)
        assert [list(v.answers) for v in answers] == [pixel.answer(*item) for item in vqa_cases]
        assert any(not all(v.answers) for v in answers)
        assert judge.stats["unparseable"] == judge.stats["failed"] == 0


def test_protocol_methods(server, cases, vqa_cases):
    pixel = PixelJudge()
    image_a, image_b, prompt = cases[0]
    with make_judge(server.url) as judge:
        assert judge.compare(image_a, image_b, prompt).winner == pixel.compare(image_a, image_b, prompt).winner
        image, prompt, questions = vqa_cases[1]
        assert judge.answer(image, prompt, questions) == pixel.answer(image, prompt, questions)
        assert judge.answer(image, prompt, [q.text for q in questions]) == pixel.answer(image, prompt, questions)
        assert judge.score(image, prompt).to_json() == pixel.score(image, prompt).to_json()
        assert judge.answer(image, prompt, []) == []


@pytest.fixture(scope="module")
def noisy_server():
    with JudgeServer(JudgeServerConfig(error_rate=0.2, seed=3)) as s:
        yield s


def test_votes_outvote_a_noisy_judge(noisy_server, cases, vqa_cases, tmp_path):
    """serve-judge at a 20% error rate; 3 votes at temperature > 0 (each its own seed) err about half as
    often as one ask, every vote is a request, and a rerun from the ledger sends none of them again."""
    pixel = PixelJudge()
    truth = [a for item in vqa_cases for a in pixel.answer(*item)]
    pair_truth = [pixel.compare(a, b, p).winner for a, b, p in cases]

    def errors(judge) -> int:
        answers = [a for v in judge.answer_many(vqa_cases) for a in v.answers]
        winners = [v.winner for v in judge.compare_many(cases)]
        return sum(map(bool.__ne__, answers, truth)) + sum(w != t for w, t in zip(winners, pair_truth))

    with make_judge(noisy_server.url, temperature=0.7) as judge:
        single = errors(judge)
        assert judge.stats["sent"] == len(vqa_cases) + len(cases)
    with Ledger(tmp_path / "run") as ledger:
        with make_judge(noisy_server.url, ledger, temperature=0.7, votes=3) as judge:
            voted = errors(judge)
            assert judge.stats["sent"] == 3 * (len(vqa_cases) + len(cases))
        n = len(truth) + len(cases)
        assert 0.1 * n < single and voted < 0.7 * single, (single, voted, n)
        before = server_total(noisy_server)
        with make_judge(noisy_server.url, ledger, temperature=0.7, votes=3) as judge:
            assert errors(judge) == voted and judge.stats["sent"] == 0
        assert server_total(noisy_server) == before
    with pytest.raises(ConfigError, match="temperature > 0"):
        make_judge(noisy_server.url, votes=3)  # at temperature 0 every vote is the same answer
    from t2i_evolve.recipes.parts import JudgeSpec

    with pytest.raises(ConfigError, match="pixel judge is exact"):
        JudgeSpec(votes=3).build(Ledger(tmp_path / "pixel"))


# --- faults, re-asks, the ledger ---------------------------------------------------------------------------


def test_faulty_server_batch_completes_with_counted_retries(faulty_server, cases, vqa_cases, tmp_path):
    pixel = PixelJudge()
    with Ledger(tmp_path / "run") as ledger, make_judge(faulty_server.url, ledger) as judge:
        verdicts = judge.compare_many(cases)
        answers = judge.answer_many(vqa_cases[:12])
        assert all(v.status == "ok" for v in verdicts + answers)
        assert [v.winner for v in verdicts] == [pixel.compare(*item).winner for item in cases]
        assert [list(v.answers) for v in answers] == [pixel.answer(*item) for item in vqa_cases[:12]]
        calls = ledger.calls(caller=judge.id)
        assert {c.status for c in calls} == {"done"}
        assert sum(c.attempts for c in calls) > len(calls), "no retry was counted"
        assert judge.stats["transient"] > 0 and judge.stats["sent"] == sum(c.attempts for c in calls)
        malformed = [c for c in calls if c.response["status"] == "unparseable"]
        assert len(malformed) == judge.stats["reasks"]  # each unreadable reply was asked again
    faults = faulty_server.stats()["faults"]
    assert set(faults) == {"429", "500", "hang", "malformed"}, faults


def test_malformed_replies_end_unparseable_after_reasks(babbling_server, cases, vqa_cases, tmp_path):
    with Ledger(tmp_path / "run") as ledger, make_judge(babbling_server.url, ledger, reasks=2) as judge:
        verdicts = judge.compare_many(cases[:3])
        answers = judge.answer_many(vqa_cases[:2])
        assert [(v.status, v.winner, v.asks) for v in verdicts] == [("unparseable", None, 3)] * 3
        assert [(v.status, v.answers, v.asks) for v in answers] == [("unparseable", None, 3)] * 2
        assert judge.compare(*cases[5]) is None and judge.answer(*vqa_cases[5]) is None
        assert judge.stats["unparseable"] == 7 and judge.stats["reasks"] == 14
        calls = ledger.calls(caller=judge.id)
        assert len(calls) == 21 and {c.response["status"] for c in calls} == {"unparseable"}
        assert {c.request["ask"] for c in calls} == {0, 1, 2}
        assert all(len(c.request["previous"]) == c.request["ask"] for c in calls)


def test_rerun_against_the_same_ledger_sends_nothing(server, cases, vqa_cases, tmp_path):
    with Ledger(tmp_path / "run") as ledger:
        with make_judge(server.url, ledger) as judge:
            first = judge.compare_many(cases), judge.answer_many(vqa_cases)
        before = server_total(server)
        with make_judge(server.url, ledger) as judge:
            again = judge.compare_many(cases), judge.answer_many(vqa_cases)
            assert judge.stats["sent"] == 0 and judge.stats["cached"] == len(cases) + len(vqa_cases)
        assert again == first and server_total(server) == before
        with make_judge(server.url, ledger, seed=1) as judge:  # another order seed is another request
            judge.compare_many(cases)
        assert server_total(server) > before
    with make_judge(server.url) as judge:  # no ledger, no cache
        judge.compare_many(cases[:4])
        judge.compare_many(cases[:4])
        assert judge.stats["sent"] == 8


def test_call_budget(server, cases, tmp_path):
    with Ledger(tmp_path / "run") as ledger, make_judge(server.url, ledger, max_calls=5) as judge:
        judge.compare_many(cases[:5])
        with pytest.raises(BudgetExhausted):
            judge.compare_many(cases[5:7])
        judge.compare_many(cases[:5])  # cached answers cost nothing
    with make_judge(server.url, max_calls=3) as judge, pytest.raises(BudgetExhausted):
        judge.compare_many(cases[:4])


def _done_keys(ledger_file: Path) -> tuple[set[str], set[str]]:
    if not ledger_file.exists():
        return set(), set()
    db = sqlite3.connect(ledger_file, timeout=5)
    try:
        rows = db.execute("SELECT key, status FROM calls").fetchall()
    except sqlite3.OperationalError:
        rows = []
    finally:
        db.close()
    return {k for k, s in rows if s == "done"}, {k for k, s in rows if s == "pending"}


def test_sigkill_mid_batch_then_rerun_resends_no_answered_request(tmp_path):
    n, concurrency = 500, 4  # the issue: SIGKILL during 500 judge requests
    with JudgeServer(JudgeServerConfig(latency_s=0.01)) as slow:
        args = (str(tmp_path / "run"), slow.url, "--n", str(n), "--concurrency", str(concurrency))
        first = ForkedScript(WORKER, *args)
        deadline = time.monotonic() + 60
        while len(_done_keys(tmp_path / "run" / "ledger.sqlite")[0]) < 40:
            assert first.poll() is None, f"worker ended early: {first.output()[1]}"
            assert time.monotonic() < deadline, "worker too slow"
            time.sleep(0.005)
        first.send_signal(signal.SIGKILL)
        first.wait()
        done, pending = _done_keys(tmp_path / "run" / "ledger.sqlite")
        assert len(done) < n, "the kill came too late to test anything"
        seen = Counter(slow.stats()["keys"])

        rerun = run_script(WORKER, *args, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        after = Counter(slow.stats()["keys"])

    assert all(after[key] == seen[key] for key in done), "a request with a recorded reply was sent again"
    resent = {key for key in seen if after[key] > seen[key]}
    with Ledger(tmp_path / "run") as ledger:
        calls = ledger.calls()
        assert len(calls) == n and {c.status for c in calls} == {"done"}
        assert set(after) == {c.key for c in calls}
        assert resent <= pending and len(resent) <= ledger.interrupted_calls() <= 4 * concurrency
    pixel = PixelJudge()
    assert json.loads(rerun.stdout)[::4] == [pixel.compare(*item).winner for item in worker.pairs(n)[::4]]


# --- the API key -------------------------------------------------------------------------------------------


def test_api_key_never_leaks(faulty_server, server, cases, tmp_path, monkeypatch, capfd, caplog):
    key = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("T2I_TEST_KEY", key)
    caplog.set_level(logging.DEBUG)
    texts = []
    with Ledger(tmp_path / "run") as ledger, make_judge(faulty_server.url, ledger, key_env="T2I_TEST_KEY") as judge:
        judge.compare_many(cases[:8])
        texts += [repr(judge), repr(judge.config), judge.config.model_dump_json(), judge.config.to_yaml()]
    with make_judge(server.url, key_env="T2I_TEST_KEY", endpoint={"retries": 0}) as judge:
        # HTTP 400 (the prompt is outside the grammar): that request alone fails, with the server's reason
        verdict, = judge.answer_many([(cases[0][0], "a purple circle", ["Is there a circle?"])])
        assert verdict.status == "failed" and "HTTP 400" in verdict.error and "purple" in verdict.error
        texts += [verdict.error, repr(verdict)]
    with make_judge("http://127.0.0.1:9/v1", key_env="T2I_TEST_KEY", endpoint={"retries": 0}) as judge:
        texts.append(str(judge.compare_many(cases[:1])[0]))
    image = tmp_path / "x.png"
    cases[0][0].save(image)
    assert main(["judge", str(image), "--prompt", cases[0][2], "--endpoint", "http://127.0.0.1:9/v1", "--model",
                 "m", "--api-key-env", "T2I_TEST_KEY", "--retries", "0"]) == 2
    assert main(["judge", str(image), "--prompt", cases[0][2], "--endpoint", server.url, "--model", "m",
                 "--api-key-env", "T2I_TEST_KEY"]) == 0
    captured = capfd.readouterr()
    texts += [captured.out, captured.err, caplog.text]
    assert "HTTP Request" in caplog.text  # the HTTP layer did log, at debug level
    for text in texts:
        assert key not in text
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def test_a_request_refused_alone_fails_alone_and_is_not_resent(server, cases, tmp_path):
    """serve-judge answers HTTP 400 for a prompt outside the grammar: that comparison fails with the server's
    reason, the others in its batch are judged and kept (once, the whole batch was failed and paid again)."""
    items = [cases[0], (cases[1][0], cases[1][1], "a purple circle"), cases[2]]
    before = server_total(server)
    with Ledger(tmp_path / "run") as ledger, make_judge(server.url, ledger) as judge:
        verdicts = judge.compare_many(items)
        assert [v.status for v in verdicts] == ["ok", "failed", "ok"] and "HTTP 400" in verdicts[1].error
        assert server_total(server) - before == 3  # not retried
        assert [c.status for c in ledger.calls()] == ["done", "failed", "done"]


def test_a_reply_that_is_not_a_chat_completion_is_retried_then_a_failed_verdict(cases):
    """A proxy's page where a completion should be (text, HTML sent as JSON, a null message), status 200:
    retried as transient, then a failed verdict that says why; never a traceback."""
    from fake_openai import FakeOpenAI

    with FakeOpenAI() as fake:
        fake.chat.extend([b"upstream proxy says hi", b"<html>502 Bad Gateway</html>",
                          b'{"id": "x", "object": "chat.completion", "created": 0, "model": "m", '
                          b'"choices": [{"index": 0, "finish_reason": "stop", "message": null}]}'])
        with make_judge(fake.base_url, endpoint={"retries": 2, "max_concurrency": 1}) as judge:
            verdict, = judge.compare_many(cases[:1])
        assert fake.count("/chat/completions") == 3
        # a body sent as JSON that is not UTF-8 (a proxy's latin-1 page), and one nested past the parser's depth
        fake.chat.extend([b'{"error": "d\xe9faillance"}', b"[" * 100_000 + b"]" * 100_000])
        with make_judge(fake.base_url, endpoint={"retries": 1, "max_concurrency": 1}) as judge:
            undecodable, = judge.compare_many(cases[1:2])
        assert fake.count("/chat/completions") == 5
    assert verdict.status == "failed" and verdict.error.startswith("malformed reply")
    assert undecodable.status == "failed" and undecodable.error == "malformed reply: not JSON"


def test_a_reply_holding_half_a_utf16_pair_is_kept_as_text(cases, tmp_path):
    """JSON may carry a lone surrogate ("\\ud83d", an emoji cut off): no text the ledger can store, so it is
    replaced, and the reply is read (or re-asked) like any other, never a traceback."""
    from fake_openai import FakeOpenAI

    with FakeOpenAI() as fake, Ledger(tmp_path / "run") as ledger:
        fake.chat.extend(['{"verdict": "first", "why": "\ud83d"}', "\ud83d"])
        with make_judge(fake.base_url, ledger, endpoint={"max_concurrency": 1}, reasks=1) as judge:
            read, unread = judge.compare_many(cases[:2])
        assert read.winner in ("a", "b") and unread.status == "unparseable"
        assert [call.status for call in ledger.calls()] == ["done"] * 3


def test_a_key_echoed_where_the_message_is_cut_leaves_no_prefix_of_it(monkeypatch):
    """A server's reason is cut to 200 characters after the key is blanked, not before (a cut through the
    key would leave a prefix that no longer matches it)."""
    from types import SimpleNamespace

    from t2i_evolve.endpoints import EndpointConfig
    from t2i_evolve.judges.openai_judge import _server_message

    key = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("T2I_TEST_KEY", key)
    endpoint = EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="T2I_TEST_KEY")
    error = SimpleNamespace(body={"error": {"message": "x" * 170 + f" headers received: Bearer {key} (end)"}})
    message = _server_message(error, endpoint)
    assert message.startswith(": xxx") and "***" in message and key[:12] not in message


def test_which_http_errors_are_worth_resending(cases):
    """As the openai client itself would (408, 409, 429, 5xx), and a server's `x-should-retry` header first."""
    from fake_openai import FakeOpenAI

    def sent_for(*failures):
        with FakeOpenAI() as fake:
            fake.chat.extend(failures)
            with make_judge(fake.base_url, endpoint={"retries": 1, "max_concurrency": 1}, reasks=0) as judge:
                judge.compare_many(cases[:1])
            return fake.count("/chat/completions")

    assert [sent_for(status) for status in (408, 409, 429, 503)] == [2, 2, 2, 2]  # retried once
    assert [sent_for(status) for status in (400, 422)] == [1, 1]  # refused: not resent
    assert sent_for((400, {"x-should-retry": "true"})) == 2 and sent_for((503, {"x-should-retry": "false"})) == 1


# --- server -------------------------------------------------------------------------------------------------


def test_server_routes_and_bad_requests(server):
    base = server.url
    assert get_json(f"{base}/models")["data"][0]["id"] == "pixel-judge"
    assert set(get_json(base.removesuffix("/v1") + "/stats")) == {"total", "answered", "faults", "keys"}
    for body, status in [(b"[1]", 400), (b"{not json", 400), (json.dumps({"messages": []}).encode(), 400)]:
        request = urllib.request.Request(f"{base}/chat/completions", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=5)
        assert error.value.code == status and "error" in json.loads(error.value.read())
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"{base}/nothing", timeout=5)
    assert error.value.code == 404
    # what it did not foresee is answered, never a dropped connection (which a client retries as transient)
    odd = json.dumps({"messages": [{"role": "user", "content": 'Prompt: "a red circle"'}], "response_format": "json"})
    big = Image.new("RGB", (1024, 1024), "white")
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    too_big = json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": 'Prompt: "a red circle"\n1. Is there a red circle?'},
        {"type": "image_url", "image_url": {"url": url}}]}]})  # (its segmenter set-up would stall the server)
    for headers, body in [({}, odd.encode()), ({"Content-Length": "abc"}, b""), ({"Content-Length": "\u00b2"}, b""),
                          ({}, b'{"messages": "\\ud83d"}'), ({}, too_big.encode())]:
        connection = http.client.HTTPConnection(base.split("//")[1].split("/")[0], timeout=5)
        connection.putrequest("POST", "/v1/chat/completions", skip_accept_encoding=True)
        for name, value in ({"Content-Length": str(len(body))} | headers).items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        assert response.status == 400 and "error" in json.loads(response.read())
        connection.close()


def test_serve_judge_command(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "t2i_evolve.cli", "serve-judge", "--port", "0", "--seed", "3"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = process.stdout.readline()
        assert "serving the pixel judge at http://127.0.0.1:" in line, process.stderr.read()
        url = line.split(" at ")[1].split()[0]
        assert get_json(f"{url}/models")["object"] == "list"
    finally:
        process.send_signal(signal.SIGTERM)  # SIGINT may be ignored when the tests run in the background
        assert process.wait(timeout=60) == 0


# --- CLI ----------------------------------------------------------------------------------------------------


def _run(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_judge_through_endpoint_matches_pixel_output(server, cases, tmp_path, capsys):
    image = tmp_path / "x.png"
    cases[3][1].save(image)
    prompt = cases[3][2]
    for extra in ([], ["--json"]):
        pixel = _run(capsys, "judge", str(image), "--prompt", prompt, *extra)
        remote = _run(capsys, "judge", str(image), "--prompt", prompt, *extra, "--endpoint", server.url, "--model", "m")
        assert remote == pixel and pixel[0] == 0


def test_a_second_opinion_reuses_the_first_ask_and_pays_for_the_new_votes_only(noisy_server, cases, vqa_cases,
                                                                              tmp_path):
    """`votes=` of a batch: a verdict asked once, then again to 3 votes, sends 2 more requests per verdict
    (the first vote is the one-vote request, read from the ledger) and ends as the 3-vote judge's verdict."""
    with Ledger(tmp_path / "run") as ledger:
        with make_judge(noisy_server.url, ledger, temperature=0.7) as judge:
            judge.answer_many(vqa_cases), judge.compare_many(cases)
            first = judge.stats["sent"]
            again = [v.answers for v in judge.answer_many(vqa_cases, votes=3)], \
                [v.winner for v in judge.compare_many(cases, votes=3)]
            assert judge.stats["sent"] - first == 2 * (len(vqa_cases) + len(cases))
        with make_judge(noisy_server.url, ledger, temperature=0.7, votes=3) as voted:
            assert ([v.answers for v in voted.answer_many(vqa_cases)], [v.winner for v in voted.compare_many(cases)]) \
                == again and voted.stats["sent"] == 0


def test_cli_judge_votes_ask_the_endpoint_once_per_vote(noisy_server, cases, tmp_path, capsys):
    image = tmp_path / "x.png"
    cases[3][1].save(image)
    for votes in (1, 3):
        before = server_total(noisy_server)
        code, out, err = _run(capsys, "judge", str(image), "--prompt", cases[3][2], "--json", "--endpoint",
                              noisy_server.url, "--model", "m", "--votes", str(votes), "--temperature", "0.7")
        assert code == 0, err
        assert server_total(noisy_server) - before == votes  # one request per vote, each answered


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--endpoint", "localhost:8000", "--model", "m"], "bad --endpoint"),
        (["--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--retries", "0"],
         "no answer: judge endpoint http://127.0.0.1:9: connection failed"),
        (["--endpoint", "http://127.0.0.1:9/v1"], "--model is required"),
        (["--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--api-key-env", "T2I_UNSET_VAR"], "is not set"),
        (["--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--votes", "3"], "needs temperature > 0"),
        (["--votes", "3", "--temperature", "0.7"], "the pixel judge is exact"),
    ],
)
def test_cli_judge_endpoint_errors_are_one_line(tmp_path, capsys, cases, flags, message):
    image = tmp_path / "x.png"
    cases[0][0].save(image)
    code, _, err = _run(capsys, "judge", str(image), "--prompt", cases[0][2], *flags)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


# --- templates and parsers ----------------------------------------------------------------------------------


def test_user_templates(server, cases, tmp_path):
    custom = tmp_path / "pairwise.txt"
    custom.write_text('Two images, one prompt.\nPrompt: "$prompt"\nAnswer first, second or tie.\n')
    with make_judge(server.url, pairwise_template=str(custom)) as judge:
        assert judge.compare_many(cases[:4]) and judge.stats["ok"] == 4
    for text, message in [("no fields", "missing $prompt"), ("$prompt $colour", "unknown field $colour"),
                          ("$prompt costs 5$", "'$'")]:
        custom.write_text(text)
        with pytest.raises(ConfigError, match=message.replace("$", r"\$")):
            make_judge(server.url, pairwise_template=str(custom))
    with pytest.raises(ConfigError, match="not found"):
        make_judge(server.url, vqa_template=str(tmp_path / "missing.txt"))


def test_parsers_are_strict():
    assert parse_vqa("1: yes\n2: NO", 2) == [True, False]
    assert parse_vqa("```\n1. yes\n\n2) no.\n```", 2) == [True, False]
    assert parse_vqa("**1: yes**\n2: no", 2) == [True, False]
    assert parse_vqa('{"answers": ["yes", "no", "yes"]}', 3) == [True, False, True]
    for bad, n in [("1: yes", 2), ("1: yes\n1: no", 1), ("1: yes\n2: no\n3: yes", 2), ("Sure!\n1: yes", 1),
                   ("1: maybe", 1), ("0: yes", 1), ('{"answers": ["yes"]}', 2), ("yes", 1), ("", 1), ("1: yes", 0)]:
        assert parse_vqa(bad, n) is None, bad
    assert [parse_pairwise(t) for t in ("first", " Second.", "**TIE**", '{"verdict": "second"}', '"first"')] == \
        ["first", "second", "tie", "second", "first"]
    for bad in ("the first one", "first or second", "1", "", '{"verdict": "both"}', "{", "firstly"):
        assert parse_pairwise(bad) is None, bad


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300), st.integers(min_value=-2, max_value=12))
def test_parsers_never_raise(text, n):
    answers = parse_vqa(text, n)
    assert answers is None or (len(answers) == n and all(isinstance(a, bool) for a in answers))
    assert parse_pairwise(text) in (None, "first", "second", "tie")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=12), st.booleans(), st.sampled_from(fmt.PAIRWISE_TOKENS))
def test_well_formed_replies_round_trip(answers, structured, token):
    assert parse_vqa(fmt.format_vqa_reply(answers, structured), len(answers)) == answers
    assert parse_pairwise(fmt.format_pairwise_reply(token, structured)) == token


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_requests_read_back(prompt):
    questions = ["Is there a circle?", "Are there exactly 2 red squares?"]
    text = fmt.vqa_text(fmt.load_template("vqa"), prompt, questions)
    assert fmt.read_prompt(text) == " ".join(prompt.split())
    assert fmt.read_questions(text) == questions
