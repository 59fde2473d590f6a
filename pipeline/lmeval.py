"""lm-evaluation-harness (`lm-eval`, the lock's `eval` extra) as an independent judge of the evaluate
stage's numbers, and a runner of lm-eval tasks given as local files, on the base model and the adapter.

- `agreement_task` writes an lm-eval task from an adapter's formatted validation rows: the prompt text the
  format stage rendered with the adapter's recorded template, every label's response as a choice (with
  the EOS text, as the evaluate stage scores it), the gold index; local files only.
- `agreement` runs it with lm-eval's `hf` model (`peft=` the adapter) and scores the same rows with the
  evaluate stage's own code (`choice_logprobs`, the `loglik` and `loglik_norm` rules), row by row.
- `evaluate_tasks` runs lm-eval tasks from a folder of YAML files (their data local: no hub dataset) on the
  base and on the adapter: the metrics of each, for `peftflow eval` to write as DVC metrics and a plot.

Not a stage: nothing here is a dep of one, so an edit reruns nothing (docs/results.md, "lm-eval").
Inputs: the base model folder, the adapter folder, formatted rows or task files. Outputs: dicts.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import yaml

from pipeline.core.io import atomic_write_json, atomic_write_text, read_jsonl
from pipeline.core.loading import load_tokenizer
from pipeline.core.modeling import device
from pipeline.core.scoring import ChoiceScores, choice_logprobs
from pipeline.methods.adapters import load_adapter
from pipeline.tasks.classification import rule_predictions

AGREEMENT = "peftflow_agreement"  # the generated task's name
DIFFER_ATOL = 1e-3  # nats: a choice's log-likelihood by lm-eval and by the evaluate stage (fp32, different batching)


def agreement_task(rows: list[dict], tokenizer, out: Path) -> Path:
    """The task folder (`<AGREEMENT>.yaml`, `rows.jsonl`) for formatted validation rows."""
    eos = tokenizer.eos_token
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "rows.jsonl", "".join(
        json.dumps({"prompt": r["prompt"], "choices": [c + eos for c in r["choices"]],
                    "gold": r["choices"].index(r["response"])}) + "\n" for r in rows))
    spec = {"task": AGREEMENT, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"validation": str((out / "rows.jsonl").resolve())}},
            "validation_split": "validation", "output_type": "multiple_choice", "doc_to_text": "{{prompt}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    atomic_write_text(out / f"{AGREEMENT}.yaml", yaml.safe_dump(spec, sort_keys=False))
    return out


@contextlib.contextmanager
def offline():
    """No hub: datasets and transformers read local files only while lm-eval runs."""
    keep = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in keep})
    try:
        yield
    finally:
        for k, v in keep.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(base: Path, adapter: Path | None, task_dir: Path, tasks: list[str], batch_size: int = 8,
        limit: int | None = None, chat_template: bool = False) -> dict:
    """lm_eval.simple_evaluate with its `hf` model on `base` (fp32, this machine's device), the adapter as
    `peft=` (None: the base alone), the tasks named from `task_dir`; its results and logged samples."""
    import lm_eval  # the `eval` extra: imported only by the commands that run it
    from lm_eval.tasks import TaskManager

    args = {"pretrained": str(base), "dtype": "float32", "batch_size": batch_size, "trust_remote_code": False,
            "device": str(device())}
    if adapter is not None:
        args["peft"] = str(adapter)
    with offline():
        out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=tasks, limit=limit, log_samples=True,
                                      task_manager=TaskManager(include_path=str(task_dir)),
                                      apply_chat_template=chat_template, random_seed=0, numpy_random_seed=0,
                                      torch_random_seed=0, fewshot_random_seed=0)
    return {"results": out["results"], "samples": out["samples"]}


def compare(samples: list[dict], total: np.ndarray, tokens: np.ndarray) -> dict:
    """Row by row: lm-eval's choice log-likelihoods against the evaluate stage's (`total`, `tokens`: its
    ChoiceScores), and each side's pick by its plain and its length-normalised rule. lm-eval moves the
    prompt's trailing whitespace into the continuation, so its log-likelihoods carry one term more, the same
    for every choice of a row (its `shift`): the plain picks cannot differ for it, the normalised ones can."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    lm = np.array([[r[0] for r in s["filtered_resps"]] for s in samples], dtype=float)
    shift = lm - total
    spread = shift.max(1) - shift.min(1)  # ~0: the extra term is one per row
    chars = np.array([[len(c) for c in s["doc"]["choices"]] for s in samples], dtype=float)
    gold = np.array([int(s["doc"]["gold"]) for s in samples])
    ours = rule_predictions_of(total, tokens)
    rows = []
    for i in range(len(samples)):
        lm_pick = int(lm[i].argmax())
        if lm_pick != ours["loglik"][i] or spread[i] > DIFFER_ATOL:
            rows.append({"row": i, "gold": int(gold[i]), "lm_eval": lm_pick, "evaluate": int(ours["loglik"][i]),
                         "lm_eval_loglik": lm[i].round(4).tolist(), "evaluate_loglik": total[i].round(4).tolist()})
    return {"rows": len(samples), "differing_rows": rows,
            "lm_eval": {"acc": round(float(np.mean([s["acc"] for s in samples])), 4),
                        "acc_norm": round(float(np.mean([s["acc_norm"] for s in samples])), 4)},
            "evaluate": {"loglik": round(float((ours["loglik"] == gold).mean()), 4),
                         "loglik_norm": round(float((ours["loglik_norm"] == gold).mean()), 4)},
            "shift": {"max_spread_within_a_row": round(float(spread.max()), 6),
                      "mean": round(float(shift.mean()), 4)},
            "norm_picks_that_differ": int(((lm / chars).argmax(1) != ours["loglik_norm"]).sum()),
            "acc_norm_from_our_scores": round(float((((total + shift.mean(1, keepdims=True)) / chars).argmax(1)
                                                     == gold).mean()), 4)}


def rule_predictions_of(total: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The evaluate stage's score rules on these scores (the content-free prior only moves `calibrated`)."""
    s = ChoiceScores(total, total, tokens)
    return rule_predictions(s, s)


def agreement(base: Path, adapter: Path, formatted: Path, work: Path, batch_size: int = 8,
              limit: int | None = None) -> dict:
    """lm-eval's `acc` / `acc_norm` on the agreement task against the evaluate stage's rules, row by row."""
    tok = load_tokenizer(base)
    rows = read_jsonl(formatted / "validation.jsonl")
    lm = run(base, adapter, agreement_task(rows, tok, work / "task"), [AGREEMENT], batch_size, limit)
    rows = rows[: limit or None]  # the rows lm-eval scored
    model = load_adapter(base, adapter)
    scores = choice_logprobs(model, tok, rows, batch_size)
    result = compare(lm["samples"][AGREEMENT], scores.total, scores.tokens)
    atomic_write_json(work / "agreement.json", result)
    return result


def task_names(task_dir: Path) -> list[str]:
    """The names of the tasks the YAML files of a folder define (their `task` key)."""
    names = []
    for f in sorted(task_dir.glob("*.yaml")):
        spec = yaml.safe_load(f.read_text()) or {}
        if isinstance(spec.get("task"), str):
            names.append(spec["task"])
    return names


def headline(results: dict) -> dict[str, float]:
    """A task's metrics from lm-eval's results, without standard errors and the alias (`acc,none` -> `acc`,
    `exact_match,strict-match` -> `exact_match/strict-match`)."""
    out = {}
    for key, value in results.items():
        if "," not in key or "_stderr" in key or not isinstance(value, int | float):
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else f"{metric}/{filt}"] = round(float(value), 4)
    return out


def evaluate_tasks(base: Path, adapter: Path, task_dir: Path, names: list[str], batch_size: int = 8,
                   limit: int | None = None, chat_template: bool = True) -> dict:
    """Every task's metrics on the base model and on the adapter: {task: {metric: {"base", "adapter"}}}."""
    both = {who: run(base, path, task_dir, names, batch_size, limit, chat_template)["results"]
            for who, path in (("base", None), ("adapter", adapter))}
    return {task: {m: {"base": headline(both["base"][task]).get(m), "adapter": v}
                   for m, v in headline(both["adapter"][task]).items()} for task in names}


def plot(metrics: dict, path: Path) -> None:
    """One bar pair (base, adapter) per task and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{t}\n{m}" for t, ms in metrics.items() for m in ms]
    values = [(v["base"] or 0.0, v["adapter"]) for ms in metrics.values() for v in ms.values()]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(labels)), 3.2))
    ax.bar(x - 0.2, [b for b, _ in values], 0.4, label="base")
    ax.bar(x + 0.2, [a for _, a in values], 0.4, label="adapter")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title("lm-eval on the base model and the adapter", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
