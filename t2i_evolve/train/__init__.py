"""Training: denoising fine-tuning through accelerate, with exact resume, EMA and LoRA."""

from .data import IMAGE_MEMORY_GB, ImageFiles, TrainingSet, batch_indices, evolving_set, replayable_records
from .lora import LoraSettings
from .rounds import RoundTraining, train_round
from .trainer import (BatchSize, EmaDecay, LearningRate, Seed, SnrGamma, TrainConfig, Trainer, WarmupSteps,
                      mirror_prompt)

__all__ = ["IMAGE_MEMORY_GB", "BatchSize", "EmaDecay", "ImageFiles", "LearningRate", "LoraSettings", "RoundTraining", "Seed", "SnrGamma",
           "TrainConfig", "Trainer", "TrainingSet", "WarmupSteps", "batch_indices", "evolving_set", "mirror_prompt",
           "replayable_records", "train_round"]
