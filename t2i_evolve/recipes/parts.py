"""Config specs that build the shared parts a recipe uses: teachers, a judge, a prompt writer.

A recipe's YAML names its parts by kind; the shapes world is every kind's default, so a recipe runs
offline with no fields set, and pointing it at real models is a change of kind plus an endpoint:

    teachers: [{kind: gallery, id: strong}]                       # procedural shapes teachers
    teachers: [{kind: openai, endpoint: {base_url: ..., model: ..., api_key_env: IMAGES_KEY}}]
    judge: {kind: openai, endpoint: {base_url: http://127.0.0.1:8000/v1, model: Qwen/Qwen2-VL-7B-Instruct}}
    writer: {kind: openai, endpoint: {...}}

Remote parts are imported on demand, so the shapes world never needs their dependencies.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
from pydantic import Field, ValidationError, model_validator

from ..config import Config, PathText
from ..data import CachedGenerator, CachedJudge, CallBudget, CallBudgets, Ledger, release_run_folder
from ..data.budgets import every_request_failed
from ..endpoints import HOW_TO_REACH, EndpointConfig, check_serves
from ..errors import BudgetExhausted, ConfigError, UserError
from ..eval.report import write_json, write_jsonl, write_rounds_report
from ..files import read_json, write_atomically
from ..judges.evidence import unseen_variation_scores
from ..generators.local_pipeline import FAMILY_SAMPLERS, FamilySampler, folder_family
from ..models import SamplerConfig, TinyModelConfig, init_tiny_model
from ..prompts.sets import open_prompts, prompt_split, refuse_open_prompts, set_prompts
from ..protocols import Generator, PromptWriter
from ..train import Seed, TrainingSet
from ..train.prior import judged_base_images
from ..world.sampling import GrammarSlice
from ..world.teachers import gallery_teacher


class TeacherSpec(Config):
    """One teacher. `gallery`: a procedural shapes teacher (`id` strong, no-<skill> or several joined by '+',
    each at `p`); `openai`: an OpenAI-compatible images endpoint; `local`: a diffusers pipeline folder at `path`."""

    kind: Literal["gallery", "openai", "local"] = "gallery"
    id: str = "strong"
    p: float | None = None
    blind_to: list[str] = []  # gallery: the color/shape words its deficit applies to (empty: all)
    endpoint: EndpointConfig | None = None
    path: PathText | None = None
    price_per_call: float | None = None
    sampler: FamilySampler = FamilySampler()  # local: how it draws; what it leaves out, its family's usual
    device: str = "auto"  # local: where it draws (auto: a GPU when there is one)
    dtype: str = "float32"  # local: e.g. float16 on a GPU
    runner: Literal["auto", "t2i-evolve", "diffusers"] = "auto"  # local: diffusers' own pipeline draws Playground, ...
    offload: bool = False  # local: on the GPU only while drawing (big teachers beside a base in training)

    @model_validator(mode="before")
    @classmethod
    def _sampler_is_a_local_teachers(cls, data):
        """Only a local teacher samples: another's `sampler` (older versions wrote one for all) is dropped (resumes)."""
        other = isinstance(data, dict) and data.get("kind") != "local"
        return {k: v for k, v in data.items() if k != "sampler"} if other else data

    @model_validator(mode="after")
    def _what_its_kind_needs(self):
        """Checked as the config loads, so a mistake stops a run before its folder and base model are made."""
        if self.kind == "gallery":  # (an unknown id, blind_to words its deficits are not about)
            gallery_teacher(self.id, 32, self.p, self.price_per_call, self.blind_to)
        elif self.kind == "openai" and self.endpoint is None or self.kind == "local" and self.path is None:
            raise ValueError(f"a teacher of kind {self.kind!r} needs {'an endpoint' if self.kind == 'openai' else 'a path'}")
        return self

    def build(self, resolution: int = 32) -> Generator:
        if self.kind == "gallery":
            return gallery_teacher(self.id, resolution, self.p, self.price_per_call, self.blind_to)
        if self.kind == "openai":
            from ..generators import OpenAIImageTeacher, OpenAIImageTeacherConfig

            extra = {} if self.price_per_call is None else {"price_per_call": self.price_per_call}
            return OpenAIImageTeacher(OpenAIImageTeacherConfig(endpoint=self.endpoint, resolution=resolution, **extra))
        from ..generators import LocalPipelineTeacher

        return LocalPipelineTeacher(self.path, price_per_call=self.price_per_call or 0.0, resolution=resolution,
                                    sampler=self.sampler, device=self.device, dtype=self.dtype, runner=self.runner,
                                    offload=self.offload)


ENDPOINT_ADDRESSES = {"judge": {"endpoint": HOW_TO_REACH}, "writer": {"endpoint": HOW_TO_REACH},
                      "teachers": {"__all__": {"endpoint": HOW_TO_REACH}}}
"""What a rerun may change in the specs below (a pydantic `exclude`): how their endpoints are reached."""


def base_model_folder(base_model: str | None, out: Path, tiny_model: TinyModelConfig, seed: int) -> Path:
    """The model folder a recipe improves: `base_model`, or (none named) a fresh tiny shapes model made once
    in `out/base`, so a rerun after a crash goes on from the same random init."""
    base = named_base(base_model) or out / "base"
    made_from, marker = {"tiny_model": tiny_model.model_dump(mode="json"), "seed": seed}, base / ".made-from.json"
    if not base_model and (read_json(marker) != made_from or not (base / "model_index.json").is_file()):
        # None yet; or made by a start that then failed a check, from another config (a run that spent calls has
        # had its config compared already); or cut short by a kill: made again (the same seed, the same weights).
        shutil.rmtree(base, ignore_errors=True)
        init_tiny_model(base, tiny_model, seed=seed)
        write_atomically(marker, json.dumps(made_from))  # last: it vouches for a whole folder
    return base


SHAPES_BASE_SAMPLER = SamplerConfig(steps=10)  # a shapes base judged: 10 DDIM steps, as its benchmarks measured


def base_sampling(config) -> SamplerConfig:
    """How an evolve run draws its base: the `sampler` fields given over its family's usual (as a local teacher's:
    an SD base at guidance 7.5, not a tiny model's settings it would be judged poorly at)."""
    family = folder_family(base) if (base := named_base(config.base_model)) else "shapes"
    return config.sampler.over(SHAPES_BASE_SAMPLER if family in (None, "shapes") else FAMILY_SAMPLERS[family])


def named_base(base_model: str | None) -> Path | None:
    """The folder `base_model` names (None: none), or one line if it is no model folder (before a config check)."""
    if base_model and not (Path(base_model) / "model_index.json").is_file():
        raise UserError(f"base_model {base_model} is not a model folder (no model_index.json)")
    return Path(base_model) if base_model else None


class JudgeSpec(Config):
    """The judge. `pixel`: the exact shapes-world judge; `openai`: a VLM behind an OpenAI-compatible
    server (vLLM, a hosted API, or `t2i-evolve serve-judge`)."""

    kind: Literal["pixel", "openai"] = "pixel"
    endpoint: EndpointConfig | None = None
    reasks: int = 2
    seed: Seed = 0
    votes: int = Field(1, ge=1, le=100, description="openai: asks per verdict, the majority wins (needs temperature "
                                            "> 0); see OpenAIJudgeConfig.")
    temperature: float | None = 0.0

    def build(self, ledger: Ledger, budget: CallBudget | None = None, questions: Callable | None = None):
        """`questions(prompt)`: what a VLM asks about an image of a prompt (an LLM writer's; default
        `prompts.questions.prompt_questions`)."""
        if self.kind == "pixel":
            if self.votes > 1:
                raise ConfigError("judge: votes are for a sampling VLM (kind: openai); the pixel judge is exact")
            from ..judges import PixelJudge

            return CachedJudge(PixelJudge(), ledger, budget=budget, backoff_s=0.0)
        from ..judges import OpenAIJudge, OpenAIJudgeConfig

        if self.endpoint is None:
            raise ConfigError("judge of kind 'openai' needs an endpoint")
        try:
            config = OpenAIJudgeConfig(endpoint=self.endpoint, reasks=self.reasks, seed=self.seed, votes=self.votes,
                                       temperature=self.temperature,
                                       max_calls=None if budget is None else budget.max_calls)
        except ValidationError as e:  # e.g. votes without sampling: one line
            raise ConfigError(f"judge: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        return OpenAIJudge(config, ledger=ledger, questions=questions)


class WriterSpec(Config):
    """The prompt writer (expand and mutate). `grammar`: the shapes grammar, offline; `openai`: an LLM."""

    kind: Literal["grammar", "openai"] = "grammar"
    endpoint: EndpointConfig | None = None
    keep: list[Literal["color", "shape"]] = Field(
        default_factory=list, description="grammar: what a variation keeps of each group besides the structure "
        "(color, shape), as an LLM told to keep the concept the base missed would; empty: both are redrawn.")
    settings: dict = Field(default_factory=dict, description="openai: OpenAIPromptWriterConfig's other fields "
                           "(temperature, max_questions, templates, price_per_call, ...).")

    def build(self, grammar: GrammarSlice, ledger: Ledger | None = None) -> PromptWriter:
        if self.kind == "grammar":
            from ..prompts import GrammarPromptWriter

            if self.settings:
                raise ConfigError("writer.settings are for an LLM writer (kind: openai)")
            return GrammarPromptWriter(grammar, keep=self.keep)
        if self.keep:
            raise ConfigError("writer.keep is for the grammar writer; an LLM writer is told what to keep in its prompt")
        from ..prompts import OpenAIPromptWriter, OpenAIPromptWriterConfig

        if self.endpoint is None:
            raise ConfigError("writer of kind 'openai' needs an endpoint")
        return OpenAIPromptWriter(OpenAIPromptWriterConfig.from_dict({**self.settings, "endpoint": self.endpoint},
                                                                     source="writer"), ledger=ledger)


def check_parts_serve(config, judge) -> None:
    """A one-line error, before any call, for a setting of `config` this judge cannot serve, and for an endpoint
    (judge, writer, teacher) that does not answer or does not serve its model (`check_serves`)."""
    scoring = [name for name in ("min_teacher_score", "min_unseen_score") if getattr(config, name) is not None]
    for name in scoring + ["prior_images"] * bool(getattr(config, "prior_images", 0)):
        if not callable(getattr(judge, "score", None)):
            raise UserError(f"{name} needs a judge that scores one image (VQA); this one only compares")
    if getattr(config, "tournament", "all") == "until_pass" and config.min_teacher_score is None:
        raise UserError("tournament: until_pass stops at the first image that passes the gate: set min_teacher_score")
    confirm = getattr(config, "confirm_votes", None)
    if confirm and not getattr(judge, "samples", False):
        raise UserError("confirm_votes needs a judge that samples (kind: openai, temperature > 0); this one answers alike")
    if confirm and confirm <= getattr(judge, "votes", 1):
        raise UserError(f"confirm_votes ({confirm}) asks again: more than the judge's own votes ({judge.votes})")
    for name, part in [("judge", config.judge), ("writer", config.writer), *(
            (f"teachers.{i}", teacher) for i, teacher in enumerate(config.teachers))]:
        if part.kind == "openai" and part.endpoint is not None:
            check_serves(part.endpoint, name)


def run_prompts(config, given: Sequence[object]) -> tuple[list[str], list[str] | None]:
    """A run's (held-out prompts, the pool its sets draw from: `prompt_split`). Prompts outside the shapes grammar
    (a `prompts_file` of real-world prompts) need parts that read any prompt: a VLM judge, teachers that draw any
    prompt, an LLM writer; one line naming the part, before any call. `given`: the (teachers, judge, writer) passed
    in place of the config's (None: built from it)."""
    if config.prompts_file is not None and config.rare_words:
        raise ConfigError("rare_words weighs grammar prompts: with a prompts_file, the file's mix is the set's mix")
    held_out, pool = prompt_split(config)
    if not (others := open_prompts(held_out + (pool or []))):  # (the shapes world: parsed once, nothing to refuse)
        return held_out, pool
    teachers, judge, writer = given
    unfit = [("the pixel judge reads", "judge kind openai (a VLM)", judge is None and config.judge.kind == "pixel"),
             ("gallery teachers draw", "teachers of kind openai or local",
              teachers is None and any(spec.kind == "gallery" for spec in config.teachers)),
             ("the grammar writer varies", "writer kind openai (an LLM)",
              writer is None and config.evolve and config.writer.kind == "grammar"),
             ("held_out_metric pixel scores", "win_rate", config.held_out_metric == "pixel")]
    for part, instead, applies in unfit:
        if applies:
            refuse_open_prompts(others, "prompts_file", part, instead)
    return held_out, pool


def check_api_keys(config) -> None:
    """Every endpoint's API key is in the environment before any work, not found missing after round 1 trained."""
    for part in [config.judge, config.writer, *config.teachers]:
        if part.kind == "openai" and part.endpoint is not None:
            part.endpoint.api_key()  # a ConfigError naming the variable


def judge_call_bounds(config, teachers: int, judge) -> tuple[int, int]:
    """The most judge calls (a) a prompt the tournament draws and (b) a judged record in its round may cost:
    gate scores per image and a comparison per challenger; the verdict (to `confirm_votes`) and the deletion
    check, each on up to `base_draws` images of the base, then its expansions or its mutation; each asked
    the judge's `votes` times (requests per verdict; 1 without). A round is sized by these, so
    `max_judge_calls` holds. `config` is an `EvolveConfig`."""
    votes = getattr(judge, "votes", 1)

    def per_draw(drawn: int) -> int:
        compared = drawn - 1 if config.tournament == "all" else 0
        return (drawn * (config.min_teacher_score is not None) + compared) * votes

    verdicts = max(votes, config.confirm_votes or 0) * (1 + (config.min_unseen_score is not None)) * config.base_draws
    expand_or_mutate = max(config.variations * per_draw(1), per_draw(teachers) * (config.mutate_rate > 0))
    return per_draw(teachers), verdicts + expand_or_mutate


def prior_images(run, base: Callable[[], object]) -> TrainingSet | None:
    """`prior_images`: the base's own images that the judge passed (`judged_base_images`), once per run; None: off."""
    c, seed = run.config, stable_seed(run.config.seed, "prior")
    if not c.prior_images:
        return None
    prompts = set_prompts(c, run.pool, c.prior_images, seed, run.held_out)
    seeds = c.seed_prompts if run.pool is None else min(c.seed_prompts, len(run.pool))  # (a prompts_file: its rest)
    seed_set = seeds * run.calls_per_seed_draw + run.scorer.judge_calls  # asked first (`seed_set`): its worst case
    run.spent.check_judge_room(seed_set + len(prompts) * getattr(run.judge, "votes", 1), "the prior images")
    return judged_base_images(run.out / "prior", base, run.judge, prompts, occurrence_seeds(seed, prompts),
                              c.min_prior_score, 0 if c.train_launcher else c.max_image_memory_gb)  # (files: launched)


def unseen_checks(run, r: int, base, records) -> list[tuple[str, float | None] | None]:
    """The deletion check's evidence per record of round `r` (`unseen_variation_scores`); all None when it is off."""
    c = run.config
    if c.min_unseen_score is None or not records:
        return [None] * len(records)
    run.judge.round = r
    seen = set(run.ledger.prompts(before_round=r))  # drawn before (a rerun: as then)
    return unseen_variation_scores(run.writer, run.judge, base, [rec.prompt for rec in records],
                                   [stable_seed(c.seed, r, rec.id, "unseen") for rec in records], seen,
                                   c.min_unseen_score, c.confirm_votes, c.base_draws)


def stable_seed(*parts: object) -> int:
    """A seed that depends only on `parts` (not on Python's hash salt or on call order)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def occurrence_seeds(seed: int, prompts: Sequence[str]) -> list[int]:
    """A seed per prompt; each repeat of a prompt gets another seed (another image, not a copy)."""
    seen: dict[str, int] = {}
    seeds = []
    for prompt in prompts:
        seen[prompt] = seen.get(prompt, -1) + 1
        seeds.append(stable_seed(seed, prompt, seen[prompt]))
    return seeds


def cached_teachers(teachers: Sequence[Generator], ledger: Ledger, max_calls: int | None = None,
                    max_price: float | None = None) -> dict[str, CachedGenerator]:
    """Each teacher behind the ledger's call cache, by id, the caps shared by all of them. The recipe sizes
    each batch to fit (`CallBudgets`); the shared cap is what keeps retries within it."""
    ids = [t.id for t in teachers]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"teacher ids must differ, got {ids}")
    budget = CallBudget(max_calls=max_calls, max_price=max_price, callers=tuple(ids))
    return {t.id: CachedGenerator(t, ledger, batch_size=64, backoff_s=0.05, budget=budget) for t in teachers}


def sampled_records(ledger: Ledger, r: int, share: float, all_below: int, seed: int) -> list:
    """The records the judge looks at in round `r`: a seeded `share` of those active when it began (all of them
    while there are `all_below` or fewer; records it deleted itself still count, so a rerun picks the same)."""
    pool = [rec for rec in ledger.records(None) if rec.round < r and rec.image_path
            and (rec.status == "active" or rec.deleted_round == r)]
    if len(pool) <= all_below:
        return pool
    picked = np.random.default_rng(stable_seed(seed, r, "sample")).choice(len(pool), size=math.ceil(share * len(pool)),
                                                                          replace=False)
    return [pool[i] for i in sorted(picked)]


def new_prompt_seeds(seed: int, prompts: Sequence[str], parents: Sequence, round: int) -> list[int]:
    """Seeds of a round's new prompts (expanded, mutated): a prompt already in the set gets a new image, not a copy."""
    return [stable_seed(seed, prompt, round, parent) for prompt, parent in zip(prompts, parents)]


def check_seed_set(seeds: list, spent: CallBudgets, min_teacher_score: float | None) -> list:
    """A seed set of no image is no run: say why in one line (a spent budget stops cleanly, and a rerun with more
    goes on; a teacher that failed every draw, or a gate that rejected all, needs a fix first). Returns `seeds`."""
    if not seeds and spent.teacher_budget_spent():  # (on `win_rate`'s references: kept for that rerun)
        raise BudgetExhausted(f"teacher budget spent before a seed image: {spent.teacher_calls()} calls")
    if not seeds and spent.teacher_calls():  # every draw failed: a server down or refusing all, not a run
        raise every_request_failed(spent.ledger, spent.teachers, 0, "the teachers drew none of the seed prompts")
    if seeds and all(rec.deleted_op == "reject" for rec in seeds):
        raise UserError(f"the judge rejected all {len(seeds)} seed images (min_teacher_score {min_teacher_score:g}): "
                        "lower it, or use a better teacher")
    return seeds


def check_rounds_kept(rounds_dir: Path, rounds: int, ledger: Ledger) -> None:
    """A rerun may add rounds, not drop started ones: their records and ops are in the ledger for good, and a
    summary of fewer rounds would report a model that is not the one the ledger was evolved with (ops, no start: a
    round `judge_first` stopped at a budget, judged but not trained)."""
    started = max([int(p.parent.name) for p in rounds_dir.glob("[0-9][0-9][0-9]/start.json")]
                  + [row["round"] for row in ledger.stats()["ops"]], default=0)
    if rounds < started:
        raise UserError(f"{rounds_dir.parent} has started {started} rounds: rerun it with rounds >= {started} (its "
                        "ledger holds their changes), or set a new output_dir")


def ops_so_far(ledger: Ledger, round: int) -> dict:
    """`{"ops": counts}` of the operations of `round` the ledger holds (a round stopped part-way, at a budget), named
    as a finished round's ("judged" for the ledger's "judge"); `{}` when it holds none (it stopped before any)."""
    counts: dict[str, int] = {}
    for op in ledger.ops(round=round):
        name = "judged" if op.op == "judge" else op.op
        counts[name] = counts.get(name, 0) + 1
    return {"ops": counts} if counts else {}


def write_summary(run, rounds: list[dict], stopped: str | None, base: Path, load_sampler) -> dict:
    """An evolve run's `summary.json` and `report.html`: its rounds, what it spent, why it stopped. A run stopped
    before its last round is scored on held-out prompts here if its last round was not (`eval_every_round`)."""
    out, config, spent, held_out = run.out, run.config, run.spent, run.scorer.prompts
    if rounds and held_out and "score" not in rounds[-1]:
        last = rounds[-1]["round"]
        rounds[-1] |= run.scorer.score(load_sampler(out / "rounds" / f"{last:03d}" / "model"), last, spent)
        write_jsonl(out / "metrics.jsonl", rounds)
    summary = {"rounds": rounds, "final_score": rounds[-1].get("score") if rounds else None,
               "held_out_metric": run.scorer.metric,  # what the scores are: pixel, win_rate or vqa
               "teacher_calls": spent.teacher_calls(), "judge_calls": spent.judge_calls(),
               "teacher_price": round(spent.teacher_price(), 9), "stopped": stopped, "ledger": run.ledger.stats()}
    if stopped and (partial := ops_so_far(run.ledger, len(rounds) + 1)):  # judged, not trained (`judge_first`)
        summary["unfinished_round"] = {"round": len(rounds) + 1, **partial}
    write_json(out / "summary.json", summary)
    write_rounds_report(out, "t2i-evolve evolve", summary, list(dict.fromkeys(held_out)), base,
                        out / "rounds" / f"{len(rounds):03d}" / "model", base_sampling(config), config.device,
                        ops=("judged", "delete", "expand", "mutate") + tuple(  # gate, check, second opinion: if on
                            op for op in ("reject", "memorized", "overturned", "redrawn", "over_judge_budget")
                            if any(op in row.get("ops", {}) for row in rounds)))
    run.ledger.close()  # (opened by `run_evolve`)
    release_run_folder(out)  # done: claimed by `run_evolve`, so no other process ran in it meanwhile
    return summary
