"""Rounds of training on data that changes between them, as one training run."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from .data import TrainingSet
from .trainer import TrainConfig, Trainer


def train_round(rounds_dir: Path, r: int, init: Path, data: Callable[[], TrainingSet], steps: int,
                **settings) -> Path:
    """Train round `r` (folder `rounds_dir/00r`) `steps` more steps on `data()`, carrying on from round r-1's
    last checkpoint: weights, AdamW moments, the learning-rate schedule (`schedule_steps` in `settings` spans
    all rounds) and EMA go on, so no round warms up again. `settings`: the rest of a `TrainConfig`. Returns
    the round's model folder; a round whose model is saved is not trained again (`data` is not built), and
    one killed mid-way resumes from its own last checkpoint (`Trainer.run`)."""
    round_dir = rounds_dir / f"{r:03d}"
    if not (round_dir / "model" / "model_index.json").exists():
        last = sorted((rounds_dir / f"{r - 1:03d}" / "checkpoints").glob("step-*"))
        done = int(last[-1].name.removeprefix("step-")) if last else 0  # steps the run has trained so far
        config = TrainConfig(model=str(init), output_dir=str(round_dir), continue_from=str(last[-1]) if last else None,
                             steps=done + steps, **settings)
        Trainer(config, data()).run()
    drop_spent_checkpoints(rounds_dir, r)
    return round_dir / "model"


def drop_spent_checkpoints(rounds_dir: Path, r: int) -> None:
    """Once round `r`'s model is saved, only its last checkpoint is read again (round r+1 carries on from it):
    delete its earlier ones and round r-1's. Each holds weights, AdamW moments and EMA: about 14 GB for an
    SD1.5 UNet, so kept over every round they would fill a disk. Run by every process after the round's last
    barrier, and idempotent, so a kill between saving and deleting is made good by the rerun."""
    spent = [rounds_dir / f"{r - 1:03d}" / "checkpoints"]
    spent += sorted((rounds_dir / f"{r:03d}" / "checkpoints").glob("step-*"))[:-1]
    for folder in spent:
        shutil.rmtree(folder, ignore_errors=True)
