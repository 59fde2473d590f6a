import json

import pytest

from pipeline.core.io import atomic_dir, atomic_write_json, read_records
from pipeline.core.stage import PipelineError


def test_jsonl_rows_keep_line_numbers_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"a": 1}\n\n{"a": 2\n[1, 2]\n\xff\xfe\n{"a": 3}\n')
    recs = read_records(f)
    assert [(r.row, r.data) for r in recs if not r.error] == [(1, {"a": 1}), (6, {"a": 3})]
    errors = {r.row: r.error for r in recs if r.error}
    assert errors[3].startswith("malformed JSON")
    assert errors[4] == "expected a JSON object, got list"
    assert errors[5].startswith("invalid UTF-8")


def test_csv_and_parquet(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"sentence": ["x y", "z w"], "label": ["neutral", "positive"]})
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    assert [r.row for r in read_records(tmp_path / "d.csv")] == [2, 3]  # row 1 is the header
    assert read_records(tmp_path / "d.parquet")[1].data == {"sentence": "z w", "label": "positive"}


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(PipelineError, match="data file not found"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(PipelineError, match="unsupported data format"):
        read_records(tmp_path / "d.txt")


def test_atomic_dir_keeps_old_output_when_interrupted(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "m.json", {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            atomic_write_json(tmp / "m.json", {"v": 2})
            raise RuntimeError("killed")
    assert json.loads((out / "m.json").read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left behind


def test_files_written_atomically_get_the_umask_s_mode(tmp_path):
    """Written through a temporary file or folder (0600 / 0700 by default), they end up with the mode any new
    file gets under the umask, so a teammate or a server under another user can read them."""
    import os

    from pipeline.core.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
