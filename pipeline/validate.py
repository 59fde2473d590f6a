"""Stage `validate`: check the raw train and validation data with pandera schemas.

Three task kinds: `classification` (a text field and a label from `labels` in params),
`instruction` (instruction / input / output) and `preference` (prompt / chosen / rejected, the two
answers different). Checks: readable rows, missing fields, types,
empty or over-long text, unknown labels, duplicates inside a split, and leakage (a validation
row whose text is also in train).

Inputs: the two data files (jsonl, csv or parquet).
Outputs: `<out>/train.jsonl` and `<out>/validation.jsonl` (accepted rows, each with its source
`row`), `<out>/quarantine.jsonl` (every rejected row with file, row, field and reason) and a
metrics file with the counts. The stage fails when a split's reject ratio exceeds
`validate.max_reject_ratio`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pandera.pandas as pa
import typer

from pipeline.io import Record, atomic_write_json, read_records, write_jsonl
from pipeline.params import Params, load_params
from pipeline.stage import PipelineError, entry

INSTRUCTION_FIELDS = ("instruction", "input", "output")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


class DataError(PipelineError, ValueError):
    """Too much of the data was rejected; the message names files, rows and fields."""


def fields(p: Params) -> tuple[str, ...]:
    if p.task == "classification":
        return (p.validate.text_field, p.validate.label_field)
    return PREFERENCE_FIELDS if p.task == "preference" else INSTRUCTION_FIELDS


def schema(p: Params) -> pa.DataFrameSchema:
    v = p.validate

    def text(name: str, lo: int = v.min_chars) -> pa.Column:
        return pa.Column(
            object,
            checks=[
                pa.Check(lambda x: isinstance(x, str), element_wise=True, error="must be a string"),
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

    if p.task == "classification":
        labels = list(p.labels)
        cols = {
            v.text_field: text(v.text_field),
            v.label_field: pa.Column(
                object,
                pa.Check(lambda x: x in labels, element_wise=True,
                         error=f"unknown label (valid: {', '.join(labels)})"),
            ),
        }
    elif p.task == "preference":
        cols = {"prompt": text("prompt"), "chosen": text("chosen", lo=1),
                "rejected": pa.Column(object, checks=text("rejected", lo=1).checks)}
        same = pa.Check(lambda df: df["chosen"].astype(str).str.strip() != df["rejected"].astype(str).str.strip(),
                        error="rejected is the same as chosen")
        return pa.DataFrameSchema(cols, checks=[same], strict=False)
    else:
        cols = {"instruction": text("instruction"), "input": text("input", lo=0), "output": text("output", lo=1)}
    return pa.DataFrameSchema(cols, strict=False)


def key(p: Params, row: dict) -> tuple:
    """What makes two rows the same example (for duplicates and leakage)."""
    if p.task == "classification":
        return (str(row[p.validate.text_field]).strip().lower(),)
    if p.task == "preference":
        return (str(row["prompt"]).strip().lower(),)
    return (str(row["instruction"]).strip().lower(), str(row["input"]).strip().lower())


def check_split(p: Params, path: Path, records: list[Record]) -> tuple[list[dict], list[dict]]:
    """Return (accepted rows, rejected entries) for one file."""
    need = fields(p)
    rejected: list[dict] = []
    candidates: list[Record] = []
    for rec in records:
        if rec.error:
            rejected.append(_reject(path, rec.row, None, rec.error, None))
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
            bad.setdefault(int(idx), (column, str(fc["check"])))
    accepted: list[dict] = []
    for i, rec in enumerate(candidates):
        if i in bad:
            field, reason = bad[i]
            rejected.append(_reject(path, rec.row, field, reason, rec.data))
        else:
            accepted.append({"row": rec.row, **{f: rec.data[f] for f in need}})
    return accepted, rejected


def _reject(path: Path, row: int, field: str | None, reason: str, record: dict | None) -> dict:
    return {"file": str(path), "row": row, "field": field, "reason": reason, "record": record}


def drop_duplicates(p: Params, path: Path, rows: list[dict], seen: dict | None = None,
                    why: str = "duplicate of row {row}") -> tuple[list[dict], list[dict]]:
    """Reject rows whose key is already in `seen` (or earlier in `rows`)."""
    seen = {} if seen is None else seen
    local: dict[tuple, int] = {}
    kept, rejected = [], []
    field = {"classification": p.validate.text_field, "preference": "prompt"}.get(p.task, "instruction")
    for r in rows:
        k = key(p, r)
        if k in seen:
            rejected.append(_reject(path, r["row"], field, why.format(row=seen[k]), r))
        elif k in local:
            rejected.append(_reject(path, r["row"], field, f"duplicate of row {local[k]}", r))
        else:
            local[k] = r["row"]
            kept.append(r)
    return kept, rejected


def run(p: Params, train: Path, validation: Path, out: Path, metrics: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    quarantine: list[dict] = []
    train_rows, rej = check_split(p, train, read_records(train))
    train_rows, dup = drop_duplicates(p, train, train_rows)
    quarantine += rej + dup
    results["train"] = (train_rows, rej + dup)
    val_rows, rej = check_split(p, validation, read_records(validation))
    val_rows, dup = drop_duplicates(p, validation, val_rows)
    train_keys = {key(p, r): r["row"] for r in train_rows}
    val_rows, leak = drop_duplicates(p, validation, val_rows, seen=train_keys,
                                     why=f"leakage: also in {train} row {{row}}")
    quarantine += rej + dup + leak
    results["validation"] = (val_rows, rej + dup + leak)

    report: dict = {}
    for split, (rows, rejected) in results.items():
        total = len(rows) + len(rejected)
        report[split] = {
            "rows": total,
            "accepted": len(rows),
            "rejected": len(rejected),
            "reject_ratio": round(len(rejected) / total, 4) if total else 0.0,
            "reasons": dict(Counter(r["reason"].split(":")[0].split(" (")[0] for r in rejected)),
        }
        if p.task == "classification":
            report[split]["labels"] = dict(Counter(r[p.validate.label_field] for r in rows))
    write_jsonl(out / "quarantine.jsonl", quarantine)
    atomic_write_json(metrics, report)
    for split, (rows, rejected) in results.items():
        ratio = report[split]["reject_ratio"]
        if not rows or ratio > p.validate.max_reject_ratio:
            first = "; ".join(
                f"{r['file']} row {r['row']}" + (f" field '{r['field']}'" if r["field"] else "") + f": {r['reason']}"
                for r in rejected[:3]
            )
            raise DataError(
                f"validate: {split} rejected {len(rejected)} of {report[split]['rows']} rows "
                f"({ratio:.1%} > validate.max_reject_ratio={p.validate.max_reject_ratio:.1%}); "
                f"first: {first}; all in {out / 'quarantine.jsonl'}"
            )
    write_jsonl(out / "train.jsonl", results["train"][0])
    write_jsonl(out / "validation.jsonl", results["validation"][0])
    return report


def main(
    train: Path = typer.Option(...),
    validation: Path = typer.Option(...),
    out: Path = typer.Option(..., help="folder for accepted rows and quarantine.jsonl"),
    metrics: Path = typer.Option(...),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    report = run(load_params(params), train, validation, out, metrics)
    for split, r in report.items():
        typer.echo(f"validate: {split}: {r['accepted']}/{r['rows']} accepted, {r['rejected']} quarantined")


if __name__ == "__main__":
    entry(main)
