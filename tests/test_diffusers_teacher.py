"""A local teacher drawn by diffusers' own pipeline class for its folder (`runner: diffusers`; by default for a family
`T2IModel` does not read, such as an EDM-scheduled SDXL like Playground v2.5, or Flux): deterministic per (prompt,
seed), cached under an id that names the runner, usable in a recipe and by `t2i-evolve sample` and `eval`; a folder
naming code of its own is refused, never run. SD3 here is drawn both ways."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from t2i_evolve.data import Ledger
from t2i_evolve.errors import UserError
from t2i_evolve.generators import LocalPipelineTeacher
from t2i_evolve.generators.local_pipeline import _library_part
from t2i_evolve.models import SamplerConfig

PROMPTS = ["a red circle", "two blue squares left of a green star", "a yellow triangle"]
DRAW = SamplerConfig(steps=2, guidance=3.0, batch_size=3)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def sd3_teacher(sd3_dir) -> LocalPipelineTeacher:
    return LocalPipelineTeacher(sd3_dir, sampler=DRAW, device="cpu", runner="diffusers")


def test_an_sd3_folder_is_drawn_by_its_diffusers_pipeline_per_prompt_and_seed(sd3_teacher, sd3_dir):
    assert sd3_teacher.config.runner == "diffusers"
    assert type(sd3_teacher.sampler.pipeline).__name__ == "StableDiffusion3Pipeline"
    assert sd3_teacher.id.endswith(":diffusers-2-cfg3:float32") and str(sd3_dir.resolve()) in sd3_teacher.id
    images = sd3_teacher.generate(PROMPTS, [0, 1, 2])
    assert [image.size for image in images] == [(32, 32)] * 3  # the pipeline's own size: 16 latents x 2
    again = sd3_teacher.generate(PROMPTS, [0, 1, 2])
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(images, again))
    alone = sd3_teacher.generate(PROMPTS[1:2], [1])[0]  # another batch: the same image (to float rounding)
    assert np.abs(pixels(alone) - pixels(images[1])).max() <= 1
    assert np.abs(pixels(sd3_teacher.generate(PROMPTS[:1], [1])[0]) - pixels(alone)).max() > 2  # the prompt counts
    assert np.abs(pixels(sd3_teacher.generate(PROMPTS[1:2], [7])[0]) - pixels(alone)).max() > 2  # and the seed


def test_its_images_are_resized_to_the_recipes_side_and_its_id_says_how(sd3_dir):
    resized = LocalPipelineTeacher(sd3_dir, sampler=DRAW, device="cpu", resolution=16, runner="diffusers")
    assert resized.id.endswith("->16px") and resized.generate(PROMPTS[:1], [0])[0].size == (16, 16)
    drawn_small = LocalPipelineTeacher(sd3_dir, sampler=DRAW.model_copy(update={"resolution": 16}), resolution=16,
                                       runner="diffusers")
    assert drawn_small.id.endswith("-16px:float32") and drawn_small.generate(PROMPTS[:1], [0])[0].size == (16, 16)


def test_the_runner_is_ours_where_we_read_the_folder_and_can_be_named(sd_dir, sd3_dir, edm_dir):
    for folder, drawn in ((sd_dir, ":ddim-1:"), (sd3_dir, ":flow-euler-1:")):  # (SD3: Euler, whatever it says)
        ours = LocalPipelineTeacher(folder, sampler=SamplerConfig(steps=1))
        assert ours.config.runner == "t2i-evolve" and drawn in ours.id
    theirs = LocalPipelineTeacher(sd_dir, sampler=SamplerConfig(steps=1), runner="diffusers")
    assert ":diffusers-1:" in theirs.id and type(theirs.sampler.pipeline).__name__ == "StableDiffusionPipeline"
    assert theirs.generate(PROMPTS[:1], [0])[0].size == (32, 32)
    edm = LocalPipelineTeacher(edm_dir, sampler=SamplerConfig(steps=2))
    assert edm.config.runner == "diffusers" and type(edm.sampler.pipeline.scheduler).__name__.startswith("EDM")
    with pytest.raises(UserError, match="a EDMDPMSolverMultistepScheduler noise schedule is not supported yet"):
        LocalPipelineTeacher(edm_dir, runner="t2i-evolve")


def test_a_folder_naming_code_of_its_own_or_pickles_is_refused_in_one_line(sd3_dir, tmp_path):
    def copy_with(name: str, **index_changes):
        folder = shutil.copytree(sd3_dir, tmp_path / name)
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps(index | index_changes))
        return folder

    with pytest.raises(UserError, match="names no diffusers pipeline \\(\\['pipeline', 'MyPipeline'\\]\\)"):
        LocalPipelineTeacher(copy_with("custom", _class_name=["pipeline", "MyPipeline"]), runner="diffusers")
    with pytest.raises(UserError, match="part 'transformer' comes from 'my_models'; only diffusers and transformers"):
        LocalPipelineTeacher(copy_with("foreign", transformer=["my_models", "MyTransformer"]), runner="diffusers")
    code = copy_with("code")
    (code / "transformer" / "diffusers.py").write_text("raise SystemExit('ran')\n")  # (older diffusers import it)
    with pytest.raises(UserError, match="holds Python code \\(transformer/diffusers.py\\)"):
        LocalPipelineTeacher(code, runner="diffusers")
    assert _library_part("stable_diffusion") and not _library_part("my_models")  # (SD's safety checker's module)
    pickled = copy_with("pickled")
    for weights in (pickled / "transformer").glob("*.safetensors"):
        weights.rename(weights.with_name("diffusion_pytorch_model.bin"))
    with pytest.raises(UserError, match="cannot load as StableDiffusion3Pipeline: .* \\(weights are read from "
                                        "\\.safetensors only\\)"):
        LocalPipelineTeacher(pickled, runner="diffusers")


def test_settings_its_pipeline_refuses_are_one_line(sd3_dir):
    teacher = LocalPipelineTeacher(sd3_dir, sampler=DRAW.model_copy(update={"resolution": 10}), runner="diffusers")
    with pytest.raises(UserError, match="\\(StableDiffusion3Pipeline\\) cannot draw: .*divisible"):
        teacher.generate(PROMPTS[:1], [0])


def test_a_teacher_only_diffusers_draws_in_a_recipe_and_in_the_cli(edm_dir, tmp_path, capsys):
    from evolve_worker import small_config
    from t2i_evolve.cli import main
    from t2i_evolve.recipes.evolve import run_evolve

    teacher = {"kind": "local", "path": str(edm_dir), "sampler": {"steps": 2, "guidance": 3.0}, "device": "cpu"}
    summary = run_evolve(small_config(str(tmp_path / "run"), teachers=[teacher], rounds=1, seed_prompts=6,
                                      eval_prompts=4, steps_per_round=2))
    assert summary["teacher_calls"] >= 6
    with Ledger(tmp_path / "run") as ledger:
        drawn_by = {record.generator for record in ledger.records()}
    assert len(drawn_by) == 1 and ":diffusers-2-cfg3:" in drawn_by.pop()

    out = tmp_path / "x.png"
    assert main(["sample", str(edm_dir), "a red circle", "--out", str(out), "--steps", "2", "--guidance", "3",
                 "--device", "cpu"]) == 0 and out.is_file()
    assert main(["sample", str(tmp_path), "a red circle", "--out", str(out)]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert main(["eval", str(edm_dir), "--prompts", "3", "--steps", "2", "--guidance", "3", "--device", "cpu",
                 "--json"]) == 0  # (which teacher to pay for: scored before a run)
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= scored["score"] <= 1 and sum(scored["asked"].values()) > 0


def test_offload_draws_the_same_images_under_the_same_id(sd_dir):
    """`offload` only moves weights (on a GPU: there while drawing, in CPU memory between draws): the images and the
    cache id are those without it, for both runners. (This machine has no GPU: here it is where the weights already
    are.)"""
    from t2i_evolve.recipes.parts import TeacherSpec

    for runner in ("t2i-evolve", "diffusers"):
        plain = LocalPipelineTeacher(sd_dir, sampler=SamplerConfig(steps=2), runner=runner)
        offloaded = LocalPipelineTeacher(sd_dir, sampler=SamplerConfig(steps=2), runner=runner, offload=True)
        assert offloaded.id == plain.id
        pairs = zip(plain.generate(PROMPTS[:2], [0, 1]), offloaded.generate(PROMPTS[:2], [0, 1]))
        assert all(np.array_equal(pixels(a), pixels(b)) for a, b in pairs), runner
    spec = TeacherSpec.from_dict({"kind": "local", "path": str(sd_dir), "offload": True, "device": "cpu"})
    assert spec.build(32).config.offload
