import json

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cli.common import fleet_adapters
from pipeline.core.stage import PipelineError, error_line


def test_metrics_table_reads_the_reports(tmp_path):
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "metrics.json").write_text(json.dumps({
        "base": {"accuracy": 0.61, "macro_f1": 0.3}, "adapter": {"accuracy": 0.9, "macro_f1": 0.88},
        "gain": {"accuracy": 0.29, "macro_f1": 0.58}}))
    r = CliRunner().invoke(app, ["metrics", "--reports", str(tmp_path)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output and "0.61" in r.output and "0.9" in r.output and "0.29" in r.output


def test_metrics_without_reports_says_what_to_do(tmp_path):
    r = CliRunner().invoke(app, ["metrics", "--reports", str(tmp_path)], env={"COLUMNS": "200"})
    assert r.exit_code == 1 and "run `dvc repro` first" in r.output


def fleet_folder(tmp_path):
    fleet = tmp_path / "fleet"
    (fleet / "resolved").mkdir(parents=True)
    for name, task in (("chat", "chat"), ("sentiment", "classification")):
        (fleet / "resolved" / f"{name}.yaml").write_text(f"task: {task}\ntrain:\n  method: lora\n")
    ev = fleet / "sentiment" / "reports" / "evaluate"
    ev.mkdir(parents=True)
    ev.joinpath("metrics.json").write_text(json.dumps({"base": {"accuracy": 0.35}, "adapter": {"accuracy": 0.93}}))
    return fleet


def test_metrics_of_a_fleet_is_one_row_per_adapter(tmp_path):
    fleet_folder(tmp_path)
    r = CliRunner().invoke(app, ["metrics", "--fleet", "--root", str(tmp_path)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    rows = [line for line in r.output.splitlines() if "lora" in line]
    assert len(rows) == 2 and "chat" in rows[0] and "not yet" in rows[0]
    assert "sentiment" in rows[1] and "accuracy 0.35 -> 0.93" in rows[1]
    r = CliRunner().invoke(app, ["metrics", "--fleet", "--root", str(tmp_path / "none")])
    assert r.exit_code == 2 and "error:" in r.output and "no adapters yet" in r.output and "dvc repro" in r.output


def test_serve_fleet_names_every_adapter_and_its_gguf_folder(tmp_path):
    fleet = fleet_folder(tmp_path)
    assert fleet_adapters(fleet) == [("chat", fleet / "chat" / "models" / "gguf"),
                                     ("sentiment", fleet / "sentiment" / "models" / "gguf")]
    with pytest.raises(PipelineError, match="no adapters yet"):
        fleet_adapters(tmp_path / "none")


def test_an_error_line_names_the_params_file_the_command_read():
    e = PipelineError("params.yaml: unknown key 'train.bacth_size'.\n Did you mean 'batch_size'?")
    assert error_line(e, "exp/fast.yaml") == "error: exp/fast.yaml: unknown key 'train.bacth_size'. Did you mean " \
                                            "'batch_size'?"
    assert error_line(e, "params.yaml") == error_line(e) == "error: params.yaml: unknown key 'train.bacth_size'. " \
                                                            "Did you mean 'batch_size'?"
