"""Reading an LLM's reply as a list of prompts, without eval and without ever raising.

The templates ask for a JSON list of strings, but models wrap it: in ``` fences (with or without a
`json` tag), in an object (`{"prompts": [...]}`), between sentences of chatter. `parse_prompt_list`
tries, in order, the whole reply as JSON, each fenced block, and each JSON value that starts at a `[`
or `{` inside the reply, and takes the first that holds strings. Anything else (prose, a numbered list, a
truncated reply) gives `[]`: the writer counts it and asks again, which is more reliable than guessing
which lines of free text were meant as prompts.
"""

from __future__ import annotations

import json
import re
from itertools import islice
from collections.abc import Iterator
from typing import Any

_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n?(.*?)```", re.DOTALL | re.IGNORECASE)
_LIST_KEYS = ("prompts", "captions", "descriptions", "items", "results", "data", "output")
"""Keys looked at first in an object reply; any other list-valued key is tried after them."""
_ITEM_KEYS = ("prompt", "caption", "text", "description")
"""Keys whose string value is the prompt when a list holds objects (`[{"prompt": "..."}]`)."""
_MAX_STARTS = 64
"""How many `[` / `{` positions to try decoding from: bounds the work on a long, hostile reply."""
_MAX_DEPTH = 4


def parse_prompt_list(reply: Any) -> list[str]:
    """The prompts in `reply` (whitespace-normalised, empty ones dropped), or [] when there are none."""
    if not isinstance(reply, str):
        return []
    for value in json_values(reply):
        prompts = _strings(value, _MAX_DEPTH)
        if prompts:
            return prompts
    return []


def json_values(reply: str) -> Iterator[Any]:
    """JSON values the reply may mean, most likely first: all of it, a fenced block, a value inside."""
    yield from _whole(reply)
    for fence in _FENCE.finditer(reply):
        yield from _whole(fence.group(1))
    yield from _inside(reply)


def _whole(text: str) -> Iterator[Any]:
    try:
        yield json.loads(text)
    except (ValueError, RecursionError):
        pass


def _inside(text: str) -> Iterator[Any]:
    """Values that start at a `[` or `{` of `text` (the first `_MAX_STARTS` such places)."""
    decoder = json.JSONDecoder()
    for start in islice((i for i, ch in enumerate(text) if ch in "[{"), _MAX_STARTS):
        try:
            value, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            continue
        yield value


def _strings(value: Any, depth: int) -> list[str]:
    """The prompt strings a decoded JSON value holds, looking into objects up to `depth` levels."""
    if depth <= 0:
        return []
    if isinstance(value, list):
        items = [_item_text(item) for item in value]
        return [text for text in items if text]
    if isinstance(value, dict):
        keys = [k for k in _LIST_KEYS if k in value] + [k for k in value if k not in _LIST_KEYS]
        for key in keys:
            found = _strings(value[key], depth - 1)
            if found:
                return found
    return []


def _item_text(item: Any) -> str | None:
    """One list item as a prompt: a string, or an object with a prompt-like string field."""
    if isinstance(item, dict):
        item = next((item[k] for k in _ITEM_KEYS if isinstance(item.get(k), str)), None)
    if not isinstance(item, str):
        return None
    return " ".join(item.split()) or None
