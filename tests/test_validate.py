import json

import pytest
from conftest import EXAMPLE, make_params

from pipeline.stages.validate import DataError, run


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def good(i):
    return {"sentence": f"Company {i} opened an office in town number {i} .", "label": "neutral"}


def test_example_data_passes(tmp_path):
    p = make_params()
    report = run(p, EXAMPLE / "sentiment_train.jsonl", EXAMPLE / "sentiment_validation.jsonl",
                 tmp_path / "v", tmp_path / "m.json")
    assert report["train"]["rejected"] == 0 and report["train"]["accepted"] == 240
    assert (tmp_path / "v" / "quarantine.jsonl").read_text() == ""
    assert json.loads((tmp_path / "m.json").read_text()) == report


def test_bad_rows_are_quarantined_with_file_row_field(tmp_path):
    p = make_params(**{"validate.max_reject_ratio": 0.9, "validate.max_chars": 200})
    train = write(tmp_path / "train.jsonl", [good(i) for i in range(10)] + [
        {"sentence": "Sales rose a lot .", "label": "postive"},       # row 11: unknown label
        {"sentence": "   ", "label": "neutral"},                      # row 12: empty
        {"sentence": 42, "label": "neutral"},                         # row 13: wrong type
        {"label": "neutral"},                                         # row 14: missing field
        '{"sentence": "broken',                                       # row 15: malformed
        good(0),                                                      # row 16: duplicate of row 1
        {"sentence": "x" * 500, "label": "neutral"},                  # row 17: over-long
    ])
    val = write(tmp_path / "val.jsonl", [good(3), good(100), good(101)])  # row 1 leaks from train
    report = run(p, train, val, tmp_path / "v", tmp_path / "m.json")
    q = {(r["file"].split("/")[-1], r["row"]): r for r in
         map(json.loads, (tmp_path / "v" / "quarantine.jsonl").read_text().splitlines())}
    assert q[("train.jsonl", 11)]["field"] == "label" and "unknown label" in q[("train.jsonl", 11)]["reason"]
    assert q[("train.jsonl", 12)]["field"] == "sentence" and "empty" in q[("train.jsonl", 12)]["reason"]
    assert "must be a string" in q[("train.jsonl", 13)]["reason"]
    assert q[("train.jsonl", 14)]["reason"] == "missing field" and q[("train.jsonl", 14)]["field"] == "sentence"
    assert "malformed JSON" in q[("train.jsonl", 15)]["reason"]
    assert q[("train.jsonl", 16)]["reason"] == "duplicate of row 1"
    assert "over-long" in q[("train.jsonl", 17)]["reason"]
    assert "leakage" in q[("val.jsonl", 1)]["reason"] and "row 4" in q[("val.jsonl", 1)]["reason"]
    assert report["train"]["accepted"] == 10 and report["train"]["rejected"] == 7
    assert report["validation"]["accepted"] == 2
    accepted = [json.loads(x) for x in (tmp_path / "v" / "train.jsonl").read_text().splitlines()]
    assert [r["row"] for r in accepted] == list(range(1, 11))


def test_too_many_rejects_fail_and_name_the_row(tmp_path):
    p = make_params(**{"validate.max_reject_ratio": 0.05})
    train = write(tmp_path / "train.jsonl", [good(i) for i in range(5)] + [{"sentence": "Up .", "label": "great"}])
    val = write(tmp_path / "val.jsonl", [good(50)])
    with pytest.raises(DataError, match=r"train.jsonl row 6 field 'label': unknown label"):
        run(p, train, val, tmp_path / "v", tmp_path / "m.json")
    assert not (tmp_path / "v" / "train.jsonl").exists()  # no half output
    assert (tmp_path / "v" / "quarantine.jsonl").exists()


def test_instruction_schema(tmp_path):
    p = make_params(task="instruction")
    train = write(tmp_path / "t.jsonl", [{"instruction": "Say hi.", "input": "", "output": "hi"},
                                         {"instruction": "Say bye.", "input": "", "output": ""}])
    val = write(tmp_path / "v.jsonl", [{"instruction": "Say yo.", "input": "", "output": "yo"}])
    p = make_params(task="instruction", **{"validate.max_reject_ratio": 0.6})
    report = run(p, train, val, tmp_path / "v", tmp_path / "m.json")
    assert report["train"]["rejected"] == 1 and report["train"]["reasons"] == {"empty text": 1}
