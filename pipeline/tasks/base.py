"""The shape every task has: what its rows hold, how they are checked, rendered, evaluated and answered.

A task is a small class with the methods below; `pipeline/tasks/__init__.py` registers it by name
(`params.yaml: task`). The stages call these methods and never branch on a task's name, so a new
kind of data is one new module and one registration line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandera.pandas as pa

    from pipeline.core.params import Params
    from pipeline.core.prompting import Renderer


class RowError(ValueError):
    """A row that cannot be read as the task's shape: the field and the reason (validate quarantines it)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass
class EvalInputs:
    """What the evaluate stage hands a task: the model (adapter on, `disable_adapter()` for the base), its
    tokenizer, the rendered and tokenized validation rows, and the folders for anything else it needs."""

    model: Any
    tok: Any
    rows: list[dict]  # formatted validation rows (prompt, response, ...)
    tokenized: Path  # tokenized data folder (train/, validation/)
    formatted: Path
    validated: Path | None
    adapter_dir: Path
    out: Path  # the evaluate output folder being written (plots, predictions, samples)


class Task:
    """One kind of data. Subclasses set `name` and implement what differs; defaults fit most tasks."""

    name: str = ""
    dpo: bool = False  # train: after the SFT steps, DPO steps on (chosen, rejected) pairs

    # ---- params
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
        return self.prompt_field(p.validate.text_field)

    def counts(self, p: Params, rows: list[dict]) -> dict:
        """Extra per-split counts for the validate metrics."""
        return {}

    # ---- format
    def render(self, p: Params, r: Renderer, row: dict, where: str, shots: list[dict] = ()) -> dict:
        """One formatted row: at least `prompt` and `response` (the training target)."""
        return {"row": row.get("row"), "prompt": r.prompt(row, where, shots), "response": r.response(row, where)}

    def prompt(self, r: Renderer, row: dict, where: str) -> str:
        """The prompt a row is answered from (training's `prompt`, predict, the Modelfile)."""
        return r.prompt(row, where)

    # ---- tokenize
    def encode(self, p: Params, tok, rows: list[dict]) -> list[dict | None]:
        """Formatted rows -> `input_ids`, `labels` (IGNORE where there is no loss), `length`, `truncated`,
        and `expected`: the texts the labelled tokens must decode to, in order (the mask audit).
        None for a row dropped by `tokenize.truncation`."""
        from pipeline.core.encoding import encode_many

        many = encode_many(tok, [r["prompt"] for r in rows], [r["response"] for r in rows],
                           p.tokenize.max_length, p.tokenize.truncation)
        return [None if e is None else {**e, "expected": [r["response"] + tok.eos_token]}
                for r, e in zip(rows, many, strict=True)]

    # ---- evaluate
    def evaluate(self, p: Params, x: EvalInputs) -> dict:
        """Metrics of the base model and the adapter on the validation rows (`base`, `adapter`, `gain`)."""
        raise NotImplementedError

    # ---- serving (predict, gguf, the command line)
    def prompt_field(self, text_field: str) -> str:
        """The row field a plain line of text fills (stdin of `peftflow predict`, the Ollama Modelfile)."""
        raise NotImplementedError

    def row_from_text(self, line: str, text_field: str) -> dict:
        """A row from one plain line of text."""
        return {self.prompt_field(text_field): line}

    def serving_labels(self, labels: list[str]) -> list[str]:
        """The answers serving is scored on (empty: free text)."""
        return []

    def answer(self, model, tok, r: Renderer, record: dict, rows: list[dict], prompts: list[str],
               max_new_tokens: int) -> list[str]:
        """The model's answers to rendered prompts (default: greedy generation up to EOS)."""
        from pipeline.core.scoring import generate

        return [generate(model, tok, prompt, max_new_tokens)[0] for prompt in prompts]
