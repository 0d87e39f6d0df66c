"""A local diffusers-style model folder as a teacher: `T2IModel` + `Sampler`, with an id for the cache.

An open model on one's own GPU is often the cheapest strong teacher. Behind `CachedGenerator` it is
used exactly like a paid API: each (prompt, seed) is drawn once per setting and kept in the ledger.
The cache key is the teacher's id, so the id names everything that changes the images: the folder,
a fingerprint of its weight and config files (retraining into the same folder, or editing a config, must
not serve the old images),
the sampler settings and the dtype.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from pydantic import Field

from ..config import Config
from ..models.sampler import SamplerConfig

# What the images depend on besides the settings: the weights, and the configs and tokenizer files beside them
# (an edited scheduler_config.json, say another prediction_type, must not serve the old images).
FINGERPRINTED_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".json", ".txt", ".model")


class LocalPipelineTeacherConfig(Config):
    """A model folder (model_index.json + parts) and how to sample it."""

    path: Path = Field(description="The model folder.")
    sampler: SamplerConfig = SamplerConfig()
    device: str = "cpu"
    dtype: str = "float32"
    price_per_call: float = Field(0.0, ge=0, description="Assumed price of one image (compute), for budgets.")
    id: str | None = Field(None, description="Cache id; by default derived from the folder and the settings.")
    resolution: int | None = Field(None, ge=8, description="Side its images are resized to (a recipe sets its base "
                                   "model's, which it trains and judges at); None: as drawn.")


class LocalPipelineTeacher:
    """A `Generator` drawing with a local model folder; deterministic per (prompt, seed) on one device."""

    def __init__(self, config: LocalPipelineTeacherConfig | str | Path, **fields):
        """`config`, or a folder path with any other config fields as keywords (`price_per_call=0.01`)."""
        from ..models import Sampler, T2IModel  # diffusers loads in seconds: only when a teacher is built

        if not isinstance(config, LocalPipelineTeacherConfig):
            config = LocalPipelineTeacherConfig.from_dict({"path": str(config), **fields}, source="local teacher")
        elif fields:
            raise TypeError("pass settings in the config or as keywords with a path, not both")
        self.config = config
        model = T2IModel.from_pretrained(config.path, config.device, config.dtype)
        drawn = config.sampler.resolution or model.resolution
        self.resize = config.resolution if config.resolution not in (None, drawn) else None
        self.id = config.id or pipeline_id(config) + (f"->{self.resize}px" if self.resize else "")
        self.price_per_call = config.price_per_call
        self.sampler = Sampler(model, config.sampler, id=self.id)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        images = self.sampler.generate(prompts, seeds)
        if self.resize:  # (as an images endpoint's are: the student trains, and is judged, at its own size)
            images = [image.resize((self.resize, self.resize), Image.Resampling.LANCZOS) for image in images]
        return images


def pipeline_id(config: LocalPipelineTeacherConfig) -> str:
    """'local:<folder>@<weights fingerprint>:<scheduler>-<steps>[-cfg<g>][-<res>px]:<dtype>'.

    The batch size is left out: it does not change what an image shows (see `models.sampler`).
    """
    s = config.sampler
    guidance = f"-cfg{s.guidance:g}" if s.guidance != 1.0 else ""
    resolution = f"-{s.resolution}px" if s.resolution else ""
    root = Path(config.path).resolve()
    return f"local:{root}@{weights_fingerprint(root)}:{s.scheduler}-{s.steps}{guidance}{resolution}:{config.dtype}"


def weights_fingerprint(root: Path) -> str:
    """A short hash of the weight and config files' names, sizes and modification times (cheap for a 10 GB model;
    a copied folder gets a new fingerprint, which costs a cache miss, never a wrong image)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in FINGERPRINTED_SUFFIXES and p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]
