"""pipeline/core/stage.py: what a stage program reads before its heavy imports (`option`, `peek`), and a
pipeline error as one line and exit code 2 (`command`)."""

from typer.testing import CliRunner

from pipeline.core.stage import PipelineError, command, option, peek


def test_option_reads_both_spellings_and_falls_back():
    assert option(["--data", "d", "--params", "p.yaml"], "--params", "params.yaml") == "p.yaml"
    assert option(["--params=q.yaml"], "--params", "params.yaml") == "q.yaml"
    assert option(["--params"], "--params", "params.yaml") == "params.yaml"  # no value: typer will say so
    assert option(["--paramsx", "a"], "--params", "params.yaml") == "params.yaml"


def test_peek_reads_one_key_and_is_none_for_what_is_missing(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  allocator: mimalloc\n  unknown_key: 1\n  lora: {r: 8}\n")  # not checked
    assert peek(f, "train.allocator") == "mimalloc" and peek(f, "train.lora.r") == 8
    assert peek(f, "train.nothing") is None and peek(f, "train.allocator.x") is None
    assert peek(tmp_path / "absent.yaml", "train.allocator") is None
    f.write_text("train: [unclosed\n")
    assert peek(f, "train") is None


def test_a_pipeline_error_is_one_line_and_exit_code_2():
    error = PipelineError("data.jsonl row 3 field 'label': missing field")

    def main() -> None:
        raise error

    r = CliRunner().invoke(command(main, whole_process=False), [])
    assert r.exit_code == 2 and r.output.strip() == f"error: {error}"
