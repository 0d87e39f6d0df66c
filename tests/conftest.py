import pytest

from t2i_evolve.judges import PixelJudge
from t2i_evolve.world import GrammarPrompts


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    """Grammar prompts shared by tests (fixed seed)."""
    return GrammarPrompts().sample(150, seed=1234)


@pytest.fixture(scope="session")
def judge() -> PixelJudge:
    return PixelJudge()
