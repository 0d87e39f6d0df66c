"""Judges of prompt following. `PixelJudge` is exact for the shapes world; `OpenAIJudge` asks a VLM behind
any OpenAI-compatible endpoint (`serve-judge` plays that endpoint with the pixel judge), and `LocalVLMJudge`
asks a transformers VLM in-process, with the same requests and parsers."""

from ..errors import EndpointError
from .batch import compare_pairs
from .gate import QualityGate
from .local_vlm import LocalVLMConfig, LocalVLMJudge
from .openai_judge import ChatJudgeConfig, OpenAIJudge, OpenAIJudgeConfig, PairVerdict, VQAVerdict
from .pixel import PixelJudge
from .vlm_format import parse_pairwise, parse_vqa

__all__ = [
    "ChatJudgeConfig", "EndpointError", "LocalVLMConfig", "LocalVLMJudge", "OpenAIJudge", "OpenAIJudgeConfig",
    "PairVerdict", "PixelJudge", "QualityGate", "VQAVerdict", "compare_pairs", "parse_pairwise", "parse_vqa",
]
