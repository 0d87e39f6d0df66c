"""A self-contained `report.html` for a run: sample grids, loss curve, judge scores per skill.

No plotting library: the grid is inline PNGs, the curve an inline SVG, so the file opens anywhere and
can be attached to an issue or a paper review as is.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Sequence

from PIL import Image

from ..files import write_atomically


def png_data_uri(image: Image.Image, scale: int = 3) -> str:
    buffer = io.BytesIO()
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def svg_curve(points: Sequence[tuple[float, float]], width: int = 520, height: int = 180, label: str = "") -> str:
    """A line chart of (x, y) points with min/max labels."""
    if len(points) < 2:
        return "<p>(not enough points for a curve)</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (width - 60) / ((x1 - x0) or 1)
    sy = (height - 30) / ((y1 - y0) or 1)
    path = " ".join(f"{50 + (x - x0) * sx:.1f},{10 + (y1 - y) * sy:.1f}" for x, y in points)
    return (
        f'<svg width="{width}" height="{height}" style="background:#fafafa">'
        f'<polyline fill="none" stroke="#2563eb" stroke-width="1.5" points="{path}"/>'
        f'<text x="2" y="16" font-size="11">{y1:.3g}</text><text x="2" y="{height - 16}" font-size="11">{y0:.3g}</text>'
        f'<text x="50" y="{height - 2}" font-size="11">{x0:g}</text>'
        f'<text x="{width - 60}" y="{height - 2}" font-size="11">{x1:g} {html.escape(label)}</text></svg>'
    )


FEW_QUESTIONS = 20
"""A skill score over fewer questions than this means little (an untrained model rarely draws what they ask about)."""


def skill_cell(summary: dict, skill: str) -> str:
    """A skill's score in a `ScoreBoard` summary, or "- (n asked)" over too few questions (0: none, not a 0 score;
    also a skill the summary does not name: another model's questions named it)."""
    asked = summary.get("asked", {}).get(skill, FEW_QUESTIONS if skill in summary.get("skills", {}) else 0)
    return f"{summary['skills'][skill]:.3f}" if asked >= FEW_QUESTIONS else f"- ({asked} asked)"


def score_table(columns: dict[str, dict]) -> str:
    """Rows: overall score and every skill (`skill_cell`); columns: e.g. before / after (`ScoreBoard` summaries)."""
    names = list(columns)
    skills = list(dict.fromkeys(s for column in columns.values() for s in column["skills"]))  # (a VLM's vary)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = ["<tr><td>score (DSG)</td>" + "".join(f"<td>{columns[n]['score']:.3f}</td>" for n in names) + "</tr>"]
    rows += ["<tr><td>" + s + "</td>" + "".join(f"<td>{skill_cell(columns[n], s)}</td>" for n in names) + "</tr>"
             for s in skills]
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain table; floats shown with three decimals."""
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_json(path: Path, data: dict) -> None:
    """Write `data` atomically (a reader, or a rerun after a crash, never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(data, indent=2))


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    """Rewrite a JSON-lines file whole and atomically, so a crash between two rows never loses one."""
    write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file that an appending writer fills, less a last line cut short (by a kill or a
    full disk) or any other line that is not a JSON object."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def image_grid(prompts: Sequence[str], rows: dict[str, Sequence[Image.Image]], limit: int = 16) -> str:
    """One column per prompt, one row per named image list (e.g. before / after / teacher)."""
    cells = "".join(f"<th class='p'>{html.escape(p)}</th>" for p in prompts[:limit])
    body = ""
    for name, images in rows.items():
        body += f"<tr><th>{html.escape(name)}</th>" + "".join(
            f"<td><img src='{png_data_uri(im)}'></td>" for im in list(images)[:limit]) + "</tr>"
    return f"<table class='grid'><tr><th></th>{cells}</tr>{body}</table>"


def write_report(path: Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write an HTML page from (heading, html body) sections."""
    style = ("body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px}"
             "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 6px;font-size:12px}"
             ".grid th.p{max-width:100px;font-weight:normal;font-size:10px}img{image-rendering:pixelated}")
    body = "".join(f"<h2>{html.escape(h)}</h2>{content}" for h, content in sections)
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
    return path


def write_rounds_report(out: Path, title: str, summary: dict, held_out: Sequence[str], before: Path, after: Path,
                        sampler_config, device: str = "cpu", ops: Sequence[str] = ()) -> Path:
    """`out/report.html` for a run in rounds (`summary["rounds"]`: round, score, active, calls, `ops` counts):
    held-out score vs teacher calls, a table of the rounds, samples of the `before` and `after` models
    (sampled on `device`: a Stable-Diffusion-sized base is slow on a CPU)."""
    from ..models import Sampler, T2IModel  # only here: the rest of this module needs no model code

    rounds = summary["rounds"]
    curve = [(row["teacher_calls"], row["score"]) for row in rounds if "score" in row]  # (what its model trained on)
    table = html_table(["round", "score", "active", "teacher calls trained on", "teacher calls after", "judge calls after",
                        *ops],
                       [[row["round"], row.get("score", "-"), row["active"], row["teacher_calls"],
                         row.get("teacher_calls_after", "-"), row["judge_calls"],
                         *(row.get("ops", {}).get(k, "-") for k in ops)] for row in rounds])
    sections = [("Stopped early", f"<p><b>{html.escape(summary['stopped'])}</b></p>")] if summary.get("stopped") else []
    sections += [("Held-out score vs the teacher calls its model trained on",
                  svg_curve(curve, label="teacher calls trained on")), ("Rounds", table)]
    if held_out and (after / "model_index.json").exists():
        shown, seeds = list(held_out[:16]), list(range(min(16, len(held_out))))
        grid = {label: Sampler(T2IModel.from_pretrained(path, device), sampler_config).generate(shown, seeds)
                for label, path in (("before", before), ("after", after))}
        sections.append(("Held-out samples before and after", image_grid(shown, grid)))
    sections.append(("Summary", f"<pre>{html.escape(json.dumps({k: v for k, v in summary.items() if k != 'rounds'}, indent=2))}</pre>"))
    return write_report(out / "report.html", title, sections)


def round_line(row: dict) -> str:
    """A round of `metrics.jsonl` in one short line: its score, the teacher calls its model trained on (and the
    count after its verdicts bought more), the judge calls so far, and the operations that happened."""
    score = f"{row['score']:.3f}" if isinstance(row.get("score"), (int, float)) else "-"
    calls, after = row["teacher_calls"], row.get("teacher_calls_after", row["teacher_calls"])
    ops = " ".join(f"{name} {n}" for name, n in row.get("ops", {}).items() if n)
    return (f"score {score}  active {row['active']}  teacher calls {calls}"
            + (f" ({after} after its verdicts)" if after != calls else "")
            + f"  judge calls {row['judge_calls']}" + (f"  {ops}" if ops else ""))


def log_round_scalars(folder: Path, row: dict, marker: Path) -> None:
    """A round's metrics row as TensorBoard scalars (`tensorboard --logdir RUN/tensorboard`), once: `marker` is
    written after, and a round it marks is not logged again (a rerun with more budget). In `folder/rounds`, at step =
    the round: `round/` score, active records, calls, wall time; `skills/`; `ops/` counts; and `score_vs_teacher_calls`
    at step = the teacher calls its model trained on (the paper's data-efficiency curve, as report.html draws it)."""
    from torch.utils.tensorboard import SummaryWriter

    if marker.exists():
        return
    r = row["round"]
    numbers = lambda values: {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with SummaryWriter(str(folder / "rounds")) as writer:
        for key, value in numbers({k: row.get(k) for k in ("score", "active", "teacher_calls_after", "judge_calls",
                                                            "wall_s")}).items():
            writer.add_scalar(f"round/{key}", value, r)
        for group in ("skills", "ops"):
            for key, value in numbers(row.get(group) or {}).items():
                writer.add_scalar(f"{group}/{key}", value, r)
        if isinstance(row.get("score"), (int, float)):
            writer.add_scalar("score_vs_teacher_calls", row["score"], row["teacher_calls"])
    marker.write_text("")
