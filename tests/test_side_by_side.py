"""A benchmark killed without Ctrl-C (SIGTERM from a job runner, SIGKILL) takes its arm workers with it:
before, they trained on for minutes, holding the cores the next run or CI measured on."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"

SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    from side_by_side import run_arms

    def arm(pid_file):
        with open(pid_file + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)
        time.sleep(120)  # an arm mid-training

    if __name__ == "__main__":
        run_arms({name: (arm, (os.path.join(sys.argv[2], name),)) for name in ("a", "b")}, jobs=2)
""")


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a container's init that never reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_arm_workers_end_with_a_killed_benchmark(tmp_path, sig):
    (tmp_path / "bench.py").write_text(SCRIPT)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "bench.py"), str(BENCHMARKS), str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_files = [tmp_path / "a", tmp_path / "b"]
    workers = []
    try:
        assert wait_for(lambda: all(f.exists() for f in pid_files), 120), "the arms never started"
        workers = [int(f.read_text()) for f in pid_files]
        assert all(running(pid) for pid in workers)
        parent.send_signal(sig)
        parent.wait(30)
        assert wait_for(lambda: not any(running(pid) for pid in workers), 15), "a worker outlived the benchmark"
    finally:
        parent.kill()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


ORDER_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    from side_by_side import run_arms

    def arm(log, name):
        with open(log, "a") as f:
            f.write(name + "\\n")
        time.sleep(0.5)
        return name.upper()

    if __name__ == "__main__":
        log = os.path.join(sys.argv[2], "started")
        cost = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 2}
        results = run_arms({name: (arm, (log, name)) for name in "abcde"}, jobs=2, cost=cost.get)
        print(",".join(f"{k}={v}" for k, v in results.items()))
""")


def test_the_costliest_arms_start_first_and_results_keep_the_given_order(tmp_path):
    """With two workers, the longest arms start together; results still come back in the order given."""
    (tmp_path / "bench.py").write_text(ORDER_SCRIPT)
    done = subprocess.run([sys.executable, str(tmp_path / "bench.py"), str(BENCHMARKS), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "a=A,b=B,c=C,d=D,e=E"
    started = (tmp_path / "started").read_text().split()
    # (two workers may log the arms they took together in either order)
    assert set(started[:2]) == {"d", "c"} and set(started[2:4]) == {"e", "b"} and started[4] == "a"  # e ties c
