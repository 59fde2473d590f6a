import json

from typer.testing import CliRunner

from pipeline.cli import app


def test_metrics_table_reads_the_reports(tmp_path):
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "metrics.json").write_text(json.dumps({
        "base": {"accuracy": 0.61, "macro_f1": 0.3}, "adapter": {"accuracy": 0.9, "macro_f1": 0.88},
        "gain": {"accuracy": 0.29, "macro_f1": 0.58}}))
    r = CliRunner().invoke(app, ["metrics", "--reports", str(tmp_path)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output and "0.61" in r.output and "0.9" in r.output and "0.29" in r.output


def test_metrics_without_reports_says_what_to_do(tmp_path):
    r = CliRunner().invoke(app, ["metrics", "--reports", str(tmp_path)])
    assert r.exit_code == 1 and "run `dvc repro` first" in r.output
