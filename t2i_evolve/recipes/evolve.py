"""Recipe `evolve`: EvolveDirector (arXiv 2410.07133). A judge keeps evaluating the base model against
its teachers and evolves the training set, so the base learns from far fewer teacher images.

    seed prompts -> teacher images (several teachers: the judge's tournament picks one per prompt; with
                    `min_teacher_score` it rejects wrong images, and `until_pass` asks the teachers in turn)
    for each round:
        train the base on the active records (`replay_share`: some deleted ones; `prior_share`: its own, judged)
        sample the base on a share of the active prompts; the judge compares base vs teacher:
            base as good as the teacher -> delete the record (no more training compute on it) and, at
                                           `mutate_rate`, add a prompt of a new structure (`min_unseen_score`:
                                           only if the base draws a fresh variation too; else expand)
            teacher better              -> expand: `variations` new prompts like it, drawn by its teacher
                                           (`confirm_votes`: only if more votes agree, for both expansions;
                                           `base_draws`: only if the base loses on fresh draws too)
        score the base on held-out prompts (the exact pixel judge; other prompts: the judge, base vs teacher)
    (`judge_first`: each round judges and evolves the set before it trains, round 1 on the base itself)

Every change is a ledger row with its round, parent and reason. Teacher and judge calls go through the ledger's
call cache, and every decision is seeded by (seed, round, record), so a run killed at any point and started again
with the same command pays for no answered call twice and ends with the same ledger. `evolve: false`: uniform data.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ..config import MAX_PROMPTS, PathText, check_resumed_config
from ..data import CallBudget, CallBudgets, Ledger, check_run_folder, claim_run_folder
from ..data.budgets import every_request_failed
from ..generators.draws import draw_by_teacher, tournament
from ..generators.local_pipeline import FamilySampler
from ..errors import BudgetExhausted, UserError
from ..eval.held_out import HeldOutScore, Metric
from ..eval.report import log_round_scalars, round_line, write_json, write_jsonl
from ..judges import QualityGate, compare_pairs
from ..judges.evidence import AT_A_TIME, base_vs_teacher
from ..models import Sampler, T2IModel, TinyModelConfig, resolve_device
from ..progress import progress_bar
from ..prompts import least_seen_new_structure, prime_writer, word_counts
from ..prompts.sets import PromptKeys, keep_prompts_copy, set_prompts
from ..train import RoundTraining, Seed, TrainingSet, evolving_set, mirror_prompt, replayable_records, train_round
from ..world import COLORS, SHAPES, GrammarSlice, scene_or_none, scene_skills
from .parts import (JudgeSpec, TeacherSpec, WriterSpec, base_model_folder, cached_teachers, check_api_keys,
                    check_parts_serve, check_rounds_kept, check_seed_set, judge_call_bounds, new_prompt_seeds,
                    occurrence_seeds, ops_so_far, prior_images, run_prompts, unseen_checks, base_sampling,
                    sampled_records, stable_seed, write_summary, ENDPOINT_ADDRESSES)


class EvolveConfig(RoundTraining):
    """EvolveDirector's loop. Defaults: the shapes world on a CPU (paper's values in the comments). The training
    settings (batch_size, lr, ...) are `RoundTraining`'s; the paper's for PixArt-alpha: lr 2e-5, warmup_steps 1000,
    ema_decay 0.9999."""

    output_dir: PathText = "runs/evolve"
    base_model: PathText | None = Field(None, description="Model folder to improve; none: a fresh tiny shapes model.")
    tiny_model: TinyModelConfig = TinyModelConfig()
    min_groups: int = 1
    max_groups: int = 2
    max_count: int = Field(3, ge=1, le=3)
    p_size: float = Field(0.0, ge=0, le=1)
    seed_prompts: int = Field(100, ge=1, le=MAX_PROMPTS, description="Random grammar prompts the set starts from.")
    rare_words: list[Literal[tuple(COLORS) + SHAPES]] = Field(default_factory=list, description="Users' long tail: "
        "seed prompts naming these are kept at rare_weight odds (writer and held-out prompts weigh words alike).")
    rare_weight: float = Field(1.0, ge=0, le=1)
    prompts_file: PathText | None = Field(None, description="Your prompts, one per line: eval_prompts of them (a seeded "
        "pick) are held out, the seed set is seed_prompts of the rest. None: the shapes grammar's slice, above.")
    teachers: list[TeacherSpec] = Field(default_factory=lambda: [TeacherSpec()], min_length=1)
    judge: JudgeSpec = JudgeSpec()
    writer: WriterSpec = WriterSpec()
    evolve: bool = Field(True, description="False: train on the seed set only (the uniform baseline).")
    rounds: int = Field(6, ge=1)
    judge_first: bool = Field(False, description="Each round judges the model it starts from (round 1: the base, not "
        "what it just memorized), evolves the set, then trains, so every image bought is trained on (with a teacher "
        "budget, set train_past_teacher_budget). False: train, then judge (the paper).")
    steps_per_round: int = Field(150, ge=1)
    max_epochs_per_round: float | None = Field(None, gt=0, allow_inf_nan=False, description="A round trains at most "
        "this many passes over the active records, over all processes (None: steps_per_round), so a set that "
        "deletions shrank is not overtrained and forgotten.")
    replay_share: float = Field(0.0, ge=0, lt=1, description="Share of each round's training on deleted records (paper: "
        "0): a set that deletions keep small is overtrained, and the base forgets what the deleted records taught.")
    prior_images: int = Field(0, ge=0, le=MAX_PROMPTS, description="Prior preservation: the base draws this many prompts (none held out) "
        "before round 1; those the judge scores min_prior_score make prior_share of all training. 0: off (paper).")
    prior_share: float = Field(0.3, gt=0, lt=1)
    min_prior_score: float = Field(1.0, ge=0, le=1)
    train_launcher: list[str] | None = None  # [accelerate, launch, --multi_gpu, ...]: each round trains as its processes
    keep_round_models: int | None = Field(None, ge=1, description="Keep only the last N rounds' model folders (a real "
        "base writes GBs a round; the run reads only the last again; LoRA files, MBs, all kept); None: every round's.")
    sample_share: float = Field(0.2, gt=0, le=1, description="Share of active records judged per round (paper 0.2).")
    sample_all_below: int = Field(100, ge=0, description="Judge every active record while there are this few.")
    variations: int = Field(3, ge=1, le=100, description="New prompts per expanded record (paper: 3).")
    mutate_rate: float = Field(0.1, ge=0, le=1, description="Chance of a new-structure prompt per deletion.")
    mutate_candidates: int = Field(1, ge=1, le=100, description="New-structure prompts asked for per mutation; the one naming "
        "the word the set has seen least is drawn, so mutations reach what the seed set never named. 1: the paper.")
    min_teacher_score: float | None = Field(
        None, ge=0, le=1, description="Quality gate: the judge scores every new teacher image (VQA); one below this "
        "is rejected (kept in the ledger, never trained on), as teachers sharing a blind spot can all be wrong. "
        "None: keep all (the paper). Its scores count as judge calls (and toward max_judge_calls).")
    tournament: Literal["all", "until_pass"] = Field(
        "all", description="all: every teacher draws every new prompt and the judge picks (the paper). until_pass "
        "(needs min_teacher_score): teachers draw in their listed order until one's image passes the gate: one "
        "call where the first is right (max_teacher_calls still reserves one per teacher).")
    min_unseen_score: float | None = Field(
        None, ge=0, le=1, description="Deletion check: before deleting a record, the base draws an unseen variation "
        "of its prompt and the judge scores it (VQA); below this the record was memorized: kept and expanded. "
        "None: the paper (a small set is memorized, deleted and trained down to nothing). One judge call each.")
    confirm_votes: int | None = Field(None, ge=2, le=100, description="A second opinion: a verdict that buys teacher images "
        "(teacher better; memorized) is asked again to this many votes, majority deciding (an even split: kept, unbought), "
        "first ask reused: a noisy judge spends no budget on what the base draws. Needs a sampling judge. None: the paper.")
    base_draws: int = Field(1, ge=1, le=100, description="Images of the base behind a verdict that buys (teacher better; "
        "memorized): it stands only if the base loses on each of up to this many draws (new seeds), so one unlucky "
        "image of a skill the base has buys nothing. 1: one draw (the paper). Up to base_draws judge calls each.")
    max_teacher_calls: int | None = Field(None, ge=0, description="Stop cleanly when teachers drew this many.")
    train_past_teacher_budget: bool = Field(False, description="At the teacher budget, stop buying but judge and train on "
                                            "(a set the judge empties then trains on its deleted records).")
    max_teacher_price: float | None = Field(None, ge=0, description="Stop cleanly when teacher calls cost this much.")
    max_judge_calls: int | None = Field(None, ge=0, description="Stop cleanly before the judge is asked more than "
                                        "this many times (a round judges only the records whose worst case fits).")
    eval_prompts: int = Field(128, ge=0, le=MAX_PROMPTS)
    held_out_metric: Metric = Field("auto", description="pixel: the exact DSG score (shapes-world prompts); win_rate: "
        "the run's judge, base vs the first teacher; vqa: the run's judge's DSG score (any prompts; both cost calls). "
        "auto: pixel where it can, else win_rate.")
    eval_draws: int = Field(1, ge=1, le=100, description="Images per held-out prompt (a small slice has few to hold out).")
    eval_every_round: bool = Field(True, description="False: judge held-out prompts after the last round only.")
    sampler: FamilySampler = Field(default_factory=FamilySampler, description="How the base is drawn to be judged; "
        "what it leaves out: its family's usual (`FAMILY_SAMPLERS`; shapes: 10 DDIM steps). evolve.yaml keeps all.")
    device: str = Field("auto", description="Where the base is sampled (judged records, held-out score): "
                        "auto (a GPU when there is one), cpu, cuda, cuda:1. Training goes through accelerate.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the base's weights when sampled (a GPU: float16)
    seed: Seed = 0
    train_seed: Seed | None = None  # the trainer's batch order and noise; None: seed. Another: a replicate
    tracker: Literal["tensorboard", "none"] = "tensorboard"  # RUN/tensorboard: training loss, each round's score...

    @property
    def grammar(self) -> GrammarSlice:
        return GrammarSlice(**self.model_dump(include={"min_groups", "max_groups", "max_count", "p_size"}))


RESUMABLE_CHANGES = dict.fromkeys(  # what a rerun of a run folder may change: more rounds or budget, where it runs,
    ("output_dir", "rounds", "max_teacher_calls", "max_teacher_price", "max_judge_calls", "train_past_teacher_budget",
     "eval_every_round", "device", "dtype", "prompts_file", "max_image_memory_gb", "train_launcher",
     "gradient_checkpointing", "keep_round_models", "tracker"), True) | ENDPOINT_ADDRESSES  # the file's path (not its prompts:
# `keep_prompts_copy`), the judge's, writer's and teachers' addresses (not their models)


def run_evolve(config: EvolveConfig, *, teachers=None, judge=None, writer=None) -> dict:
    """Run (or resume) the loop; returns the summary also written to `summary.json`.

    `teachers` (a list of `Generator`s), `judge` and `writer` replace the ones the config names (wrap a
    judge in `CachedJudge` to keep its calls in the ledger, with `budget=CallBudget(max_calls=...)` for the hard cap
    that a judge the config builds gets from `max_judge_calls`; teachers are always cached).
    """
    resolve_device(config.device)  # a device this machine lacks fails now, not after round 1's training
    held_out, pool = run_prompts(config, given=(teachers, judge, writer))  # (a bad prompts_file: before any file)
    check_api_keys(config)
    out = check_run_folder(config.output_dir, "evolve")  # (not a demo's, nor an import's)
    claim_run_folder(out, "evolve")  # no other process in it: it would pay again for this one's calls in flight
    sampling = base_sampling(config)  # how the base is drawn: set in full, so evolve.yaml holds every field
    config = config.updated("sampler", sampler=sampling)
    ledger = Ledger(out)
    if spent := ledger.call_count():  # it has spent something: a rerun must not mix another config's rounds into it
        check_resumed_config(out / "evolve.yaml", config, RESUMABLE_CHANGES)
        check_rounds_kept(out / "rounds", config.rounds, ledger)
        keep_prompts_copy(out, config.prompts_file)  # (other prompts than it started from: refused)
    base = base_model_folder(config.base_model, out, config.tiny_model, config.seed)
    teachers = cached_teachers(teachers or [spec.build(T2IModel.folder_resolution(base)) for spec in config.teachers],
                               ledger, config.max_teacher_calls, config.max_teacher_price)
    writer = writer or config.writer.build(config.grammar, ledger)
    hard_cap = None if config.max_judge_calls is None else CallBudget(max_calls=config.max_judge_calls)
    judge = judge or config.judge.build(ledger, hard_cap, getattr(writer, "questions", None))  # (an LLM writes them)
    check_parts_serve(config, judge)  # (rounds are sized to fit `max_judge_calls`; `hard_cap` stops re-asks, retries)
    run = Run(config, ledger, teachers, judge, writer, out, held_out, pool)
    config.save(out / "evolve.yaml")  # once it passed every check: what a rerun must match
    if not spent:  # (kept after the marker: a prompts.txt in a folder without one is a user's, not written over)
        keep_prompts_copy(out, config.prompts_file, replace=True)

    def load_sampler(folder: Path) -> Sampler:
        return Sampler(T2IModel.from_pretrained(folder, config.device, config.dtype), sampling)
    stopped, rounds = None, []
    with progress_bar("evolve rounds", config.rounds, logged=True) as advance:
        try:
            run.scorer.draw_references(run.spent)  # (win_rate: what each round's base is compared with; paid first)
            run.seed_set()
            run.prior = prior_images(run, lambda: load_sampler(base))
            model_dir = base
            for r in range(1, config.rounds + 1):
                done_file = out / "rounds" / f"{r:03d}" / "round.json"
                if done_file.exists():  # finished before a restart: its ledger rows are all there
                    rounds.append(json.loads(done_file.read_text()))
                    model_dir = done_file.parent / "model"
                    advance(1)
                    continue
                tick, start = time.perf_counter(), done_file.with_name("start.json")
                if not start.exists():  # what the round started from, kept for a rerun of the round
                    row = {"round": r}
                    if config.evolve and config.judge_first:  # judged on the model the round starts from
                        row["ops"] = run.evolve_set(r, load_sampler(model_dir))
                    # Emptied: done, unless told to train on past the teacher budget (on deleted records)
                    at_budget = config.train_past_teacher_budget and run.spent.teacher_budget_spent()
                    if ledger.count() == 0 and not (at_budget and replayable_records(ledger)):
                        stopped = "every record deleted: the base matches its teachers on the whole set"
                        break
                    write_json(start, row | {"teacher_calls": run.spent.teacher_calls(), "active": ledger.count()})
                row = json.loads(start.read_text())
                model_dir = run.train(r, model_dir)
                scored = held_out and (config.eval_every_round or r == config.rounds)
                judge_after = config.evolve and not config.judge_first
                sampler = load_sampler(model_dir) if scored or judge_after else None  # loaded once for both
                row |= run.scorer.score(sampler, r, run.spent) if scored else {}
                try:
                    row |= {"ops": run.evolve_set(r, sampler)} if judge_after else {}
                except BudgetExhausted as e:  # trained and scored: reported, not done (more budget: judged again)
                    stopped, row = str(e), row | ops_so_far(ledger, r)  # what it changed before the budget ran out
                row |= {"judge_calls": run.spent.judge_calls(), "teacher_calls_after": run.spent.teacher_calls(),
                        "wall_s": time.perf_counter() - tick}
                rounds.append(row)
                write_jsonl(out / "metrics.jsonl", rounds)
                if config.tracker == "tensorboard":  # (once a round: a rerun with more budget logs no round again)
                    log_round_scalars(out / "tensorboard", row, done_file.with_name("logged"))
                if stopped:
                    break
                write_json(done_file, row)
                advance(1, status=round_line(row))
        except BudgetExhausted as e:
            stopped = str(e)
    return write_summary(run, rounds, stopped, base, load_sampler)


class Run:
    """The steps of one evolve run, over its ledger. Each step can be repeated after a crash."""

    def __init__(self, config: EvolveConfig, ledger: Ledger, teachers: dict, judge, writer, out: Path, held_out: list,
                 pool: list | None = None):
        self.config, self.ledger, self.teachers, self.judge, self.writer, self.out = config, ledger, teachers, judge, writer, out
        self.scorer, self.pool = HeldOutScore(held_out, config.held_out_metric, judge=judge, teachers=teachers), pool
        self.held_out = PromptKeys(held_out + [mirror_prompt(p) for p in held_out if config.random_flip])  # never drawn
        # (in any spelling) by a teacher, nor, with random flips, the mirror image of one: it scores unseen prompts
        self.calls_per_seed_draw, self.calls_per_judged_record = judge_call_bounds(config, len(teachers), judge)
        self.gate, self.prior = QualityGate(judge, config.min_teacher_score), None
        self.spent = CallBudgets(ledger, teachers, judge.id, max_teacher_calls=config.max_teacher_calls,
                                 max_teacher_price=config.max_teacher_price, max_judge_calls=config.max_judge_calls,
                                 train_past_teacher_budget=config.train_past_teacher_budget)

    def seed_set(self) -> None:
        """Round 0: random prompts from the grammar (or `prompts_file`), each drawn by the teacher the judge likes best.
        A prompt that comes up again is drawn again with another seed: uniform data has repeats."""
        done = self.out / "rounds" / "000" / "round.json"
        if done.exists():  # drawn once: relaunched past the teacher budget, it must not count what it skipped
            return
        prompts = set_prompts(self.config, self.pool, self.config.seed_prompts, self.config.seed, self.held_out,
                              **self.config.model_dump(include={"rare_words", "rare_weight"}))
        self.spent.check_judge_room(len(prompts) * self.calls_per_seed_draw + self.scorer.judge_calls,
                                    "the seed set and a held-out score")
        self.add_drawn(prompts, occurrence_seeds(self.config.seed, prompts), round=0, op="seed",
                       parents=[None] * len(prompts), reasons=["seed prompt"] * len(prompts))
        seeds = check_seed_set(self.ledger.records(None, round=0), self.spent, self.config.min_teacher_score)
        write_json(done, {"round": 0, "records": len(seeds), "teacher_calls": self.spent.teacher_calls()})

    def add_drawn(self, prompts, seeds, *, round, op, parents, reasons, teacher_ids=None) -> int:
        """Draw `prompts` (by `teacher_ids`, or by the tournament's winner) and add them as records.
        Held-out prompts are skipped: the run is scored on prompts no teacher drew for it."""
        keep = [i for i, prompt in enumerate(prompts) if prompt not in self.held_out]
        ids = None if teacher_ids is None else [teacher_ids[i] for i in keep]
        fit = self.spent.draws_that_fit([prompts[i] for i in keep], [seeds[i] for i in keep], ids)
        keep, ids = [keep[j] for j in fit], ids and [ids[j] for j in fit]
        prompts, seeds, parents, reasons = ([xs[i] for i in keep] for xs in (prompts, seeds, parents, reasons))
        tries = self.spent.first_tries(prompts, seeds, ids)  # (what the retries of each batch leave room for)
        chunks = [slice(i, i + AT_A_TIME) for i in range(0, len(prompts), AT_A_TIME)]  # (images held at once)
        return sum(self._draw(prompts[j], seeds[j], ids and ids[j], round, op, parents[j], reasons[j], tries[j],
                              sum(tries[j.stop:])) for j in chunks)

    def _draw(self, prompts, seeds, ids, round, op, parents, reasons, tries, later) -> int:
        """`add_drawn`'s drawing, `AT_A_TIME` prompts at a time (their images held until they are in the ledger)."""
        if ids is None:  # discriminate: a tournament of the teachers picks each image
            teacher_ids, images = tournament(
                self.teachers, prompts, seeds, round, passes_gate=lambda images, ps: self.gate.passes(images, ps, round),
                compare=lambda pairs: self.compare(pairs, round), until_pass=self.config.tournament == "until_pass",
                reserve=later)
            if len(self.teachers) > 1:
                reasons = [f"{reason}; {tid} won the judge's tournament" for reason, tid in zip(reasons, teacher_ids)]
        else:
            teacher_ids, images = ids, draw_by_teacher(self.teachers, prompts, seeds, ids, round, tries, later)
        added, scores = 0, self.gate.scores(images, prompts, round)  # (all at once: a VLM answers them concurrently)
        for prompt, seed, tid, image, parent, reason, score in zip(prompts, seeds, teacher_ids, images, parents, reasons, scores):
            if image is None:
                continue  # the teacher failed after retries: nothing to learn from
            scene = scene_or_none(prompt)
            record_id = self.ledger.add_record(prompt=prompt, generator=tid, seed=seed, image=image, round=round,
                                               op=op, parent=parent, reason=reason, spec=scene and scene.to_json(),
                                               skills=scene_skills(scene) if scene else ())
            self.gate.reject_if_wrong(self.ledger, record_id, score, round)
            added += 1
        return added

    def train(self, r: int, init: Path) -> Path:
        """Train `steps_per_round` more steps (fewer at `max_epochs_per_round`) on `training_set`; the rounds
        are one training run on changing data (`train_round`)."""
        c = self.config
        rows = self.ledger.count() or len(replayable_records(self.ledger))  # none active: `evolving_set`
        images = None if c.max_epochs_per_round is None else max(1, math.ceil(c.max_epochs_per_round * rows))
        shared = c.round_training() | {"seed": c.seed if c.train_seed is None else c.train_seed}
        return train_round(self.out / "rounds", r, init, self.training_set, c.steps_per_round, c.train_launcher,
                           c.keep_round_models, **shared, max_images=images, tracker=c.tracker,
                           logging_dir=str(self.out / "tensorboard"),
                           schedule_steps=c.rounds * c.steps_per_round, checkpoint_every=max(25, c.steps_per_round // 4))

    def training_set(self) -> TrainingSet:
        c = self.config  # (launched: a set of files, which its processes read from a manifest)
        return evolving_set(self.ledger, c.replay_share, self.prior, c.prior_share,
                            0 if c.train_launcher else c.max_image_memory_gb)

    def evolve_set(self, r: int, base: Sampler) -> dict:
        """Discriminate, then delete, expand and mutate; returns the round's operation counts."""
        c = self.config
        prime_writer(self.writer, self.ledger, r)
        records = sampled_records(self.ledger, r, c.sample_share, c.sample_all_below, c.seed)
        scored = c.eval_every_round or r == c.rounds  # (the calls of the round's held-out score, when it has one)
        fit = self.spent.comparisons_that_fit(len(records), r, self.calls_per_judged_record,
                                              reserve=self.scorer.judge_calls * scored)
        records, over_budget = records[:fit], len(records) - fit  # (sampled: the judge budget has no room for them)
        seeds = [stable_seed(c.seed, r, rec.id) for rec in records]
        verdicts, overturned, redrawn = base_vs_teacher(self.judge, lambda pairs: self.compare(pairs, r), base, records,
                                                        seeds, self.ledger.load_image, c.confirm_votes, c.base_draws)
        ops = ({"overturned": overturned} if c.confirm_votes else {}) | ({"over_judge_budget": over_budget} if over_budget else {})
        ops |= {"redrawn": len(redrawn)} if c.base_draws > 1 else {}
        ops |= dict.fromkeys(("judged", "delete", "expand", "mutate", "unjudged")
                             + ("memorized",) * (c.min_unseen_score is not None), 0)
        expand, as_good, mutate = [], [], []  # expand: (record, why)
        for i, (rec, verdict) in enumerate(zip(records, verdicts)):
            if verdict is None or verdict.winner not in ("a", "b", "tie"):
                ops["unjudged"] += 1  # failed or unparseable: no evidence, no change
                continue
            ops["judged"] += 1
            row = {"base_vs_teacher": "split vote" if verdict.split else verdict.winner, "score_base": verdict.score_a,
                   "score_teacher": verdict.score_b} | ({"on_a_fresh_draw": True} if i in redrawn else {})  # (`base_draws`)
            if verdict.winner == "b" or verdict.split:  # (votes split evenly: no evidence to buy or delete on)
                self.ledger.set_judge(rec.id, row, round=r)
                expand += [(rec, "teacher better than base")] if verdict.winner == "b" else []
            else:
                as_good.append((rec, row))
        if records and not ops["judged"]:  # not one verdict: the judge is down or unreadable, not unsure
            raise every_request_failed(self.ledger, [self.judge.id], r,
                                       f"the judge answered none of round {r}'s {len(records)} comparisons")
        for (rec, row), unseen in zip(as_good, unseen_checks(self, r, base, [rec for rec, _ in as_good])):
            if unseen is not None:  # (None: check off, or no unseen variation: the verdict stands)
                row |= {"unseen_prompt": unseen[0], "unseen_score": unseen[1]}
            self.ledger.set_judge(rec.id, row, round=r)
            if unseen is not None and unseen[1] is None:
                continue  # the judge failed on the check: no evidence, no change
            if unseen is not None and unseen[1] < c.min_unseen_score:
                expand.append((rec, f"base drew its trained prompt but scored {unseen[1]:.2f} on {unseen[0]!r}"))
                ops["memorized"] += 1
                continue
            self.ledger.delete_record(rec.id, round=r, reason=f"base {row['base_vs_teacher']} vs teacher")
            ops["delete"] += 1
            if np.random.default_rng(stable_seed(c.seed, r, rec.id, "mutate")).random() < c.mutate_rate:
                mutate.append(rec)
        at_budget = c.train_past_teacher_budget and self.spent.teacher_budget_spent(before_round=r)  # as a rerun sees it:
        ops["expand"] = self._expand(r, [] if at_budget else expand)  # do not ask the writer (an LLM costs calls)
        bought = {rec.parent for rec in self.ledger.records(None, round=r) if rec.op == "expand"}
        ops["unexpanded"] = sum(rec.id not in bought for rec, _ in expand)  # every variation held out or over budget
        ops["mutate"] = self._mutate(r, [] if at_budget else mutate)
        if c.min_teacher_score is not None:  # of the expanded and mutated images (counted from the ledger: reruns)
            ops["reject"] = sum(op.op == "reject" for op in self.ledger.ops(round=r))
        return ops

    def _expand(self, r: int, records: list) -> int:
        """The teacher beat the base (`records`: (record, why)): variations drawn by the record's teacher."""
        prompts, parents, teachers, reasons = [], [], [], []
        for rec, why in records:
            if rec.generator not in self.teachers:
                raise UserError(f"record {rec.id} was drawn by {rec.generator!r}, not one of this run's teachers "
                                f"({', '.join(self.teachers)}): add it to `teachers` to expand it")
            for prompt in self.writer.variations(rec.prompt, self.config.variations,
                                                 seed=stable_seed(self.config.seed, r, rec.id)):
                prompts.append(prompt), parents.append(rec.id), teachers.append(rec.generator), reasons.append(why)
        return self.add_drawn(prompts, new_prompt_seeds(self.config.seed, prompts, parents, r), round=r, op="expand",
                              parents=parents, reasons=reasons, teacher_ids=teachers)

    def _mutate(self, r: int, records) -> int:
        """Keep the set from collapsing: per picked deletion, a prompt of a new structure, of `mutate_candidates` the
        one naming what the set (before this round's mutations: a rerun counts the same) has seen least."""
        m, prompts, parents = self.config.mutate_candidates, [], []
        counts = word_counts(self.ledger.prompts(before_round=r) + self.ledger.prompts(since_round=r, ops=["expand"]))
        for rec in records:  # (the first ask has the seed it had before asks were repeated)
            seeds = [stable_seed(self.config.seed, r, rec.id, "new", *([ask] if ask else [])) for ask in range(m + 2)]
            if pick := least_seen_new_structure(self.writer, rec.prompt, m, seeds, self.held_out, counts):
                prompts, parents = prompts + [pick], parents + [rec.id]
        return self.add_drawn(prompts, new_prompt_seeds(self.config.seed, prompts, parents, r), round=r, op="mutate",
                              parents=parents, reasons=["new structure after a deletion"] * len(prompts))

    def compare(self, pairs, round: int):
        self.judge.round = round
        return compare_pairs(self.judge, pairs)
