import json

import numpy as np
import pytest

from t2i_evolve.errors import CallTimeout, ConfigError, TransientError
from t2i_evolve.eval import evaluate
from t2i_evolve.protocols import SKILLS, Generator
from t2i_evolve.recipes.parts import TeacherSpec
from t2i_evolve.world import MixtureTeacher, ProceduralTeacher, TeacherConfig, default_gallery


@pytest.fixture(scope="module")
def gallery_scores(prompts, judge):
    return {t.id: (t.deficit, evaluate(t, judge, prompts).summary()) for t in default_gallery()}


def test_strong_teacher_is_perfect(gallery_scores):
    deficit, summary = gallery_scores["strong"]
    assert deficit is None
    assert summary["score"] >= 0.995
    assert min(summary["skills"].values()) >= 0.99


@pytest.mark.parametrize("skill", SKILLS)
def test_each_deficit_loses_most_on_its_own_skill(gallery_scores, skill):
    strong = gallery_scores["strong"][1]["skills"]
    deficit, summary = gallery_scores[f"no-{skill}"]
    assert deficit == skill
    loss = {s: strong[s] - summary["skills"][s] for s in SKILLS}
    assert loss[skill] >= 0.30, loss
    assert max(loss, key=loss.get) == skill, loss


def test_teachers_are_deterministic_generators():
    teacher = ProceduralTeacher(TeacherConfig(id="no-count", deficit="count"))
    assert isinstance(teacher, Generator)
    a = teacher.generate(["two red circles", "a blue star"], [0, 1])
    b = teacher.generate(["two red circles", "a blue star"], [0, 1])
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert teacher.calls == 4


def test_faults_are_transient_and_retry_succeeds(tmp_path):
    teacher = ProceduralTeacher(TeacherConfig(transient_error_rate=0.3, timeout_rate=0.2), call_log=tmp_path / "calls")
    seen = {"timeout": 0, "error": 0}
    for seed in range(60):
        for _ in range(30):
            try:
                teacher.generate(["a red circle"], [seed])
                break
            except CallTimeout:
                seen["timeout"] += 1
            except TransientError:
                seen["error"] += 1
        else:
            pytest.fail("retries never succeeded")
    assert seen["timeout"] > 0 and seen["error"] > 0
    assert teacher.faults == seen["timeout"] + seen["error"]
    assert teacher.calls == 60
    log = [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]
    assert len(log) == 60 and len({(c["prompt"], c["seed"]) for c in log}) == 60


def test_mixture_routes_each_request_to_one_member(judge, prompts):
    members = [ProceduralTeacher(TeacherConfig(id="strong")),
               ProceduralTeacher(TeacherConfig(id="no-color", deficit="color", p=1.0))]
    mix = MixtureTeacher("mix", members, [0.5, 0.5])
    score = evaluate(mix, judge, prompts[:60]).summary()["skills"]["color"]
    assert 0.2 < score < 0.9
    assert members[0].calls + members[1].calls == 60 == mix.calls
    assert mix.member_for("a red circle", 3) is mix.member_for("a red circle", 3)


def test_blur_and_noise_are_configurable(judge):
    clean = ProceduralTeacher().draw("a red circle", 0)[0]
    noisy = ProceduralTeacher(TeacherConfig(id="blurry", blur=0.8, noise=10)).draw("a red circle", 0)[0]
    assert np.abs(np.asarray(clean, float) - np.asarray(noisy, float)).mean() > 2
    assert judge.score(noisy, "a red circle").score == 1.0


def test_a_fault_in_a_batch_fails_that_request_alone(tmp_path):
    teacher = ProceduralTeacher(TeacherConfig(transient_error_rate=0.2), call_log=tmp_path / "calls")
    prompts = [f"{n} red circles" for n in ("two", "three")] * 20
    images = teacher.generate(prompts, list(range(len(prompts))))
    failed = [i for i, image in enumerate(images) if image is None]
    assert 0 < len(failed) < len(prompts) and teacher.faults == len(failed)
    assert teacher.calls == len(prompts) - len(failed)
    assert (tmp_path / "calls").read_text().count("\n") == teacher.calls  # only answered requests are billed


def test_a_blind_spot_breaks_only_its_words(judge):
    """`blind_to`: the deficit hits those words every time and no other word ever (a systematic weakness)."""
    teacher = ProceduralTeacher(TeacherConfig(id="no-red", deficit="color", p=1.0, blind_to=["red"]))
    for seed in range(3):
        for prompt in ["a red circle", "a red star", "two red squares"]:
            assert judge.score(teacher.generate([prompt], [seed])[0], prompt).score < 1.0, prompt
        for prompt in ["a blue circle", "a green star", "two yellow squares"]:
            assert judge.score(teacher.generate([prompt], [seed])[0], prompt).score == 1.0, prompt
    with pytest.raises(ValueError, match="not colors: circle"):
        TeacherConfig(id="x", deficit="color", blind_to=["circle"])
    with pytest.raises(ValueError, match="needs a color or shape deficit"):
        TeacherConfig(id="x", deficit="count", blind_to=["two"])
    with pytest.raises(ConfigError, match="^evolve.yaml: teacher no-shape: blind_to has words that are not shapes: red"):
        TeacherSpec.from_dict({"id": "no-shape", "blind_to": ["red"]}, "evolve.yaml")  # what a YAML meets: one line


def test_a_compound_teacher_has_each_members_blind_spots(judge):
    """'no-color+no-shape': blind to its color words and to its shape words at once (a base weaker than
    each gallery teacher), right on every other word; its calls are counted once per image."""
    teacher = TeacherSpec(id="no-color+no-shape", p=1.0, blind_to=["red", "circle"]).build()
    for seed in range(3):
        for prompt in ["a red star", "a blue circle", "a red circle", "two green squares left of a red triangle"]:
            assert judge.score(teacher.generate([prompt], [seed])[0], prompt).score < 1.0, prompt
        for prompt in ["a blue star", "two yellow squares", "a green triangle above a magenta square"]:
            assert judge.score(teacher.generate([prompt], [seed])[0], prompt).score == 1.0, prompt
    assert teacher.calls == 21 and teacher.id == "no-color+no-shape"
    with pytest.raises(ConfigError, match="^x.yaml: teacher no-color\\+no-count: blind_to has words none of its "
                                          "deficits is about: circle$"):
        TeacherSpec.from_dict({"id": "no-color+no-count", "blind_to": ["red", "circle"]}, "x.yaml")
    with pytest.raises(ConfigError, match="unknown gallery teacher 'no-colour'"):
        TeacherSpec.from_dict({"id": "no-colour+no-shape"})
    with pytest.raises(ConfigError, match="^config: teacher no-color\\+no-spatial: no-spatial cannot join others"):
        TeacherSpec.from_dict({"id": "no-color+no-spatial"})  # not a silent teacher without its spatial deficit


def test_a_mixture_fails_a_faulty_request_alone_and_keeps_the_images_paid_for(tmp_path):
    """As a procedural teacher: in a batch, a transient fault is that item's None, not the batch's exception
    (which made the call cache resend, and pay again for, every image of the batch)."""
    from t2i_evolve.data import CachedGenerator, Ledger

    config = TeacherConfig(id="m1", transient_error_rate=0.2)
    members = [ProceduralTeacher(config), ProceduralTeacher(config.model_copy(update={"id": "m2"}))]
    prompts = [f"{n} {c} {s}s" for n in ("two", "three") for c in ("red", "blue", "green") for s in ("circle", "square")]
    ledger = Ledger(tmp_path / "run")
    images = CachedGenerator(MixtureTeacher("mix", members), ledger, backoff_s=0).generate(prompts, range(12))
    assert all(image is not None for image in images)
    assert sum(m.calls for m in members) == 12  # each image drawn (paid) once
    assert sum(c.attempts for c in ledger.calls()) == 12 + sum(m.faults for m in members) > 12
