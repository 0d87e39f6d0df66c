"""A VLM judge run in-process with transformers, from a local model folder (no server, no hub).

Same requests, templates, strict parsers, re-asks and ledger cache as `OpenAIJudge` (both are
`ChatJudge`s); only the transport differs: the chat messages are turned into the model's own chat
template with `AutoProcessor` and answered by `AutoModelForImageTextToText.generate` with greedy
decoding, a batch of conversations at a time. Weights load from safetensors only (a pickle checkpoint
can run code on load) and never from the network.

Use it when a GPU sits next to the training loop and a server would be one more thing to run; use
`OpenAIJudge` with vLLM for throughput.
"""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image
from pydantic import Field

from ..errors import ConfigError
from .openai_judge import ChatJudge, ChatJudgeConfig

if TYPE_CHECKING:
    from ..data import Ledger


class LocalVLMConfig(ChatJudgeConfig):
    """A transformers image-text-to-text model folder and how to run it."""

    model_path: str = Field(description="Folder with config.json, *.safetensors and the processor files.")
    device: str = Field("cpu", description="torch device, e.g. cpu, cuda, cuda:1.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class LocalVLMJudge(ChatJudge):
    """`Judge` answered by a local transformers VLM; `ledger` optional, as for `OpenAIJudge`."""

    def __init__(self, config: LocalVLMConfig, ledger: Ledger | None = None, **kwargs: Any):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        super().__init__(config, ledger, **kwargs)
        path = Path(config.model_path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model_path: no config.json in {path}")
        if not any(path.glob("*.safetensors")):
            raise ConfigError(f"model_path: no *.safetensors weights in {path} (pickle checkpoints are not loaded)")
        self.config: LocalVLMConfig = config
        self.id = config.judge_id or f"local:{path.name}:{_fingerprint(path)}"
        self.batch_size = config.batch_size or 8
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokenizer.padding_side = "left"  # decoder-only generation continues from the right end of each row
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True, use_safetensors=True, dtype=getattr(torch, config.dtype),
        ).to(config.device).eval()

    def __repr__(self) -> str:
        return f"LocalVLMJudge(id={self.id!r})"

    def _params(self) -> dict:
        return {"max_tokens": self.config.max_tokens, "decoding": "greedy"}

    def _complete(self, requests, conversations, keys) -> list[str]:
        import torch

        texts, images = [], []
        for messages in conversations:
            chat, pictures = _to_transformers(messages)
            texts.append(self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
            images.append(pictures)
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True).to(self.config.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.config.max_tokens, do_sample=False,
                                         num_beams=1)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [str(text) for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]


def _to_transformers(messages: list[dict]) -> tuple[list[dict], list[Image.Image]]:
    """OpenAI-style messages -> the content-parts form transformers chat templates read, and the images
    (decoded from their data URLs) in the order their placeholders appear."""
    chat, images = [], []
    for message in messages:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
        for part in content if isinstance(content, list) else []:
            if part["type"] == "image_url":
                data = part["image_url"]["url"].partition(",")[2]
                with Image.open(io.BytesIO(base64.b64decode(data))) as image:
                    images.append(image.convert("RGB"))
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": part["text"]})
        chat.append({"role": message["role"], "content": parts})
    return chat, images


def _fingerprint(path: Path) -> str:
    """A short hash of the model's config and weight files (names, sizes, mtimes), so retrained weights
    in the same folder are a different judge to the cache."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]
