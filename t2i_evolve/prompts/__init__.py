"""Prompt writers: the shapes grammar offline, and an LLM over OpenAI-compatible chat completions.

Both follow `protocols.PromptWriter` (sample, variations, new_structures, skill_prompts) and return
distinct prompts only. `parsing` reads an LLM reply as a list of prompts; `dedup` drops near-duplicates
by ROUGE-L, as self-instruct does; `coverage` picks the new prompt naming what a set has seen least.
"""

from .coverage import content_words, least_seen, least_seen_new_structure, word_counts
from .dedup import DEFAULT_THRESHOLD, Deduper, dedup, normalize
from .grammar_writer import GrammarPromptWriter, exercises, structure
from .openai_writer import OpenAIPromptWriter, OpenAIPromptWriterConfig, load_templates, prime_writer
from .parsing import parse_prompt_list

__all__ = [
    "DEFAULT_THRESHOLD",
    "Deduper",
    "GrammarPromptWriter",
    "OpenAIPromptWriter",
    "OpenAIPromptWriterConfig",
    "content_words",
    "dedup",
    "exercises",
    "least_seen",
    "least_seen_new_structure",
    "load_templates",
    "normalize",
    "parse_prompt_list",
    "prime_writer",
    "structure",
    "word_counts",
]
