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

import random
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.io import atomic_write_json, read_jsonl
from pipeline.core.stage import PipelineError, TemplateError
from pipeline.tasks.base import EvalInputs, Task

if TYPE_CHECKING:
    from pipeline.core.prompting import Prompt, Renderer
    from pipeline.core.scoring import ChoiceScores, Scorer

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


def pick_shots(rows: list[dict], label_field: str, labels: list[str], k: int, seed: int) -> list[dict]:
    """`k` solved examples for few-shot prompts: drawn with `seed`, taking the labels in turn so every
    label is shown (then shuffled, so the last example's label is no hint)."""
    rng = random.Random(seed)
    pools = {lab: [r for r in rows if r.get(label_field) == lab] for lab in labels}
    for pool in pools.values():
        rng.shuffle(pool)
    picked: list[dict] = []
    while len(picked) < k and any(pools.values()):
        for lab in labels:
            if pools[lab] and len(picked) < k:
                picked.append(pools[lab].pop())
    rng.shuffle(picked)
    return [{**r, "labels": list(labels)} for r in picked]


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
    reads = {
        "validate": ("labels", "validate.text_field", "validate.label_field", "validate.min_chars"),
        "format": ("labels", "validate.text_field", "validate.label_field"),
        "tokenize": ("tokenize.max_length", "tokenize.truncation"),
        "evaluate": ("seed", "evaluate.shots", "evaluate.max_new_tokens", "evaluate.samples"),
    }

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

    def key_field(self, p) -> str:
        return p.validate.text_field

    def counts(self, p, rows: list[dict]) -> dict:
        return {"labels": dict(Counter(r[p.validate.label_field] for r in rows))}

    def facts(self, p) -> dict:
        return {"labels": list(p.labels), "text_field": p.validate.text_field, "label_field": p.validate.label_field}

    def render(self, p, r: Renderer, row: dict, where: str) -> dict:
        return self.item(r, self.facts(p), row, where)

    def item(self, r: Renderer, facts: dict, row: dict, where: str, shots: list[dict] = ()) -> dict:
        """A formatted row: prompt (after `shots`, solved examples), the label's response, every label's."""
        row = {**row, "labels": facts["labels"]}
        prompt, response = r.prompt(row, where, shots), r.response(row, where)
        choices = r.choices(row, facts["label_field"], facts["labels"], where)
        if len(set(choices)) != len(choices):
            raise TemplateError(f"{r.name}: {where}: two labels render to the same response: {choices}")
        return {"row": row.get("row"), "prompt": prompt, "response": response, "label": row[facts["label_field"]],
                "choices": choices}

    def prompt(self, prompt: Prompt, r: Renderer, row: dict, where: str) -> str:
        return r.prompt({**row, "labels": prompt.facts["labels"]}, where)

    def shots(self, p, x: EvalInputs) -> list[dict]:
        """`evaluate.shots` solved training rows (see pick_shots), none without the validated folder."""
        if not p.evaluate.shots or x.validated is None:
            return []
        f = x.prompt.facts
        return pick_shots(read_jsonl(x.validated / "train.jsonl"), f["label_field"], f["labels"], p.evaluate.shots,
                          p.seed)

    def fewshot_rows(self, x: EvalInputs, shots: list[dict]) -> list[dict]:
        """The validation rows re-rendered with the solved examples before each prompt (same template,
        chat template and system prompt as training)."""
        src = x.validated / "validation.jsonl"
        return [self.item(x.renderer, x.prompt.facts, row, f"{src} row {row.get('row', '?')}", shots)
                for row in read_jsonl(src)]

    def content_free(self, x: EvalInputs, shots: list[dict]) -> list[dict]:
        """A validation row with its text replaced by each content-free input (other fields kept, so any
        template renders), with the same shots."""
        f = x.prompt.facts
        row = read_jsonl(x.validated / "validation.jsonl")[0] if x.validated else {}
        return [self.item(x.renderer, f, {**row, f["text_field"]: text, f["label_field"]: f["labels"][0]},
                          "content-free input", shots) for text in CONTENT_FREE]

    def predictions(self, p, x: EvalInputs, scorer: Scorer, items: list[dict], shots: list[dict]) -> dict:
        """Every rule's predicted labels for the model as `scorer` runs it (adapter on, or the base)."""
        labels = x.prompt.facts["labels"]
        picks = rule_predictions(scorer.choices(items), scorer.choices(self.content_free(x, shots)))
        preds = {rule: [labels[k] for k in pick] for rule, pick in picks.items()}
        answers = scorer.generate([r["prompt"] for r in items], p.evaluate.max_new_tokens)
        parsed = [parse_label(a, r["choices"], labels) for a, r in zip(answers, items, strict=True)]
        preds["generate"] = [labels[k] if k is not None else "(none)" for k in parsed]
        return preds

    def evaluate(self, p, x: EvalInputs) -> dict:
        labels, rows = x.prompt.facts["labels"], x.rows
        if p.evaluate.shots and x.validated is None:
            raise PipelineError("evaluate: evaluate.shots needs the validated data folder (--validated)")
        shots = self.shots(p, x)
        actual = [r["label"] for r in rows]
        rules: dict[str, dict[str, list[str]]] = {}
        with x.scorer.base() as base:
            rules["base"] = self.predictions(p, x, base, rows, [])
            if shots:  # the shots are the same for every row: they join the shared prefix, run once
                fewshot = self.fewshot_rows(x, shots)
                assert [r["row"] for r in fewshot] == [r["row"] for r in rows]
                rules[f"base_{p.evaluate.shots}shot"] = self.predictions(p, x, base, fewshot, shots)
        rules["adapter"] = self.predictions(p, x, x.scorer, rows, [])
        results = self.metrics(rules, actual, labels, x)
        results["adapter"]["stopped_ratio"] = x.scorer.samples(rows, p.evaluate.samples, p.evaluate.max_new_tokens,
                                                               x.out / "samples.jsonl")
        results["rows"] = len(rows)
        return results

    def metrics(self, rules: dict[str, dict[str, list[str]]], actual: list[str], labels: list[str],
                x: EvalInputs) -> dict:
        """Each model's headline metrics and every rule's, the best prompting baseline, the majority class,
        the gains; writes the predictions and the confusion plot."""
        results = {name: classification_metrics(actual, preds["loglik"], labels) for name, preds in rules.items()}
        results["rules"] = {name: {rule: rule_metrics(actual, pred, labels) for rule, pred in preds.items()}
                            for name, preds in rules.items()}
        for name in rules:
            results["rules"][name]["generate"]["parsed"] = round(
                sum(a != "(none)" for a in rules[name]["generate"]) / len(actual), 4)
        scored = results["rules"]
        best = max(((m, r) for m in rules if m != "adapter" for r in RULES),
                   key=lambda mr: (scored[mr[0]][mr[1]]["accuracy"], scored[mr[0]][mr[1]]["macro_f1"]))
        results["prompting_baseline"] = {"name": f"{best[0]}/{best[1]}", **scored[best[0]][best[1]]}
        panels = {k: results[k] for k in rules}
        if best[1] != "loglik":
            panels[results["prompting_baseline"]["name"]] = classification_metrics(actual, rules[best[0]][best[1]],
                                                                                   labels)
        if x.validated is not None:
            field = x.prompt.facts["label_field"]
            train_labels = Counter(r[field] for r in read_jsonl(x.validated / "train.jsonl"))
            majority = max(labels, key=lambda lab: train_labels.get(lab, 0))
            results["majority"] = {"label": majority, **rule_metrics(actual, [majority] * len(actual), labels)}
        atomic_write_json(x.out / "predictions.json", [
            {"row": r["row"], "actual": a, "predicted": b, "base_predicted": c}
            for r, a, b, c in zip(x.rows, actual, rules["adapter"]["loglik"], rules["base"]["loglik"], strict=False)])
        plot_confusion(panels, labels, x.out / "confusion.png")
        results["gain"] = {k: round(results["adapter"][k] - results["base"][k], 4) for k in ("accuracy", "macro_f1")}
        results["gain_over_prompting"] = {k: round(results["adapter"][k] - results["prompting_baseline"][k], 4)
                                          for k in ("accuracy", "macro_f1")}
        return results

    def prompt_field(self, prompt: Prompt) -> str:
        return prompt.facts["text_field"]

    def serving_labels(self, prompt: Prompt) -> list[str]:
        return list(prompt.facts["labels"])

    def answer(self, scorer: Scorer, prompt: Prompt, r: Renderer, rows: list[dict], prompts: list[str],
               max_new_tokens: int) -> list[str]:
        f = prompt.facts
        items = [{"prompt": q, "choices": r.choices({**row, "labels": f["labels"]}, f["label_field"], f["labels"])}
                 for q, row in zip(prompts, rows, strict=True)]
        return [f["labels"][k] for k in np.argmax(scorer.choices(items).total, axis=1)]
