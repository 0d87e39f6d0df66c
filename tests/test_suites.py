from t2i_evolve.eval import evaluate, suite_prompts
from t2i_evolve.world import ProceduralTeacher, TeacherConfig, parse
from t2i_evolve.world.suites import TASKS, geneval_suite


def test_suite_matches_geneval_sizes_and_is_fixed():
    suite = geneval_suite(seed=0)
    assert {t: len(p) for t, p in suite.items()} == {t: n for t, (n, _) in TASKS.items()}
    assert sum(len(p) for p in suite.values()) == 553
    assert suite == geneval_suite(seed=0) and suite != geneval_suite(seed=1)
    assert all(len(parse(p).groups) == 2 and parse(p).relations[0] for p in suite["position"])
    assert all(parse(p).groups[0].count >= 2 for p in suite["counting"])


def test_geneval_rule_and_task_scores(judge):
    prompts, tasks = suite_prompts(geneval_suite(seed=0, scale=0.3))
    strong = evaluate(ProceduralTeacher(), judge, prompts, tasks=tasks).summary()["geneval"]
    assert strong["overall"] >= 0.99
    no_space = ProceduralTeacher(TeacherConfig(id="no-spatial", deficit="spatial"))
    weak = evaluate(no_space, judge, prompts, tasks=tasks).summary()["geneval"]
    assert weak["tasks"]["position"] < 0.7
    assert weak["tasks"]["colors"] >= 0.99
    assert weak["overall"] == sum(weak["tasks"].values()) / 6
