"""Stage `tokenize` (pipeline/stages/tokenize.py): Arrow splits with their counts and the mask audit."""

import json

from datasets import load_from_disk


def test_stage_writes_arrow_and_counts(prepared):
    ds = load_from_disk(str(prepared["tokenized"] / "train"))
    assert len(ds) == 64 and set(ds.column_names) >= {"input_ids", "labels", "length"}
    assert all(len(r["input_ids"]) == len(r["labels"]) == r["length"] for r in ds)
    assert not (prepared["tokenized"] / "format.json").exists()  # the prompt is recorded once, by format
    assert json.loads((prepared["formatted"] / "format.json").read_text())["prompt"]["task"] == "classification"
