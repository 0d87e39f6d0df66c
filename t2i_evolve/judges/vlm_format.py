"""What a VLM judge is asked and how its replies are read: chat messages, templates and strict parsers.

Both the OpenAI-compatible judge and the local transformers judge build their requests here, and
`serve-judge` reads them back here, so the three agree on one format:

- VQA: one request per image holding *all* of a prompt's yes/no questions, numbered; the reply is one
  line per question, `1: yes`. One request instead of one per question cuts calls (and money) by the
  number of questions, and the model sees the questions together, as TIFA/DSG ask them.
- Pairwise: one request with both images, labelled "First image" and "Second image"; the reply is one
  word from `PAIRWISE_TOKENS`. The caller randomises which image goes first (VLMs favour a position).

Templates are `string.Template` texts (`$prompt`, `$questions`, `$count`; a literal dollar is `$$`):
the defaults ship in `templates/`, and a user's own file can replace either one. The parsers are strict
(a reply either has exactly the asked shape or it is None, "unparseable") and total: any string, however
odd, returns a value or None and never raises, since a model's reply is untrusted input.

Structured output: with `structured=True` the request also carries an OpenAI `response_format` JSON
schema, which OpenAI, vLLM (all versions; its old `guided_choice` field was removed in 0.12) and SGLang
honour by constrained decoding; the parsers read that JSON as well as the plain-text form, so a server
that ignores the schema still works.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import string
from importlib import resources
from pathlib import Path
from typing import Literal, Sequence

from ..errors import ConfigError

Kind = Literal["vqa", "pairwise"]
PairwiseToken = Literal["first", "second", "tie"]
PAIRWISE_TOKENS: tuple[str, ...] = ("first", "second", "tie")
IMAGE_LABELS = ("First image:", "Second image:")
MAX_REPLY_CHARS = 20_000  # longer replies are not answers; refusing them keeps parsing cheap
_FIELDS = {"vqa": ({"prompt", "questions"}, {"prompt", "questions", "count"}), "pairwise": ({"prompt"}, {"prompt"})}
_REASK = {
    "vqa": 'Your reply could not be read. Reply again with exactly {n} lines, one per question, of the form '
           '"1: yes" or "1: no", and nothing else.',
    "pairwise": "Your reply could not be read. Reply again with exactly one word: first, second or tie.",
}
_STRUCTURED_NOTE = "Reply as JSON that follows the given schema."


def load_template(kind: Kind, path: str | Path | None = None) -> str:
    """The template text for `kind`: the packaged default, or the file at `path`.

    Raises `ConfigError` for a missing file or a template without its required fields (or with fields
    the judge does not fill), so a typo shows up when the judge is built, not as odd replies later.
    """
    if path is None:
        text = resources.files(__package__).joinpath("templates", f"{kind}.txt").read_text(encoding="utf-8")
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{kind} template not found: {path}")
        text = path.read_text(encoding="utf-8")
    template = string.Template(text)
    required, allowed = _FIELDS[kind]
    if not template.is_valid():
        raise ConfigError(f"{kind} template {path or '(default)'}: a '$' that is not a field (write $$ for a dollar)")
    fields = set(template.get_identifiers())
    if missing := required - fields:
        raise ConfigError(f"{kind} template {path or '(default)'}: missing ${sorted(missing)[0]}")
    if unknown := fields - allowed:
        raise ConfigError(f"{kind} template {path or '(default)'}: unknown field ${sorted(unknown)[0]}")
    return text


def template_hash(text: str) -> str:
    """Short content hash of a template; part of every cache key, so editing a template re-asks."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _one_line(text: str) -> str:
    """A prompt on one line, so the `Prompt:` line of a request can be read back."""
    return " ".join(text.split())


def vqa_text(template: str, prompt: str, questions: Sequence[str]) -> str:
    numbered = "\n".join(f"{i}. {_one_line(q)}" for i, q in enumerate(questions, 1))
    return string.Template(template).substitute(prompt=_one_line(prompt), questions=numbered, count=len(questions))


def pairwise_text(template: str, prompt: str) -> str:
    return string.Template(template).substitute(prompt=_one_line(prompt))


def vqa_messages(template: str, prompt: str, questions: Sequence[str], png: bytes, *,
                 structured: bool = False, previous: Sequence[str] = ()) -> list[dict]:
    """Chat messages asking all `questions` about one image; `previous` are earlier unreadable replies."""
    text = vqa_text(template, prompt, questions) + (f"\n\n{_STRUCTURED_NOTE}" if structured else "")
    content = [{"type": "image_url", "image_url": {"url": data_url(png)}}, {"type": "text", "text": text}]
    return _with_reasks(content, previous, _REASK["vqa"].format(n=len(questions)))


def pairwise_messages(template: str, prompt: str, first_png: bytes, second_png: bytes, *,
                      structured: bool = False, previous: Sequence[str] = ()) -> list[dict]:
    """Chat messages asking which of two images (in the order given) follows `prompt` better."""
    text = pairwise_text(template, prompt) + (f"\n\n{_STRUCTURED_NOTE}" if structured else "")
    content = []
    for label, png in zip(IMAGE_LABELS, (first_png, second_png)):
        content += [{"type": "text", "text": label}, {"type": "image_url", "image_url": {"url": data_url(png)}}]
    content.append({"type": "text", "text": text})
    return _with_reasks(content, previous, _REASK["pairwise"])


def _with_reasks(content: list[dict], previous: Sequence[str], reminder: str) -> list[dict]:
    """The question, then each earlier reply and a reminder of the format: a re-ask is a conversation,
    so a model that answered in prose sees what it wrote and is told what was expected instead."""
    messages = [{"role": "user", "content": content}]
    for reply in previous:
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": reminder}]
    return messages


def vqa_response_format(n: int) -> dict:
    """OpenAI `response_format` for `n` answers: {"answers": ["yes"|"no", ... n times]}."""
    schema = {
        "type": "object",
        "properties": {"answers": {"type": "array", "items": {"type": "string", "enum": ["yes", "no"]},
                                   "minItems": n, "maxItems": n}},
        "required": ["answers"],
        "additionalProperties": False,
    }
    return {"type": "json_schema", "json_schema": {"name": "vqa_answers", "schema": schema, "strict": True}}


def pairwise_response_format() -> dict:
    """OpenAI `response_format` for a verdict: {"verdict": "first"|"second"|"tie"}."""
    schema = {
        "type": "object",
        "properties": {"verdict": {"type": "string", "enum": list(PAIRWISE_TOKENS)}},
        "required": ["verdict"],
        "additionalProperties": False,
    }
    return {"type": "json_schema", "json_schema": {"name": "pairwise_verdict", "schema": schema, "strict": True}}


# --- parsing replies -------------------------------------------------------------------------------

_VQA_LINE = re.compile(r"(\d{1,4})\s*[:.)]\s*(yes|no)\.?", re.IGNORECASE)
_DECORATION = str.maketrans("", "", "*`\"'")


def _clean(text: str) -> str | None:
    """The reply without Markdown decoration and code fences; None for a non-string or huge reply."""
    if not isinstance(text, str) or len(text) > MAX_REPLY_CHARS:
        return None
    lines = [line for line in text.splitlines() if not line.strip().startswith("```")]
    cleaned = "\n".join(lines).strip()
    return cleaned if cleaned.startswith("{") else cleaned.translate(_DECORATION)


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def parse_vqa(text: str, n: int) -> list[bool] | None:
    """Exactly `n` answers from a reply, or None.

    Accepted: one line per question, `<number>: yes|no` (also `1. no`, `1) Yes.`), every number from 1
    to n exactly once, blank lines ignored, nothing else; or JSON {"answers": [n times "yes"/"no"]}.
    """
    cleaned = _clean(text)
    if cleaned is None or n < 1:
        return None
    if cleaned.startswith("{"):
        return _vqa_from_json(cleaned, n)
    answers: dict[int, bool] = {}
    for line in cleaned.splitlines():
        if not line.strip():
            continue
        match = _VQA_LINE.fullmatch(line.strip())
        if match is None:
            return None
        number = int(match.group(1))
        if number in answers or not 1 <= number <= n:
            return None
        answers[number] = match.group(2).lower() == "yes"
    if len(answers) != n:
        return None
    return [answers[i] for i in range(1, n + 1)]


def _vqa_from_json(text: str, n: int) -> list[bool] | None:
    data = _json_object(text)
    values = data.get("answers") if data is not None else None
    if not isinstance(values, list) or len(values) != n:
        return None
    out = []
    for value in values:
        if isinstance(value, bool):
            out.append(value)
        elif isinstance(value, str) and value.strip().lower() in ("yes", "no"):
            out.append(value.strip().lower() == "yes")
        else:
            return None
    return out


def parse_pairwise(text: str) -> PairwiseToken | None:
    """'first', 'second' or 'tie' from a reply that is exactly that word (any case, a trailing full stop
    and Markdown decoration allowed), or JSON {"verdict": ...}; otherwise None."""
    cleaned = _clean(text)
    if cleaned is None:
        return None
    if cleaned.startswith("{"):
        data = _json_object(cleaned)
        cleaned = data.get("verdict") if data is not None else None
        if not isinstance(cleaned, str):
            return None
    word = cleaned.strip().rstrip(".").strip().lower()
    return word if word in PAIRWISE_TOKENS else None  # type: ignore[return-value]


# --- reading requests back (serve-judge) ---------------------------------------------------------------

_PROMPT_LINE = re.compile(r'^Prompt: "(.*)"$', re.MULTILINE)
_QUESTION_LINE = re.compile(r"^(\d{1,4})\. (.+\?)$", re.MULTILINE)


def read_prompt(text: str) -> str | None:
    """The prompt of a request built from a template that keeps the default `Prompt: "$prompt"` line."""
    match = _PROMPT_LINE.search(text)
    return match.group(1) if match else None


def read_questions(text: str) -> list[str]:
    """The numbered questions of a VQA request (`1. Is there a circle?` lines), in order."""
    return [m.group(2) for m in _QUESTION_LINE.finditer(text)]


def format_vqa_reply(answers: Sequence[bool], structured: bool) -> str:
    """The reply a well-behaved judge gives (serve-judge answers with it)."""
    words = ["yes" if a else "no" for a in answers]
    if structured:
        return json.dumps({"answers": words})
    return "\n".join(f"{i}: {w}" for i, w in enumerate(words, 1))


def format_pairwise_reply(token: str, structured: bool) -> str:
    return json.dumps({"verdict": token}) if structured else token
