"""Kill -9 a process in the middle of 1,000 cached generator calls, rerun it, and check the ledger.

The promise under test: after a crash and a rerun, every datum is recorded exactly once, no image file
is half-written under its final name, and the only calls paid twice are the ones that were in flight
when the process died (`Ledger.interrupted_calls()`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from forked import ForkedScript
from t2i_evolve.data import Ledger

WORKER = Path(__file__).with_name("crash_worker.py")
N = 1000
KILL_AFTER = 237  # not a multiple of the worker's chunks of 50, so the kill lands among calls, not records

_spec = importlib.util.spec_from_file_location("crash_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def start_worker(run_dir: Path, call_log: Path, batch_size: int) -> ForkedScript:
    return ForkedScript(WORKER, str(run_dir), str(call_log), "--n", str(N), "--batch-size", str(batch_size))


def done_calls(ledger_file: Path) -> int:
    if not ledger_file.exists():
        return 0
    db = sqlite3.connect(ledger_file, timeout=5)
    try:
        return db.execute("SELECT count(*) FROM calls WHERE status = 'done'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def kill_midway(process: ForkedScript, ledger_file: Path) -> int:
    """SIGKILL the worker once it has `KILL_AFTER` done calls; returns the count seen just before."""
    deadline = time.monotonic() + 60
    while (seen := done_calls(ledger_file)) < KILL_AFTER:
        assert process.poll() is None, f"worker ended early: {process.output()[1]}"
        assert time.monotonic() < deadline, "worker too slow"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return seen


@pytest.mark.parametrize("batch_size", [1, 8])
def test_kill_and_rerun_pays_only_for_interrupted_calls(tmp_path, batch_size):
    run_dir, call_log = tmp_path / "run", tmp_path / "calls.log"

    first = start_worker(run_dir, call_log, batch_size)
    seen = kill_midway(first, run_dir / "ledger.sqlite")
    assert first.returncode == -signal.SIGKILL
    assert done_calls(run_dir / "ledger.sqlite") < N, "the kill came too late to test anything"

    rerun = start_worker(run_dir, call_log, batch_size)
    done = rerun.result(timeout=120)
    assert done.returncode == 0, done.stderr

    expected = worker.requests(N)
    calls_seen_by_server = [json.loads(line) for line in call_log.read_text().splitlines()]
    logged = Counter((call["prompt"], call["seed"]) for call in calls_seen_by_server)
    assert set(logged) == set(expected)
    repeated = sum(logged.values()) - N

    with Ledger(run_dir) as ledger:
        records = ledger.records()
        assert sorted((r.prompt, r.seed) for r in records) == sorted(expected)
        calls = ledger.calls()
        assert len(calls) == N and {c.status for c in calls} == {"done"}
        assert any(c.attempts > 1 for c in calls), "the teacher's transient faults were never retried"
        assert sorted((c.request["prompt"], c.request["seed"]) for c in calls) == sorted(expected)
        interrupted = ledger.interrupted_calls()
        assert 0 <= repeated <= interrupted <= batch_size, (seen, repeated, interrupted)

        for record in records:
            image = np.asarray(ledger.load_image(record.image_path))
            assert (image == np.asarray(worker.teacher().draw(record.prompt, record.seed)[0])).all()

    final_name = re.compile(r"[0-9a-f]{64}\.png")
    for path in (run_dir / "images").rglob("*"):
        if path.is_dir():
            continue
        if final_name.fullmatch(path.name):
            assert path.parent.name == path.name[:2]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem, f"half-written {path}"
            Image.open(path).load()
        else:
            assert path.name.startswith(".") and path.name.endswith(".tmp"), f"unexpected file {path}"
