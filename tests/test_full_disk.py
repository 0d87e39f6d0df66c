"""A full disk: no call is paid for without room to keep its answer, a checkpoint cut short leaves nothing
behind, a metrics line cut short does not stop the resume, and whatever library hits the full disk, the CLI
says it in one line (and that a rerun resumes).

CI once failed on a full disk (pytest's folders of three runs kept); a real run fills one faster: an SD1.5
checkpoint is ~14 GB.
"""

from __future__ import annotations

import errno
import shutil
import sqlite3

import pytest

from t2i_evolve.cli import main
from t2i_evolve.data import Ledger
from t2i_evolve.data import cache as call_cache
from t2i_evolve.data.cached import CachedGenerator
from t2i_evolve.errors import DiskFull, is_disk_full
from t2i_evolve.eval.report import read_jsonl
from t2i_evolve.train import TrainConfig, Trainer, TrainingSet
from t2i_evolve.train.ema import EMA
from t2i_evolve.world import GrammarPrompts, ProceduralTeacher


class CountingTeacher(ProceduralTeacher):
    """The strong procedural teacher, counting the images it is asked for (each one a paid call)."""

    def __init__(self):
        super().__init__()
        self.drawn = 0

    def generate(self, prompts, seeds):
        self.drawn += len(prompts)
        return super().generate(prompts, seeds)


def test_no_call_is_sent_or_counted_on_a_disk_too_full_to_keep_its_answer(tmp_path, monkeypatch):
    teacher, prompts = CountingTeacher(), GrammarPrompts().sample(6, seed=0)
    with Ledger(tmp_path) as ledger:
        generator = CachedGenerator(teacher, ledger)
        monkeypatch.setattr(call_cache, "MIN_FREE_BYTES", 2**62)  # more than any disk has free
        with pytest.raises(DiskFull, match="free some space and rerun the same command"):
            generator.generate(prompts, list(range(6)))
        assert teacher.drawn == 0 and ledger.call_count() == 0  # nothing paid, nothing counted against a budget
        monkeypatch.undo()
        assert all(image is not None for image in generator.generate(prompts, list(range(6))))
        assert teacher.drawn == 6 and [c.attempts for c in ledger.calls()] == [1] * 6
        monkeypatch.setattr(call_cache, "MIN_FREE_BYTES", 2**62)
        assert all(image is not None for image in generator.generate(prompts, list(range(6))))  # cached: no room needed
        assert teacher.drawn == 6


def test_a_checkpoint_cut_short_by_a_full_disk_leaves_nothing_and_the_rerun_resumes(tiny_dir, tmp_path, monkeypatch):
    """The disk fills while step 2's checkpoint is written: its half-written folder is removed (the room it took
    given back), step 1's stays, and after a metrics line cut short too, the rerun ends as an uninterrupted run."""
    prompts = GrammarPrompts().sample(8, seed=1)
    data = TrainingSet.from_generator(ProceduralTeacher(), prompts)
    config = TrainConfig(model=str(tiny_dir), output_dir=str(tmp_path), steps=3, batch_size=4, checkpoint_every=1,
                         log_every=1, ema_decay=0.9, tracker="none")
    saves = []
    real_save = EMA.save

    def save_until_the_disk_fills(ema, path):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(ema, path)

    monkeypatch.setattr(EMA, "save", save_until_the_disk_fills)
    with pytest.raises(OSError) as raised:
        Trainer(config, data).run()
    assert is_disk_full(raised.value)
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000001"]  # no .staging-0000002 left
    with open(tmp_path / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 2, "lo')  # the line being appended when the disk filled
    monkeypatch.undo()
    Trainer(config, data).run()
    assert [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert (tmp_path / "model" / "model_index.json").is_file()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000002", "step-0000003"]


def test_a_full_disk_torch_save_reports_as_unexpected_pos_is_told_by_the_room_left(tiny_dir, tmp_path, monkeypatch):
    """torch.save (AdamW moments, schedule, RNG states) says a full disk as "unexpected pos", with no errno: with
    the disk out of room it is `DiskFull`; with room to spare the same error stays itself (a bug to report)."""
    from accelerate import Accelerator

    data = TrainingSet.from_generator(ProceduralTeacher(), GrammarPrompts().sample(4, seed=2))
    config = TrainConfig(model=str(tiny_dir), output_dir=str(tmp_path), steps=1, batch_size=4, tracker="none")

    real_usage, disk_room = shutil.disk_usage, {"left": None, "fills": True}

    def save_state(self, folder, **kwargs):  # the disk fills with the checkpoint (the first time)
        disk_room["left"] = 4096 if disk_room["fills"] else None
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(
        free=disk_room["left"] or real_usage(path).free))
    with pytest.raises(DiskFull, match=r"too little for checkpoint step-0000001 \(RuntimeError: .* unexpected pos"):
        Trainer(config, data).run()
    assert not list(tmp_path.glob("checkpoints/*"))
    disk_room["left"], disk_room["fills"] = None, False
    with pytest.raises(RuntimeError, match="unexpected pos"):
        Trainer(config, data).run()


def test_training_that_could_not_save_its_first_checkpoint_does_not_start(tiny_dir, tmp_path, monkeypatch):
    """The estimate of a checkpoint's size is within a fifth of the real one (full tuning with EMA, and LoRA);
    with less room than that, the run stops before its first step, in one line, and nothing is written."""
    data = TrainingSet.from_generator(ProceduralTeacher(), GrammarPrompts().sample(4, seed=3))
    for name, settings in [("full", {"ema_decay": 0.9}), ("lora", {"lora": {"rank": 4}})]:
        config = TrainConfig(model=str(tiny_dir), output_dir=str(tmp_path / name), steps=1, batch_size=4,
                             tracker="none", **settings)
        trainer = Trainer(config, data)
        trainer.run()
        written = sum(f.stat().st_size for f in (tmp_path / name / "checkpoints").rglob("*") if f.is_file())
        assert abs(trainer.checkpoint_bytes() / written - 1) < 0.2, (name, trainer.checkpoint_bytes(), written)
    real_usage, fresh = shutil.disk_usage, tmp_path / "no-room" / "train"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=written))
    trainer = Trainer(config.model_copy(update={"output_dir": str(fresh)}), data)
    with pytest.raises(DiskFull, match=r"too little for a checkpoint of this run, about \d+ MB and the 64 MB kept free\)"):
        trainer.run()
    assert trainer.step == 0 and not fresh.exists()


class SafetensorError(Exception):
    """What safetensors raises (not an `OSError`) when its file does not fit."""

    __module__ = "safetensors._safetensors_rust"


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device", "rounds/001/model.safetensors"),
    sqlite3.OperationalError("database or disk is full"),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
], ids=["oserror", "sqlite", "safetensors"])
def test_a_full_disk_is_one_line_that_says_a_rerun_resumes(error, tmp_path, monkeypatch, capsys):
    import t2i_evolve.recipes.evolve as evolve_recipe

    def fill_the_disk(config):
        raise error

    monkeypatch.setattr(evolve_recipe, "run_evolve", fill_the_disk)
    assert main(["evolve", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the disk is full (") and "rerun the same command" in err
    assert "Traceback" not in err


def test_other_errors_are_not_taken_for_a_full_disk(tmp_path, monkeypatch):
    import t2i_evolve.recipes.evolve as evolve_recipe

    assert not is_disk_full(sqlite3.OperationalError("database is locked"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("the server said: No space left on device"))  # not our disk
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as cause:
            raise RuntimeError("could not save the model") from cause
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)  # a library's own error raised from the full disk

    def fail(config):
        raise RuntimeError("a bug")

    monkeypatch.setattr(evolve_recipe, "run_evolve", fail)
    with pytest.raises(RuntimeError, match="a bug"):  # a bug stays a traceback, to be reported
        main(["evolve", "--out", str(tmp_path / "run")])


def test_a_run_folder_in_use_by_another_process_is_refused_and_freed_when_it_dies(tmp_path, capsys):
    """A command started twice on one folder (or a requeued job) would pay again for the other's calls in flight:
    the second stops in one line naming the first; once the first is gone, even by SIGKILL, the folder is free."""
    import signal
    import subprocess
    import sys

    from t2i_evolve.data import claim_run_folder, release_run_folder

    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from t2i_evolve.data import claim_run_folder; "
         "claim_run_folder(sys.argv[1], 'evolve'); print('claimed', flush=True); time.sleep(120)", str(folder)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "claimed\n"
        assert main(["evolve", "--out", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {folder} is in use by t2i-evolve evolve (pid {holder.pid}): let it finish or stop it, then rerun\n"
        assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # nothing else written, nothing paid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert claim_run_folder(folder, "evolve") == folder
    assert claim_run_folder(folder, "demo") == folder  # this process holds it: claiming again is a no-op
    assert _claimed_elsewhere(folder)  # held from another process's view, until released
    release_run_folder(folder)
    assert not _claimed_elsewhere(folder)
    claim_run_folder(folder, "evolve")
    shutil.rmtree(folder)  # deleted with its lock file, and made again: this process claims it afresh
    claim_run_folder(folder, "evolve")
    assert _claimed_elsewhere(folder)
    release_run_folder(folder)


def _claimed_elsewhere(folder) -> bool:
    """Whether a new process is refused `folder`."""
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", "import sys; from t2i_evolve.data import claim_run_folder; "
                            "claim_run_folder(sys.argv[1], 'probe')", str(folder)], capture_output=True, text=True)
    return probe.returncode != 0 and "is in use by" in probe.stderr
