"""Task `classification`: a text field and a label from `labels` in params.

Rows: `validate.text_field` (text) and `validate.label_field` (one of `labels`). Rendered with every
label's response as `choices`; evaluated by scoring each choice as a continuation of the prompt
(no free generation, so no unparseable answers): accuracy, macro-F1, per-class precision / recall /
F1 and a confusion matrix for the base model (adapter disabled), the adapter, and with
`evaluate.shots: k` the base model k-shot; served the same way (the most likely label).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.core.io import atomic_write_json, read_jsonl
from pipeline.core.prompting import Renderer, TemplateError, label_choices, pick_shots
from pipeline.core.scoring import choice_scores, write_samples
from pipeline.core.stage import PipelineError
from pipeline.tasks.base import EvalInputs, Task


def classification_metrics(actual: list[str], predicted: list[str], labels: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    prec, rec, f1, support = precision_recall_fscore_support(actual, predicted, labels=labels, zero_division=0)
    return {
        "accuracy": round(float(accuracy_score(actual, predicted)), 4),
        "macro_f1": round(float(f1_score(actual, predicted, labels=labels, average="macro", zero_division=0)), 4),
        "per_class": {lab: {"precision": round(float(prec[k]), 4), "recall": round(float(rec[k]), 4),
                            "f1": round(float(f1[k]), 4), "support": int(support[k])}
                      for k, lab in enumerate(labels)},
        "confusion": confusion_matrix(actual, predicted, labels=labels).tolist(),
    }


def plot_confusion(results: dict[str, dict], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8))
    for ax, (name, m) in zip(np.atleast_1d(axes), results.items(), strict=False):
        cm = np.array(m["confusion"])
        ax.imshow(cm, cmap="Blues")
        for (a, b), v in np.ndenumerate(cm):
            ax.text(b, a, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(f"{name}: acc {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Classification(Task):
    name = "classification"

    def check_params(self, p) -> str | None:
        if len(p.labels) < 2:
            return "params.yaml: 'labels' must list at least two labels for task classification."
        return None

    def fields(self, p) -> tuple[str, ...]:
        return (p.validate.text_field, p.validate.label_field)

    def columns(self, p, text) -> dict:
        import pandera.pandas as pa

        labels = list(p.labels)
        return {p.validate.text_field: text(p.validate.text_field, p.validate.min_chars),
                p.validate.label_field: pa.Column(object, [
                    pa.Check(lambda x: isinstance(x, str), element_wise=True, error="expected text"),
                    pa.Check(lambda x: not isinstance(x, str) or x in labels, element_wise=True,
                             error=f"unknown label (valid: {', '.join(labels)})")])}

    def key(self, p, row: dict) -> tuple:
        return (str(row[p.validate.text_field]).strip().lower(),)

    def counts(self, p, rows: list[dict]) -> dict:
        return {"labels": dict(Counter(r[p.validate.label_field] for r in rows))}

    def render(self, p, r: Renderer, row: dict, where: str, shots: list[dict] = ()) -> dict:
        item = super().render(p, r, row, where, shots)
        item["label"] = row[p.validate.label_field]
        item["choices"] = label_choices(r, row, p.validate.label_field, list(p.labels), where)
        if len(set(item["choices"])) != len(item["choices"]):
            raise TemplateError(f"{r.name}: two labels render to the same response: {item['choices']}")
        return item

    def fewshot_rows(self, p, tok, formatted: Path, validated: Path) -> list[dict]:
        """The validation rows re-rendered with `evaluate.shots` solved training examples before each
        prompt (same template, chat template and system prompt as training; see prompting.pick_shots)."""
        fmt = json.loads((formatted / "format.json").read_text())
        renderer = Renderer(fmt["template_text"], fmt["template"], tokenizer=tok, chat_template=fmt["chat_template"],
                            system_prompt=fmt["system_prompt"])
        shots = pick_shots(read_jsonl(validated / "train.jsonl"), p.validate.label_field, list(p.labels),
                           p.evaluate.shots, p.seed)
        src = validated / "validation.jsonl"
        return [self.render(p, renderer, {**row, "labels": list(p.labels)}, f"{src} row {row.get('row', '?')}", shots)
                for row in read_jsonl(src)]

    def evaluate(self, p, x: EvalInputs) -> dict:
        labels, rows, bs = list(p.labels), x.rows, p.evaluate.batch_size
        fewshot = []
        if p.evaluate.shots:
            if x.validated is None:
                raise PipelineError("evaluate: evaluate.shots needs the validated data folder (--validated)")
            fewshot = self.fewshot_rows(p, x.tok, x.formatted, x.validated)
        actual = [r["label"] for r in rows]
        preds = {}
        with x.model.disable_adapter():
            preds["base"] = [labels[k] for k in choice_scores(x.model, x.tok, rows, bs).argmax(1)]
            if fewshot:  # the shots are the same for every row: they join the shared prefix, run once
                assert [r["row"] for r in fewshot] == [r["row"] for r in rows]
                preds[f"base_{p.evaluate.shots}shot"] = [labels[k] for k in
                                                         choice_scores(x.model, x.tok, fewshot, bs).argmax(1)]
        preds["adapter"] = [labels[k] for k in choice_scores(x.model, x.tok, rows, bs).argmax(1)]
        results = {name: classification_metrics(actual, pred, labels) for name, pred in preds.items()}
        atomic_write_json(x.out / "predictions.json", [
            {"row": r["row"], "actual": a, "predicted": b, "base_predicted": c}
            for r, a, b, c in zip(rows, actual, preds["adapter"], preds["base"], strict=False)])
        plot_confusion(results, labels, x.out / "confusion.png")
        results["gain"] = {k: round(results["adapter"][k] - results["base"][k], 4) for k in ("accuracy", "macro_f1")}
        results["adapter"]["stopped_ratio"] = write_samples(x.model, x.tok, rows, p.evaluate.samples,
                                                            p.evaluate.max_new_tokens, x.out / "samples.jsonl")
        results["rows"] = len(rows)
        return results

    def prompt_field(self, text_field: str) -> str:
        return text_field

    def serving_labels(self, labels: list[str]) -> list[str]:
        return list(labels)

    def answer(self, model, tok, r: Renderer, record: dict, rows: list[dict], prompts: list[str],
               max_new_tokens: int) -> list[str]:
        labels = record["labels"]
        items = [{"prompt": prompt, "choices": label_choices(r, {**row, "labels": labels},
                                                             record.get("label_field", "label"), labels)}
                 for prompt, row in zip(prompts, rows, strict=True)]
        return [labels[k] for k in np.argmax(choice_scores(model, tok, items, batch_size=16), axis=1)]
