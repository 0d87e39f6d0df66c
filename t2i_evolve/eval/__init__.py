"""Evaluation: judged images -> DSG score, per-skill scores and GenEval-style task scores."""

from .scoring import ScoreBoard, evaluate, suite_prompts

__all__ = ["ScoreBoard", "evaluate", "suite_prompts"]
