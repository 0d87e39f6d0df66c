"""Independent jobs (a benchmark's arms) run side by side in worker processes, each with its share of the cores.

A worker ends with its parent: a benchmark stopped by SIGTERM or SIGKILL (no Ctrl-C reaching its workers) leaves
no arm training on, holding the cores the next run or CI would measure on. Killing an arm mid-round loses
nothing: every arm is an evolve run, and a rerun with the same `--out` resumes it from its ledger.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing.connection import wait

from t2i_evolve.allocator import keep_freed_memory
from t2i_evolve.errors import UserError
from t2i_evolve.progress import progress_bar


def run_arms(arms: dict, jobs: int, cost=None) -> dict:
    """Run every arm, name -> (function, arguments); with jobs > 1 in that many worker processes (on a GPU
    they share the device). Arms share no state: each is seeded by its own config. Returns name -> result,
    in the order given. `cost` (name -> a number): the costliest arms start first, so the workers end about
    together (the longest arm started last leaves the other cores idle while it runs)."""
    if jobs <= 1:
        keep_freed_memory()  # (this process runs them: as a worker would)
        results = {}
        with progress_bar("arms", len(arms)) as advance:
            for name, (fn, fn_args) in arms.items():
                with naming_the_arm(name):
                    results[name] = fn(*fn_args)
                advance(status=name)
        return results
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=start_worker, initargs=(threads,)) as pool:
        futures = {}
        for name in sorted(arms, key=cost, reverse=True) if cost else arms:  # (stable: ties as given)
            fn, fn_args = arms[name]
            futures[pool.submit(fn, *fn_args)] = name
        results = {}
        with progress_bar(f"arms ({jobs} at a time)", len(arms)) as advance:
            try:
                for future in as_completed(futures):
                    with naming_the_arm(futures[future]):
                        results[futures[future]] = future.result()
                    advance(status=futures[future])
            except BaseException:  # one arm failed (or Ctrl-C): start no more, report it now
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    return {name: results[name] for name in arms}


@contextmanager
def naming_the_arm(name) -> Iterator[None]:
    """An arm's one-line error (a config its data cannot serve, say) names the arm: the others' results are lost
    with the run, and a rerun with the same `--out` resumes them from their ledgers."""
    try:
        yield
    except UserError as e:
        raise UserError(f"arm {name}: {e}") from None


def numbers(parser: argparse.ArgumentParser, flag: str, text: str, kind=int, low: float = 0,
            high: float = math.inf) -> list:
    """A comma-separated list flag, each item a finite `kind` in [low, high): else one line, exit 2 (before any arm
    trains), not a traceback."""
    try:
        values = [kind(item) for item in text.split(",")]
    except ValueError:
        parser.error(f"{flag}: expected comma-separated {kind.__name__}s, not {text!r}")
    if bad := [v for v in values if not (math.isfinite(v) and low <= v < high)]:
        parser.error(f"{flag}: each in [{low:g}, {high:g}), not {bad[0]}")
    return values


def finite(text: str) -> float:
    """An argparse `type` for a float flag that must be a number (not nan, not inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"a finite number, not {text}")
    return value


def start_worker(threads: int) -> None:
    """A worker's share of the cores, no progress bars of its own (the parent draws one for all), and a
    watch on its parent that ends the worker when the parent is gone, however it ended."""
    import torch

    from t2i_evolve import progress

    keep_freed_memory()  # (as the commands run: an arm about 1.08x as fast on a CPU)
    torch.set_num_threads(threads)
    progress.console.quiet = True
    threading.Thread(target=exit_with, args=(multiprocessing.parent_process().sentinel,), daemon=True).start()


def exit_with(parent_sentinel: int) -> None:
    """Block until the parent process ends (its sentinel turns ready), then end this process at once."""
    wait([parent_sentinel])
    os._exit(1)
