import json

import pytest

from t2i_evolve.cli import main
from t2i_evolve.config import Config
from t2i_evolve.errors import ConfigError
from t2i_evolve.world import TeacherConfig

PROMPT = "two red circles left of a blue square"


def run(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_render_then_judge_json(tmp_path, capsys):
    image = tmp_path / "x.png"
    assert run(capsys, "world", "render", PROMPT, "--seed", "0", "--out", str(image))[0] == 0
    code, out, _ = run(capsys, "judge", str(image), "--prompt", PROMPT, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["score"] == 1.0
    assert set(data["answers"][0]) == {"question", "skill", "parent", "parents", "answer"}
    assert data["answers"][0]["parent"] is None and data["answers"][2]["parent"] == 0
    assert data["answers"][2]["parents"] == [0, 1]  # "Is there a red circle?" (binding): the shape's and the color's
    code, out, _ = run(capsys, "judge", str(image), "--prompt", "three green stars", "--json")
    assert json.loads(out)["score"] == 0.0


@pytest.mark.parametrize("folder", ["exp[lr=1e-3]", "[/x]", "lr:100:", "a" * 90])
def test_a_path_is_printed_as_it_is_on_one_line(folder, tmp_path, capsys):
    """Brackets are common in experiment names: a path is never read as rich markup (which dropped
    `[lr=1e-3]` from it, and raised on `[/x]` after the work was done), nor wrapped when stdout is piped."""
    image = tmp_path / folder / "x.png"
    code, out, err = run(capsys, "world", "render", PROMPT, "--out", str(image))
    assert code == 0 and image.is_file() and err == ""
    assert out == f"wrote {image}\n"


def test_world_questions(capsys):
    code, out, _ = run(capsys, "world", "questions", PROMPT, "--json")
    assert code == 0
    rows = json.loads(out)
    assert {r["skill"] for r in rows} == {"shape", "color", "binding", "count", "spatial"}
    code, out, _ = run(capsys, "world", "questions", PROMPT)
    assert "Are the red circles left of the blue square?" in out


def test_gallery_eval_json_contract(capsys):
    code, out, _ = run(capsys, "gallery", "eval", "--prompts", "40", "--seed", "3", "--json")
    assert code == 0
    teachers = json.loads(out)["teachers"]
    assert teachers["strong"]["deficit"] is None
    assert teachers["no-count"]["deficit"] == "count"
    assert teachers["no-count"]["skills"]["count"] < teachers["strong"]["skills"]["count"]
    assert all(set(t) == {"deficit", "score", "skills"} for t in teachers.values())


@pytest.mark.parametrize(
    "args, message",
    [
        (["world", "questions", "two purple circles"], "'purple'"),
        (["judge", "missing.png", "--prompt", "a red circle"], "image not found"),
        (["world", "render", PROMPT, "--out", "x.png", "--teacher", "nobody"], "unknown teacher"),
        (["ledger", "stats", "no-such-run"], "no ledger"),
        (["gallery", "eval", "--prompts", "0"], "at least 1"),
        (["world", "render", PROMPT, "--out", "no-extension"], "name an image file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *args)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_corrupt_png_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really")
    code, _, err = run(capsys, "judge", str(bad), "--prompt", "a red circle")
    assert code == 2 and err.startswith("error: cannot read image")


def test_an_image_too_small_to_segment_is_one_line(tmp_path, capsys):
    """A 6-pixel scene with a blob in it raised deep in the segmenter's set-up (its renders of shapes vanish)."""
    from PIL import Image, ImageDraw

    tiny = Image.new("RGB", (6, 6), "white")
    ImageDraw.Draw(tiny).rectangle([1, 1, 4, 4], fill="red")
    tiny.save(tmp_path / "d6.png")
    code, _, err = run(capsys, "judge", str(tmp_path / "d6.png"), "--prompt", "a red circle")
    assert code == 2 and err == "error: a 6x6 image: the pixel judge reads scenes of at least 8 px a side\n"
    (tmp_path / "tiny.yaml").write_text("resolution: 4\n")
    code, _, err = run(capsys, "init-model", str(tmp_path / "m"), "--config", str(tmp_path / "tiny.yaml"))
    assert code == 2 and "resolution" in err and not (tmp_path / "m").exists()


def test_usage_errors_exit_2(capsys):
    assert run(capsys, "world", "render")[0] == 2


def test_config_from_yaml_names_the_bad_field(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("id: no-color\ndeficit: color\np: 0.5\n")
    assert TeacherConfig.from_yaml(good).p == 0.5
    (tmp_path / "typo.yaml").write_text("id: x\ndefficit: color\n")
    with pytest.raises(ConfigError, match="field 'defficit'"):
        TeacherConfig.from_yaml(tmp_path / "typo.yaml")
    (tmp_path / "type.yaml").write_text("id: x\ndeficit: colour\n")
    with pytest.raises(ConfigError, match="field 'deficit'"):
        TeacherConfig.from_yaml(tmp_path / "type.yaml")
    (tmp_path / "broken.yaml").write_text("id: [unclosed\n")
    with pytest.raises(ConfigError, match="bad YAML"):
        TeacherConfig.from_yaml(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="not found"):
        Config.from_yaml(tmp_path / "nope.yaml")


def test_evolve_with_a_missing_base_model_says_so_in_one_line(tmp_path, capsys):
    config = tmp_path / "evolve.yaml"
    config.write_text(f"base_model: {tmp_path / 'nope'}\nrounds: 1\n")
    code, out, err = run(capsys, "evolve", "--config", str(config), "--out", str(tmp_path / "run"))
    assert code == 2 and "base_model" in err and "model_index.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nope").exists()  # not silently filled with a fresh model


def test_evolve_on_a_device_this_machine_lacks_says_so_before_any_work(tmp_path, capsys):
    config = tmp_path / "evolve.yaml"
    config.write_text("device: gpu\nrounds: 1\n")
    code, out, err = run(capsys, "evolve", "--config", str(config), "--out", str(tmp_path / "run"))
    assert code == 2 and "unknown device 'gpu'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_bad_paths_and_configs_are_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """A file where a folder should be, a config that is not UTF-8 or is a folder, a grammar slice with no
    scenes in it, a negative seed: each ends with exit 2 and no traceback, before anything is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.png").write_bytes(b"")
    (tmp_path / "latin1.yaml").write_bytes("rounds: 1  # \xe9t\xe9\n".encode("latin-1"))
    (tmp_path / "no-scenes.yaml").write_text("min_groups: 3\nmax_groups: 2\n")
    (tmp_path / "twice.yaml").write_text("rounds: 2\nrounds: 3\n")
    (tmp_path / "demo.yaml").write_text("output_dir: file.png\ntrain_images: 1\neval_prompts: 1\nminutes: 0.01\n")
    for args, message in [
        (["world", "render", PROMPT, "--out", "file.png/x.png"], "file.png: a file stands where a folder is needed"),
        (["init-model", "file.png/model"], "file.png/model: a file stands where a folder is needed"),
        (["judge", ".", "--prompt", PROMPT], ". is a folder, not an image"),
        (["evolve", "--config", "twice.yaml"], "(line 2): the key 'rounds' is given twice"),
        (["sample", "m", PROMPT, "--out", "x.png", "--steps", "0"], "flags: --steps: Input should be greater"),
        (["init-model", "file.png"], "file.png is a file, not a folder"),
        (["evolve", "--out", "file.png"], "file.png is a file, not a folder"),
        (["demo", "--out", "file.png"], "file.png is a file, not a folder"),
        (["demo", "--config", "demo.yaml"], "file.png is a file, not a folder"),  # (the file's output_dir)
        (["demo", "output_dir=file.png", "train_images=1", "minutes=0.01"], "file.png is a file, not a folder"),
        (["evolve", "mixed_precision=fp8"], "'mixed_precision=fp8' (command line): field 'mixed_precision'"),
        (["train", "steps=3"], "the command line: field 'model': Field required"),  # (no file: fields as KEY=VALUE)
        (["evolve", "--config", "latin1.yaml"], "not UTF-8 text"),
        (["evolve", "--config", str(tmp_path)], "is a folder, not a config file"),
        (["evolve", "--config", "no-scenes.yaml", "--out", "run"], "min_groups <= max_groups"),
        (["evolve", "--out", "run", "teachers=[{kind: gallery, id: strnog}]"], "unknown gallery teacher 'strnog'"),
        (["evolve", "--out", "run", "teachers=[{kind: local}]"], "a teacher of kind 'local' needs a path"),
    ]:
        code, _, err = run(capsys, *args)
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)
    code, _, err = run(capsys, "gallery", "eval", "--prompts", "1", "--seed", "-3")
    assert code == 2 and "--seed" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # (no ledger, no base model made before the teachers were checked)


def test_a_command_refused_after_it_made_its_run_folder_takes_the_folder_back(tmp_path, capsys, monkeypatch):
    """`train` claims its output folder, then finds no model: the folder it made goes (a `.lock` alone was left); a
    folder the user made stays, as does one the command was refused in after it wrote something there."""
    from PIL import Image

    from t2i_evolve.data import Ledger

    monkeypatch.chdir(tmp_path)
    with Ledger(tmp_path / "data") as ledger:
        ledger.add_record(prompt="a red circle", generator="import", image=Image.new("RGB", (32, 32)), op="import")
    (tmp_path / "mine").mkdir()
    for out in ("new/run", "mine"):
        code, _, err = run(capsys, "train", "model=nowhere", "data=data", f"output_dir={out}", "steps=1")
        assert code == 2 and "model folder not found: nowhere" in err
    assert not (tmp_path / "new" / "run").exists() and (tmp_path / "mine").is_dir()


def test_an_empty_path_is_refused_and_a_tilde_is_home(tmp_path, capsys, monkeypatch):
    """An empty --out or output_dir was the current folder (a run wrote its ledger, report and summary among the
    user's files); `~/x` in a YAML file was a folder named '~'."""
    monkeypatch.chdir(tmp_path)
    for args in (["evolve", "--out", ""], ["demo", "--out", " "]):
        code, _, err = run(capsys, *args)
        assert code == 2 and "flags: --out: is empty" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    from t2i_evolve.recipes.evolve import EvolveConfig

    config = EvolveConfig.from_dict({"output_dir": "~/runs/a", "base_model": "~/models/b"})
    assert (config.output_dir, config.base_model) == (f"{tmp_path}/home/runs/a", f"{tmp_path}/home/models/b")


def test_train_writes_into_no_folder_of_its_inputs_nor_of_another_command(tiny_dir, tmp_path, capsys):
    from PIL import Image

    from t2i_evolve.data import Ledger

    with Ledger(tmp_path / "data") as ledger:
        ledger.add_record(prompt="a red circle", generator="import", image=Image.new("RGB", (32, 32)), op="import")
    (tmp_path / "evolve-run").mkdir()
    (tmp_path / "evolve-run" / "evolve.yaml").write_text("{}\n")
    mine = tmp_path / "mine"  # a folder of the user's: their own metrics and another tool's config.yaml
    mine.mkdir()
    (mine / "metrics.jsonl").write_text('{"mine": 1}\n')
    (mine / "config.yaml").write_text("lr: 0.1\n")
    for output_dir, message in [(tmp_path / "data", "is in the data folder"),
                                (tiny_dir, "is in the model folder"),
                                (tiny_dir / "out", "is in the model folder"),
                                (tiny_dir.parent, f"is where training writes {tiny_dir.name}/ in output_dir"),
                                (tmp_path / "evolve-run", "is an evolve run's folder: choose a new output folder"),
                                (mine, "holds config.yaml, metrics.jsonl that no train run made")]:
        (tmp_path / "train.yaml").write_text(f"model: {tiny_dir}\ndata: {tmp_path / 'data'}\noutput_dir: {output_dir}\n")
        code, _, err = run(capsys, "train", "--config", str(tmp_path / "train.yaml"))
        assert code == 2 and message in err and err.count("\n") == 1, (output_dir, err)
    assert sorted(p.name for p in (tmp_path / "evolve-run").iterdir()) == ["evolve.yaml"]
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert (mine / "metrics.jsonl").read_text() == '{"mine": 1}\n' and (mine / "config.yaml").read_text() == "lr: 0.1\n"
    assert not (tiny_dir / "out").exists()
    own = tmp_path / "own"  # a user's train config kept in its output folder, without the `steps` a saved one has
    own.mkdir()
    (own / "config.yaml").write_text(f"model: {tiny_dir}\ndata: {tmp_path / 'data'}\noutput_dir: {own}\nbatch_size: 1\n")
    code, _, err = run(capsys, "train", "--config", str(own / "config.yaml"), "steps=1")
    assert code == 0 and (own / "model" / "model_index.json").is_file(), err
    demo_like = tmp_path / "demo-like"  # a demo's folder holds its trainer's config.yaml: given it, still a demo's
    demo_like.mkdir()
    (demo_like / "demo.yaml").write_text("{}\n")
    (demo_like / "config.yaml").write_text((own / "config.yaml").read_text().replace(str(own), str(demo_like)))
    code, _, err = run(capsys, "train", "--config", str(demo_like / "config.yaml"))
    assert code == 2 and "is a demo run's folder" in err, err


def test_evolve_and_demo_write_over_no_file_of_the_users(tmp_path, capsys):
    """A folder without a run's marker that holds a report.html or a summary.json: a new run would replace them."""
    for command, taken in [("evolve", "summary.json"), ("evolve", "prompts.txt"), ("demo", "report.html"),
                           ("demo", "config.yaml")]:
        folder = tmp_path / command / taken
        folder.mkdir(parents=True)
        (folder / taken).write_text("the user's own\n")
        code, _, err = run(capsys, command, "--out", str(folder))
        assert code == 2 and f"holds {taken} that no {command} run made" in err and err.count("\n") == 1, err
        assert [p.name for p in folder.iterdir()] == [taken] and (folder / taken).read_text() == "the user's own\n"


def test_an_end_of_input_deep_in_a_library_is_one_line(tmp_path, capsys, monkeypatch):
    """typer turns an EOFError (torch.load of an empty file: "Ran out of input") into its Abort: a traceback here."""
    import t2i_evolve.world

    def cut_short(resolution):
        raise EOFError("Ran out of input")

    monkeypatch.setattr(t2i_evolve.world, "default_gallery", cut_short)
    code, out, err = run(capsys, "world", "render", PROMPT, "--out", str(tmp_path / "x.png"))
    assert (code, out, err.lstrip("\n")) == (1, "", "error: Ran out of input (EOFError)\n")  # (after typer's newline)


def test_ctrl_c_is_one_line_saying_how_to_resume(tmp_path, capsys, monkeypatch):
    """Typer turns Ctrl-C into exit code 130 and nothing else: the user was left with a blank line."""
    import t2i_evolve.world

    def interrupted(resolution):
        raise KeyboardInterrupt

    monkeypatch.setattr(t2i_evolve.world, "default_gallery", interrupted)
    code, out, err = run(capsys, "world", "render", PROMPT, "--out", str(tmp_path / "x.png"))
    assert code == 130 and out == "" and err.startswith("interrupted: rerun the same command to resume")
    assert err.count("\n") == 1


def test_a_progress_bar_writes_nothing_to_a_log_file(capsys):
    """Off a terminal a bar is no help, and rich left a blank line where it stood (two lines for one error)."""
    from t2i_evolve.progress import progress_bar

    with progress_bar("rounds", 3) as advance:
        for _ in range(3):
            advance(1, status="score 0.5")
    assert capsys.readouterr().err == ""


def test_init_model_over_a_model_is_refused_unless_told_to_overwrite(tmp_path, capsys):
    """The refusal named an `overwrite` the command had no flag for."""
    weights = tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"
    assert run(capsys, "init-model", str(tmp_path / "m"))[0] == 0
    first = weights.read_bytes()
    code, _, err = run(capsys, "init-model", str(tmp_path / "m"), "--seed", "1")
    assert code == 2 and "`init-model --overwrite`" in err and weights.read_bytes() == first
    assert run(capsys, "init-model", str(tmp_path / "m"), "--seed", "1", "--overwrite")[0] == 0
    assert weights.read_bytes() != first


def test_images_of_another_size_are_named_by_a_prompt_and_no_folder_is_made(tiny_dir, tmp_path, capsys):
    from PIL import Image

    from t2i_evolve.data import Ledger

    with Ledger(tmp_path / "data") as ledger:
        for i in range(3):
            ledger.add_record(prompt=f"a red circle {i}", generator="import", image=Image.new("RGB", (32, 32)), op="import")
        ledger.add_record(prompt="a wide one", generator="import", image=Image.new("RGB", (64, 48)), op="import")
    (tmp_path / "train.yaml").write_text(f"model: {tiny_dir}\ndata: {tmp_path / 'data'}\noutput_dir: {tmp_path / 'out'}\n")
    code, _, err = run(capsys, "train", "--config", str(tmp_path / "train.yaml"))
    assert code == 2 and "3 at 32x32, 1 at 64x48 (e.g. 'a wide one'); resize them" in err
    assert not (tmp_path / "out").exists()
