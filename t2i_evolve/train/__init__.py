"""Training: denoising fine-tuning through accelerate, with exact resume, EMA and LoRA."""

from .data import TrainingSet, batch_indices, evolving_set, replayable_records
from .lora import LoraSettings
from .rounds import train_round
from .trainer import TrainConfig, Trainer

__all__ = ["LoraSettings", "TrainConfig", "Trainer", "TrainingSet", "batch_indices", "evolving_set",
           "replayable_records", "train_round"]
