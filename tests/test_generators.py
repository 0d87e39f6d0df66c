"""Teachers as generators: an OpenAI-compatible images endpoint (against the fake server on loopback)
and a local model folder, both behind the ledger's call cache."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from fake_openai import KEY_ENV, FakeOpenAI, api_key, server  # noqa: F401 (fixtures)

from t2i_evolve.data import CachedGenerator, CallBudget, Ledger
from t2i_evolve.endpoints import EndpointConfig
from t2i_evolve.errors import BudgetExhausted, ConfigError, TransientError
from t2i_evolve.generators import (
    EndpointError,
    LocalPipelineTeacher,
    LocalPipelineTeacherConfig,
    OpenAIImageTeacher,
    OpenAIImageTeacherConfig,
)
from t2i_evolve.models import SamplerConfig
from t2i_evolve.protocols import Generator
from t2i_evolve.world import GrammarPrompts, ProceduralTeacher, TeacherConfig

PROMPTS = GrammarPrompts().sample(6, seed=11)


def teacher(server, size="32x32", **fields) -> OpenAIImageTeacher:
    endpoint = EndpointConfig(base_url=server.base_url, model="fake-images", api_key_env=KEY_ENV, backoff_s=0.0,
                              **fields.pop("endpoint", {}))
    return OpenAIImageTeacher(OpenAIImageTeacherConfig(endpoint=endpoint, size=size, **fields))


def pixels(images):
    return [np.asarray(image) for image in images]


def test_images_are_cached_and_priced(server, tmp_path):
    strong = ProceduralTeacher(TeacherConfig())
    images_teacher = teacher(server, price_per_call=0.25)
    assert isinstance(images_teacher, Generator)
    cached = CachedGenerator(images_teacher, Ledger(tmp_path / "run"), backoff_s=0)
    seeds = list(range(len(PROMPTS)))
    images = cached.generate(PROMPTS, seeds)
    expected = [strong.draw(p, s)[0] for p, s in zip(PROMPTS, seeds)]
    assert all(np.array_equal(a, b) for a, b in zip(pixels(images), pixels(expected)))
    assert all(image.mode == "RGB" and image.size == (32, 32) for image in images)
    assert server.count("/images/generations") == len(PROMPTS)
    assert sorted(r["body"]["seed"] for r in server.requests) == seeds

    rerun = CachedGenerator(teacher(server, price_per_call=0.25), Ledger(tmp_path / "run"))
    again = rerun.generate(PROMPTS, seeds)
    assert server.count("/images/generations") == len(PROMPTS)
    assert all(np.array_equal(a, b) for a, b in zip(pixels(images), pixels(again)))
    calls = Ledger(tmp_path / "run").calls(caller=images_teacher.id)
    assert len(calls) == len(PROMPTS) and sum(c.price for c in calls) == pytest.approx(0.25 * len(PROMPTS))


def test_ids_name_model_size_and_resolution(server):
    a, b, c = teacher(server), teacher(server, size="64x64"), teacher(server, size="64x64", resolution=32)
    assert len({a.id, b.id, c.id}) == 3 and all("fake-images" in t.id for t in (a, b, c))
    assert "64x64" in b.id


def test_seed_and_response_format_can_be_left_out(server):
    teacher(server, send_seed=False, send_response_format=False).generate(PROMPTS[:1], [5])
    teacher(server).generate(PROMPTS[:1], [5])
    first, second = (r["body"] for r in server.requests)
    assert "seed" not in first and "response_format" not in first
    assert second["seed"] == 5 and second["response_format"] == "b64_json" and second["n"] == 1


def test_images_are_resized_to_the_configured_resolution(server):
    images = teacher(server, size="64x64", resolution=24).generate(PROMPTS[:2], [0, 1])
    assert [image.size for image in images] == [(24, 24)] * 2
    assert {r["body"]["size"] for r in server.requests} == {"64x64"}


def test_transient_failures_are_retried_alone(server, tmp_path):
    server.images.extend([429, 500])
    ledger = Ledger(tmp_path / "run")
    cached = CachedGenerator(teacher(server), ledger, backoff_s=0)
    images = cached.generate(PROMPTS[:3], [0, 1, 2])
    assert all(image is not None for image in images)
    calls = ledger.calls(caller=cached.id)
    assert sorted(c.attempts for c in calls) == [1, 2, 2] and all(c.status == "done" for c in calls)
    assert server.count("/images/generations") == 5  # three sent, two of them again; none paid twice


def test_a_batch_that_fails_entirely_raises_transient(server):
    server.images.extend([503, 503])
    with pytest.raises(TransientError, match="503"):
        teacher(server).generate(PROMPTS[:2], [0, 1])


def test_budget_stops_cleanly(server, tmp_path):
    ledger = Ledger(tmp_path / "run")
    cached = CachedGenerator(teacher(server, price_per_call=0.5), ledger, backoff_s=0, budget=CallBudget(max_price=1.0))
    with pytest.raises(BudgetExhausted):
        cached.generate(PROMPTS[:3], [0, 1, 2])
    assert server.count("/images/generations") == 2
    assert cached.generate(PROMPTS[:2], [0, 1])  # what was paid for is kept
    assert server.count("/images/generations") == 2
    assert sum(c.price for c in ledger.calls(caller=cached.id)) == pytest.approx(1.0)


def test_a_request_refused_alone_fails_alone_and_the_others_are_kept(server, tmp_path):
    """A content policy's 400 for one prompt of a batch: that request fails (not resent, its reason kept), the
    images of the others are stored; once raised for the whole batch, they were paid for and thrown away."""
    server.images.extend([400])
    ledger = Ledger(tmp_path / "run")
    cached = CachedGenerator(teacher(server), ledger, backoff_s=0)
    images = cached.generate(PROMPTS[:3], [0, 1, 2])
    assert sum(image is None for image in images) == 1 and server.count("/images/generations") == 3
    failed, = ledger.calls(caller=cached.id, status="failed")
    assert failed.attempts == 1 and failed.error.startswith("RequestRefused") and "HTTP 400" in failed.error
    assert len(ledger.calls(caller=cached.id, status="done")) == 2


def test_a_password_in_the_base_url_never_reaches_an_error_or_the_ledger(api_key, tmp_path):
    with FakeOpenAI() as server:
        url = server.base_url.replace("http://", "http://alice:S3CRET-PASSWORD@")
        endpoint = EndpointConfig(base_url=url, model="fake-images", api_key_env=KEY_ENV)
        server.images.extend([400, 400])
        ledger = Ledger(tmp_path / "run")
        assert CachedGenerator(OpenAIImageTeacher(OpenAIImageTeacherConfig(endpoint=endpoint, size="32x32")),
                               ledger).generate(PROMPTS[:2], [0, 1]) == [None, None]
        errors = [call.error for call in ledger.calls(status="failed")]
    assert len(errors) == 2 and all("127.0.0.1" in e and "S3CRET" not in e and "alice" not in e for e in errors)


def test_a_key_with_a_trailing_newline_is_trimmed_and_one_no_header_can_carry_is_a_config_error(monkeypatch):
    """A secret file's newline is not part of the key; a pasted dash or line break is a one-line ConfigError naming
    the variable (sent, it failed as "connection failed" on every retry, or as a traceback), never quoting it."""
    endpoint = EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env=KEY_ENV)
    monkeypatch.setenv(KEY_ENV, "sk-abc123\n")
    assert endpoint.api_key() == "sk-abc123"
    for bad in ("sk-abc123\u2013x", "sk-abc123\r\nX-Other: 1", "sk-abc 123"):
        monkeypatch.setenv(KEY_ENV, bad)
        with pytest.raises(ConfigError, match=KEY_ENV) as info:
            endpoint.api_key()
        assert "abc" not in str(info.value)


def test_concurrency_is_bounded():
    with FakeOpenAI(image_delay_s=0.05) as server:
        endpoint = EndpointConfig(base_url=server.base_url, model="m", max_concurrency=2)
        config = OpenAIImageTeacherConfig(endpoint=endpoint, size="32x32")
        images = OpenAIImageTeacher(config).generate(PROMPTS, range(6))
        assert len(images) == 6 and 1 <= server.max_in_flight <= 2


def test_refusals_are_endpoint_errors_without_the_key(api_key, tmp_path):
    with FakeOpenAI(api_key="another-key") as server:
        with pytest.raises(EndpointError, match="401") as info:
            CachedGenerator(teacher(server), Ledger(tmp_path / "run")).generate(PROMPTS[:2], [0, 1])
        assert server.requests[0]["auth"] == f"Bearer {api_key}"
    assert api_key not in str(info.value) and "***" in str(info.value)
    assert not any(api_key.encode() in p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file())


SMALL = SamplerConfig(steps=1, resolution=16)  # the tiny UNet is slow on a loaded CPU: one step, 8x8 latents


@pytest.fixture(scope="module")
def local_teacher(sd_dir):
    return LocalPipelineTeacher(LocalPipelineTeacherConfig(path=sd_dir, sampler=SMALL))


def test_local_pipeline_is_deterministic_per_prompt_and_seed(local_teacher, sd_dir):
    assert isinstance(local_teacher, Generator) and local_teacher.price_per_call == 0.0
    assert str(sd_dir.resolve()) in local_teacher.id and "ddim-1" in local_teacher.id
    prompts, seeds = ["a red circle", "two blue stars", "a red circle"], [0, 1, 2]
    a = pixels(local_teacher.generate(prompts, seeds))
    b = pixels(local_teacher.generate(prompts, seeds))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (16, 16, 3) and not np.array_equal(a[0], a[2])
    # a recipe's base is trained and judged at its own size: its teachers' images are resized to it
    assert LocalPipelineTeacher(sd_dir, sampler=SMALL, resolution=16).id == local_teacher.id  # drawn at 16 already
    to_32 = LocalPipelineTeacher(sd_dir, sampler=SMALL, resolution=32)
    assert to_32.id == local_teacher.id + "->32px" and pixels(to_32.generate(prompts[:1], seeds[:1]))[0].shape == (32, 32, 3)


def test_local_pipeline_id_follows_settings_and_caches(local_teacher, sd_dir, tmp_path):
    from t2i_evolve.generators import pipeline_id

    assert pipeline_id(LocalPipelineTeacherConfig(path=sd_dir, sampler=SMALL)) == local_teacher.id
    for changed in (SMALL.model_copy(update={"steps": 2}), SMALL.model_copy(update={"guidance": 3.0})):
        assert pipeline_id(LocalPipelineTeacherConfig(path=sd_dir, sampler=changed)) != local_teacher.id
    unguided = [pipeline_id(LocalPipelineTeacherConfig(path=sd_dir, sampler=SMALL.model_copy(update={"guidance": g})))
                for g in (1.0, 0.5, 0.0)]  # (at 1 or below no guidance: the same images, one id)
    assert len(set(unguided)) == 1 and "cfg" not in unguided[0]
    copy = shutil.copytree(sd_dir, tmp_path / "copy")
    copy_id = pipeline_id(LocalPipelineTeacherConfig(path=copy, sampler=SMALL))
    weights = next(copy.rglob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # "retrained"
    assert pipeline_id(LocalPipelineTeacherConfig(path=copy, sampler=SMALL)) != copy_id
    retrained_id, scheduler = pipeline_id(LocalPipelineTeacherConfig(path=copy, sampler=SMALL)), copy / "scheduler"
    config = next(scheduler.glob("*.json"))
    config.write_text(config.read_text().replace('"epsilon"', '"v_prediction"'))  # same weights, other images
    assert pipeline_id(LocalPipelineTeacherConfig(path=copy, sampler=SMALL)) != retrained_id
    by_path = LocalPipelineTeacher(sd_dir, sampler=SMALL, price_per_call=0.5)
    assert by_path.id == local_teacher.id and by_path.price_per_call == 0.5
    with pytest.raises(ConfigError, match="steps"):
        LocalPipelineTeacher(sd_dir, steps=2)
    ledger = Ledger(tmp_path / "run")
    first = CachedGenerator(local_teacher, ledger).generate(["a red circle"], [0])
    again = CachedGenerator(local_teacher, ledger).generate(["a red circle"], [0])
    assert np.array_equal(pixels(first)[0], pixels(again)[0])
    assert [c.attempts for c in ledger.calls(caller=local_teacher.id)] == [1]


def test_a_local_teacher_in_a_recipe_config_draws_as_its_spec_says(sd_dir, tmp_path, capsys):
    """A real SD/SDXL teacher wants guidance and a GPU: the recipe's spec took neither (CPU, float32, no guidance)."""
    from t2i_evolve.cli import main
    from t2i_evolve.recipes.parts import TeacherSpec

    spec = TeacherSpec.from_dict({"kind": "local", "path": str(sd_dir), "sampler": {"steps": 2, "guidance": 5},
                                  "device": "cpu", "dtype": "bfloat16"})
    teacher = spec.build(32)
    assert teacher.id.endswith(":dpm++-2-cfg5:bfloat16")  # (the scheduler left out: the family's, DPM++)
    assert (teacher.sampler.model.device.type, teacher.sampler.model.dtype) == ("cpu", torch.bfloat16)
    assert TeacherSpec.from_dict({"kind": "local", "path": str(sd_dir)}).device == "auto"
    out = tmp_path / "x.png"
    assert main(["sample", str(sd_dir), "a red circle", "--out", str(out), "--steps", "2", "--guidance", "3",
                 "--device", "cpu", "--dtype", "bfloat16"]) == 0 and out.is_file()
    assert main(["sample", str(sd_dir), "a red circle", "--out", str(out), "--dtype", "float8"]) == 2
    assert "unknown dtype 'float8'" in capsys.readouterr().err


def test_trainings_evaluations_draw_with_the_models_familys_usual_settings(sd_dir, tmp_path, monkeypatch):
    """`train`'s `eval_every` draws an SD model as its family usually does (guidance 7.5), not at the shapes model's
    settings, which a real model draws poorly at."""
    from builders import build_teacher_ledger
    from t2i_evolve.cli import main
    from t2i_evolve.eval import scoring
    from t2i_evolve.generators.local_pipeline import FAMILY_SAMPLERS

    asked, real = [], scoring.grammar_evaluator
    monkeypatch.setattr(scoring, "grammar_evaluator", lambda sampler: asked.append(sampler) or real(
        prompts=2, sampler=sampler.model_copy(update={"steps": 1})))  # (one step, two prompts: seconds)
    data = build_teacher_ledger(tmp_path / "data", 8, seed=0)
    assert main(["train", f"model={sd_dir}", f"data={data}", f"output_dir={tmp_path / 'run'}", "steps=1",
                 "batch_size=4", "eval_every=1", "tracker=none"]) == 0
    assert asked == [FAMILY_SAMPLERS["sd"]] and "eval" in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_a_local_teacher_draws_what_its_sampler_leaves_out_with_its_familys_usual_settings(
        sd_dir, sdxl_dir, pixart_dir, sd3_dir, edm_dir, tiny_dir, tmp_path, capsys):
    """No sampler, or one that names steps only: a real family's usual scheduler and guidance for the rest (an SD
    teacher at 20 DDIM steps without guidance drew what no one would buy), the shapes model's own, or for a folder
    diffusers draws, its pipeline's own. The CLI's flags and an evolve config's sampler agree."""
    from t2i_evolve.cli import main
    from t2i_evolve.generators import pipeline_id
    from t2i_evolve.generators.local_pipeline import FAMILY_SAMPLERS, usual_sampler
    from t2i_evolve.recipes.parts import TeacherSpec

    expected = {sd_dir: "sd", sdxl_dir: "sdxl", pixart_dir: "pixart", sd3_dir: "sd3", tiny_dir: "shapes"}
    assert {folder: usual_sampler(folder) for folder in expected} == {f: FAMILY_SAMPLERS[k] for f, k in expected.items()}
    assert usual_sampler(edm_dir) is None and FAMILY_SAMPLERS["sd"].guidance == 7.5
    teacher = TeacherSpec.from_dict({"kind": "local", "path": str(sd_dir), "device": "cpu"}).build(32)
    assert teacher.id.endswith(":dpm++-25-cfg7.5:float32") and teacher.sampler.config == FAMILY_SAMPLERS["sd"]
    assert pipeline_id(LocalPipelineTeacherConfig(path=sd_dir)) == teacher.id  # (the id without building it)
    three = TeacherSpec.from_dict({"kind": "local", "path": str(sd_dir), "sampler": {"steps": 3}}).build(32)
    assert three.id.endswith(":dpm++-3-cfg7.5:float32")  # the steps given, the rest the family's
    full = LocalPipelineTeacher(sd_dir, sampler=SamplerConfig(steps=2), device="cpu")  # a SamplerConfig sets all
    assert full.id.endswith(":ddim-2:float32")
    # `sample` without sampling flags draws as the family's teacher does; a flag given changes that setting alone
    out = tmp_path / "usual.png"
    assert main(["sample", str(sd_dir), "a red circle", "--out", str(out), "--device", "cpu"]) == 0
    assert np.array_equal(pixels([Image.open(out)])[0], pixels(teacher.generate(["a red circle"], [0]))[0])
    assert main(["sample", str(sd_dir), "a red circle", "--out", str(out), "--steps", "3", "--device", "cpu"]) == 0
    assert np.array_equal(pixels([Image.open(out)])[0], pixels(three.generate(["a red circle"], [0]))[0])
    # a folder diffusers draws: its pipeline's own settings but for those given, named so in the id
    own, steps_only = (LocalPipelineTeacher(edm_dir, device="cpu", **extra) for extra in ({}, {"sampler": {"steps": 2}}))
    assert own.id.endswith(":diffusers-own-cfgown:float32") and steps_only.id.endswith(":diffusers-2-cfgown:float32")
    asked = []
    for teacher in (own, steps_only):
        real = teacher.sampler.pipeline
        teacher.sampler.pipeline = lambda *args, real=real, **kwargs: asked.append(kwargs) or real(*args, **kwargs)
    assert len(own.generate(["a red circle"] * 5, list(range(5)))) == 5 and steps_only.generate(["a red circle"], [0])
    assert [len(kwargs["generator"]) for kwargs in asked] == [4, 1, 1]  # (4 at a time under the pipeline's own)
    assert not {"num_inference_steps", "guidance_scale", "height"} & set(asked[0])
    assert asked[-1]["num_inference_steps"] == 2 and "guidance_scale" not in asked[-1]
    capsys.readouterr()
    for flags, message in [(["--scheduler", "dpm++"], "--scheduler: "), (["--guidance", "nan"], "guidance")]:
        assert main(["sample", str(edm_dir), "a red circle", "--out", str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1
