"""Training: denoising fine-tuning through accelerate, with exact resume, EMA and LoRA."""

from .data import TrainingSet, batch_indices, evolving_set, replayable_records
from .lora import LoraSettings
from .rounds import train_round
from .trainer import BatchSize, EmaDecay, LearningRate, Seed, SnrGamma, TrainConfig, Trainer, WarmupSteps, mirror_prompt

__all__ = ["BatchSize", "EmaDecay", "LearningRate", "LoraSettings", "Seed", "SnrGamma", "TrainConfig", "Trainer",
           "TrainingSet", "WarmupSteps", "batch_indices", "evolving_set", "mirror_prompt", "replayable_records",
           "train_round"]
