import os

import pytest
import torch

from builders import (build_tiny_edm_sdxl, build_tiny_flux, build_tiny_pixart, build_tiny_sd, build_tiny_sd3,
                      build_tiny_sdxl)

from t2i_evolve.allocator import keep_freed_memory
from t2i_evolve.judges import PixelJudge
from t2i_evolve.world import GrammarPrompts

keep_freed_memory()  # as the commands run (t2i_evolve/allocator.py); subprocesses through the CLI do it themselves
if os.environ.get("PYTEST_XDIST_WORKER"):  # one process per core: one thread each, and so for subprocesses
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    """Grammar prompts shared by tests (fixed seed)."""
    return GrammarPrompts().sample(150, seed=1234)


@pytest.fixture(scope="session")
def judge() -> PixelJudge:
    return PixelJudge()


def _model_folder(build, name: str, doc: str):
    """A session fixture: a tiny random-init model folder that `build` writes (see builders.py)."""
    def folder(tmp_path_factory):
        return build(tmp_path_factory.mktemp(name) / f"tiny-{name}")

    folder.__doc__ = doc
    return pytest.fixture(scope="session", name=f"{name}_dir")(folder)


sd_dir = _model_folder(build_tiny_sd, "sd", "A Stable-Diffusion-style folder.")
sdxl_dir = _model_folder(build_tiny_sdxl, "sdxl", "An SDXL-style folder (two text encoders, size conditioning).")
pixart_dir = _model_folder(build_tiny_pixart, "pixart", "A PixArt-alpha-style folder (a DiT over T5 states).")
sd3_dir = _model_folder(build_tiny_sd3, "sd3", "An SD3-style folder (flow matching, three text encoders).")
flux_dir = _model_folder(build_tiny_flux, "flux", "A Flux-dev-style folder (flow matching over latent patches, T5, "
                         "guidance as an input).")
edm_dir = _model_folder(build_tiny_edm_sdxl, "edm", "An SDXL folder with an EDM schedule (only diffusers draws it).")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny shapes-world model folder, random init."""
    from t2i_evolve.models import init_tiny_model

    return init_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)
