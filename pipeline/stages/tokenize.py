"""Stage `tokenize`: formatted rows -> input ids and labels, the loss only where the task says, proven.

The task encodes (pipeline/tasks/): by default the prompt and the response are tokenized
separately (the prompt exactly as `predict` tokenizes it at serving time) and joined, the labels
-100 over the prompt, and an EOS token closes every response so the model learns to stop;
preference pairs also get `rejected_input_ids` / `rejected_labels` (a pair is dropped when either
side is); a chat conversation is tokenized whole and labelled on its assistant turns. Rows longer
than `tokenize.max_length` follow `tokenize.truncation`: `response` cuts the end, `prompt` the
start, `drop` drops the row. The mask audit then decodes the labelled tokens of every row and
compares them with the texts the task expects (`core/encoding.py:mask_audit`); any difference
stops the stage naming the row.

Inputs: formatted `train.jsonl` / `validation.jsonl`, the base tokenizer folder.
Outputs: `<out>/{train,validation}/` as `datasets` Arrow folders (input_ids, labels, length, row)
and `<out>/tokenize.json` (counts, rows audited, the tokenizer's sha256); a metrics file with the
same counts.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline import contract
from pipeline.core.encoding import IGNORE, mask_audit
from pipeline.core.io import atomic_dir, atomic_write_json, read_jsonl, sha256_file
from pipeline.core.loading import load_tokenizer
from pipeline.core.params import Params
from pipeline.core.stage import PipelineError, entry
from pipeline.tasks import get as get_task

STAGE = "tokenize"
READS = ("task",)  # + the task's (max_length, truncation; chat: loss_on)
LOADS = ("task",)


def strip_expected(e: dict) -> dict:
    return {k: v for k, v in e.items() if k not in ("expected", "rejected_expected")}


def audit(tok, rows: list[dict], encoded: list[dict | None], src: Path) -> None:
    """The mask audit: in every kept row, the tokens with a loss decode to the task's expected texts and
    nothing else (the answer and its end token; a chat's assistant turns). Any failure stops the stage."""
    failed = []
    for r, e in zip(rows, encoded, strict=True):
        if e is None:
            continue
        why = mask_audit(tok, e["input_ids"], e["labels"], e["expected"], e["truncated"])
        if why is None and "rejected_expected" in e:
            why = mask_audit(tok, e["rejected_input_ids"], e["rejected_labels"], e["rejected_expected"],
                             e["truncated"])
            why = why and f"rejected: {why}"
        if why:
            failed.append((r["row"], why))
    if failed:
        row, why = failed[0]
        raise PipelineError(f"tokenize: the loss mask is wrong in {len(failed)} of {len(rows)} rows of {src}; "
                            f"first: row {row}: {why}")


def run(params: Params, formatted: Path, tokenizer_dir: Path, out: Path) -> dict:
    from datasets import Dataset

    p = contract.view(params, STAGE, READS)
    tok = load_tokenizer(tokenizer_dir)
    task = get_task(p.task)
    report: dict = {}
    with atomic_dir(out) as tmp:
        for split in ("train", "validation"):
            rows = read_jsonl(formatted / f"{split}.jsonl")
            many = task.encode(p, tok, rows)
            audit(tok, rows, many, formatted / f"{split}.jsonl")
            encoded = [{**strip_expected(e), "row": r["row"]} for r, e in zip(rows, many, strict=True) if e is not None]
            dropped = len(rows) - len(encoded)
            if not encoded:
                raise PipelineError(f"tokenize: every {split} row of {formatted / (split + '.jsonl')} was dropped: "
                                    f"too long for tokenize.max_length={p.tokenize.max_length}, or nothing to learn")
            Dataset.from_list(encoded).save_to_disk(str(tmp / split))
            lengths = [e["length"] for e in encoded]
            report[split] = {
                "rows": len(rows),
                "kept": len(encoded),
                "dropped": dropped,
                "truncated": sum(e["truncated"] for e in encoded),
                "tokens": sum(lengths),
                "max_length": max(lengths),
                "mean_length": round(sum(lengths) / len(lengths), 1),
                "response_tokens": sum(sum(t != IGNORE for t in e["labels"]) for e in encoded),
                "mask_audit": {"checked": len(encoded), "failed": 0},
            }
        atomic_write_json(tmp / "tokenize.json", {
            **report, "tokenizer_sha256": sha256_file(Path(tokenizer_dir) / "tokenizer.json")
            if (Path(tokenizer_dir) / "tokenizer.json").exists() else None,
        })
    return report


def main(
    formatted: Path = typer.Option(...),
    tokenizer: Path = typer.Option(...),
    out: Path = typer.Option(...),
    metrics: Path = typer.Option(...),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    report = run(contract.load(params), formatted, tokenizer, out)
    atomic_write_json(metrics, report)
    for split, r in report.items():
        typer.echo(f"tokenize: {split}: {r['kept']} rows, {r['truncated']} truncated, {r['dropped']} dropped, "
                   f"mean {r['mean_length']} tokens")


if __name__ == "__main__":
    entry(main)
