"""Stage `tokenize`: prompt + response -> input ids and labels, with the prompt masked.

The prompt and the response are tokenized separately (the prompt exactly as `predict` will
tokenize it at serving time) and joined; the labels are -100 over the prompt, so the loss is on
the response only, and an EOS token closes every response so the model learns to stop.
Rows longer than `tokenize.max_length` follow `tokenize.truncation`: `response` cuts the end of
the response, `prompt` cuts the start of the prompt, `drop` drops the row; the counts are
reported.

Inputs: formatted `train.jsonl` / `validation.jsonl`, the base tokenizer folder.
Preference pairs also get `rejected_input_ids` / `rejected_labels` (the same prompt, the rejected
answer); a pair is dropped when either side is.
Outputs: `<out>/{train,validation}/` as `datasets` Arrow folders (input_ids, labels, length)
and `<out>/tokenize.json` (counts); a metrics file with the same counts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from pipeline.core.encoding import encode_many
from pipeline.core.io import atomic_dir, atomic_write_json, read_jsonl, sha256_file
from pipeline.core.modeling import IGNORE, load_tokenizer
from pipeline.core.params import Tokenize, load_params
from pipeline.core.stage import PipelineError, entry


def run(p: Tokenize, formatted: Path, tokenizer_dir: Path, out: Path) -> dict:
    from datasets import Dataset

    tok = load_tokenizer(tokenizer_dir)
    report: dict = {}
    with atomic_dir(out) as tmp:
        for split in ("train", "validation"):
            rows = read_jsonl(formatted / f"{split}.jsonl")
            many = encode_many(tok, [r["prompt"] for r in rows], [r["response"] for r in rows],
                               p.max_length, p.truncation)
            if rows and "rejected" in rows[0]:  # preference pairs: the rejected answer after the same prompt
                worse = encode_many(tok, [r["prompt"] for r in rows], [r["rejected"] for r in rows],
                                    p.max_length, p.truncation)
                many = [None if e is None or w is None else
                        {**e, "rejected_input_ids": w["input_ids"], "rejected_labels": w["labels"],
                         "truncated": e["truncated"] or w["truncated"]} for e, w in zip(many, worse, strict=True)]
            encoded = [{**e, "row": r["row"]} for r, e in zip(rows, many, strict=True) if e is not None]
            dropped = len(rows) - len(encoded)
            if not encoded:
                raise PipelineError(f"tokenize: every {split} row was dropped (tokenize.max_length={p.max_length})")
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
            }
        shutil.copy(formatted / "format.json", tmp / "format.json")  # travels with the data to the adapter
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
    report = run(load_params(params).tokenize, formatted, tokenizer, out)
    atomic_write_json(metrics, report)
    for split, r in report.items():
        typer.echo(f"tokenize: {split}: {r['kept']} rows, {r['truncated']} truncated, {r['dropped']} dropped, "
                   f"mean {r['mean_length']} tokens")


if __name__ == "__main__":
    entry(main)
