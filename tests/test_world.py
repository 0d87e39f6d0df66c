import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from t2i_evolve.errors import ConfigError, GrammarError, UserError
from t2i_evolve.world import (COLORS, RELATIONS, SHAPES, SIZES, Group, ProceduralTeacher, Scene, parse, render, render_prompt,
                              scene_or_none)
from t2i_evolve.world.grammar import scene_skills
from t2i_evolve.world.questions import answer_checks, dsg_answers, questions_for
from t2i_evolve.world.render import layout, seeded_rng
from t2i_evolve.world.sampling import GrammarPrompts, GrammarSlice, iid_prompts

groups = st.builds(
    Group,
    count=st.integers(1, 3),
    color=st.sampled_from(list(COLORS)),
    shape=st.sampled_from(SHAPES),
    size=st.sampled_from([None, *SIZES]),
)
scenes = st.integers(1, 3).flatmap(
    lambda n: st.builds(
        Scene,
        groups=st.tuples(*[groups] * n).filter(lambda gs: len({(g.color, g.shape) for g in gs}) == len(gs)),
        relations=st.tuples(*[st.sampled_from([None, *RELATIONS])] * (n - 1)),
    )
)


@settings(max_examples=300, deadline=None)
@given(scenes)
def test_round_trip(scene):
    assert parse(render_prompt(scene)) == scene


@settings(max_examples=100, deadline=None)
@given(scenes)
def test_spec_json_round_trip(scene):
    assert Scene.from_json(scene.to_json()) == scene


def test_parse_example():
    scene = parse("two red circles left of a blue square")
    assert scene.groups == (Group(2, "red", "circle"), Group(1, "blue", "square"))
    assert scene.relations == ("left of",)
    assert parse("One Big red circle above three small green stars.").groups[1] == Group(3, "green", "star", "small")


@pytest.mark.parametrize(
    "prompt, word",
    [
        ("two purple circles", "purple"),
        ("a red circle next to a blue square", "next"),
        ("two red circle", "circle"),
        ("four red circles", "four"),
        ("a red circle and a blue square and a green star and a red star", "and"),
    ],
)
def test_parse_error_names_the_word(prompt, word):
    with pytest.raises(GrammarError) as info:
        parse(prompt)
    assert info.value.word == word
    assert repr(word) in str(info.value)


@pytest.mark.parametrize("prompt", ["a red circle left of a red circle", "a small red circle above two big red circles",
                                    "a red circle and a blue square and two red circles"])
def test_two_groups_a_judge_cannot_tell_apart_are_not_in_the_grammar(prompt):
    """Each group's questions are answered on the objects of its color and shape: with two such groups, a
    right picture would fail "exactly one red circle" and any relation between them (it scored 0.44-0.86)."""
    with pytest.raises(GrammarError, match="two groups of red circles .* 'two red circles'") as info:
        parse(prompt)
    assert info.value.word == ("circles" if prompt.endswith("s") else "circle")
    assert scene_or_none(prompt) is None


def test_a_shapes_teacher_refuses_a_prompt_outside_the_grammar_alone(tmp_path):
    """As an images endpoint refuses a prompt it cannot draw: that request fails, with why, and the others
    of its batch are drawn (an LLM writer's prompt outside the grammar no longer stops a run)."""
    from t2i_evolve.data import CachedGenerator, Ledger

    prompts = ["a red circle", "a dog on a skateboard", "a red circle left of a red circle", "two blue stars"]
    with Ledger(tmp_path) as ledger:
        images = CachedGenerator(ProceduralTeacher(), ledger, backoff_s=0).generate(prompts, [0, 1, 2, 3])
        assert [image is None for image in images] == [False, True, True, False]
        refused = {call.request["prompt"]: call.error for call in ledger.calls(status="failed")}
    assert set(refused) == set(prompts[1:3]) and all("cannot draw" in e for e in refused.values())
    assert [call.attempts for call in Ledger(tmp_path).calls()] == [1, 1, 1, 1]  # refused: not resent


def test_questions_follow_dsg_dependencies():
    qs = questions_for("two red circles left of a blue square")
    by_text = {q.text: (i, q) for i, q in enumerate(qs)}
    i_circle, _ = by_text["Is there a circle?"]
    i_red, _ = by_text["Is there a red object?"]
    i_bound, bound = by_text["Is there a red circle?"]
    assert bound.skill == "binding" and set(bound.parents) == {i_circle, i_red}
    _, count = by_text["Are there exactly 2 red circles?"]
    assert count.skill == "count" and count.parents == (i_bound,)
    spatial = [q for q in qs if q.skill == "spatial"]
    assert len(spatial) == 1 and i_bound in spatial[0].parents
    for i, q in enumerate(qs):
        assert all(p < i for p in q.parents)
    # A lone group has no binding partner: its color question hangs off the shape question.
    single = questions_for("a big green star")
    assert [q.skill for q in single] == ["shape", "color", "count", "size"]
    assert single[1].parents == (0,)


def test_dsg_rule_zeroes_children():
    qs = questions_for("a red circle")
    assert dsg_answers(qs, [False, True, True]) == [False, False, False]
    assert dsg_answers(qs, [True, False, True]) == [True, False, False]


def test_render_is_deterministic_and_correct(prompts):
    for i, prompt in enumerate(prompts[:60]):
        image, objects = render(prompt, seed=i)
        again, _ = render(prompt, seed=i)
        assert np.array_equal(np.asarray(image), np.asarray(again))
        assert image.size == (32, 32)
        assert all(answer_checks(questions_for(prompt), objects, 32)), prompt
    a, _ = render(prompts[0], seed=0)
    b, _ = render(prompts[0], seed=1)
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_layout_keeps_a_gap_between_objects(prompts):
    for i, prompt in enumerate(prompts[:60]):
        objects = layout(parse(prompt), seeded_rng(i), 32)
        for j, a in enumerate(objects):
            for b in objects[j + 1 :]:
                reach = (a.extent + b.extent) / 2 + 2.0
                assert abs(a.cx - b.cx) >= reach - 1e-6 or abs(a.cy - b.cy) >= reach - 1e-6


def test_resolution_is_configurable():
    image, objects = render("three small cyan triangles above a big red square", seed=3, resolution=64)
    assert image.size == (64, 64)
    assert all(answer_checks(questions_for("three small cyan triangles above a big red square"), objects, 64))


def test_sampler_slice_and_skills():
    one_two = GrammarPrompts(GrammarSlice(min_groups=1, max_groups=2)).sample(200, seed=0)
    assert all(1 <= len(parse(p).groups) <= 2 for p in one_two)
    spatial = GrammarPrompts().sample(50, seed=0, skill="spatial")
    assert all("spatial" in scene_skills(parse(p)) for p in spatial)
    assert GrammarPrompts().sample(20, seed=5) == GrammarPrompts().sample(20, seed=5)
    with pytest.raises(UserError, match="binding"):
        GrammarPrompts(GrammarSlice(max_groups=1)).sample(5, seed=0, skill="binding")
    # a slice whose crowding cap no scene fits is one line when made, not a sampler that never returns
    with pytest.raises(ConfigError, match="max_crowding 0.25 admits no scene of 3 groups: as many single medium"):
        GrammarSlice(min_groups=3, p_size=0.0, max_crowding=0.25)
    with pytest.raises(ConfigError, match="admits no scene of 3 groups"):  # a 1-group scene fits, a 3-group one not
        GrammarSlice(min_groups=1, max_groups=3, max_crowding=0.12)
    assert GrammarPrompts(GrammarSlice(min_groups=3, p_size=0.5, max_crowding=0.25)).sample(3, seed=0)  # small ones fit


def test_rare_words_give_the_seed_prompts_a_long_tail():
    """A prompt naming a rare word is kept at `rare_weight` odds: yellow falls from about one prompt in six
    to about one in sixty at weight 0.1 and to none at 0; a smaller set is still the start of a larger one,
    and weight 1 is the plain mix."""
    slice_ = GrammarSlice(max_groups=1, max_count=1)
    plain = iid_prompts(slice_, 3000, seed=3)
    tail = iid_prompts(slice_, 3000, seed=3, rare_words=["yellow"], rare_weight=0.1)
    share = {name: sum("yellow" in p for p in ps) / len(ps) for name, ps in [("plain", plain), ("tail", tail)]}
    assert 0.14 < share["plain"] < 0.19 and 0.008 < share["tail"] < 0.03
    assert iid_prompts(slice_, 500, seed=3, rare_words=["yellow"], rare_weight=0.1) == tail[:500]
    assert iid_prompts(slice_, 3000, seed=3, rare_words=["yellow"], rare_weight=1.0) == plain
    assert not any("yellow" in p for p in iid_prompts(slice_, 500, seed=3, rare_words=["yellow"], rare_weight=0.0))
    with pytest.raises(UserError, match="kept at 0 odds"):  # every color rare and never kept: said, not a hang
        iid_prompts(slice_, 10, seed=3, rare_words=list(COLORS), rare_weight=0.0)
