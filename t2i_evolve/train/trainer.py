"""Denoising fine-tuning through `accelerate`: the loop every recipe that trains on images uses.

One `Accelerator` owns devices, mixed precision, gradient accumulation and trackers, so the same code
runs on a laptop CPU and under `accelerate launch` on several GPUs. What is ours:
- batches are a pure function of the position in the stream of images (`data.batch_indices`; on another
  number of processes a resumed run goes on from the next image), and the noise, timesteps
  and caption-dropout draws (a generator seeded per step), so a run killed with SIGKILL and resumed
  from its last checkpoint ends with the same weights as one that never stopped;
- checkpoints are written to a temporary folder and renamed, so a crash never leaves half of one
  under its final name, and a corrupt one is reported in one line;
- EMA weights, LoRA adapters through peft, periodic evaluation to `metrics.jsonl`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Callable, Literal

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, broadcast, parse_flag_from_env
from diffusers.optimization import get_scheduler
from pydantic import BeforeValidator, Field

from ..config import Config, PathText, check_resumed_config
from ..data.cache import check_room
from ..errors import UserError, is_disk_full
from ..eval.report import read_jsonl, write_jsonl
from ..models import T2IModel
from ..progress import console
from .data import IMAGE_MEMORY_GB, ImageFiles, TrainingSet, batch_indices
from .ema import EMA
from .lora import LoraSettings, add_lora, export_adapters, merged_copy
from .stopping import stop_at_a_step_end


class _TiedWeightsSavedOnce(logging.Filter):
    """accelerate warns at every checkpoint of a model with tied weights (T5's input embeddings are its `shared`
    ones) that it saved them once; safetensors' loader ties them again on resume, so at every round it was noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsSavedOnce())


# What makes a training setting valid, shared by every config that hands one on to `TrainConfig` (a recipe's,
# the demo's), so a bad value fails when that config loads, before any teacher is paid.
BatchSize = Annotated[int, Field(ge=1)]
LearningRate = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # (inf: a NaN model)
WarmupSteps = Annotated[int, Field(ge=0)]
EmaDecay = Annotated[float, Field(ge=0, lt=1)]
SnrGamma = Annotated[float, Field(gt=0)]
MixedPrecision = Annotated[Literal["no", "fp16", "bf16"], BeforeValidator(lambda v: "no" if v is False else v)]
"""(YAML reads a bare `no` as false: it means "no" here.)"""
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # (torch seeds are 64-bit, and seeds are mixed into larger ones)


class TrainConfig(Config):
    """Settings of a denoising fine-tuning run (defaults: the shapes-world tiny model on a CPU)."""

    model: PathText = Field(description="Model folder (diffusers layout, safetensors weights).")
    data: PathText | None = Field(None, description="Run folder whose ledger's active records are the data (or the "
                                  "manifest .json of a recipe's round: `launched_training`).")
    output_dir: PathText = "runs/train"
    steps: int = Field(1000, ge=1)
    max_images: int | None = Field(None, ge=1, description="End sooner, once this run has trained on this many "
                                   "images past where it started (`continue_from`), over every process: the steps "
                                   "at batch_size x grad_accum x processes a step (a round's share of a recipe).")
    batch_size: BatchSize = 32
    grad_accum: int = Field(1, ge=1)
    lr: LearningRate = 1e-3
    lr_schedule: Literal["constant_with_warmup", "cosine", "linear"] = "constant_with_warmup"
    warmup_steps: WarmupSteps = 100
    schedule_steps: int | None = Field(None, ge=1, description="Steps the learning-rate schedule spans (default: "
                                       "`steps`); a run that is one part of a longer one sets the whole length.")
    continue_from: PathText | None = Field(None, description="A checkpoint folder of an earlier run to carry on from: its "
                                      "weights, optimizer moments, schedule, EMA and step go on, at this config's lr "
                                      "and weight decay, on this run's data (another set: from the start of an epoch "
                                      "of it); a checkpoint of this run's own comes first.")
    weight_decay: float = Field(0.01, ge=0, allow_inf_nan=False)
    max_grad_norm: float = Field(1.0, ge=0, allow_inf_nan=False)  # 0: no clipping
    ema_decay: EmaDecay | None = 0.995
    caption_dropout: float = Field(0.1, ge=0, le=1, description="Share of captions replaced by '' (for CFG).")
    random_flip: bool = Field(False, description="Mirror half the images left-right, and swap 'left' and 'right' in "
                              "their prompts so that spatial prompts stay true: twice the views of a small set.")
    snr_gamma: SnrGamma | None = Field(None, description="Min-SNR loss weighting (5 is the usual value).")
    train_unet: bool = True
    train_text_encoder: bool = True
    lora: LoraSettings | None = None
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0, description="Steps between held-out evaluations, and one at the end; 0: none "
                            "between (`t2i-evolve train` then evaluates not at all; a recipe's evaluator at the end).")
    log_every: int = Field(25, ge=1)
    seed: Seed = 0
    tracker: Literal["tensorboard", "none"] = "tensorboard"
    logging_dir: PathText | None = Field(None, description="The tracker's folder (it writes under `train/`); None: "
                                    "output_dir. Rounds of one run share one, so their loss is one curve.")
    max_image_memory_gb: float = Field(IMAGE_MEMORY_GB, ge=0, description="Decoded training images are held in memory "
                                       "up to this size; a larger set is read from its files batch by batch, the next "
                                       "batch while this one trains.")
    max_minutes: float | None = Field(None, gt=0, description="Stop (and save) after this much training time.")


RESUMABLE_CHANGES = {"output_dir", "steps", "max_images", "schedule_steps", "continue_from", "max_minutes",
                     "checkpoint_every", "keep_checkpoints", "eval_every", "log_every", "tracker", "logging_dir",
                     "gradient_checkpointing", "max_image_memory_gb"}
"""What a rerun of a training run may change and still resume its checkpoint: how long, how often it saves and logs.
The rest (model, data, learning rate, batch, seed...) would carry a checkpoint on as another run."""


def check_resumable(config: TrainConfig) -> None:
    """A training run a user reruns (`t2i-evolve train`) resumes its checkpoints only under the config it started
    with, but for `RESUMABLE_CHANGES`: one line otherwise. (A recipe checks its own config, which sets its trainers':
    a recipe's run folder moved elsewhere names its base model by another path, and resumes.)"""
    out = Path(config.output_dir)
    if any((out / "checkpoints").glob("step-*")):
        check_resumed_config(out / "config.yaml", config, RESUMABLE_CHANGES)

Evaluate = Callable[[T2IModel, int], dict]

LARGE_TEXT_ENCODER = 10**9
"""Weights past which fully training a text encoder is said to be likely a mistake (T5-XXL: 4.7B, and its optimizer)."""


def on_cpus() -> bool:
    """Whether accelerate must be told to run on CPUs: when asked (`accelerate launch --cpu`), and when a launcher
    (`torchrun --nproc_per_node N`) started several processes on a machine without a GPU, which accelerate would
    otherwise run as N lone processes, each training the whole run into the same folder (on CPUs they share the
    work through gloo)."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    gpu = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()  # (torch<2.6)
    return parse_flag_from_env("ACCELERATE_USE_CPU") or (several and not gpu)


def process_state() -> PartialState:
    """This process among those a launcher started (one process, unlaunched): what `Trainer`'s accelerator sees."""
    return PartialState(cpu=on_cpus())


def start_precision(mixed_precision: str) -> None:
    """accelerate keeps one mixed precision a process (`AcceleratorState`) and refuses an `Accelerator` that asks
    for another: a trainer after one of another precision in this process (a notebook, a benchmark's arms) starts
    that state afresh (not the processes' group, `PartialState`)."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state()


class Trainer:
    """Trains `model` on `data` as `config` says; `run()` resumes from the latest checkpoint if any."""

    def __init__(self, config: TrainConfig, data: TrainingSet, evaluate: Evaluate | None = None):
        if not (config.train_unet or config.train_text_encoder):
            raise UserError("nothing to train: set train_unet or train_text_encoder")
        self.config, self.data, self.evaluate = config, data, evaluate
        self.out = Path(config.output_dir)
        self.model = T2IModel.from_pretrained(config.model, device=process_state().device)
        self.modules = self._trainable_modules()
        # The parts only read (the VAE; a text encoder or denoiser not trained): a saved model copies their files from
        # the folder they were read from, so they are saved as they were. Under bf16 training the text encoders and
        # denoiser among them are held in bf16, as autocast computes them in it anyway: half their memory (PixArt's
        # frozen T5-XXL: 19 GB -> 9.5). The VAE (small) stays float32: SDXL's encodes outside autocast.
        self.frozen = [name for name in ("vae", *self.model.trainable_parts()) if name not in self.modules
                       and getattr(self.model, name) is not None]
        if config.mixed_precision == "bf16":
            for name in self.frozen:
                if name != "vae":
                    getattr(self.model, name).to(torch.bfloat16)
        # Several processes sync every trainable weight's gradient each step and would wait for one that never
        # comes (SDXL's first text encoder's last layer): the wrapper is told to look for them (a little slower)
        unused = any(self.model.unused_parts(name) for name in self.modules)
        start_precision(config.mixed_precision)
        self.accelerator = Accelerator(
            cpu=on_cpus(),
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum,
            log_with=None if config.tracker == "none" else config.tracker,
            project_config=ProjectConfiguration(project_dir=str(self.out),
                                                logging_dir=config.logging_dir or str(self.out)),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if unused else None,
        )
        self.params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        # The fused kernel updates all parameters in one pass (CPU and CUDA); measured faster than the loop.
        fused = all(p.is_floating_point() for p in self.params) and self.accelerator.device.type in ("cpu", "cuda")
        optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
        n = self.accelerator.num_processes
        now, origin = self._saved_states()
        self.start_images, self.last_step = self._plan(now, origin)
        self.data_id = data.fingerprint()
        self.epoch_start = self._epoch_start(now, origin)
        schedule = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=config.warmup_steps * n,
                                 num_training_steps=(config.schedule_steps or self.last_step) * n)
        prepared = self.accelerator.prepare(*self.modules.values(), optimizer, schedule)
        for name, module in zip(list(self.modules), prepared):
            if module is not self.modules[name]:  # wrapped for several processes (DistributedDataParallel): the
                module.config = self.modules[name].config  # model reads its parts' configs (sizes, token length)
            setattr(self.model, name, module)
            self.modules[name] = module  # (what `accumulate` skips the gradient sync of between micro-batches)
        self.optimizer, self.schedule = prepared[-2:]
        # Saved by `save_checkpoint` as safetensors (accelerate would pickle it, and unpickle it on resume).
        self.ema = EMA(self.params, config.ema_decay) if config.ema_decay else None
        self.prompt_ids = self.model.tokenize(data.prompts)  # once: the word pieces never change
        if config.random_flip:  # the prompt of each row's mirrored image
            self.mirrored_ids = self.model.tokenize([mirror_prompt(p) for p in data.prompts])
        self.step = 0
        self.stream_step, self.stream_images = 0, 0  # a step, and the images trained on by then (`_resume`)
        self._reader, self._ahead = ThreadPoolExecutor(1, thread_name_prefix="t2i-evolve-batches"), None

    def _trainable_modules(self) -> dict[str, torch.nn.Module]:
        c = self.config
        modules = {}
        for name, module in self.model.trainable_parts().items():  # the UNet, the text encoder (SDXL: two)
            module.requires_grad_(False)
            if not (c.train_unet if name == "unet" else c.train_text_encoder):
                continue
            if c.lora:
                add_lora(module, c.lora, name, c.seed)  # only the adapter weights require grad
            else:
                module.requires_grad_(True)
                weights = sum(p.numel() for p in module.parameters())
                if name != "unet" and weights > LARGE_TEXT_ENCODER and process_state().is_main_process:
                    console.print(f"training all {weights / 1e9:.1f}B weights of {name} ({type(module).__name__}): "
                                  "train_text_encoder: false trains the denoiser alone (EvolveDirector keeps PixArt's "
                                  "T5-XXL frozen), lora: {rank: 16} trains adapters", markup=False, soft_wrap=True)
            if c.gradient_checkpointing:
                _enable_checkpointing(module)
            module.train()
            modules[name] = module
        return modules

    def _saved_states(self) -> tuple[dict | None, dict | None]:
        """The `trainer_state.json` of this run's latest checkpoint and of `continue_from` (None: none, or unreadable:
        `_resume` says what is wrong with it)."""
        own = sorted(self.checkpoint_dir.glob("step-*")) if self.checkpoint_dir.is_dir() else []
        origin = self.config.continue_from
        return _trainer_state(own[-1]) if own else None, _trainer_state(Path(origin)) if origin else None

    def _epoch_start(self, now: dict | None, origin: dict | None) -> int:
        """How far past `start_images` this run's stream of batches starts. Carried on from a checkpoint of a run on
        another set (an evolve round from the last round's), at this set's next epoch after where that stream got
        to: an epoch's images are each seen once (not the rest of one ordering and the start of another: some twice,
        some never), and no ordering is used twice. On the same set (a run split in two) where it got to, as one run."""
        if now or not origin:  # (as this run started; or it starts the stream)
            return now.get("epoch_start", 0) if now else 0
        position = origin.get("epoch_start", 0) + self.start_images  # where its stream of batches got to
        n = len(self.data)  # (an older version's checkpoint names no set: taken as this one)
        return (position if origin.get("data") in (None, self.data_id) else -(-position // n) * n) - self.start_images

    def _plan(self, now: dict | None, origin: dict | None) -> tuple[int, int]:
        """Images trained on before this run started (its `continue_from`'s), and the step it ends at: `steps`,
        or sooner where `max_images` more are trained on, counted in images, so that a run resumed on another
        number of processes ends where the images say (read from the checkpoints' `trainer_state.json`)."""
        c, per_step = self.config, self.images_per_step
        origin_step = origin["step"] if origin else 0
        start_images = now["start_images"] if now and "start_images" in now else (
            origin.get("images", origin_step * per_step) if origin else 0)
        if c.max_images is None:
            return start_images, c.steps
        step, images = (now["step"], now.get("images", now["step"] * per_step)) if now else (origin_step, start_images)
        return start_images, min(c.steps, step + math.ceil(max(0, start_images + c.max_images - images) / per_step))

    # -- the loop ---------------------------------------------------------------------------------------

    def run(self, progress: Callable[[int, dict], None] | None = None) -> dict:
        """Train to `last_step`; returns the last logged metrics. `progress(steps_done, metrics)`."""
        c, acc = self.config, self.accelerator
        self._resume()
        if self.step < self.last_step:
            self._check_room()
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            c.save(self.out / "config.yaml")
        if c.tracker != "none":  # the settings once a logging folder (each time: a folder of them), not again on a
            # resume or for each round of a run sharing one; a resume hides what its killed attempt logged past it
            settings = {k: v for k, v in c.model_dump().items() if not isinstance(v, dict)}
            first = not self.resumed and not (c.continue_from and c.logging_dir)
            acc.init_trackers("train", config=settings if first else None,
                              init_kwargs={c.tracker: {"purge_step": self.step + 1}} if self.resumed else None)
        last: dict = {}
        losses: list[torch.Tensor] = []
        tick = start = time.perf_counter()
        deadline = start + c.max_minutes * 60 if c.max_minutes else float("inf")
        out_of_time = False
        with stop_at_a_step_end(acc.num_processes == 1) as stop_asked:  # Ctrl-C: saved at a step's end
            while self.step < self.last_step and not out_of_time:
                loss = self._train_step()
                losses.append(loss)
                self.step += 1
                out_of_time = self._past(deadline) or stop_asked()  # (logged and saved as a deadline is)
                if self.step % c.log_every == 0 or self.step == self.last_step or out_of_time:
                    seconds = time.perf_counter() - tick
                    images = len(losses) * self.images_per_step
                    mean = acc.reduce(torch.stack(losses).mean(), "mean")  # (over every process's batches)
                    last = {"step": self.step, "loss": mean.item(), "lr": self.schedule.get_last_lr()[0],
                            "images_per_s": images / seconds}
                    self._log(last)
                    losses, tick = [], time.perf_counter()
                if self.evaluate and c.eval_every and self.step % c.eval_every == 0 and self.step < self.last_step:
                    self._log({"step": self.step, "eval": self._evaluate()})
                if self.step % c.checkpoint_every == 0 or self.step == self.last_step or out_of_time:
                    self.save_checkpoint()
                if progress:
                    progress(self.step, last)
        if stop_asked():  # (saved: the trackers' last rows written out too)
            acc.end_training()
            raise KeyboardInterrupt
        if self.evaluate:
            last = {**last, "eval": self._evaluate()}
            self._log({"step": self.step, "eval": last["eval"]})
        self.save_model(self.out / "model")
        acc.end_training()
        return last

    def _past(self, deadline: float) -> bool:
        """Whether the training time (`max_minutes`) is up, by the main process's clock, so that every process
        stops at the same step (one that stopped alone would leave the others waiting at their next gradient sync)."""
        if deadline == float("inf") or self.accelerator.num_processes == 1:
            return time.perf_counter() >= deadline
        late = torch.tensor([float(time.perf_counter() >= deadline)], device=self.accelerator.device)
        return bool(broadcast(late, from_process=0).item())

    def _train_step(self) -> torch.Tensor:
        """One optimizer step over `grad_accum` micro-batches; returns the mean loss (not synced)."""
        c, acc = self.config, self.accelerator
        total = torch.zeros((), device=acc.device)
        for micro in range(c.grad_accum):
            with acc.accumulate(*self.modules.values()):
                position = self.epoch_start + self.stream_images + (
                    ((self.step - self.stream_step) * c.grad_accum + micro) * acc.num_processes + acc.process_index
                ) * c.batch_size
                indices = batch_indices(position, c.batch_size, len(self.data), c.seed)
                pixels = self._pixels(position, indices)
                seed = hash((c.seed, self.step, micro, acc.process_index)) % 2**63
                rng = torch.Generator(acc.device).manual_seed(seed)
                ids = self.prompt_ids[indices.to(self.prompt_ids.device)]
                if c.random_flip:  # (drawn only when on: a run without it sees the same noise as before)
                    flip = torch.rand(len(ids), generator=rng, device=acc.device) < 0.5
                    pixels = torch.where(flip.cpu()[:, None, None, None], pixels.flip(-1), pixels)
                    per_row = flip.view(-1, *(1,) * (ids.dim() - 1))  # (SDXL's ids have a row per tokenizer)
                    ids = torch.where(per_row, self.mirrored_ids[indices.to(ids.device)], ids)
                drop = torch.rand(len(ids), generator=rng, device=acc.device) < c.caption_dropout
                # Dropout in the modules (T5's) draws from the global generators: seeded from the step as well, so
                # a resumed run draws what an unbroken one did (and the generators are left as they were).
                with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
                    torch.manual_seed(seed)
                    with acc.autocast():
                        with torch.set_grad_enabled(c.train_text_encoder):
                            text = self.model.encode_tokens(ids, drop=drop)
                        latents = self.model.encode_images(pixels.to(acc.device))
                        loss = self.model.denoising_loss(latents, text, generator=rng, snr_gamma=c.snr_gamma)
                    acc.backward(loss)
                if acc.sync_gradients and c.max_grad_norm:
                    acc.clip_grad_norm_(self.params, c.max_grad_norm)
                self.optimizer.step()
                self.schedule.step()
                self.optimizer.zero_grad(set_to_none=True)
                total += loss.detach() / c.grad_accum
        if self.ema and not acc.optimizer_step_was_skipped:  # fp16: a step the loss scaler skipped moved nothing
            self.ema.update()
        return total

    def _pixels(self, position: int, indices: torch.Tensor) -> torch.Tensor:
        """The batch's images. A set read from its files (`ImageFiles`) has this process's next batch read in a
        thread meanwhile: batches are a function of the position, so the next one is known."""
        if not isinstance(self.data.images, ImageFiles):
            return self.data.pixels(indices)
        ahead, self._ahead = self._ahead, None
        pixels = ahead[1].result() if ahead and ahead[0] == position else self.data.pixels(indices)
        c = self.config
        following = position + self.accelerator.num_processes * c.batch_size
        self._ahead = (following, self._reader.submit(
            self.data.pixels, batch_indices(following, c.batch_size, len(self.data), c.seed)))
        return pixels

    def _evaluate(self) -> dict:
        """The main process evaluates, through the unwrapped parts (a wrapped part's forward would sync its
        buffers with processes that are not evaluating, and wait for them); the others wait for it."""
        acc, was = self.accelerator, {name: m.training for name, m in self.modules.items()}
        for name, m in self.modules.items():
            m.eval()
            setattr(self.model, name, acc.unwrap_model(m))
        try:
            with torch.no_grad(), (self.ema.applied() if self.ema else nullcontext()):
                result = self.evaluate(self.model, self.step) if acc.is_main_process else {}
        finally:
            for name, m in self.modules.items():
                m.train(was[name])
                setattr(self.model, name, m)
        acc.wait_for_everyone()
        return result

    def _log(self, metrics: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if "eval" in metrics:
            flat |= {f"eval/{k}": v for k, v in metrics["eval"].items() if isinstance(v, (int, float))}
        if self.config.tracker != "none" and flat:
            self.accelerator.log(flat, step=metrics["step"])

    # -- checkpoints ----------------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def checkpoint_bytes(self) -> int:
        """About what one checkpoint takes on disk: the trained modules' weights, AdamW's two moments of each
        trainable weight and the EMA's copy of it (an SD1.5 UNet: about 14 GB)."""
        weights = sum(t.numel() * t.element_size() for m in self.modules.values() for t in m.state_dict().values())
        trainable = sum(p.numel() * p.element_size() for p in self.params)
        return weights + trainable * (3 if self.ema else 2)

    def _check_room(self) -> None:
        """Refuse to start training that could not save its first checkpoint: told now, not after the hours of
        steps before it (every process checks, so none waits at a barrier for one that stopped)."""
        need = self.checkpoint_bytes()
        check_room(self.out, need, f"a checkpoint of this run, about {need / 2**20:,.0f} MB")

    def save_checkpoint(self) -> Path:
        """Model, optimizer, schedule, RNG and EMA states plus the step; written aside, then renamed."""
        acc = self.accelerator
        final = self.checkpoint_dir / f"step-{self.step:07d}"
        staging = self.checkpoint_dir / f".staging-{self.step:07d}"
        if acc.is_main_process and staging.exists():
            shutil.rmtree(staging)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(staging), safe_serialization=True)
            if acc.is_main_process:
                if self.ema:
                    self.ema.save(staging / "ema.safetensors")
                (staging / "trainer_state.json").write_text(json.dumps(
                    {"step": self.step, "images": self.images_trained(), "processes": acc.num_processes,
                     "start_images": self.start_images, "epoch_start": self.epoch_start, "data": self.data_id,
                     "config": self.config.model_dump()}))
        except BaseException as e:  # a full disk, a kill signal: give back the room a half-written checkpoint takes
            try:  # torch.save says a full disk as "unexpected pos": tell it by the room left, before that is given back
                if isinstance(e, Exception) and not is_disk_full(e):
                    line = str(e).splitlines()[0] if str(e) else ""
                    check_room(self.out, needed_for=f"checkpoint {final.name} ({type(e).__name__}: {line})")
            finally:
                if acc.is_main_process:
                    shutil.rmtree(staging, ignore_errors=True)
            raise
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            for old in sorted(self.checkpoint_dir.glob("step-*"))[: -self.config.keep_checkpoints]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def _resume(self) -> None:
        """From this run's latest checkpoint, else from `continue_from` (whose metrics are not ours)."""
        checkpoints = sorted(self.checkpoint_dir.glob("step-*")) if self.checkpoint_dir.is_dir() else []
        self.resumed = bool(checkpoints)  # (this run's own: not `continue_from`, another run's)
        if not checkpoints and not self.config.continue_from:
            self._truncate_metrics()  # what an attempt killed before its first checkpoint logged
            return
        latest = checkpoints[-1] if checkpoints else Path(self.config.continue_from)
        if not checkpoints and not (latest / "trainer_state.json").is_file():
            raise UserError(f"continue_from {latest} is not a checkpoint folder (no trainer_state.json)")
        try:
            state = _trainer_state(latest)
            if state is None:
                raise ValueError("its trainer_state.json is unreadable or names no step")
            if (latest / "custom_checkpoint_0.pkl").is_file():
                raise ValueError("its EMA is a pickle (an older t2i-evolve wrote it), which is never loaded")
            self.accelerator.load_state(str(latest))
            if self.ema and (latest / "ema.safetensors").is_file():
                self.ema.load(latest / "ema.safetensors")
            elif self.ema:  # a run without EMA: its average starts from the weights it left, not from `model`'s
                self.ema = EMA(self.params, self.config.ema_decay)
            if not checkpoints:  # another run's optimizer state: this config's learning rate and weight decay
                self._set_lr(self.config.lr, self.config.weight_decay)
        except Exception as e:  # any unreadable part: one line, naming the checkpoint
            raise UserError(f"cannot resume from checkpoint {latest}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'unreadable'}: was `model` changed since it was saved? (a "
                            "checkpoint cut short by a crash: delete it to resume from an earlier one)") from None
        self.step = state["step"]
        self._go_on_as(state.get("processes", self.accelerator.num_processes), state.get("images"))
        self._truncate_metrics()  # (from `continue_from`: rows of an attempt killed before this run's checkpoint)

    @property
    def images_per_step(self) -> int:
        """Images one optimizer step trains on, over every process."""
        c = self.config
        return c.batch_size * c.grad_accum * self.accelerator.num_processes

    def images_trained(self) -> int:
        """Images trained on by this step (every process's): where the stream of batches has got to."""
        return self.stream_images + (self.step - self.stream_step) * self.images_per_step

    def _go_on_as(self, processes: int, images: int | None) -> None:
        """Resumed as another number of processes than saved the checkpoint (a job restarted on fewer GPUs),
        go on where it left off: the batches from the next image of the stream, not from where this many
        processes would have got by this step; and the learning rate of this step, which accelerate's schedule
        counts in steps times processes."""
        n = self.accelerator.num_processes  # (no count of images: an older t2i-evolve's checkpoint, saved by
        self.stream_step, self.stream_images = (self.step, images) if images is not None else (0, 0)  # this many)
        if processes != n:
            schedule = self.schedule.scheduler  # (the LambdaLR inside accelerate's wrapper)
            schedule.last_epoch = round(schedule.last_epoch * n / processes)
            self._set_lr()

    def _set_lr(self, lr: float | None = None, weight_decay: float | None = None) -> None:
        """The learning rate at the schedule's step (its peak `lr` where given; `weight_decay` too), as the optimizer
        and the schedule read it."""
        schedule = self.schedule.scheduler
        if lr is not None:
            schedule.base_lrs = [lr] * len(schedule.base_lrs)
        for group, base, at in zip(self.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
            group["lr"], group["initial_lr"] = base * at(schedule.last_epoch), base
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
        schedule._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _truncate_metrics(self) -> None:
        """Drop metrics logged after the step we start from (they will be logged again), and the final
        evaluation when it resumed at the last step (it is run again)."""
        path = self.out / "metrics.jsonl"
        if self.accelerator.is_main_process and path.exists():
            lines = read_jsonl(path)
            final = self.step >= self.last_step and self.evaluate is not None
            kept = [row for row in lines if row.get("step", 0) < self.step or (
                row.get("step", 0) == self.step and not (final and "eval" in row))]
            write_jsonl(path, kept)

    def save_model(self, path: Path) -> Path:
        """The trained model (EMA weights if any, LoRA merged) as a loadable safetensors folder; with LoRA, the
        adapters also as diffusers' LoRA file in a `lora` folder beside it, where the model's family has one."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            for name, module in self.modules.items():
                setattr(self.model, name, acc.unwrap_model(module))
            with self.ema.applied() if self.ema else nullcontext():  # (the adapters first: the model's
                # model_index.json, written last, vouches for both, as an evolve round's rerun reads it)
                (path / "model_index.json").unlink(missing_ok=True)  # (an earlier save's: not over new adapters)
                if (unexported := export_adapters(self.model, path.parent / "lora")) is not None:
                    console.print(f"note: the adapters are saved merged into {path} only: {unexported}", markup=False,
                                  soft_wrap=True)
                merged_copy(self.model).save_pretrained(path, unchanged_from=Path(self.config.model),
                                                        unchanged=self.frozen)
        acc.wait_for_everyone()
        return path


def _trainer_state(checkpoint: Path) -> dict | None:
    """A checkpoint's `trainer_state.json` (step, images trained, processes, the set's fingerprint; counts that are
    not integers left out), or None where it cannot be read or names no step."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not (isinstance(state, dict) and isinstance(state.get("step"), int)):
        return None
    return {key: value for key, value in state.items()
            if isinstance(value, int) or key == "config" or key == "data" and isinstance(value, str)}


def _enable_checkpointing(module: torch.nn.Module) -> None:
    """Activation checkpointing under each library's current name (transformers 5 renamed it)."""
    for method in ("enable_gradient_checkpointing", "activation_checkpointing_enable", "gradient_checkpointing_enable"):
        if hasattr(module, method):
            getattr(module, method)()
            return


_MIRRORED = {"left": "right", "right": "left"}


def mirror_prompt(prompt: str) -> str:
    """The prompt of a left-right mirrored image: 'left' and 'right' swapped in any case ('Left' -> 'Right', 'LEFT'
    -> 'RIGHT'), everything else kept."""

    def swap(match: re.Match) -> str:
        word, other = match.group(0), _MIRRORED[match.group(0).lower()]
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    return re.sub(r"\b(left|right)\b", swap, prompt, flags=re.IGNORECASE)
