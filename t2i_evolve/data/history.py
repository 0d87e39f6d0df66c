"""A record's story in a run's ledger: the prompts it descends from, each round's verdict on it, what it bought.

`ledger history RUN ID` prints it. The ledger already holds every piece (records name their parent, every change is
an op row with its round and reason); this module only follows the links, so a question like "why did the run
buy forty images of yellow stars?" is answered from the run folder alone, with no call repeated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    from .ledger import Ledger, Record


def describe_result(judge: Any) -> str | None:
    """A judge result's plain fields as one line ("base_vs_teacher b, score_base 0.22, score_teacher 1.00"):
    numbers to two places, lists and objects left out (the whole result stays on the record). The reason of a
    'judge' op, so that each round's verdict is kept after the next round's replaces it on the record."""
    value = judge.to_json() if hasattr(judge, "to_json") else judge
    if not isinstance(value, dict):
        return None if value is None else str(value)[:200]
    shown = {k: f"{v:.2f}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)
             for k, v in value.items() if v is None or isinstance(v, (str, int, float))}
    return ", ".join(f"{k} {v}" for k, v in shown.items()) or None


def find_records(ledger: Ledger, which: str) -> list[int]:
    """The ids `which` names: a record id ("120", "#120"), else every record whose prompt is `which` in any spelling
    the run takes for the same prompt (`prompt_key`: case, spaces, a full stop at the end), in id order. None found:
    a one-line UserError."""
    from ..prompts.sets import prompt_key

    text = which.strip()
    if text.removeprefix("#").isdecimal() and text.isascii():
        record_id = int(text.removeprefix("#"))
        if record_id < 2**63 and ledger.has_record(record_id):
            return [record_id]
        if text.startswith("#"):
            raise UserError(f"no record {record_id} in {ledger.run_dir} (it holds {ledger.count(None)} records)")
    key = prompt_key(text)  # (digits alone and no such id: a prompt of digits, from a user's prompts file)
    ids = [record_id for record_id, prompt in ledger.record_prompts() if prompt_key(prompt) == key]
    if not ids:
        raise UserError(f"no record {text!r} in {ledger.run_dir}: give a record id (it holds {ledger.count(None)}), "
                        "or a prompt as the run wrote it (`ledger export` lists them)")
    return ids


def record_history(ledger: Ledger, record_id: int) -> dict:
    """One record's story, JSON-serialisable: `record`; `lineage`, its ancestors from the seed prompt down to its
    parent; `events`, every op on it in order (created, judged each round with the verdict, deleted or rejected,
    with reasons); `children`, the records it bought (expansions, mutations) with why."""
    record = ledger.record(record_id)
    lineage, seen, parent = [], {record.id}, record.parent
    while parent is not None and parent not in seen:  # (a parent is always older: `seen` only guards the loop)
        ancestor = ledger.record(parent)
        lineage.insert(0, ancestor)
        seen.add(parent)
        parent = ancestor.parent
    events = [{"round": op.round, "op": op.op, "reason": op.reason, "at": op.at}
              for op in ledger.ops(record_id=record_id)]
    return {"record": _summary(record), "lineage": [_summary(r) for r in lineage], "events": events,
            "children": [_summary(r) for r in ledger.records(None, parent=record_id)]}


def history_lines(history: dict) -> list[str]:
    """`record_history` as a person reads it: the record, where it came from, then round by round what
    happened to it and what it bought."""
    record = history["record"]
    lines = [f"{_name(record)}: {record['status']}, drawn by {record['generator']}"
             + ("" if record["seed"] is None else f" (seed {record['seed']})")
             + ("" if record["image_path"] is None else f", image {record['image_path']}")]
    if history["lineage"]:
        chain = " -> ".join(f"{_name(r)} ({r['op']}, round {r['round']})" for r in history["lineage"])
        lines.append(f"  from {chain}")
    groups: dict[tuple[int, str], list[dict]] = {}
    for child in history["children"]:
        groups.setdefault((child["round"], child["op"]), []).append(child)
    for r in sorted({event["round"] for event in history["events"]} | {r for r, _ in groups}):  # round by round
        for event in (e for e in history["events"] if e["round"] == r):
            lines.append(f"  round {r}  {event['op']}" + (f": {event['reason']}" if event["reason"] else ""))
        for (_, op), bought in sorted((key, group) for key, group in groups.items() if key[0] == r):
            lines.append(f"  round {r}  bought {len(bought)} by {op}: {bought[0]['reason'] or '-'}")
            lines += [f"    -> {_name(c)}, {c['generator']}, {c['status']}" for c in bought]
    return lines


def _summary(record: Record) -> dict:
    return {"id": record.id, "prompt": record.prompt, "round": record.round, "op": record.op,
            "reason": record.reason, "parent": record.parent, "generator": record.generator, "seed": record.seed,
            "status": record.status, "image_path": record.image_path, "judge": record.judge,
            "deleted_round": record.deleted_round, "deleted_reason": record.deleted_reason}


def _name(record: dict) -> str:
    return f"#{record['id']} {record['prompt']!r}"
