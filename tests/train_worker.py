"""Runs a short training job, for tests/test_train.py's SIGKILL-and-resume test.

    python tests/train_worker.py MODEL_DIR OUTPUT_DIR STEPS
"""

import sys

from t2i_evolve.train import TrainConfig, Trainer, TrainingSet
from t2i_evolve.world import GrammarPrompts, ProceduralTeacher

PROMPTS = GrammarPrompts().sample(48, seed=7)


def training_set() -> TrainingSet:
    return TrainingSet.from_generator(ProceduralTeacher(), PROMPTS)


def config(model: str, output_dir: str, steps: int) -> TrainConfig:
    return TrainConfig(model=model, output_dir=output_dir, steps=steps, batch_size=8, grad_accum=2, lr=1e-3,
                       warmup_steps=2, ema_decay=0.9, checkpoint_every=3, keep_checkpoints=2, log_every=1,
                       tracker="none")


if __name__ == "__main__":
    model, output_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    Trainer(config(model, output_dir, steps), training_set()).run()
