"""Evaluation: judged images -> DSG score, per-skill scores and GenEval-style task scores."""

from .scoring import ScoreBoard, evaluate, judge_images, suite_prompts

__all__ = ["ScoreBoard", "evaluate", "judge_images", "suite_prompts"]
