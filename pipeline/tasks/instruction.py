"""Task `instruction`: Alpaca-style rows, `instruction` / `input` (may be empty) / `output`.

Rendered by the template into a prompt and the output as the response; evaluated by eval loss and
perplexity on the response tokens for the base model and the adapter, with greedy sample
generations of both side by side; served by greedy generation up to EOS.
"""

from __future__ import annotations

from pipeline.tasks.base import EvalInputs, Task, loss_report


class Instruction(Task):
    name = "instruction"
    reads = {
        "validate": ("validate.min_chars",),
        "tokenize": ("tokenize.max_length", "tokenize.truncation"),
        "evaluate": ("evaluate.max_new_tokens", "evaluate.samples"),
    }

    def fields(self, p) -> tuple[str, ...]:
        return ("instruction", "input", "output")

    def columns(self, p, text) -> dict:
        return {"instruction": text("instruction", p.validate.min_chars), "input": text("input", 0),
                "output": text("output", 1)}

    def key(self, p, row: dict) -> tuple:
        return (str(row["instruction"]).strip().lower(), str(row["input"]).strip().lower())

    def key_field(self, p) -> str:
        return "instruction"

    def evaluate(self, p, x: EvalInputs) -> dict:
        return loss_report(p, x)

    def prompt_field(self, prompt) -> str:
        return "instruction"

    def row_from_text(self, line: str, prompt) -> dict:
        return {"instruction": line, "input": ""}
