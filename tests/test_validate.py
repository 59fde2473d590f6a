import json

import pytest
from conftest import EXAMPLE, make_params

from pipeline.core.stage import PipelineError
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
    assert q[("train.jsonl", 13)]["reason"] == "expected text, got a number"
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


def test_windows_exports_are_read_and_wrong_types_are_named(tmp_path):
    """A BOM and CRLF line ends (Windows editors, spreadsheets) are accepted in jsonl and csv; a
    label that is not text says what it is instead of "unknown label"; an empty file says so."""
    p = make_params(**{"validate.max_reject_ratio": 0.9})
    rows = [good(i) for i in range(6)] + [{"sentence": "Profit rose again .", "label": 1}]
    text = "\r\n".join(json.dumps(r) for r in rows) + "\r\n"
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    csv = tmp_path / "val.csv"
    csv.write_bytes(b"\xef\xbb\xbfsentence,label\r\n" + "".join(
        f"{good(i)['sentence']},{good(i)['label']}\r\n" for i in range(100, 104)).encode("utf-8"))
    report = run(p, train, csv, tmp_path / "v", tmp_path / "m.json")
    assert report["train"]["accepted"] == 6 and report["validation"]["accepted"] == 4
    q = [json.loads(x) for x in (tmp_path / "v" / "quarantine.jsonl").read_text().splitlines()]
    assert [(r["row"], r["field"], r["reason"]) for r in q] == [(7, "label", "expected text, got a number")]

    for empty in (b"", b"\xef\xbb\xbf", b"\r\n\r\n"):
        (tmp_path / "empty.jsonl").write_bytes(empty)
        with pytest.raises(PipelineError, match=r"empty.jsonl: file is empty"):
            run(p, tmp_path / "empty.jsonl", csv, tmp_path / "v2", tmp_path / "m2.json")
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(PipelineError, match=r"empty.csv: file is empty"):
        run(p, train, tmp_path / "empty.csv", tmp_path / "v2", tmp_path / "m2.json")


def test_a_failed_validate_leaves_its_metrics_and_writes_the_quarantine_alone(tmp_path):
    """Too many rejects: the tracked metrics file stays as the last good run left it, and the output folder
    (run into one that held an earlier run's rows) holds the quarantine alone, never a mix of the two runs."""
    p = make_params()
    train = write(tmp_path / "train.jsonl", [good(i) for i in range(10)])
    val = write(tmp_path / "val.jsonl", [good(100), good(101)])
    run(p, train, val, tmp_path / "v", tmp_path / "m.json")
    before = (tmp_path / "m.json").read_text()
    write(train, [good(i) for i in range(10)] + [{"sentence": "x", "label": "neutral"}] * 3)
    with pytest.raises(DataError):
        run(p, train, val, tmp_path / "v", tmp_path / "m.json")
    assert (tmp_path / "m.json").read_text() == before
    assert sorted(f.name for f in (tmp_path / "v").iterdir()) == ["quarantine.jsonl"]
    assert len((tmp_path / "v" / "quarantine.jsonl").read_text().splitlines()) == 3


def test_quarantine_and_continue_trains_on_the_accepted_rows(tmp_path, tiny_base):
    """Rejects under validate.max_reject_ratio: the stage goes on, the quarantine lists every rejected row with
    file, row, field and reason, and the rows the adapter trains on are exactly the accepted ones."""
    from datasets import load_from_disk

    from pipeline.stages import format as fmt
    from pipeline.stages import tokenize, train

    p = make_params(**{"validate.max_reject_ratio": 0.2, "train.max_steps": 2})
    rows = [json.loads(x) for x in (EXAMPLE / "sentiment_train.jsonl").read_text().splitlines()[:20]]
    bad = [{"sentence": "Profit fell .", "label": "bearish"}, {"sentence": 7, "label": "neutral"}, rows[0]]
    src = write(tmp_path / "train.jsonl", rows[:10] + bad[:2] + rows[10:] + bad[2:])
    val = write(tmp_path / "val.jsonl", (EXAMPLE / "sentiment_validation.jsonl").read_text().splitlines()[:8])
    report = run(p, src, val, tmp_path / "validated", tmp_path / "m.json")
    assert (report["train"]["accepted"], report["train"]["rejected"]) == (20, 3)
    q = [json.loads(x) for x in (tmp_path / "validated" / "quarantine.jsonl").read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in q] == [(11, "label"), (12, "sentence"), (23, "sentence")]
    assert q[2]["reason"] == "duplicate of row 1" and all(r["file"] == str(src) for r in q)
    fmt.run(p, tmp_path / "validated", EXAMPLE.parent.parent / "prompts" / "sentiment.jinja", tiny_base,
            tmp_path / "formatted")
    tokenize.run(p, tmp_path / "formatted", tiny_base, tmp_path / "tokenized")
    trained = sorted(r["row"] for r in load_from_disk(str(tmp_path / "tokenized" / "train")))
    assert trained == [*range(1, 11), *range(13, 23)]  # the accepted rows, by their source row numbers
    m = train.run(p, tmp_path / "tokenized", tmp_path / "formatted" / "format.json", tiny_base, tmp_path / "a",
                  tmp_path / "live", tmp_path / "c")
    record = json.loads((tmp_path / "a" / "peftflow.json").read_text())
    assert m["steps"] == 2 and record["data"]["train"] == {"path": str(src), "md5": record["data"]["train"]["md5"],
                                                           "rows": 23, "accepted": 20}
