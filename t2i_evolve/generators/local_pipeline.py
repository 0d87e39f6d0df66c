"""A local diffusers-style model folder as a teacher: `T2IModel` + `Sampler` (or, for a family `T2IModel` does not
read, such as Playground v2.5 or Kandinsky, diffusers' own pipeline class for it), with an id for the cache.

An open model on one's own GPU is often the cheapest strong teacher. Behind `CachedGenerator` it is
used exactly like a paid API: each (prompt, seed) is drawn once per setting and kept in the ledger.
The cache key is the teacher's id, so the id names everything that changes the images: the folder,
a fingerprint of its weight and config files (retraining into the same folder, or editing a config, must
not serve the old images),
the sampler settings and the dtype.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import Field, model_validator

from ..config import Config
from ..errors import UserError
from ..files import read_json
from ..models.sampler import SamplerConfig, guidance_tag, sampled_with

# What the images depend on besides the settings: the weights, and the configs and tokenizer files beside them
# (an edited scheduler_config.json, say another prediction_type, must not serve the old images).
FINGERPRINTED_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".json", ".txt", ".model")


FAMILY_SAMPLERS = {  # what a local teacher's `sampler` leaves out: each family's usual settings
    "shapes": SamplerConfig(),  # the tiny pixel-space shapes model: 20 DDIM steps, no guidance (what it learns with)
    "sd": SamplerConfig(scheduler="dpm++", steps=25, guidance=7.5),  # SD 1.x/2.x
    "sdxl": SamplerConfig(scheduler="dpm++", steps=30, guidance=5.0),
    "pixart": SamplerConfig(scheduler="dpm++", steps=20, guidance=4.5),
    "sd3": SamplerConfig(steps=28, guidance=7.0),  # (its own Euler steps)
    "flux": SamplerConfig(steps=28, guidance=3.5),  # Flux-dev: the guidance it reads (no unconditional pass)
    "flux-schnell": SamplerConfig(steps=4),  # distilled to a few steps, without guidance
}
FLOW_SAMPLED = frozenset({"sd3", "flux", "flux-schnell"})
"""The families drawn with their flow-matching Euler steps, whatever a sampler's `scheduler` says."""
PIPELINE_BATCH = 4  # images a diffusers pipeline draws at once under its own settings (a 1024 px Flux batch is big)


def folder_family(path: str | Path) -> str | None:
    """The `FAMILY_SAMPLERS` key of the model folder at `path`, from its model_index.json and configs alone; None for a
    folder `T2IModel` does not read (diffusers' own pipeline draws it: `runner`)."""
    from ..models.folders import known_family, read_index

    family = known_family(Path(path))
    if family == "flux":  # dev reads a guidance scale; schnell has none
        config = read_json(Path(path) / "transformer" / "config.json")
        return "flux" if isinstance(config, dict) and config.get("guidance_embeds") else "flux-schnell"
    if family != "unet":
        return family
    index = read_index(Path(path))
    has = lambda part: isinstance(index.get(part), list) and bool(index[part]) and index[part][0] is not None
    return "sdxl" if has("text_encoder_2") else "sd" if has("vae") else "shapes"  # (an absent part: [null, null])


def usual_sampler(path: str | Path) -> SamplerConfig | None:
    """The family's usual settings for the model folder at `path` (`FAMILY_SAMPLERS`); None for a folder diffusers'
    pipeline draws: then the pipeline's own steps and guidance."""
    family = folder_family(path)
    return None if family is None else FAMILY_SAMPLERS[family]


class FamilySampler(Config):
    """Sampling settings where each field left out (None) is the model family's usual (`FAMILY_SAMPLERS`), or for a
    folder diffusers' pipeline draws, that pipeline's own (its scheduler always: `scheduler` applies to our runner
    alone). How a local teacher draws, how `sample` and `eval` draw, and how `evolve` draws its base. A
    `SamplerConfig` given sets every field."""

    scheduler: Literal["ddim", "dpm++"] | None = None
    steps: int | None = Field(None, ge=1, le=10_000)
    guidance: float | None = Field(None, allow_inf_nan=False)
    batch_size: int | None = Field(None, ge=1)
    resolution: int | None = Field(None, ge=8)

    @model_validator(mode="before")
    @classmethod
    def _every_field_of_a_sampler_config(cls, value):
        return value.model_dump() if isinstance(value, SamplerConfig) else value

    def given(self) -> dict:
        """The fields set, as `SamplerConfig` fields."""
        return {name: value for name, value in self.model_dump().items() if value is not None}

    def over(self, usual: SamplerConfig) -> SamplerConfig:
        """The fields set, over `usual`'s."""
        return SamplerConfig(**usual.model_dump() | self.given())


class LocalPipelineTeacherConfig(Config):
    """A model folder (model_index.json + parts) and how to sample it."""

    path: Path = Field(description="The model folder.")
    sampler: FamilySampler = Field(default_factory=FamilySampler, description="How it draws; what it leaves out: "
                                    "the family's usual (`FAMILY_SAMPLERS`: SD 1.x/2.x 25 DPM++ steps at guidance 7.5, "
                                    "SDXL 30 at 5.0, PixArt 20 at 4.5, SD3 28 at 7.0, Flux-dev 28 reading 3.5, "
                                    "Flux-schnell 4 without guidance), or for a folder diffusers draws its pipeline's "
                                    "own. A `SamplerConfig` sets every field.")
    device: str = "cpu"
    dtype: str = "float32"
    price_per_call: float = Field(0.0, ge=0, description="Assumed price of one image (compute), for budgets.")
    id: str | None = Field(None, description="Cache id; by default derived from the folder and the settings.")
    resolution: int | None = Field(None, ge=8, description="Side its images are resized to (a recipe sets its base "
                                   "model's, which it trains and judges at); None: as drawn.")
    runner: Literal["auto", "t2i-evolve", "diffusers"] = Field(
        "auto", description="Who draws. t2i-evolve: `T2IModel` and our sampler (SD 1.x/2.x, SDXL, PixArt, SD3, "
        "Flux: checked equal to diffusers' pipelines; `sampler.scheduler` applies but to SD3 and Flux). diffusers: the "
        "pipeline class the folder names (any family: Flux, Playground, ...), with its own scheduler and prompt "
        "handling; "
        "a given sampler's `steps`, `guidance`, `resolution` and `batch_size` passed on, not its `scheduler` (none "
        "given: the pipeline's own). auto: t2i-evolve where it reads the folder, else diffusers.")
    offload: bool = Field(False, description="Hold the weights in CPU memory, on the device only while drawing: "
                          "several big teachers beside a base in training on one GPU. The images are the same (the id "
                          "too); each draw pays the move.")

    def sampling(self) -> SamplerConfig:
        """What our runner draws with: the fields given over the family's usual (`SamplerConfig`'s for a folder it
        does not read)."""
        return self.sampler.over(usual_sampler(self.path) or SamplerConfig())


class LocalPipelineTeacher:
    """A `Generator` drawing with a local model folder; deterministic per (prompt, seed) on one device."""

    def __init__(self, config: LocalPipelineTeacherConfig | str | Path, **fields):
        """`config`, or a folder path with any other config fields as keywords (`price_per_call=0.01`)."""
        from ..models import Sampler, T2IModel, resolve_device  # diffusers loads in seconds: only when built

        if not isinstance(config, LocalPipelineTeacherConfig):
            config = LocalPipelineTeacherConfig.from_dict({"path": str(config), **fields}, source="local teacher")
        elif fields:
            raise TypeError("pass settings in the config or as keywords with a path, not both")
        if config.runner == "auto":  # (the folder's family, as the id and the sampling read it)
            config = config.model_copy(update={"runner": "t2i-evolve" if folder_family(config.path) else "diffusers"})
        self.config, self.device = config, resolve_device(config.device)
        if config.runner == "t2i-evolve":
            model = T2IModel.from_pretrained(config.path, "cpu" if config.offload else self.device, config.dtype)
            self.sampler: Sampler | DiffusersPipeline = Sampler(model, config.sampling())
            drawn = self.sampler.config.resolution or model.resolution
        else:
            self.sampler = DiffusersPipeline(config)
            drawn = config.sampler.resolution or self.sampler.resolution
        self.resize = config.resolution if config.resolution not in (None, drawn) else None
        self.id = config.id or pipeline_id(config) + (f"->{self.resize}px" if self.resize else "")
        self.price_per_call = config.price_per_call

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        with self._on_device():
            images = self.sampler.generate(prompts, seeds)
        if self.resize:  # (as an images endpoint's are: the student trains, and is judged, at its own size)
            images = [image.resize((self.resize, self.resize), Image.Resampling.LANCZOS) for image in images]
        return images


    @contextmanager
    def _on_device(self) -> Iterator[None]:
        """`offload` with our runner: the model on its device for this draw, back in CPU memory after it (diffusers'
        pipelines move each part themselves: `enable_model_cpu_offload`)."""
        model = getattr(self.sampler, "model", None)
        if not (self.config.offload and model is not None and self.device.type != "cpu"):
            yield
            return
        model.to(self.device)
        try:
            yield
        finally:
            model.to("cpu")


def pipeline_id(config: LocalPipelineTeacherConfig) -> str:
    """'local:<folder>@<weights fingerprint>:<scheduler>-<steps>[-cfg<g>][-<res>px]:<dtype>' of what it draws with
    (`sampling()`), the scheduler 'flow-euler' for a flow-matching model (SD3, Flux: its Euler steps whatever
    `sampler.scheduler` says); for a folder diffusers' pipeline draws (`runner`), 'diffusers' with the settings given
    and 'own' for those the pipeline sets ('diffusers-own-cfgown': all of them).

    The batch size is left out: it does not change what an image shows (see `models.sampler`).
    """
    root = Path(config.path).resolve()
    family = folder_family(root)
    if config.runner == "diffusers" or config.runner == "auto" and family is None:
        given = config.sampler
        guidance = "-cfgown" if given.guidance is None else f"-cfg{given.guidance:g}" if given.guidance != 1.0 else ""
        steps, resolution = given.steps or "own", f"-{given.resolution}px" if given.resolution else ""
        return f"local:{root}@{weights_fingerprint(root)}:diffusers-{steps}{guidance}{resolution}:{config.dtype}"
    s = config.sampling()
    guidance = guidance_tag(s.guidance, family == "flux")  # (Flux-dev reads its scale: any but 1 changes it)
    resolution = f"-{s.resolution}px" if s.resolution else ""
    scheduler = sampled_with(s, family in FLOW_SAMPLED)
    return f"local:{root}@{weights_fingerprint(root)}:{scheduler}-{s.steps}{guidance}{resolution}:{config.dtype}"


class DiffusersPipeline:
    """A folder drawn by the diffusers pipeline class its model_index.json names: any family diffusers has (Flux,
    Playground, Kandinsky, ...), with the folder's own scheduler and prompt handling.

    Only diffusers' own classes and parts of diffusers or transformers are loaded, weights as safetensors: a folder
    naming code of its own (a custom pipeline or part) or holding any Python file is refused, never run. Each
    image's starting noise comes from a CPU generator seeded by its seed, so an image depends on (prompt, seed) and
    the settings, not on its batch (up to float rounding) nor the device's random state.
    """

    def __init__(self, config: LocalPipelineTeacherConfig):
        import diffusers
        import torch

        from ..models import resolve_device
        from ..models.folders import read_index

        root, self.settings = Path(config.path), config.sampler
        index = read_index(root)
        cls = getattr(diffusers, str(index.get("_class_name")), None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
            raise UserError(f"{root}: model_index.json names no diffusers pipeline ({index.get('_class_name')!r}); "
                            "a folder's own pipeline code is not run")
        foreign = [name for name, entry in index.items() if isinstance(entry, list) and len(entry) == 2
                   and entry[0] is not None and not _library_part(str(entry[0]))]
        if foreign:
            raise UserError(f"{root}: part {foreign[0]!r} comes from {index[foreign[0]][0]!r}; only diffusers and "
                            "transformers parts are loaded (a folder's own code is not run)")
        code = next(root.rglob("*.py"), None)  # (older diffusers import a part's `<library>.py` where there is one)
        if code is not None:
            raise UserError(f"{root}: holds Python code ({code.relative_to(root)}), which a model folder drawn here "
                            "may not: remove it (a folder's own code is not run)")
        dtype = getattr(torch, config.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise UserError(f"unknown dtype {config.dtype!r} (try float32, bfloat16, float16)")
        try:
            self.pipeline = cls.from_pretrained(root, use_safetensors=True, local_files_only=True, dtype=dtype,
                                                trust_remote_code=False)
            device = resolve_device(config.device)
            if config.offload and device.type != "cpu":  # each part on the device only while it runs
                self.pipeline.enable_model_cpu_offload(device=device)
            else:
                self.pipeline.to(device)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError, AttributeError) as e:
            hint = " (weights are read from .safetensors only)" if "safetensors" in _first_line(e) else ""
            raise UserError(f"{root}: cannot load as {cls.__name__}: {_first_line(e)}{hint}") from None
        self.pipeline.set_progress_bar_config(disable=True)
        self.name = f"{root} ({cls.__name__})"
        denoiser = getattr(self.pipeline, "transformer", None) or getattr(self.pipeline, "unet", None)
        side = getattr(self.pipeline, "default_sample_size", None) or getattr(getattr(denoiser, "config", None),
                                                                              "sample_size", None)
        scale = getattr(self.pipeline, "vae_scale_factor", None)
        self.resolution: int | None = side * scale if isinstance(side, int) and isinstance(scale, int) else None
        """The side it draws at by default (None where the pipeline does not say)."""

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        import torch

        s = self.settings  # (what it leaves out: the pipeline's own)
        settings = {"num_inference_steps": s.steps, "guidance_scale": s.guidance, "height": s.resolution,
                    "width": s.resolution}
        settings = {name: value for name, value in settings.items() if value is not None}
        batch = s.batch_size or PIPELINE_BATCH
        images: list[Image.Image] = []
        for start in range(0, len(prompts), batch):
            noise = [torch.Generator().manual_seed(int(seed)) for seed in seeds[start:start + batch]]
            try:
                with torch.no_grad():
                    images += self.pipeline(list(prompts[start:start + batch]), generator=noise, output_type="pil",
                                            **settings).images
            except (ValueError, TypeError, RuntimeError) as e:  # (settings it refuses; a full GPU)
                raise UserError(f"{self.name} cannot draw: {_first_line(e)}") from None
        return images


def _library_part(library: str) -> bool:
    """Whether a part model_index.json names comes from diffusers or transformers: those libraries, or one of
    diffusers' pipeline modules (an SD folder's `["stable_diffusion", "StableDiffusionSafetyChecker"]`)."""
    if library in ("diffusers", "transformers"):
        return True
    import importlib.util

    return library.isidentifier() and importlib.util.find_spec(f"diffusers.pipelines.{library}") is not None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def weights_fingerprint(root: Path) -> str:
    """A short hash of the weight and config files' names, sizes and modification times (cheap for a 10 GB model;
    a copied folder gets a new fingerprint, which costs a cache miss, never a wrong image)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in FINGERPRINTED_SUFFIXES and p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]
