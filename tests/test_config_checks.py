"""Bad model, sampler and endpoint settings fail at load as one line naming the field, not as a traceback later."""

import re
from types import SimpleNamespace

import pytest
from diffusers import DDPMScheduler
from PIL import Image

from t2i_evolve.cli import main
from t2i_evolve.endpoints import EndpointConfig
from t2i_evolve.errors import ConfigError, UserError
from t2i_evolve.models import SamplerConfig, TinyModelConfig, make_scheduler


def run(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"norm_num_groups": 0}, "norm_num_groups"),
        ({"text_heads": 0}, "text_heads"),
        ({"attention_head_dim": 0}, "attention_head_dim"),
        ({"attention_head_dim": 33}, "attention_head_dim"),  # more heads than the 32 channels of an attention block
        ({"block_out_channels": [], "down_block_types": []}, "block_out_channels"),
        ({"down_block_types": ["Bogus", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]}, "down_block_types"),
        ({"down_block_types": ["DownEncoderBlock2D", "DownBlock2D", "DownBlock2D"]}, "down_block_types"),
        ({"beta_schedule": "bogus"}, "beta_schedule"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),  # DDPM has it, the DDIM sampler does not
        ({"block_out_channels": [-16, 32, 64]}, "block_out_channels"),
        ({"resolution": 0}, "resolution"),
        ({"resolution": -32}, "resolution"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"layers_per_block": 0}, "layers_per_block"),
    ],
)
def test_bad_tiny_model_config_is_one_line_naming_the_field(fields, field):
    with pytest.raises(ConfigError, match=field) as info:
        TinyModelConfig.from_dict(fields, source="m.yaml")
    assert "\n" not in str(info.value)


def test_tiny_model_config_accepts_the_real_diffusers_block_names():
    config = TinyModelConfig.from_dict({"down_block_types": ["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D"],
                                        "beta_schedule": "linear", "attention_head_dim": 32})
    assert config.up_block_types == ("CrossAttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert TinyModelConfig().down_block_types[0] == "DownBlock2D"


def test_init_model_refuses_a_bad_config_before_writing(tmp_path, capsys):
    config = tmp_path / "m.yaml"
    config.write_text("resolution: 0\n")
    code, _, err = run(capsys, "init-model", str(tmp_path / "m"), "--config", str(config))
    assert code == 2 and err.count("\n") == 1 and "resolution" in err
    assert not (tmp_path / "m").exists()


def test_sampler_steps_below_one_is_one_line_naming_steps():
    with pytest.raises(ConfigError, match="flags: --steps: ") as info:
        SamplerConfig.from_dict({"steps": 0}, source="flags")
    assert "\n" not in str(info.value)


def test_more_sampling_steps_than_training_timesteps_is_a_user_error():
    model = SimpleNamespace(scheduler=DDPMScheduler(num_train_timesteps=10), device="cpu", is_flow=False)
    with pytest.raises(UserError, match=r"11 sampling steps.*10 timesteps"):
        make_scheduler(model, "ddim", 11)
    for name in ("ddim", "dpm++"):
        assert len(make_scheduler(model, name, 10).timesteps) == 10


def test_cli_sample_with_more_steps_than_training_timesteps_is_one_line(tiny_dir, tmp_path, capsys):
    code, _, err = run(capsys, "sample", str(tiny_dir), "a red circle", "--out", str(tmp_path / "s.png"),
                       "--steps", "1001")
    assert code == 2 and err.count("\n") == 1 and "1001" in err and "1000" in err
    assert not (tmp_path / "s.png").exists()


def test_cli_eval_with_zero_steps_is_one_line_naming_steps(tiny_dir, capsys):
    code, _, err = run(capsys, "eval", str(tiny_dir), "--steps", "0", "--prompts", "1")
    assert code == 2 and err.count("\n") == 1 and "steps" in err and "validation error" not in err
    code, _, err = run(capsys, "eval", str(tiny_dir), "--prompts", "1", "--dtype", "float8")
    assert code == 2 and err.count("\n") == 1 and "unknown dtype 'float8'" in err


BAD_URLS = [
    "http://127.0.0.1:99999/v1",  # port out of range (was an OverflowError deep in the client)
    "http://127.0.0.1:abc/v1",  # port not a number (was httpx.InvalidURL)
    "http://[::1/v1",  # unclosed IPv6 bracket (was ValueError: Invalid IPv6 URL)
    "http://127.0.0.1:0/v1",
    "localhost:8000",
    "ftp://127.0.0.1/v1",
    "http:///v1",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_bad_endpoint_base_url_is_one_line_naming_base_url(url):
    with pytest.raises(ConfigError, match="base_url") as info:
        EndpointConfig.from_dict({"base_url": url, "model": "m"})
    assert "\n" not in str(info.value)


def test_bad_base_url_never_echoes_a_password():
    with pytest.raises(ConfigError) as info:
        EndpointConfig.from_dict({"base_url": "http://user:secret@127.0.0.1:99999/v1", "model": "m"})
    assert "secret" not in str(info.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1", "https://api.example.com/v1", "http://[::1]:8000/v1",
                                 "http://localhost/v1", "http://127.0.0.1:65535/v1"])
def test_good_endpoint_base_urls_are_kept(url):
    assert EndpointConfig.from_dict({"base_url": url, "model": "m"}).base_url == url


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/v1", "http://127.0.0.1:abc/v1"])
def test_cli_judge_with_a_bad_endpoint_port_is_one_line(url, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), "white").save(image)
    code, _, err = run(capsys, "judge", str(image), "--prompt", "a red circle", "--endpoint", url, "--model", "m")
    assert code == 2 and err.count("\n") == 1 and "base_url" in err


def test_a_resumed_run_may_move_its_endpoints_but_not_swap_their_models(tmp_path):
    """Calls are cached and counted under the endpoint's model: another model on a rerun would find none spent,
    and pay its budgets again. Another address, key or patience is the same model reached another way."""
    from t2i_evolve.config import check_resumed_config
    from t2i_evolve.recipes.evolve import RESUMABLE_CHANGES, EvolveConfig

    def config(part: str, **endpoint) -> EvolveConfig:
        spec = {"kind": "openai", "endpoint": {"base_url": "http://127.0.0.1:8000/v1", "model": "m-1"} | endpoint}
        return EvolveConfig.from_dict({part: [spec] if part == "teachers" else spec})

    for part in ("judge", "writer", "teachers"):
        config(part).save(tmp_path / "evolve.yaml")
        moved = config(part, base_url="http://10.0.0.2:9000/v1", api_key_env="KEY", timeout_s=5, max_concurrency=64)
        check_resumed_config(tmp_path / "evolve.yaml", moved, RESUMABLE_CHANGES)
        where = re.escape("teachers[0]" if part == "teachers" else part)
        with pytest.raises(UserError, match=f"another config \\({where}.endpoint.model: 'm-1' -> 'm-2'\\)"):
            check_resumed_config(tmp_path / "evolve.yaml", config(part, model="m-2"), RESUMABLE_CHANGES)
    assert [p.name for p in tmp_path.iterdir()] == ["evolve.yaml"]  # (saved whole, through a temp file)


def test_a_config_this_version_does_not_validate_is_still_compared_on_the_fields_both_know(tmp_path):
    """Such a file (another version's, a field since renamed; or hand-edited) was not compared at all: a rerun under
    another judge or learning rate resumed the run, mixing two runs in one folder."""
    import yaml

    from t2i_evolve.config import check_resumed_config
    from t2i_evolve.recipes.evolve import RESUMABLE_CHANGES, EvolveConfig

    started = EvolveConfig.from_dict({"lr": 3e-4, "rounds": 2})
    saved = yaml.safe_load(started.to_yaml()) | {"renamed_since": 1}
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump(saved))
    check_resumed_config(path, EvolveConfig.from_dict({"lr": 3e-4, "rounds": 5}), RESUMABLE_CHANGES)  # more rounds
    with pytest.raises(UserError, match=r"another config \(lr: 0.0003 -> 0.001\)"):
        check_resumed_config(path, EvolveConfig.from_dict({"lr": 1e-3, "rounds": 2}), RESUMABLE_CHANGES)
    path.write_text("lr: [unclosed\n")
    with pytest.raises(ConfigError, match="bad YAML in .*evolve.yaml .*the config .* was started with: fix it"):
        check_resumed_config(path, started, RESUMABLE_CHANGES)


def test_a_base_cut_short_by_a_kill_is_made_again(tmp_path):
    """Killed while the fresh tiny base was saved (parts, no model_index.json) or before its marker: the rerun
    makes it again rather than refuse a folder it made itself, or reuse one another config made."""
    from t2i_evolve.models import T2IModel, TinyModelConfig
    from t2i_evolve.recipes.parts import base_model_folder

    (tmp_path / "base" / "unet").mkdir(parents=True)
    (tmp_path / "base" / "unet" / "config.json").write_text("{}")
    base = base_model_folder(None, tmp_path, TinyModelConfig(), seed=0)
    assert T2IModel.from_pretrained(base).unet.config.block_out_channels == [16, 32, 64]

    (base / ".made-from.json").unlink()  # killed between the save and the marker, then started with another size
    smaller = TinyModelConfig(block_out_channels=(8, 8, 16))
    base_model_folder(None, tmp_path, smaller, seed=0)
    assert T2IModel.from_pretrained(base).unet.config.block_out_channels == [8, 8, 16]


def test_command_line_overrides_set_fields_as_the_yaml_file_would(tmp_path):
    """`key=value` after a command: a field, one of a nested config (made where the file has none) or of a list's
    item the file gives; values read as YAML. The file is not changed, and what the file does not name keeps its
    default (a nested config written in part, as in the file)."""
    from t2i_evolve.recipes.evolve import EvolveConfig

    path = tmp_path / "evolve.yaml"
    path.write_text("rounds: 3\nteachers:\n  - {kind: gallery, id: strong}\n  - {kind: gallery, id: no-color}\n")
    config = EvolveConfig.load(path, ["lr=1e-5", "teachers.1.p=0.5", "sampler.steps=30", "lora={rank: 4}",
                                      "train_launcher=[torchrun, --standalone]", "max_teacher_calls=null", "rounds=4"])
    assert (config.lr, config.rounds, config.teachers[1].p, config.sampler.steps, config.lora.rank) == (1e-5, 4, 0.5, 30, 4)
    assert config.train_launcher == ["torchrun", "--standalone"] and config.teachers[0] == EvolveConfig().teachers[0]
    assert path.read_text().startswith("rounds: 3\n") and EvolveConfig.load(path).rounds == 3
    assert EvolveConfig.load(None, ["seed=5"]) == EvolveConfig(seed=5)  # no file: over the defaults
    # a nested config the file leaves out is its default but what the override names (the judge's other fields kept)
    default = EvolveConfig().judge.model_copy(update={"reasks": 5})
    assert EvolveConfig.load(None, ["judge.reasks=5", "teachers.0.p=0.7"]).judge == default
    assert EvolveConfig.load(None, ["teachers.0.p=0.7"]).teachers[0].id == "strong"
    assert EvolveConfig.load(None, ["mixed_precision=no"]).mixed_precision == "no"  # (YAML's bare no: false)
    path.write_text("teachers:\n  - {kind: local, path: a, sampler: &s {steps: 10}}\n  - {kind: local, path: b, sampler: *s}\n")
    teachers = EvolveConfig.load(path, ["teachers.0.sampler.steps=30"]).teachers  # an alias is not changed with it
    assert [t.sampler.steps for t in teachers] == [30, 10]
    for text, overrides, message in [("teachers: &t [*t]\n", ["lr=1"], "a value nests too deep, or holds itself"),
                                     ("[]\n", [], "expected a mapping of fields, got list"),
                                     ("[]\n", ["lr=1"], "'lr=1': the config file holds no mapping of fields")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            EvolveConfig.load(path, overrides)


@pytest.mark.parametrize("override, message", [
    ("lr=abc", "'lr=abc' (command line): field 'lr': Input should be a valid number"),
    ("sampler.steps=0", "'sampler.steps=0' (command line): field 'sampler.steps': Input should be greater than"),
    ("nosuch=1", "'nosuch=1' (command line): EvolveConfig has no field 'nosuch'"),
    ("lrr=1", "'lrr=1' (command line): EvolveConfig has no field 'lrr' (did you mean 'lr'?)"),
    ("prompt_file.x.0=1", "'prompt_file.x.0=1' (command line): EvolveConfig has no field 'prompt_file' (did you mean "
                          "'prompts_file'?)"),  # (not "give the whole list": there is none to give)
    ("lr", "'lr': an override is key=value"),
    ("=3", "'=3': an override is key=value"),
    ("teachers.2.p=1", "'teachers.2.p=1': teachers.2: no such item (the list has 2)"),
    ("judge.endpoint.headers.0=x", "'judge.endpoint.headers.0=x': judge.endpoint.headers is not in the config file"),
    ("rounds.x=1", "'rounds.x=1': rounds is 3, which has no fields"),
    ("lora={rank: [}", "'lora={rank: [}': its value is not YAML"),
])
def test_a_bad_override_is_one_line_naming_it_as_typed(tmp_path, capsys, override, message):
    from t2i_evolve.recipes.evolve import EvolveConfig

    path = tmp_path / "evolve.yaml"
    path.write_text("rounds: 3\nteachers:\n  - {kind: gallery, id: strong}\n  - {kind: gallery, id: no-color}\n")
    with pytest.raises(ConfigError) as caught:
        EvolveConfig.load(path, [override])
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert main(["evolve", "--config", str(path), "--out", str(tmp_path / "run"), override]) == 2
    assert capsys.readouterr().err.strip().endswith(str(caught.value)) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, field", [
    ("lr=.inf", "lr"), ("weight_decay=-1", "weight_decay"), ("weight_decay=.nan", "weight_decay"),
    ("max_grad_norm=-5", "max_grad_norm"), ("max_grad_norm=.nan", "max_grad_norm"),
])
def test_training_settings_that_would_train_a_nan_model_are_refused_in_one_line(tmp_path, capsys, override, field):
    """An infinite rate trained to a NaN model and saved it (exit 0); a negative weight decay was torch's traceback."""
    assert main(["train", "model=m", "data=d", f"output_dir={tmp_path / 'out'}", override]) == 2
    err = capsys.readouterr().err
    assert f"field '{field}'" in err and "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("override", ["max_epochs_per_round=.inf", "device=meta", "device=mps"])
def test_evolve_settings_it_cannot_run_are_refused_before_any_call(tmp_path, capsys, override):
    """An infinite epoch cap reached integer maths after the seed images were paid for; a device this torch cannot
    run on failed in its first kernel."""
    assert main(["evolve", "--out", str(tmp_path / "run"), override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and not (tmp_path / "run" / "ledger.sqlite").exists()


def test_an_image_past_pils_size_limit_is_one_line(tmp_path, capsys):
    Image.new("1", (40000, 40000)).save(tmp_path / "bomb.png")
    assert main(["judge", str(tmp_path / "bomb.png"), "--prompt", "two red circles"]) == 2
    err = capsys.readouterr().err
    assert "bomb.png" in err and err.count("\n") == 1


@pytest.mark.parametrize("args", [
    ["gallery", "eval", "--prompts", "100000000000000"], ["gallery", "eval", "--prompts", "abc"],
    ["judge", "x.png", "--prompt", "a red circle", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m",
     "--retries", "100000000000000"],
    ["demo", "train_images=100000000000000"], ["evolve", "seed_prompts=100000000000000"],
    ["evolve", "tiny_model.layers_per_block=100000"], ["evolve", "judge.votes=100000"], ["train", "--bogus"],
    ["ledger", "history", "run"], ["bogus"], ["serve-judge", "--faults", "429,bogus"], ["serve-judge", "--faults", " "],
    ["serve-judge", "--host", " "],
])
def test_a_number_past_any_real_use_or_a_bad_flag_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, args):
    """A typo'd count sat for hours building a list (or retrying a dead endpoint) with nothing shown; a bad flag
    printed typer's usage box; `--faults bogus` was named `--0`; an empty `--host` bound every interface."""
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err and "--0" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_empty_folder_argument_is_refused_not_read_as_this_folder(tmp_path, capsys, monkeypatch):
    """`Path("")` is the current folder: `init-model "$UNSET"` wrote a model into it, `ledger import "$UNSET"` a
    ledger."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    for args in (["init-model", ""], ["ledger", "import", " ", "--from", "src"], ["ledger", "import", "run", "--from", ""],
                 ["ledger", "export", "run", "--to", ""]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "is empty: name a folder" in err and err.count("\n") == 1, err
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_an_empty_judge_endpoint_is_an_error_not_the_pixel_judge(tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    assert main(["judge", str(tmp_path / "x.png"), "--prompt", "a red circle", "--endpoint", "", "--model", "m"]) == 2
    assert "--endpoint is empty" in capsys.readouterr().err


def test_yaml_aliases_that_expand_past_any_real_config_are_one_line(tmp_path):
    """Nine anchors of ten aliases each: a few lines that expand to 10^9 values, which validating (and copying, for
    a KEY=VALUE) took hours over."""
    from t2i_evolve.recipes.evolve import EvolveConfig

    anchors = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(anchors) + "\njudge:\n  endpoint:\n    headers: *a8\n")
    for overrides in ([], ["rounds=2"]):
        with pytest.raises(ConfigError, match="aliases .* expand to over 100,000 values"):
            EvolveConfig.load(bomb, overrides)
    inline = "[" + ", ".join(["&a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]) + "]"  # (the same, as a value typed)
    with pytest.raises(ConfigError, match="'judge.headers=.*aliases .* expand to over 100,000 values"):
        EvolveConfig.load(None, [f"judge.headers={inline}"])
    small = "[&a0 [x, x], [*a0, *a0]]"  # a few aliases: read as YAML reads them
    with pytest.raises(ConfigError, match="field 'judge.headers'"):
        EvolveConfig.load(None, [f"judge.headers={small}"])
