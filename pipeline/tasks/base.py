"""The shape every task has: what its rows hold, how they are checked, rendered, evaluated and answered.

A task is a small class with the methods below; `pipeline/tasks/__init__.py` registers it by name
(`params.yaml: task`). The stages call these methods and never branch on a task's name, so a new
kind of data is one new module and one registration line. `reads` says which params keys the task
reads in which stage (DVC's params syntax): the stage's params view allows them, and `dvc.yaml`
lists them (`peftflow contract --write`). What a task needs to score or generate it gets from the
stage (`EvalInputs.scorer`, a `Scorer`), so a task module imports no model code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from datasets import load_from_disk

from pipeline.core.encoding import encode_many

if TYPE_CHECKING:
    import pandera.pandas as pa

    from pipeline.core.params import Params
    from pipeline.core.prompting import Prompt, Renderer
    from pipeline.core.scoring import Scorer


class RowError(ValueError):
    """A row that cannot be read as the task's shape: the field and the reason (validate quarantines it)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass
class EvalInputs:
    """What the evaluate stage hands a task: the scorer (the model with the adapter on; `scorer.base()`
    for the base model), the training prompt and its renderer, the rendered validation rows, the data
    folders, the adapter's record, and the folder being written (plots, predictions, samples)."""

    scorer: Scorer
    prompt: Prompt
    renderer: Renderer
    rows: list[dict]  # formatted validation rows (prompt, response, ...)
    tokenized: Path  # tokenized data folder (train/, validation/)
    validated: Path | None
    adapter_dir: Path
    adapter_record: dict
    out: Path


class Task:
    """One kind of data. Subclasses set `name` and `reads` and implement what differs; defaults fit most."""

    name: str = ""
    dpo: bool = False  # train: after the SFT steps, DPO steps on (chosen, rejected) pairs
    reads: dict[str, tuple[str, ...]] = {}  # stage -> params keys the task's methods read in that stage

    # ---- params (the whole file, checked by every stage)
    def check_params(self, p: Params) -> str | None:
        """A problem with params for this task (one line naming the key), or None."""
        return None

    # ---- validate
    def normalize(self, p: Params, data: dict) -> dict:
        """The row in the task's own shape (e.g. ShareGPT `conversations` -> `messages`), before the
        schema checks; raise RowError for a row that cannot be."""
        return data

    def fields(self, p: Params) -> tuple[str, ...]:
        """The fields a row must have."""
        raise NotImplementedError

    def columns(self, p: Params, text) -> dict[str, pa.Column]:
        """pandera columns for those fields; `text(name, min_chars)` is the standard text column."""
        raise NotImplementedError

    def row_checks(self, p: Params) -> list[pa.Check]:
        """pandera checks across fields (a failure names the last field)."""
        return []

    def key(self, p: Params, row: dict) -> tuple:
        """What makes two rows the same example (duplicates, train/validation leakage)."""
        raise NotImplementedError

    def key_field(self, p: Params) -> str:
        """The field a duplicate is reported on."""
        raise NotImplementedError

    def counts(self, p: Params, rows: list[dict]) -> dict:
        """Extra per-split counts for the validate metrics."""
        return {}

    # ---- format
    def render(self, p: Params, r: Renderer, row: dict, where: str) -> dict:
        """One formatted row: at least `prompt` and `response` (the training target)."""
        return {"row": row.get("row"), "prompt": r.prompt(row, where), "response": r.response(row, where)}

    def facts(self, p: Params) -> dict:
        """What serving needs beyond the template (recorded with the prompt), e.g. the label set."""
        return {}

    def prompt(self, prompt: Prompt, r: Renderer, row: dict, where: str) -> str:
        """The prompt a row is answered from (predict, the Modelfile, serving)."""
        return r.prompt(row, where)

    # ---- tokenize
    def encode(self, p: Params, tok, rows: list[dict]) -> list[dict | None]:
        """Formatted rows -> `input_ids`, `labels` (IGNORE where there is no loss), `length`, `truncated`,
        and `expected`: the texts the labelled tokens must decode to, in order (the mask audit).
        None for a row dropped by `tokenize.truncation`."""
        many = encode_many(tok, [r["prompt"] for r in rows], [r["response"] for r in rows],
                           p.tokenize.max_length, p.tokenize.truncation)
        return [None if e is None else {**e, "expected": [r["response"] + tok.eos_token]}
                for r, e in zip(rows, many, strict=True)]

    # ---- evaluate
    def evaluate(self, p: Params, x: EvalInputs) -> dict:
        """Metrics of the base model and the adapter on the validation rows (`base`, `adapter`, `gain`)."""
        raise NotImplementedError

    # ---- serving (predict, gguf, the command line)
    def prompt_field(self, prompt: Prompt) -> str:
        """The row field a plain line of text fills (stdin of `peftflow predict`, the Ollama Modelfile)."""
        raise NotImplementedError

    def row_from_text(self, line: str, prompt: Prompt) -> dict:
        """A row from one plain line of text."""
        return {self.prompt_field(prompt): line}

    def serving_labels(self, prompt: Prompt) -> list[str]:
        """The answers serving is scored on (empty: free text)."""
        return []

    def answer(self, scorer: Scorer, prompt: Prompt, r: Renderer, rows: list[dict], prompts: list[str],
               max_new_tokens: int) -> list[str]:
        """The model's answers to rendered prompts (default: greedy generation up to EOS)."""
        return scorer.generate(prompts, max_new_tokens)

    def __repr__(self) -> str:
        return f"<task {self.name}>"


def loss_report(p, x: EvalInputs) -> dict:
    """Eval loss and perplexity on the validation rows' labelled tokens, base and adapter, and greedy
    samples of both side by side (the instruction and chat tasks' evaluation)."""
    data = [{"input_ids": r["input_ids"], "labels": r["labels"]}
            for r in load_from_disk(str(x.tokenized / "validation"))]
    results = {}
    with x.scorer.base() as base:
        results["base"] = {"eval_loss": base.loss(data)}
    results["adapter"] = {"eval_loss": x.scorer.loss(data)}
    for m in results.values():
        m["perplexity"] = round(math.exp(min(m["eval_loss"], 50)), 3)
        m["eval_loss"] = round(m["eval_loss"], 4)
    results["adapter"]["stopped_ratio"] = x.scorer.samples(x.rows, p.evaluate.samples, p.evaluate.max_new_tokens,
                                                           x.out / "samples.jsonl")
    results["gain"] = {"eval_loss": round(results["base"]["eval_loss"] - results["adapter"]["eval_loss"], 4)}
    results["rows"] = len(data)
    return results
