"""Data safety of the ledger and of imagefolder export/import: never delete or change what is not ours.

Each test reproduces a defect found by an audit: an export that deleted a user's own dataset because its
images had numeric names, a traceback (and a changed file) on a ledger file of another program, and an
import that misreported what it added and left an empty ledger behind when it failed.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest
from PIL import Image

from t2i_evolve.cli import main
from t2i_evolve.data import Ledger
from t2i_evolve.data.imagefolder import MANIFEST, export_imagefolder, import_imagefolder
from t2i_evolve.errors import UserError


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
    return buffer.getvalue()


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `t2i-evolve ARGS`, with line wrapping undone in stdout."""
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, " ".join(captured.out.split()), captured.err


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_dataset(root, n: int = 6) -> dict[str, bytes]:
    """A user's own imagefolder at `root/train`: `1.png`..`n.png` and a metadata.jsonl."""
    train = root / "train"
    train.mkdir(parents=True)
    for i in range(1, n + 1):
        (train / f"{i}.png").write_bytes(png((i * 30, 0, 0)))
    rows = [{"file_name": f"{i}.png", "prompt": f"my picture {i}"} for i in range(1, n + 1)]
    (train / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return snapshot(root)


@pytest.fixture
def run_dir(tmp_path):
    """A run folder with two active records and one deleted one."""
    run = tmp_path / "run"
    with Ledger(run) as ledger:
        for i in range(3):
            ledger.add_record(prompt=f"prompt {i}", generator="teacher", seed=i,
                              image=Image.new("RGB", (4, 4), (0, i * 40, 0)))
        ledger.delete_record(3, round=1)
    return run


# 1. Export never deletes files it did not write.


def test_export_keeps_a_users_dataset_with_numbered_images(run_dir, tmp_path, capsys):
    before = user_dataset(tmp_path / "myset")
    code, out, err = cli(capsys, "ledger", "export", run_dir, "--to", tmp_path / "myset", "--status", "deleted")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(tmp_path / "myset") in err and "empty or new folder" in err
    assert snapshot(tmp_path / "myset") == before
    code, out, err = cli(capsys, "ledger", "export", run_dir, "--to", run_dir)  # (its first file: .lock, or images)
    assert code == 2 and "it is a run folder" in err and err.count("\n") == 1


def test_export_refuses_other_files_next_to_train(run_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metadata.jsonl").write_text("{}\n")
    with Ledger(run_dir) as ledger, pytest.raises(UserError, match="empty or new folder"):
        export_imagefolder(ledger, tmp_path / "out")
    assert snapshot(tmp_path / "out") == {"metadata.jsonl": b"{}\n"}


def test_export_reruns_into_its_own_folder_and_removes_only_its_own_files(run_dir, tmp_path):
    out = tmp_path / "out"
    with Ledger(run_dir) as ledger:
        assert export_imagefolder(ledger, out, status=None) == 3
        assert export_imagefolder(ledger, out) == 2  # the deleted record's image goes
        assert sorted(p.name for p in (out / "train").glob("*.png")) == ["1.png", "2.png"]
        manifest = json.loads((out / "train" / MANIFEST).read_text())
        assert sorted(manifest["files"]) == ["1.png", "2.png", "metadata.jsonl"]

        (out / "train" / "7.png").write_bytes(png((1, 2, 3)))  # the user's, not ours
        before = snapshot(out)
        with pytest.raises(UserError, match="7.png"):
            export_imagefolder(ledger, out, status=None)
        assert snapshot(out) == before


# 2. A file that is not one of our ledgers is refused in one line, and left as it was.


def test_a_corrupt_ledger_file_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "ledger.sqlite").write_bytes(b"junk\n")
    code, out, err = cli(capsys, "ledger", "stats", tmp_path / "fake")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert str(tmp_path / "fake" / "ledger.sqlite") in err
    with pytest.raises(UserError, match="not a database"):
        Ledger(tmp_path / "fake")
    assert (tmp_path / "fake" / "ledger.sqlite").read_bytes() == b"junk\n"


def damaged_copies(tmp_path) -> dict[str, object]:
    """Two copies of a 40-record run folder: one with its pages past the header overwritten (SQLite opens it, and
    fails at the first read of a table), one with a row whose JSON does not parse."""
    import random

    good = tmp_path / "good"
    with Ledger(good) as ledger:
        for i in range(40):
            ledger.add_record(prompt=f"a red circle {i}", generator="teacher", seed=i, image=Image.new("RGB", (4, 4)))
    pages, row = tmp_path / "pages", tmp_path / "row"
    for copy in (pages, row):
        shutil.copytree(good, copy)
    data = bytearray((pages / "ledger.sqlite").read_bytes())
    data[4096:] = random.Random(0).randbytes(len(data) - 4096)
    (pages / "ledger.sqlite").write_bytes(bytes(data))
    with sqlite3.connect(row / "ledger.sqlite") as db:
        db.execute("UPDATE records SET skills = '[bad' WHERE id = 3")
    db.close()
    return {"pages": pages, "row": row}


def test_a_ledger_damaged_past_its_header_is_one_line_naming_it(tiny_dir, tmp_path, capsys):
    for damage, run in damaged_copies(tmp_path).items():
        before = snapshot(run)
        train = ["train", f"model={tiny_dir}", f"data={run}", f"output_dir={tmp_path / 'trained'}", "steps=1"]
        for args in (["ledger", "stats", run], ["ledger", "stats", run, "--json"], ["ledger", "history", run, "3"],
                     ["ledger", "export", run, "--to", tmp_path / "exported"], train):
            code, out, err = cli(capsys, *args)
            assert code == 2 and err.count("\n") == 1 and f"{run / 'ledger.sqlite'} is damaged" in err, (damage, args, err)
            assert ("JSON does not parse" in err) == (damage == "row"), err
        assert snapshot(run) == before  # (nothing written into it, and nothing made elsewhere)
        assert not (tmp_path / "exported").exists() and not (tmp_path / "trained").exists()


def test_an_unreadable_reply_is_not_taken_for_a_damaged_ledger(tmp_path):
    """A JSON error raised by a teacher or judge the ledger was calling is the reply's, not the ledger file's."""
    from t2i_evolve.data.ledger import damaged_ledger

    with Ledger(tmp_path / "run") as ledger:
        with pytest.raises(json.JSONDecodeError) as raised:
            ledger.cached_call("judge", {"q": 1}, lambda: json.loads("{not json"))
        assert damaged_ledger(raised.value) is None
        assert ledger.calls()[0].status == "failed"  # (the ledger itself reads on)


def test_an_sqlite_file_of_another_program_is_refused_untouched(tmp_path):
    path = tmp_path / "other" / "ledger.sqlite"
    path.parent.mkdir()
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE records (title TEXT, artist TEXT)")
    db.execute("INSERT INTO records VALUES ('Blue Train', 'Coltrane')")
    db.commit()
    db.close()
    before = snapshot(path.parent)
    with pytest.raises(UserError) as error:
        Ledger(path.parent)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "not a t2i-evolve ledger" in message
    assert snapshot(path.parent) == before


# 3. Import: the flag in its message, what it really added, and no empty ledger when it fails.


def source_folder(root, rows: list[dict]) -> None:
    root.mkdir(parents=True)
    for i in range(len(rows)):
        (root / f"{i}.png").write_bytes(png((0, 0, i * 50)))
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_import_rerun_reports_what_it_added(tmp_path, capsys):
    source_folder(tmp_path / "src", [{"file_name": f"{i}.png", "prompt": f"p {i}"} for i in range(4)])
    code, out, _ = cli(capsys, "ledger", "import", tmp_path / "run", "--from", tmp_path / "src")
    assert code == 0 and out.startswith("imported 4 new records")
    code, out, _ = cli(capsys, "ledger", "import", tmp_path / "run", "--from", tmp_path / "src")
    assert code == 0 and out.startswith("imported 0 new records"), out
    with Ledger(tmp_path / "run") as ledger:
        result = import_imagefolder(ledger, tmp_path / "src")
        assert (result.added, result.existing) == (0, 4)
        assert result.summary == "0 new records (4 already in the ledger)"
        assert ledger.count() == 4


def test_failed_import_names_the_flag_and_creates_no_ledger(tmp_path, capsys):
    source_folder(tmp_path / "src", [{"file_name": "0.png", "label": "no prompt here"}])
    code, out, err = cli(capsys, "ledger", "import", tmp_path / "run", "--from", tmp_path / "src")
    assert code == 2 and err.count("\n") == 1
    assert "--prompt-column" in err and "prompt_column" not in err
    assert not (tmp_path / "run").exists()
    ledger = Ledger(tmp_path / "run2")
    with pytest.raises(UserError):
        import_imagefolder(ledger, tmp_path / "src")
    assert not (tmp_path / "run2").exists()
    assert ledger.count(None) == 0  # the ledger still works; its first use creates it
    ledger.close()


# 4. What a review found: a CSV row with a stray comma, markup in a report, a re-export, a retried call's round.


def test_a_csv_row_with_more_fields_than_its_header_is_one_line_not_a_cut_prompt(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "0.png").write_bytes(png((9, 9, 9)))
    (src / "metadata.csv").write_text("file_name,prompt\n0.png,two red circles, left of a blue square\n")
    code, _, err = cli(capsys, "ledger", "import", tmp_path / "run", "--from", src)
    assert code == 2 and "metadata.csv:2: 3 fields where the header has 2" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    (src / "metadata.csv").write_text('file_name,prompt\n0.png,"two red circles, left of a blue square"\n')
    assert cli(capsys, "ledger", "import", tmp_path / "run", "--from", src)[0] == 0
    with Ledger(tmp_path / "run") as ledger:
        assert [rec.prompt for rec in ledger.records()] == ["two red circles, left of a blue square"]


def test_markup_in_a_run_summary_is_escaped_in_report_html(tmp_path):
    from t2i_evolve.eval.report import write_rounds_report

    script = "</pre><script>alert(1)</script>"  # a skill name from an imported metadata.jsonl, say
    write_rounds_report(tmp_path, "run", {"ledger": {"skills": {script: 1}}, "rounds": []}, [], tmp_path, tmp_path,
                        sampler_config=None)
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_a_re_export_writes_no_image_over_an_unchanged_one(run_dir, tmp_path):
    """Images are written aside and renamed (a kill mid-copy cannot cut one short), and only when missing."""
    out = tmp_path / "out"
    with Ledger(run_dir) as ledger:
        export_imagefolder(ledger, out)
        first = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.png")}
        (out / "train" / "2.png").unlink()
        export_imagefolder(ledger, out)
        again = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.png")}
    assert again.keys() == first.keys() and again["1.png"] == first["1.png"]
    assert snapshot(out)["train/2.png"] == (run_dir / Ledger(run_dir).record(2).image_path).read_bytes()


def test_a_call_retried_in_a_later_round_stays_in_its_first(tmp_path):
    """`ledger stats` per round and the judge budget of a round rerun count a call where it was first sent
    (here: killed mid-call in round 1, sent again by the rerun of round 2), and once: the request was counted
    when the process that died sent it."""
    from t2i_evolve.data.cache import content_key

    with Ledger(tmp_path / "run") as ledger:
        with ledger.transaction() as db:  # what a process killed mid-call leaves: its row pending
            db.execute("INSERT INTO calls (key, caller, request, status, attempts, round, created_at, updated_at) "
                       "VALUES (?, 'judge', '{\"q\": 1}', 'pending', 1, 1, '', '')", (content_key(["judge", {"q": 1}]),))
        assert ledger.cached_call("judge", {"q": 1}, lambda: {"ok": 1}, round=2, backoff_s=0) == {"ok": 1}
        (row,) = ledger.calls()
        assert (row.round, row.attempts, row.interrupted, row.status) == (1, 1, 1, "done")


# 5. What a second review found: a temp image a kill left, another run's export, pixels that do not decode.


def test_an_export_killed_mid_copy_is_finished_by_the_next(run_dir, tmp_path):
    """A kill while an image was written aside leaves `write_atomically`'s temp file: ours, not a stranger."""
    out = tmp_path / "out"
    with Ledger(run_dir) as ledger:
        export_imagefolder(ledger, out)
        (out / "train" / ".2.png.k3x9q1.tmp").write_bytes(b"half an image")
        assert export_imagefolder(ledger, out) == 2
        (out / "train" / ".notes.txt.k3x9q1.tmp").write_bytes(b"a user's")  # not a name of ours
        with pytest.raises(UserError, match="holds .notes.txt.k3x9q1.tmp, which no export wrote"):
            export_imagefolder(ledger, out)


def test_another_runs_export_into_the_folder_writes_its_own_images(tmp_path):
    """Record ids start at 1 in every ledger: an image of the same id and size is not the same image."""
    out = tmp_path / "out"
    for name, color, prompt in [("a", (10, 20, 30), "a navy square"), ("b", (30, 20, 10), "a brown square")]:
        with Ledger(tmp_path / name) as ledger:
            ledger.add_record(prompt=prompt, generator="teacher", seed=0, image=Image.new("RGB", (4, 4), color))
            export_imagefolder(ledger, out)
    assert len(png((10, 20, 30))) == len(png((30, 20, 10)))  # (what made the two look alike)
    assert Image.open(out / "train" / "1.png").getpixel((0, 0)) == (30, 20, 10)
    assert json.loads((out / "train" / "metadata.jsonl").read_text())["prompt"] == "a brown square"


def test_an_image_whose_pixels_do_not_decode_fails_the_import_before_anything_is_stored(tmp_path, capsys):
    """Its chunks' checksums hold (a verify passes) but its compressed pixels are not zlib data."""
    import struct
    import zlib

    good = png((200, 0, 0))
    start = good.index(b"IDAT") - 4
    length = struct.unpack(">I", good[start:start + 4])[0]
    garbage = b"\x00" * length
    bad = good[:start + 8] + garbage + struct.pack(">I", zlib.crc32(b"IDAT" + garbage)) + good[start + 12 + length:]
    source_folder(tmp_path / "src", [{"file_name": "0.png", "prompt": "p 0"}, {"file_name": "1.png", "prompt": "p 1"}])
    (tmp_path / "src" / "1.png").write_bytes(bad)
    code, _, err = cli(capsys, "ledger", "import", tmp_path / "run", "--from", tmp_path / "src")
    assert code == 2 and "corrupt image" in err and "1.png" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # no ledger, and no image of the good row stored


def test_an_import_into_a_runs_folder_is_refused_and_waits_for_no_run(tmp_path, capsys):
    """An evolve run cannot resume past records it did not make (it would expand them with no teacher of its own),
    and a demo would count them as its teacher's: the import is refused, the folder untouched. A folder another
    process holds is refused too."""
    from t2i_evolve.data import claim_run_folder, release_run_folder

    source_folder(tmp_path / "src", [{"file_name": "0.png", "prompt": "p 0"}])
    for marker in ("evolve.yaml", "demo.yaml"):
        run = tmp_path / marker.split(".")[0]
        run.mkdir()
        (run / marker).write_text("{}\n")
        code, _, err = cli(capsys, "ledger", "import", run, "--from", tmp_path / "src")
        assert code == 2 and f"{marker.split('.')[0]} run's folder: import into a new folder" in err and err.count("\n") == 1
        assert [p.name for p in run.iterdir()] == [marker]
    busy = tmp_path / "busy"
    claim_run_folder(busy, "evolve")
    try:
        script = ("import sys; from t2i_evolve.cli import main; "
                  f"sys.exit(main(['ledger', 'import', {str(busy)!r}, '--from', {str(tmp_path / 'src')!r}]))")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "is in use by t2i-evolve evolve" in done.stderr
    finally:
        release_run_folder(busy)
    assert cli(capsys, "ledger", "import", busy, "--from", tmp_path / "src")[0] == 0


def _unwritable(folder) -> bool:
    """Make `folder` one this user cannot write (chmod; for root, whom chmod does not stop, chattr +i)."""
    folder.chmod(0o555)
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    try:
        (folder / "probe").touch()
    except OSError:
        return True
    (folder / "probe").unlink()
    return False


def test_a_run_folder_this_user_cannot_write_is_read_and_never_written(run_dir, tmp_path, capsys):
    """A colleague's run on a shared disk: `ledger stats` and `export` read it (they said 'unable to open
    database file'), and a read command never writes a ledger (a 0-byte one was given a schema)."""
    before = (run_dir / "ledger.sqlite").read_bytes()
    try:
        if not _unwritable(run_dir):
            pytest.skip("this file system lets this user write any folder")
        code, out, _ = cli(capsys, "ledger", "stats", run_dir, "--json")
        assert code == 0 and json.loads(out)["records"] == {"total": 3, "active": 2, "deleted": 1}
        code, out, _ = cli(capsys, "ledger", "export", run_dir, "--to", tmp_path / "out")
        assert code == 0 and len(list((tmp_path / "out" / "train").glob("*.png"))) == 2
    finally:
        if os.geteuid() == 0 and shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(run_dir)], capture_output=True)
        run_dir.chmod(0o755)
    assert (run_dir / "ledger.sqlite").read_bytes() == before
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "ledger.sqlite").write_bytes(b"")
    code, _, err = cli(capsys, "ledger", "stats", empty)
    assert code == 2 and "is empty, not a ledger yet" in err and (empty / "ledger.sqlite").stat().st_size == 0


def test_an_export_of_no_records_imports_as_one_line_saying_so(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "metadata.jsonl").write_text("")
    code, _, err = cli(capsys, "ledger", "import", tmp_path / "run", "--from", tmp_path / "src")
    assert code == 2 and "metadata.jsonl lists no images" in err and "--prompt-column" not in err


def test_what_a_run_writes_others_may_read_as_the_umask_allows(run_dir, tmp_path):
    """Files were written through mkstemp, which makes them the owner's alone (0600): a colleague given a run
    folder or an export could list it and read none of it."""
    umask = os.umask(0)
    os.umask(umask)
    with Ledger(run_dir) as ledger:
        export_imagefolder(ledger, tmp_path / "out")
        image = run_dir / ledger.record(1).image_path
    for path in (image, tmp_path / "out" / "train" / "metadata.jsonl", tmp_path / "out" / "train" / "1.png"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
