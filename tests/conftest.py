import os

import pytest
import torch

from builders import build_tiny_pixart, build_tiny_sd, build_tiny_sd3, build_tiny_sdxl

from t2i_evolve.judges import PixelJudge
from t2i_evolve.world import GrammarPrompts

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


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory):
    """A tiny random-init Stable-Diffusion-style model folder."""
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    """A tiny random-init SDXL-style model folder (two text encoders, size conditioning)."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="session")
def pixart_dir(tmp_path_factory):
    """A tiny random-init PixArt-alpha-style folder (a DiT denoiser over T5 states)."""
    return build_tiny_pixart(tmp_path_factory.mktemp("pixart") / "tiny-pixart")


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    """A tiny random-init Stable-Diffusion-3-style folder (a family only diffusers' own pipeline draws)."""
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny shapes-world model folder, random init."""
    from t2i_evolve.models import init_tiny_model

    return init_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)
