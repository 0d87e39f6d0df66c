"""keep_freed_memory: a step's freed buffers stay in the process, so the next step does not fault them in again."""

import os
import platform
import subprocess
import sys

import pytest

from t2i_evolve.allocator import SWITCH, keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A step's activations: twelve 8 MB buffers live at once, freed at its end; ten steps after a first one.
STEPS = """
import resource, sys
from t2i_evolve.allocator import keep_freed_memory
kept = keep_freed_memory()
import numpy as np
def step():
    for a in [np.empty(2 << 20, np.float32) for _ in range(12)]:
        a.fill(1.0)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(switch: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {SWITCH: switch}
    kept, faults = subprocess.run([sys.executable, "-c", STEPS], env=env, capture_output=True, text=True,
                                  check=True).stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_buffers_are_reused_not_faulted_in_again():
    kept, faults_kept = page_faults("keep")
    default, faults_default = page_faults("default")
    assert (kept, default) == ("True", "False")
    assert faults_default > 10_000  # glibc as it is trims the freed heap: the next step faults ~6,000 pages back
    assert faults_kept < faults_default / 20


def test_switched_off_by_the_env_or_by_your_own_malloc_tunables(monkeypatch):
    monkeypatch.setenv(SWITCH, "Default")
    assert keep_freed_memory() is False
    monkeypatch.delenv(SWITCH)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert keep_freed_memory() is GLIBC
