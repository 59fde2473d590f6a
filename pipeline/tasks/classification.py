"""Task `classification`: a text field and a label from `labels` in params.

Rows: `validate.text_field` (text) and `validate.label_field` (one of `labels`). Rendered with every
label's response as `choices`. The headline figures score each choice as a continuation of the prompt
(full log-likelihood, with EOS): accuracy, macro-F1, per-class precision / recall / F1 and a confusion
matrix for the base model (adapter disabled), the adapter, and with `evaluate.shots: k` the base model
k-shot. Every model is also scored by the other standard rules (`RULES`), so a prompting baseline is
the best of them, named, not one rule that may answer one class for every row; the majority class of
the training data is reported beside them. Served like the headline (the most likely label).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.core.io import atomic_write_json, read_jsonl
from pipeline.core.prompting import Renderer, TemplateError, label_choices, pick_shots
from pipeline.core.scoring import ChoiceScores, choice_logprobs, choice_scores, generate_many, write_samples
from pipeline.core.stage import PipelineError
from pipeline.tasks.base import EvalInputs, Task

# How a model's answer is read, each named in the metrics (`rules`):
#   loglik       the choice with the highest summed log-probability (tokens + EOS): the headline rule
#   loglik_norm  the same divided by the choice's token count (length-normalised)
#   first_token  the highest log-probability of the choice's first token alone
#   calibrated   contextual calibration (Zhao et al. 2021): loglik over the choices as a distribution,
#                divided by the mean distribution the same prompt gives content-free inputs
#   generate     greedy generation; the label named first in the answer (none named: wrong)
RULES = ("loglik", "loglik_norm", "first_token", "calibrated", "generate")
CONTENT_FREE = ("N/A", "", "[MASK]")  # the content-free inputs of contextual calibration
ONE_CLASS = 0.9  # a model that puts more than this share of rows in one class is flagged


def rule_predictions(s: ChoiceScores, content_free: ChoiceScores) -> dict[str, np.ndarray]:
    """The choice index each score-based rule picks for every row."""
    from scipy.special import logsumexp

    def dist(x: np.ndarray) -> np.ndarray:
        return x - logsumexp(x, axis=1, keepdims=True)

    prior = logsumexp(dist(content_free.total), axis=0) - np.log(len(content_free.total))
    return {"loglik": s.total.argmax(1), "loglik_norm": (s.total / s.tokens).argmax(1),
            "first_token": s.first.argmax(1), "calibrated": (dist(s.total) - prior).argmax(1)}


def parse_label(text: str, choices: list[str], labels: list[str]) -> int | None:
    """The index of the label a generated answer names first (its name or its rendered response, as a
    whole word, any case), or None when it names none."""
    low, first = text.lower(), None
    for k, names in enumerate(zip(choices, labels, strict=True)):
        for name in {n.strip().lower() for n in names if n.strip()}:
            m = re.search(rf"(?<!\w){re.escape(name)}(?!\w)", low)
            if m and (first is None or m.start() < first[0]):
                first = (m.start(), k)
    return None if first is None else first[1]


def shares(predicted: list[str]) -> float:
    return round(max(Counter(predicted).values()) / len(predicted), 4) if predicted else 0.0


def rule_metrics(actual: list[str], predicted: list[str], labels: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    top = shares(predicted)
    return {"accuracy": round(float(accuracy_score(actual, predicted)), 4),
            "macro_f1": round(float(f1_score(actual, predicted, labels=labels, average="macro", zero_division=0)), 4),
            "top_class_share": top, "one_class": top > ONE_CLASS}


def classification_metrics(actual: list[str], predicted: list[str], labels: list[str]) -> dict:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    prec, rec, f1, support = precision_recall_fscore_support(actual, predicted, labels=labels, zero_division=0)
    return {
        **rule_metrics(actual, predicted, labels),
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
        flag = f"\nONE CLASS: {m['top_class_share']:.0%} of rows" if m.get("one_class") else ""
        ax.set_title(f"{name}: acc {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}{flag}",
                     color="#c44e52" if flag else "black")
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

    def renderer(self, tok, formatted: Path) -> Renderer:
        """The training prompt's renderer (same template, chat template and system prompt)."""
        fmt = json.loads((formatted / "format.json").read_text())
        return Renderer(fmt["template_text"], fmt["template"], tokenizer=tok, chat_template=fmt["chat_template"],
                        system_prompt=fmt["system_prompt"])

    def fewshot_rows(self, p, tok, formatted: Path, validated: Path) -> list[dict]:
        """The validation rows re-rendered with `evaluate.shots` solved training examples before each
        prompt (same template, chat template and system prompt as training; see prompting.pick_shots)."""
        src, renderer, shots = validated / "validation.jsonl", self.renderer(tok, formatted), self.shots(p, validated)
        return [self.render(p, renderer, {**row, "labels": list(p.labels)}, f"{src} row {row.get('row', '?')}", shots)
                for row in read_jsonl(src)]

    def shots(self, p, validated: Path | None) -> list[dict]:
        if not p.evaluate.shots or validated is None:
            return []
        return pick_shots(read_jsonl(validated / "train.jsonl"), p.validate.label_field, list(p.labels),
                          p.evaluate.shots, p.seed)

    def content_free(self, p, x: EvalInputs, shots: list[dict]) -> list[dict]:
        """A validation row with its text replaced by each content-free input (other fields kept, so any
        template renders), with the same shots."""
        row = read_jsonl(x.validated / "validation.jsonl")[0] if x.validated else {}
        renderer = self.renderer(x.tok, x.formatted)
        return [self.render(p, renderer, {**row, p.validate.text_field: text, p.validate.label_field: p.labels[0],
                                          "labels": list(p.labels)}, "content-free input", shots)
                for text in CONTENT_FREE]

    def predictions(self, p, x: EvalInputs, items: list[dict], shots: list[dict]) -> dict[str, list[str]]:
        """Every rule's predicted labels for the model as it is (adapter on or disabled)."""
        labels, bs = list(p.labels), p.evaluate.batch_size
        picks = rule_predictions(choice_logprobs(x.model, x.tok, items, bs),
                                 choice_logprobs(x.model, x.tok, self.content_free(p, x, shots), bs))
        preds = {rule: [labels[k] for k in pick] for rule, pick in picks.items()}
        answers = generate_many(x.model, x.tok, [r["prompt"] for r in items], p.evaluate.max_new_tokens, bs)
        parsed = [parse_label(a, r["choices"], labels) for a, r in zip(answers, items, strict=True)]
        preds["generate"] = [labels[k] if k is not None else "(none)" for k in parsed]
        return preds

    def evaluate(self, p, x: EvalInputs) -> dict:
        labels, rows = list(p.labels), x.rows
        if p.evaluate.shots and x.validated is None:
            raise PipelineError("evaluate: evaluate.shots needs the validated data folder (--validated)")
        shots = self.shots(p, x.validated)
        actual = [r["label"] for r in rows]
        rules: dict[str, dict[str, list[str]]] = {}
        with x.model.disable_adapter():
            rules["base"] = self.predictions(p, x, rows, [])
            if shots:  # the shots are the same for every row: they join the shared prefix, run once
                fewshot = self.fewshot_rows(p, x.tok, x.formatted, x.validated)
                assert [r["row"] for r in fewshot] == [r["row"] for r in rows]
                rules[f"base_{p.evaluate.shots}shot"] = self.predictions(p, x, fewshot, shots)
        rules["adapter"] = self.predictions(p, x, rows, [])
        results = {name: classification_metrics(actual, preds["loglik"], labels) for name, preds in rules.items()}
        results["rules"] = {name: {rule: rule_metrics(actual, pred, labels) for rule, pred in preds.items()}
                            for name, preds in rules.items()}
        for name in rules:
            results["rules"][name]["generate"]["parsed"] = round(
                sum(x != "(none)" for x in rules[name]["generate"]) / len(rows), 4)
        scored = results["rules"]
        best = max(((m, r) for m in rules if m != "adapter" for r in RULES),
                   key=lambda mr: (scored[mr[0]][mr[1]]["accuracy"], scored[mr[0]][mr[1]]["macro_f1"]))
        results["prompting_baseline"] = {"name": f"{best[0]}/{best[1]}", **results["rules"][best[0]][best[1]]}
        panels = {k: results[k] for k in rules}
        if best[1] != "loglik":
            panels[results["prompting_baseline"]["name"]] = classification_metrics(actual, rules[best[0]][best[1]],
                                                                                   labels)
        if x.validated is not None:
            train_labels = Counter(r[p.validate.label_field] for r in read_jsonl(x.validated / "train.jsonl"))
            majority = max(labels, key=lambda lab: train_labels.get(lab, 0))
            results["majority"] = {"label": majority, **rule_metrics(actual, [majority] * len(rows), labels)}
        atomic_write_json(x.out / "predictions.json", [
            {"row": r["row"], "actual": a, "predicted": b, "base_predicted": c}
            for r, a, b, c in zip(rows, actual, rules["adapter"]["loglik"], rules["base"]["loglik"], strict=False)])
        plot_confusion(panels, labels, x.out / "confusion.png")
        results["gain"] = {k: round(results["adapter"][k] - results["base"][k], 4) for k in ("accuracy", "macro_f1")}
        results["gain_over_prompting"] = {k: round(results["adapter"][k] - results["prompting_baseline"][k], 4)
                                          for k in ("accuracy", "macro_f1")}
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
