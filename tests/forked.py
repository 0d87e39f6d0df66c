"""Run a test's worker script in a process of its own, forked from one that has already imported the libraries.

The crash tests start some sixty worker processes (each is SIGKILLed or run to the end, then run again). A fresh
interpreter spent about 8 of a small evolve worker's 15 s importing torch, diffusers and transformers; a process
forked from a `multiprocessing` fork server that imported them once (per pytest worker) starts in a fraction of
a second. The child is still a separate process: it is SIGKILLed, its files and SQLite connections die with it,
and its exit code reads as `subprocess`'s would (-9 when killed), so the tests assert the same things.

The fork server imports and never computes, so no thread pool exists when it forks (forking after torch has
started its threads is what is unsafe).
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "diffusers", "transformers", "t2i_evolve.recipes.evolve",
                                 "t2i_evolve.train", "t2i_evolve.cli"])


def _run_script(script: str, args: list[str], env: dict[str, str], out: str, err: str) -> None:
    """In the child: stdout and stderr to files, then the script as `python script args` would run it."""
    for fd, path in ((1, out), (2, err)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(file, fd)
        os.close(file)
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).parent))
    runpy.run_path(script, run_name="__main__")


class ForkedScript:
    """A running script, with the part of `subprocess.Popen` the tests use: pid, poll, wait, send_signal and the
    output once it has ended."""

    def __init__(self, script: Path, *args: str, env: dict[str, str] | None = None):
        self._folder = tempfile.TemporaryDirectory(prefix="forked-")
        self._out, self._err = (os.path.join(self._folder.name, name) for name in ("stdout", "stderr"))
        self._process = _CONTEXT.Process(target=_run_script, args=(str(script), list(args), env or {}, self._out,
                                                                    self._err))
        self._process.start()
        self.pid = self._process.pid
        self.args = [str(script), *args]

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def output(self) -> tuple[str, str]:
        """stdout and stderr, read once the script has ended."""
        return tuple(Path(path).read_text(errors="replace") if os.path.exists(path) else ""
                     for path in (self._out, self._err))

    def result(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Wait for the end (killing the script past `timeout`) and return what `subprocess.run` would."""
        try:
            code = self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            self._process.join()
            raise
        stdout, stderr = self.output()
        self._folder.cleanup()
        return subprocess.CompletedProcess(self.args, code, stdout, stderr)


def run_script(script: Path, *args: str, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`subprocess.run([python, script, *args], capture_output=True, text=True)`, without the imports."""
    return ForkedScript(script, *args, env=env).result(timeout)
