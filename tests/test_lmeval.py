"""pipeline/lmeval.py and `peftflow eval`: lm-evaluation-harness, run on the tiny model, agrees with the evaluate
stage row by row on the adapter's own validation rows; the shipped example tasks run on base and adapter."""

import json

import numpy as np
from typer.testing import CliRunner

from pipeline import lmeval
from pipeline.cli import app


def test_lm_eval_acc_is_the_evaluate_stages_loglik_rule_on_every_row(trained, tiny_base, tmp_path):
    """lm-eval's `hf` model with `peft=` the adapter, on a task made from the formatted validation rows: the same
    pick as the evaluate stage's `loglik` rule on every row, and each choice's log-likelihood the stage's plus one
    term per row (lm-eval scores the prompt's trailing newline with the answer), the same for every choice."""
    r = lmeval.agreement(tiny_base, trained["adapter"], trained["formatted"], tmp_path, batch_size=4)
    assert r["rows"] == len(trained["formatted"].joinpath("validation.jsonl").read_text().splitlines()) > 0
    assert r["differing_rows"] == [], r["differing_rows"][:3]
    assert r["lm_eval"]["acc"] == r["evaluate"]["loglik"]
    assert r["shift"]["max_spread_within_a_row"] < lmeval.DIFFER_ATOL and r["shift"]["mean"] < 0
    assert r["acc_norm_from_our_scores"] == r["lm_eval"]["acc_norm"]  # its per-character rule, from our scores
    spec = (tmp_path / "task" / f"{lmeval.AGREEMENT}.yaml").read_text()
    assert "dataset_path: json" in spec and str(tmp_path) in spec  # local rows, no hub dataset


def test_compare_names_a_row_whose_pick_differs():
    samples = [{"doc_id": i, "doc": {"choices": ["a<e>", "bb<e>"], "gold": 0}, "acc": 1.0, "acc_norm": 1.0,
                "filtered_resps": [(-1.0 - s, False), (-2.0 - s, False)]} for i, s in enumerate((0.5, 0.7))]
    total = np.array([[-1.0, -2.0], [-3.0, -2.5]])  # row 1: the stage picks choice 1, lm-eval choice 0
    r = lmeval.compare(samples, total, np.array([[2, 3], [2, 3]]))
    assert [d["row"] for d in r["differing_rows"]] == [1]
    assert r["evaluate"]["loglik"] == 0.5 and r["lm_eval"]["acc"] == 1.0


def test_peftflow_eval_runs_the_shipped_tasks_on_base_and_adapter(trained, tiny_base, tmp_path):
    """The example tasks of evals/ (multiple choice and generation, data from data/example) on the tiny model:
    metrics for base and adapter as a DVC metrics file, and the plot."""
    out = tmp_path / "lm_eval"
    r = CliRunner().invoke(app, ["eval", "--adapter", str(trained["adapter"]), "--base", str(tiny_base), "--out",
                                 str(out), "--limit", "6", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"peftflow_sentiment_choice", "peftflow_sentiment_answer"}
    assert set(metrics["peftflow_sentiment_choice"]) == {"acc", "acc_norm"}
    assert all(0 <= v[w] <= 1 for ms in metrics.values() for v in ms.values() for w in ("base", "adapter"))
    assert (out / "metrics.png").stat().st_size > 0
