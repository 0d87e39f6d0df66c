"""Rounds of training on data that changes between them, as one training run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Callable, Literal, Sequence

from pydantic import Field

from ..config import Config
from ..errors import UserError
from .data import IMAGE_MEMORY_GB, TrainingSet
from .lora import LoraSettings
from .trainer import BatchSize, EmaDecay, LearningRate, MixedPrecision, SnrGamma, TrainConfig, Trainer, WarmupSteps


class RoundTraining(Config):
    """The training settings a recipe gives each round's `TrainConfig` (what each does: there), so that one added
    to the trainer is one line here, not one per recipe. Defaults: the tiny shapes model on a CPU. A real base on a
    GPU: lr about 1e-5 (1e-4 with `lora: {rank: 16}`), mixed_precision bf16, and gradient_checkpointing (SDXL)."""

    batch_size: BatchSize = 16  # each process's, under a launcher
    grad_accum: int = Field(1, ge=1)
    lr: LearningRate = 2e-3
    lr_schedule: Literal["constant_with_warmup", "cosine", "linear"] = "constant_with_warmup"  # over all rounds
    weight_decay: float = Field(0.01, ge=0, allow_inf_nan=False)  # AdamW's (EvolveDirector: 0.03)
    snr_gamma: SnrGamma | None = 5.0
    warmup_steps: WarmupSteps = 20
    ema_decay: EmaDecay | None = 0.995
    random_flip: bool = False  # mirrored images, left/right swapped in their prompts
    train_text_encoder: bool = True  # false: the denoiser alone (EvolveDirector keeps PixArt-alpha's T5-XXL frozen)
    lora: LoraSettings | None = None  # adapters on the base, carried over the rounds; each round's model merged
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool = False
    max_image_memory_gb: float = Field(IMAGE_MEMORY_GB, ge=0)  # past this, a round's images are read batch by batch

    def round_training(self) -> dict:
        """These settings, as `TrainConfig` fields."""
        return self.model_dump(include=set(RoundTraining.model_fields))


def train_round(rounds_dir: Path, r: int, init: Path, data: Callable[[], TrainingSet], steps: int,
                launcher: Sequence[str] | None = None, keep_models: int | None = None, **settings) -> Path:
    """Train round `r` (folder `rounds_dir/00r`) `steps` more steps on `data()`, carrying on from round r-1's
    last checkpoint: weights, AdamW moments, the learning-rate schedule (`schedule_steps` in `settings` spans
    all rounds) and EMA go on, so no round warms up again. `settings`: the rest of a `TrainConfig`. Returns
    the round's model folder; a round whose model is saved is not trained again (`data` is not built), and
    one killed mid-way resumes from its own last checkpoint (`Trainer.run`). `launcher`: train as the processes
    it starts (`launched_training`), else in this one. `keep_models`: once round r's model is saved, the model
    folders of rounds before the last `keep_models` are deleted (none is read again: a saved round is not trained
    again, and the next carries on from this one's); None: all kept."""
    round_dir = rounds_dir / f"{r:03d}"
    if not (round_dir / "model" / "model_index.json").exists():
        last = sorted((rounds_dir / f"{r - 1:03d}" / "checkpoints").glob("step-*"))
        done = int(last[-1].name.removeprefix("step-")) if last else 0  # steps the run has trained so far
        config = TrainConfig(model=str(init), output_dir=str(round_dir), continue_from=str(last[-1]) if last else None,
                             steps=done + steps, **settings)
        if launcher:
            launched_training(config, data(), launcher, f"round {r}")
        else:
            Trainer(config, data()).run()
    drop_spent_checkpoints(rounds_dir, r)
    for old in range(1, r - keep_models + 1) if keep_models else ():
        (rounds_dir / f"{old:03d}" / "model" / "model_index.json").unlink(missing_ok=True)  # first: no folder left
        shutil.rmtree(rounds_dir / f"{old:03d}" / "model", ignore_errors=True)              # vouched for half deleted
    return round_dir / "model"


def launched_training(config: TrainConfig, data: TrainingSet, launcher: Sequence[str], what: str) -> None:
    """Train as the processes `launcher` starts (`accelerate launch --multi_gpu --num_processes 8`, `torchrun
    --standalone --nproc_per_node 8`), while the loop that called this, its ledger and its paid calls stay in this
    one: the set's manifest and the config go into the output folder, and `t2i-evolve train` reads them there."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = data.save(out / "training_set.json")
    config.model_copy(update={"data": str(manifest)}).save(out / "launched.yaml")
    command = [*launcher, "-m", "t2i_evolve.cli", "train", "--config", str(out / "launched.yaml")]
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL)
    except OSError as e:  # (no such launcher)
        raise UserError(f"{what}'s training: cannot start `{' '.join(launcher)}`: {e.strerror or e}") from None
    if done.returncode != 0:
        raise UserError(f"{what}'s training under `{' '.join(launcher)}` failed (exit {done.returncode}; its output "
                        "is above); rerun to resume it from its last checkpoint")


def drop_spent_checkpoints(rounds_dir: Path, r: int) -> None:
    """Once round `r`'s model is saved, only its last checkpoint is read again (round r+1 carries on from it):
    delete its earlier ones and round r-1's. Each holds weights, AdamW moments and EMA: about 14 GB for an
    SD1.5 UNet, so kept over every round they would fill a disk. Run by every process after the round's last
    barrier, and idempotent, so a kill between saving and deleting is made good by the rerun."""
    spent = [rounds_dir / f"{r - 1:03d}" / "checkpoints"]
    spent += sorted((rounds_dir / f"{r:03d}" / "checkpoints").glob("step-*"))[:-1]
    for folder in spent:
        shutil.rmtree(folder, ignore_errors=True)
