"""The evolve benchmark's presets name real flags: `argparse.set_defaults` ignores a misspelt key, so a run
reproduced by preset name would quietly use another setting."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import evolve_efficiency  # noqa: E402


@pytest.mark.parametrize("preset", sorted(evolve_efficiency.PRESETS))
def test_every_preset_key_is_a_flag(preset):
    assert evolve_efficiency.preset_flags_unknown(evolve_efficiency.build_parser(), preset) == set()


def test_a_misspelt_preset_key_is_caught(monkeypatch):
    monkeypatch.setitem(evolve_efficiency.PRESETS, "typo", {"evolve_seed_prompt": 24, "rounds": 10})
    assert evolve_efficiency.preset_flags_unknown(evolve_efficiency.build_parser(), "typo") == {"evolve_seed_prompt"}
