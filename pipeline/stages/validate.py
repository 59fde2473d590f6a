"""Stage `validate`: check the raw train and validation data with pandera schemas.

The task (pipeline/tasks/) names the fields and their checks: `classification` a text field and a
label from `labels`, `instruction` instruction / input / output, `preference` prompt / chosen /
rejected (the two answers different), `chat` the turns of a conversation (ShareGPT rows mapped to
`messages` first). Checks: readable rows, missing fields, types,
empty or over-long text, unknown labels, duplicates inside a split, and leakage (a validation
row whose text is also in train).

Inputs: the two data files (jsonl, csv or parquet).
Outputs: `<out>/train.jsonl` and `<out>/validation.jsonl` (accepted rows, each with its source
`row`), `<out>/quarantine.jsonl` (every rejected row with file, row, field and reason),
`<out>/data.json` (each file's path, md5 and row counts, and `data.license`: the data's part of every
record downstream) and a metrics file with the counts. The stage fails when a split's reject ratio
exceeds `validate.max_reject_ratio`; the folder then holds the quarantine alone, and the metrics
file is left as it was.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pandera.pandas as pa
import typer

from pipeline import contract
from pipeline.core.io import Record, atomic_dir, atomic_write_json, file_digest, read_records, write_jsonl
from pipeline.core.params import Params
from pipeline.core.stage import PipelineError, entry
from pipeline.tasks import get as get_task
from pipeline.tasks.base import RowError

STAGE = "validate"
READS = ("task", "validate.max_chars", "validate.max_reject_ratio", "data.license")  # + the task's
LOADS = ("task",)


class DataError(PipelineError, ValueError):
    """Too much of the data was rejected; the message names files, rows and fields."""


def schema(p: Params) -> pa.DataFrameSchema:
    """The task's columns and row checks, built with the one text column every task uses."""
    v = p.validate

    def text(name: str, lo: int) -> pa.Column:
        return pa.Column(
            object,
            checks=[
                pa.Check(lambda x: isinstance(x, str), element_wise=True, error="expected text"),
                pa.Check(
                    lambda x: not isinstance(x, str) or len(x.strip()) >= lo,
                    element_wise=True,
                    error=f"empty text (fewer than {lo} characters)",
                ),
                pa.Check(
                    lambda x: not isinstance(x, str) or len(x) <= v.max_chars,
                    element_wise=True,
                    error=f"over-long text (more than validate.max_chars={v.max_chars} characters)",
                ),
            ],
        )

    t = get_task(p.task)
    return pa.DataFrameSchema(t.columns(p, text), checks=t.row_checks(p), strict=False)


def check_split(p: Params, path: Path, records: list[Record]) -> tuple[list[dict], list[dict]]:
    """Return (accepted rows, rejected entries) for one file."""
    task = get_task(p.task)
    need = task.fields(p)
    rejected: list[dict] = []
    candidates: list[Record] = []
    for rec in records:
        if rec.error:
            rejected.append(_reject(path, rec.row, None, rec.error, None))
            continue
        try:
            rec = Record(rec.row, task.normalize(p, rec.data))
        except RowError as e:
            rejected.append(_reject(path, rec.row, e.field, e.reason, rec.data))
            continue
        missing = [f for f in need if f not in rec.data]
        if missing:
            rejected.append(_reject(path, rec.row, missing[0], "missing field", rec.data))
            continue
        candidates.append(rec)
    if not candidates:
        return [], rejected
    df = pd.DataFrame([{f: r.data[f] for f in need} for r in candidates], dtype=object)
    bad: dict[int, tuple[str, str]] = {}
    try:
        schema(p).validate(df, lazy=True)
    except pa.errors.SchemaErrors as err:
        for _, fc in err.failure_cases.iterrows():
            idx = fc["index"]
            if idx is None or pd.isna(idx):
                continue
            across = fc.get("schema_context") == "DataFrameSchema" or not isinstance(fc["column"], str)
            column = need[-1] if across else fc["column"]  # a check across fields names the last one
            reason = str(fc["check"])
            if reason == "expected text":
                reason += f", got {kind_of(fc['failure_case'])}"
            bad.setdefault(int(idx), (column, reason))
    accepted: list[dict] = []
    for i, rec in enumerate(candidates):
        if i in bad:
            field, reason = bad[i]
            rejected.append(_reject(path, rec.row, field, reason, rec.data))
        else:
            accepted.append({"row": rec.row, **{f: rec.data[f] for f in need}})
    return accepted, rejected


def kind_of(value) -> str:
    """What a value that should be text is, in words ("a number", "a list", ...)."""
    import numbers

    if value is None or (isinstance(value, float) and value != value):
        return "nothing (null)"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, numbers.Number):
        return "a number"
    return {list: "a list", tuple: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _reject(path: Path, row: int, field: str | None, reason: str, record: dict | None) -> dict:
    return {"file": str(path), "row": row, "field": field, "reason": reason, "record": record}


def drop_duplicates(p: Params, path: Path, rows: list[dict], seen: dict | None = None,
                    why: str = "duplicate of row {row}") -> tuple[list[dict], list[dict]]:
    """Reject rows whose key is already in `seen` (or earlier in `rows`)."""
    seen = {} if seen is None else seen
    local: dict[tuple, int] = {}
    kept, rejected = [], []
    t = get_task(p.task)
    field = t.key_field(p)
    for r in rows:
        k = t.key(p, r)
        if k in seen:
            rejected.append(_reject(path, r["row"], field, why.format(row=seen[k]), r))
        elif k in local:
            rejected.append(_reject(path, r["row"], field, f"duplicate of row {local[k]}", r))
        else:
            local[k] = r["row"]
            kept.append(r)
    return kept, rejected


def split_report(p: Params, results: dict[str, tuple[list[dict], list[dict]]]) -> dict:
    """The counts per split: rows, accepted, rejected, their ratio, the reasons, and what the task adds."""
    report: dict = {}
    for split, (rows, rejected) in results.items():
        total = len(rows) + len(rejected)
        report[split] = {
            "rows": total,
            "accepted": len(rows),
            "rejected": len(rejected),
            "reject_ratio": round(len(rejected) / total, 4) if total else 0.0,
            "reasons": dict(Counter(r["reason"].split(":")[0].split(" (")[0] for r in rejected)),
            **get_task(p.task).counts(p, rows),
        }
    return report


def too_many_rejected(p: Params, results: dict, report: dict, out: Path) -> DataError | None:
    """The error for the first split with no accepted row or a reject ratio over the limit, or None."""
    for split, (rows, rejected) in results.items():
        ratio = report[split]["reject_ratio"]
        if not rows or ratio > p.validate.max_reject_ratio:
            first = "; ".join(
                f"{r['file']} row {r['row']}" + (f" field '{r['field']}'" if r["field"] else "") + f": {r['reason']}"
                for r in rejected[:3]
            )
            return DataError(
                f"validate: {split} rejected {len(rejected)} of {report[split]['rows']} rows "
                f"({ratio:.1%} > validate.max_reject_ratio={p.validate.max_reject_ratio:.1%}); "
                f"first: {first}; all in {out / 'quarantine.jsonl'}"
            )
    return None


def run(params: Params, train: Path, validation: Path, out: Path, metrics: Path) -> dict:
    """Check both files; write the accepted rows, the quarantine and the data record into `out` (atomically)
    and the counts into `metrics`. Too many rejects: `out` holds the quarantine alone, `metrics` is untouched."""
    p = contract.view(params, STAGE, READS)
    task = get_task(p.task)
    results: dict = {}
    train_rows, rej = check_split(p, train, read_records(train))
    train_rows, dup = drop_duplicates(p, train, train_rows)
    results["train"] = (train_rows, rej + dup)
    val_rows, rej = check_split(p, validation, read_records(validation))
    val_rows, dup = drop_duplicates(p, validation, val_rows)
    train_keys = {task.key(p, r): r["row"] for r in train_rows}
    val_rows, leak = drop_duplicates(p, validation, val_rows, seen=train_keys,
                                     why=f"leakage: also in {train} row {{row}}")
    results["validation"] = (val_rows, rej + dup + leak)
    report = split_report(p, results)
    error = too_many_rejected(p, results, report, out)
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "quarantine.jsonl", [r for _, rejected in results.values() for r in rejected])
        if error is None:
            for split, (rows, _) in results.items():
                write_jsonl(tmp / f"{split}.jsonl", rows)
            atomic_write_json(tmp / "data.json", {
                split: {"path": str(path), "md5": file_digest(path, "md5"), "rows": report[split]["rows"],
                        "accepted": report[split]["accepted"]}
                for split, path in (("train", train), ("validation", validation))} | {"license": p.data.license})
    if error is not None:
        raise error
    atomic_write_json(metrics, report)
    return report


def main(
    train: Path = typer.Option(...),
    validation: Path = typer.Option(...),
    out: Path = typer.Option(..., help="folder for accepted rows and quarantine.jsonl"),
    metrics: Path = typer.Option(...),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    report = run(contract.load(params), train, validation, out, metrics)
    for split, r in report.items():
        typer.echo(f"validate: {split}: {r['accepted']}/{r['rows']} accepted, {r['rejected']} quarantined")


if __name__ == "__main__":
    entry(main)
