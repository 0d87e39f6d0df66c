"""The `t2i-evolve` command line. Output formats here are contracts that scripts rely on.

Every command defaults to the built-in shapes world, so each one runs offline on a laptop. Bad input
(an unknown word, a missing file, a corrupt image, a bad config) ends with one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .console import named_folder, out, print_json, say
from .errors import UserError, is_disk_full
from .ledger_cli import ledger_app, open_ledger

MAX_EVAL_PROMPTS = 1_000_000  # each one drawn and judged: days on a CPU already
MAX_SEED = 2**32 - 1  # as a config's `Seed`: torch seeds are 64-bit, and seeds are mixed into larger ones

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Improve text-to-image models with automated feedback.")
world_app = typer.Typer(no_args_is_help=True, help="The built-in shapes world.")
gallery_app = typer.Typer(no_args_is_help=True, help="Procedural teachers with named skill deficits.")
app.add_typer(world_app, name="world")
app.add_typer(gallery_app, name="gallery")
app.add_typer(ledger_app, name="ledger")
def overrides_argument(example: str):
    return typer.Argument(None, metavar="KEY=VALUE", show_default=False,
                          help=f"Fields over the config's, as in its YAML: {example}")


def _image_out(path: Path) -> Path:
    """`--out`, checked before any work: its format is read from the file name, its folder made."""
    from PIL import Image

    if path.suffix.lower() not in Image.registered_extensions() or path.is_dir():
        raise UserError(f"--out {path}: name an image file (.png, .jpg, .webp)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@world_app.command("render")
def world_render(
    prompt: str,
    seed: int = typer.Option(0, min=0, max=MAX_SEED,
                             help="Layout seed; the same (prompt, seed) always gives the same image."),
    out_path: Path = typer.Option(..., "--out", help="PNG file to write."),
    resolution: int = typer.Option(32, min=8, max=1024, help="Image side in pixels."),
    teacher: str = typer.Option("strong", help="Gallery teacher that draws it (strong, no-color, ...)."),
):
    """Render a prompt as a PNG."""
    from .world import default_gallery

    teachers = {t.id: t for t in default_gallery(resolution)}
    if teacher not in teachers:
        raise UserError(f"unknown teacher {teacher!r}; choose from {', '.join(teachers)}")
    out_path = _image_out(out_path)
    teachers[teacher].draw(prompt, seed)[0].save(out_path)
    say(f"wrote {out_path}")


@world_app.command("questions")
def world_questions(prompt: str, as_json: bool = typer.Option(False, "--json", help="Print JSON."),
                    writer_config: Optional[Path] = typer.Option(None, "--writer", help="Writer YAML, as evolve.yaml's "
                                                                 "`writer:`: an LLM writes the questions of any prompt.")):
    """Print the prompt's yes/no questions with their skills and parents (DSG style)."""
    from .recipes.parts import WriterSpec
    from .world import GrammarSlice, questions_for

    writer = WriterSpec.from_yaml(writer_config).build(GrammarSlice()) if writer_config else None
    questions = writer.questions(prompt) if hasattr(writer, "questions") else questions_for(prompt)
    if getattr(writer, "failed_requests", 0):
        raise UserError("the writer gave no reply (its endpoint down, or refusing the request): no questions written")
    if as_json:
        print_json([{"question": q.text, "skill": q.skill, "parent": q.parent, "parents": list(q.parents)}
                     for q in questions])
        return
    table = Table("#", "question", "skill", "parents")
    for i, q in enumerate(questions):
        table.add_row(str(i), q.text, q.skill, ", ".join(map(str, q.parents)) or "-")
    out.print(table)


@app.command("judge")
def judge(
    image: Path,
    prompt: str = typer.Option(..., help="The prompt the image should follow."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    endpoint: Optional[str] = typer.Option(None, help="Base URL (ending in /v1) of an OpenAI-compatible VLM "
                                                      "server to judge with; default: the pixel judge."),
    model: Optional[str] = typer.Option(None, help="Model name on --endpoint."),
    api_key_env: Optional[str] = typer.Option(None, help="Env var holding the endpoint's API key."),
    timeout: float = typer.Option(60.0, help="Seconds per request to --endpoint."),
    retries: int = typer.Option(4, min=0, max=100, help="Re-sends after a 429/5xx/timeout from --endpoint."),
    votes: int = typer.Option(1, min=1, max=100, help="Asks to --endpoint, each with its own sampling seed; the majority "
                                      "answer per question wins (needs --temperature > 0)."),
    temperature: float = typer.Option(0.0, help="Sampling temperature of --endpoint's model."),
):
    """Judge an image against a prompt: each question's answer and the DSG score (a VLM at --endpoint judges any
    prompt; outside the shapes grammar it is asked one question about the whole prompt)."""
    from .images import load_image
    from .world import parse

    if endpoint is None:  # the pixel judge reads shapes-world prompts only (a VLM: any, `prompts.questions`)
        parse(prompt)  # a prompt outside the grammar fails before the image is read
    picture = load_image(image)
    if endpoint is None and (votes != 1 or temperature != 0):
        raise UserError("--votes and --temperature are for a sampling VLM at --endpoint; the pixel judge is exact")
    result = _remote_score(picture, prompt, endpoint, model, api_key_env, timeout, retries, votes, temperature) \
        if endpoint is not None else _pixel_score(picture, prompt)
    if as_json:  # ("parent": the first of "parents", for readers of one parent per question)
        print_json(result.to_json())
        return
    table = Table("#", "question", "skill", "parents", "answer")
    for i, a in enumerate(result.answers):
        table.add_row(str(i), a.question.text, a.question.skill, ", ".join(map(str, a.question.parents)) or "-",
                      "[green]yes[/]" if a.answer else "[red]no[/]")
    out.print(table)
    say(f"score: {result.score:.3f}")


def _pixel_score(image, prompt: str):
    from .judges import PixelJudge

    return PixelJudge().score(image, prompt)


def _remote_score(image, prompt: str, endpoint: str, model: Optional[str], api_key_env: Optional[str],
                  timeout: float, retries: int, votes: int = 1, temperature: float = 0.0):
    """The DSG score from an `OpenAIJudge` at --endpoint; every way it can fail is one line (`UserError`)."""
    from urllib.parse import urlsplit

    from .endpoints import base_url_problem
    from .judges import OpenAIJudge, OpenAIJudgeConfig
    from .judges.openai_judge import image_score

    if not endpoint.strip():
        raise UserError("--endpoint is empty: name a URL like http://127.0.0.1:8000/v1 (leave it out: the pixel judge)")
    if model is None:
        raise UserError("--model is required with --endpoint")
    if problem := base_url_problem(endpoint):
        raise UserError(f"bad --endpoint: its base_url {problem}; expected a URL like http://127.0.0.1:8000/v1")
    config = OpenAIJudgeConfig.from_dict(
        {"endpoint": {"base_url": endpoint, "model": model, "api_key_env": api_key_env, "timeout_s": timeout,
                      "retries": retries, "max_concurrency": 1}, "votes": votes, "temperature": temperature},
        source="judge flags")
    with OpenAIJudge(config) as vlm:
        questions = vlm.questions(prompt)
        verdict = vlm.answer_many([(image, prompt, questions)])[0]
    if verdict.status == "failed":
        parts = urlsplit(endpoint)  # (the error names it where the server answered; not where none did)
        host = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        where = "" if "judge endpoint" in verdict.error else f"judge endpoint {host}: "
        raise UserError(f"no answer: {where}{verdict.error} (a timeout, a dropped connection, a 429 or a 5xx is "
                        f"retried {retries} times; a 4xx is not)")
    if verdict.status == "unparseable":
        raise UserError(f"the judge's reply could not be read after {verdict.asks} asks")
    return image_score(questions, verdict.answers)


@app.command("serve-judge")
def serve_judge(
    port: int = typer.Option(8000, help="Port (0: a free one, printed at start)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    error_rate: float = typer.Option(0.0, help="Share of wrong answers (seeded)."),
    fault_rate: float = typer.Option(0.0, help="Share of requests failing with a 429, a 500, a hang or a malformed reply."),
    faults: str = typer.Option("429,500,hang,malformed", help="Which faults --fault-rate draws from."),
    latency: float = typer.Option(0.0, help="Seconds added to every request."),
    hang: float = typer.Option(30.0, "--hang-s", help="Seconds a 'hang' fault holds a request."),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="Seed of errors and faults."),
):
    """Serve the pixel judge as an OpenAI-compatible VLM endpoint (POST /v1/chat/completions)."""
    from typing import get_args

    from .judges.server import Fault, JudgeServer, JudgeServerConfig

    named = [f.strip() for f in faults.split(",") if f.strip()]
    if unknown := [f for f in named if f not in get_args(Fault)]:
        raise UserError(f"--faults: unknown fault {unknown[0]!r}; choose from {', '.join(get_args(Fault))}")
    if not named:
        raise UserError(f"--faults is empty: name one or more of {', '.join(get_args(Fault))}")
    config = JudgeServerConfig.from_dict(
        {"host": host, "port": port, "error_rate": error_rate, "fault_rate": fault_rate, "latency_s": latency,
         "faults": named, "hang_s": hang, "seed": seed},
        source="serve-judge flags")
    try:
        server = JudgeServer(config)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sys.stdout.write(f"serving the pixel judge at {server.url} (Ctrl-C to stop)\n")
    sys.stdout.flush()
    # Stop cleanly on Ctrl-C and on SIGTERM (process managers), also when started in the background,
    # where the shell leaves SIGINT ignored.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    sys.stdout.write(f"stopped after {server.stats()['total']} requests\n")


@gallery_app.command("eval")
def gallery_eval(
    prompts: int = typer.Option(200, max=MAX_EVAL_PROMPTS, help="Number of grammar prompts."),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="Prompt and drawing seed."),
    resolution: int = typer.Option(32, min=8, max=1024),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Draw N grammar prompts with every gallery teacher and judge them per skill."""
    from .eval import evaluate
    from .judges import PixelJudge
    from .progress import progress_bar
    from .world import GrammarPrompts, default_gallery

    if prompts < 1:
        raise UserError("--prompts must be at least 1")
    texts = GrammarPrompts().sample(prompts, seed=seed)
    teachers = default_gallery(resolution)
    judge_ = PixelJudge()
    results = {}
    with progress_bar("judging the gallery", prompts * len(teachers)) as advance:
        for teacher in teachers:
            summary = evaluate(teacher, judge_, texts, seed=seed, progress=advance).summary()
            results[teacher.id] = {"deficit": teacher.deficit, "score": summary["score"], "skills": summary["skills"]}
    if as_json:
        print_json({"teachers": results})
        return
    skills = list(next(iter(results.values()))["skills"])
    table = Table(title=f"{prompts} prompts, pixel judge")
    for name in ("teacher", "deficit", "score", *skills):
        table.add_column(name, no_wrap=True)
    for tid, r in results.items():
        table.add_row(tid, r["deficit"] or "-", f"{r['score']:.3f}", *(f"{r['skills'][s]:.2f}" for s in skills))
    out.print(table)


@app.command("init-model")
def init_model(
    out_dir: Path = typer.Argument(..., parser=named_folder, metavar="OUT_DIR"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="Initialisation seed."),
    config: Optional[Path] = typer.Option(None, help="TinyModelConfig YAML."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what the folder holds (a trained model too)."),
):
    """Write the tiny shapes-world model (random init) as a diffusers-style folder."""
    from .models import TinyModelConfig, init_tiny_model

    cfg = TinyModelConfig.from_yaml(config) if config else TinyModelConfig()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file, not a folder: choose a folder for the model")
    init_tiny_model(out_dir, cfg, seed=seed, overwrite=overwrite)
    say(f"wrote {out_dir}")


@app.command("train")
def train(config: Optional[Path] = typer.Option(None, help="TrainConfig YAML (model, data, output_dir, steps, ...); "
                                                "or its fields as KEY=VALUE."),
          overrides: Optional[list[str]] = overrides_argument("steps=2000 lr=1e-4 'lora={rank: 16}' data=runs/demo")):
    """Denoising fine-tuning on a run's ledger; rerun to resume from the last checkpoint."""
    from .data import claim_run_folder
    from .eval.scoring import grammar_evaluator
    from .generators.local_pipeline import usual_sampler
    from .progress import progress_bar
    from .train import TrainConfig, Trainer, TrainingSet
    from .train.trainer import check_resumable, process_state

    cfg = TrainConfig.load(config, overrides or ())
    config = config or "the command line"  # (what its errors name)
    if cfg.data is None:
        raise UserError(f"{config}: field 'data' must name a run folder with a ledger")
    _check_train_output(config, cfg)
    if Path(cfg.data).suffix == ".json":  # a recipe's round, launched as several processes (`launched_training`;
        data = TrainingSet.load(Path(cfg.data), cfg.max_image_memory_gb)  # the recipe checks its own config)
    else:  # (read, and checked, before any folder is made)
        check_resumable(cfg)
        with open_ledger(Path(cfg.data)) as ledger:
            data = TrainingSet.from_ledger(ledger, max_memory_gb=cfg.max_image_memory_gb)
    main = process_state().is_main_process  # (launched as several processes, they share the folder; one speaks)
    if main:
        claim_run_folder(cfg.output_dir, "train", launched=True)
    # (evaluations draw as the model's family usually does: an SD model at guidance 7.5)
    trainer = Trainer(cfg, data, evaluate=grammar_evaluator(sampler=usual_sampler(cfg.model)) if cfg.eval_every else None)
    with progress_bar("training", trainer.last_step, shown=main, logged=True) as advance:
        drawn = [0]  # (a resumed run's first step moves the bar to where its checkpoint was)

        def on_step(step: int, metrics: dict) -> None:  # (a status, a log's line, where a metrics row is new)
            new = metrics.get("step") == step
            advance(step - drawn[0], status=f"loss {metrics.get('loss', float('nan')):.4f}" if new else None)
            drawn[0] = step
        last = trainer.run(on_step)
    done = f"step {trainer.step}: {json.dumps(last)}" if last else f"at step {trainer.step} already: nothing to train"
    if main:
        say(f"{done}; model in {Path(cfg.output_dir) / 'model'}")


def _check_train_output(config: Path, cfg) -> None:
    """`train` writes checkpoints/, metrics.jsonl and model/ into output_dir: never into (or over) its own data or
    model folder, nor into another command's run folder (whose next run would rewrite that metrics.jsonl), nor over
    files of the user's."""
    from .data import check_run_folder

    out = Path(cfg.output_dir).resolve()
    for field in ("data", "model"):
        source = Path(getattr(cfg, field)).resolve()  # (a folder inside the data's run folder writes over nothing)
        if source == out or field == "model" and out.is_relative_to(source):
            raise UserError(f"{config}: output_dir {cfg.output_dir} is in the {field} folder ({getattr(cfg, field)}): "
                            "name a folder of its own")
        if any(source.is_relative_to(out / name) for name in ("model", "checkpoints")):
            raise UserError(f"{config}: the {field} folder ({getattr(cfg, field)}) is where training writes "
                            f"{source.relative_to(out).parts[0]}/ in output_dir {cfg.output_dir}: name another output_dir")
    # the user's own config kept in output_dir: train saves it as it read it, with the command line's KEY=VALUE
    given = ("config.yaml",) if isinstance(config, Path) and config.resolve() == out / "config.yaml" else ()
    try:
        check_run_folder(cfg.output_dir, "train", given)  # (its own: a resume)
    except UserError as e:
        raise UserError(f"{config}: output_dir {e}") from None


@app.command("sample")
def sample(
    model: Path,
    prompt: str,
    out_path: Path = typer.Option(..., "--out", help="PNG file to write."),
    seed: int = typer.Option(0, min=0, max=MAX_SEED),
    steps: Optional[int] = typer.Option(None, help="Sampling steps (default: the family's usual)."),
    scheduler: Optional[str] = typer.Option(None, help="ddim or dpm++ (default: the family's usual)."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale, 1 = off (default: the "
                                             "family's usual: SD 7.5, SDXL 5, PixArt 4.5, SD3 7, the shapes model 1; "
                                             "Flux-dev: the scale it reads, 3.5)."),
    device: str = typer.Option("auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 (a GPU's)."),
):
    """Draw one image of a prompt with a model folder (Playground, Kandinsky...: with diffusers' own pipeline for it)."""
    from .generators import LocalPipelineTeacher
    from .generators.local_pipeline import folder_family

    cfg = _sampler_flags(model, scheduler=scheduler, steps=steps, guidance=guidance)
    out_path = _image_out(out_path)
    teacher = LocalPipelineTeacher(model, sampler=cfg, device=device, dtype=dtype)
    teacher.generate([prompt], [seed])[0].save(out_path)
    say(f"wrote {out_path}")
    tokenizer = getattr(getattr(teacher.sampler, "model", None), "tokenizer", None)
    if folder_family(model) == "shapes" and tokenizer is not None:  # (its vocabulary: the grammar's words, no more)
        words = [word for word, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(prompt.lower())]
        unknown = [w for w in words if tokenizer.convert_tokens_to_ids(w) == tokenizer.unk_token_id and w.isalpha()]
        if unknown := list(dict.fromkeys(unknown)):
            say(f"note: the shapes-world model knows only its grammar's words, not {', '.join(map(repr, unknown))}: "
                "drawn as if they were not there")


@app.command("eval")
def eval_model(
    model: Path,
    prompts: int = typer.Option(128, max=MAX_EVAL_PROMPTS, help="Held-out grammar prompts."),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="Prompt seed."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps (default: the family's usual)."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale, 1 = off (default: the "
                                             "family's usual)."),
    device: str = typer.Option("auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 (a GPU's)."),
    prompts_file: Optional[Path] = typer.Option(None, help="Your prompts, one per line, each drawn once, instead of "
                                                "grammar prompts (outside the shapes grammar: with --judge)."),
    judge_config: Optional[Path] = typer.Option(None, "--judge", help="Judge YAML, as evolve.yaml's `judge:` (kind: "
                                                "openai, endpoint: ...): its DSG score; default: the pixel judge."),
    writer_config: Optional[Path] = typer.Option(None, "--writer", help="Writer YAML, as evolve.yaml's `writer:`: an "
                                                 "LLM writing each prompt's questions for --judge."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Judge a model on held-out prompts (shapes-world ones, or yours with a VLM): overall and per-skill scores."""
    from .eval import evaluate
    from .eval.held_out import HeldOutScore
    from .generators import LocalPipelineTeacher
    from .judges import PixelJudge
    from .progress import progress_bar
    from .prompts.sets import read_prompt_file, refuse_open_prompts
    from .recipes.parts import JudgeSpec, WriterSpec
    from .world import GrammarPrompts, GrammarSlice

    if prompts < 1:
        raise UserError("--prompts must be at least 1")
    texts = read_prompt_file(prompts_file) if prompts_file else GrammarPrompts().sample(prompts, seed=seed)
    judge_spec = JudgeSpec.from_yaml(judge_config) if judge_config else JudgeSpec()
    if judge_spec.kind == "pixel":
        refuse_open_prompts(texts, str(prompts_file), "the pixel judge reads", "--judge with a VLM (kind: openai)")
    if writer_config and judge_spec.kind == "pixel":
        raise UserError("--writer writes questions for a VLM judge: pass --judge (kind: openai) too")
    writer_spec = WriterSpec.from_yaml(writer_config) if writer_config else None
    for spec in (judge_spec, writer_spec):  # every key in the environment before the model is loaded and drawn
        if spec is not None and spec.kind == "openai" and spec.endpoint is not None:
            spec.endpoint.api_key()
    writer = writer_spec.build(GrammarSlice()) if writer_spec else None
    judge = None if judge_spec.kind == "pixel" else judge_spec.build(None, None, getattr(writer, "questions", None))
    config = _sampler_flags(model, steps=steps, guidance=guidance)
    sampler = LocalPipelineTeacher(model, sampler=config, device=device, dtype=dtype)  # (Playground...: its pipeline)
    if judge is None:
        with progress_bar("judging", len(texts)) as advance:
            summary = evaluate(sampler, PixelJudge(), texts, seed=seed, progress=advance).summary()
        result = {"score": summary["score"], "skills": summary["skills"], "asked": summary["asked"]}  # (0 asked: 0.0)
    else:  # a VLM: its DSG score (`held_out_metric: vqa`), questions from the writer where there is one
        result = HeldOutScore(texts, "vqa", judge=judge, seed=seed).score(sampler, 0) | {"judge": judge.id}
        if "unscored" in result:
            raise UserError(f"no score: {result['unscored'].removeprefix('held-out prompts: ')} (judge {judge.id}: is "
                            "its endpoint up? `t2i-evolve judge IMAGE --endpoint ...` names the error)")
        if getattr(writer, "failed_requests", 0):
            say(f"note: the writer gave no questions for {writer.failed_requests} prompts; the judge asked one question "
                "about each whole prompt instead")
    if as_json:
        print_json(result)
        return
    from .eval.report import skill_cell

    table = Table("skill", "score")
    table.add_row("overall", f"{result['score']:.3f}")
    for skill in result.get("skills", {}):
        table.add_row(skill, skill_cell(result, skill))
    out.print(table)


def _sampler_flags(model: Path, **flags):
    """The sampling flags given (`FamilySampler`: those left out are the model family's usual, or for a folder
    diffusers' pipeline draws, that pipeline's own; `--scheduler` is our sampler's alone)."""
    from .generators.local_pipeline import FamilySampler, folder_family

    given = FamilySampler.from_dict({name: value for name, value in flags.items() if value is not None}, source="flags")
    if given.scheduler is not None and folder_family(model) is None:
        raise UserError(f"--scheduler: {model} is drawn by its diffusers pipeline, with its own scheduler; leave it out")
    return given


@app.command("demo")
def demo(
    out_dir: Optional[str] = typer.Option(None, "--out", help="Run folder (rerun to resume; default: the config's, "
                                          "else runs/demo)."),
    minutes: Optional[float] = typer.Option(None, help="Wall-clock budget of the whole demo (default: the config's, "
                                            "else 9.5)."),
    config: Optional[Path] = typer.Option(None, help="DemoConfig YAML (flags override it)."),
    as_json: bool = typer.Option(False, "--json", help="Print summary.json on stdout."),
    overrides: Optional[list[str]] = overrides_argument("lr=1e-3 train_images=4000 sampler.steps=20"),
):
    """Train the tiny model on strong-teacher data and judge it before and after (shapes world)."""
    from .demo import DemoConfig, run_demo, short_training_note
    from .eval.report import skill_cell

    base = DemoConfig.load(config, overrides or ())
    flags = {"output_dir": out_dir, "minutes": minutes}
    cfg = base.updated("demo flags", **{name: value for name, value in flags.items() if value is not None})
    summary = run_demo(cfg)
    note = short_training_note(summary, cfg.minutes)  # on stderr, last: what to do about a busy machine
    if as_json:
        print_json(summary)
        if note:
            print(note, file=sys.stderr)
        return
    table = Table(title=f"held-out judge score ({summary['eval_prompts']} prompts, slice {summary['slice']})")
    for name in ("", "before", "after"):
        table.add_column(name, no_wrap=True)
    table.add_row("score", f"{summary['before']['score']:.3f}", f"{summary['after']['score']:.3f}")
    for skill in summary["before"]["skills"]:
        table.add_row(skill, skill_cell(summary["before"], skill), skill_cell(summary["after"], skill))
    geneval = summary["after"].get("geneval") or {}
    for task, value in geneval.get("tasks", {}).items():
        table.add_row(f"GenEval {task}", "", f"{value:.3f}")
    if geneval:
        table.add_row("GenEval overall", "", f"{geneval['overall']:.3f}")
    out.print(table)
    say(f"{summary['train_steps']} steps on {summary['train_images']} teacher images in "
        f"{summary['wall_s'] / 60:.1f} min; report: {Path(cfg.output_dir) / 'report.html'}")
    if note:
        print(note, file=sys.stderr)


@app.command("evolve")
def evolve(
    config: Path = typer.Option(None, help="EvolveConfig YAML; default: the shapes world on a CPU."),
    output_dir: Optional[str] = typer.Option(None, "--out", help="Run folder (overrides the config's output_dir)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    overrides: Optional[list[str]] = overrides_argument("lr=1e-5 rounds=10 sampler.steps=30 teachers.0.p=0.7"),
):
    """EvolveDirector: train on teacher images while a judge deletes, expands and mutates the set."""
    from .recipes.evolve import EvolveConfig, run_evolve
    from .eval.report import round_line

    cfg = EvolveConfig.load(config, overrides or ())
    if output_dir is not None:
        cfg = cfg.updated("evolve flags", output_dir=output_dir)
    summary = run_evolve(cfg)
    if as_json:
        print_json({k: v for k, v in summary.items() if k != "ledger"})
        return
    for row in summary["rounds"]:
        say(f"round {row['round']}: {round_line(row)}")
    if summary["stopped"]:
        say(f"stopped early: {summary['stopped']}")
    say(f"run folder {cfg.output_dir} (report.html, summary.json, ledger)")


USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
"""click's (typer >= 0.22 carries its own copy of click: found through the class typer exports)."""
NO_ARGS_IS_HELP = getattr(sys.modules[USAGE_ERROR.__module__], "NoArgsIsHelpError", ())


def main(argv: list[str] | None = None) -> int:
    """Entry point: usage errors and user errors become one line, exit 2."""
    from pydantic import ValidationError

    from .allocator import keep_freed_memory
    from .data.claim import give_back_unused_folders
    from .data.ledger import damaged_ledger

    keep_freed_memory()  # (a step's freed buffers kept for the next: about 1.08x on a CPU; allocator.py)
    try:
        code = app(args=argv, prog_name="t2i-evolve", standalone_mode=False)
        if code == 130:  # typer's answer to Ctrl-C (a KeyboardInterrupt never reaches the clause below)
            sys.stderr.write("interrupted: rerun the same command to resume (train, evolve and demo go on from their "
                             "last checkpoint; one Ctrl-C in training saves one where it stopped)\n")
        return code if isinstance(code, int) else 0
    except NO_ARGS_IS_HELP as e:  # a bare `t2i-evolve` (or group): its help, as typer shows it
        from typer.rich_utils import rich_format_error

        rich_format_error(e)
        return e.exit_code
    except USAGE_ERROR as e:  # a bad flag or value: one line, as every other error (not typer's box)
        where = e.ctx.command_path if e.ctx else "t2i-evolve"
        sys.stderr.write(f"error: {e.format_message().splitlines()[0].rstrip('.')} (see `{where} --help`)\n")
        return e.exit_code
    except typer.Abort as e:  # typer's answer to an EOFError (torch.load of an empty file: "Ran out of input")
        cause = e.__cause__
        sys.stderr.write(f"error: {cause or 'aborted'}{f' ({type(cause).__name__})' if cause else ''}\n")
        return 1
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except (UserError, ValidationError) as e:
        sys.stderr.write(f"error: {str(e).splitlines()[0]}\n")
        give_back_unused_folders()  # (one it made for a run, refused before it wrote anything there)
        return 2
    except Exception as e:
        if is_disk_full(e):  # what was written is kept (files are renamed into place, the ledger is SQLite)
            sys.stderr.write(f"error: the disk is full ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                             "free some space and rerun the same command; it resumes where it stopped\n")
            return 2
        if (ledger := damaged_ledger(e)) is not None:
            json_error = isinstance(e, json.JSONDecodeError) or "malformed JSON" in str(e)
            what = "a row's JSON does not parse" if json_error else str(e).splitlines()[0]
            sys.stderr.write(f"error: {ledger} is damaged ({what}): restore its run folder from a "
                             "backup (sqlite3's `.recover` saves what is still readable)\n")
            return 2
        if not isinstance(e, OSError):
            raise
        # a path that cannot be written or read: a file where a folder should be, no permission
        sys.stderr.write(f"error: {_path_problem(e)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    return 0


def _path_problem(e: OSError) -> str:
    """An OSError about a path, said as what is wrong with it ("[Errno 17] File exists: 'x'" did not say)."""
    if e.filename and (isinstance(e, NotADirectoryError) or isinstance(e, FileExistsError) and Path(e.filename).is_file()):
        return f"{e.filename}: a file stands where a folder is needed (in that path): choose another path"
    if isinstance(e, PermissionError) and e.filename:
        return f"{e.filename}: no permission to write or read it"
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
