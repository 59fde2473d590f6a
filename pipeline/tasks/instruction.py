"""Task `instruction`: Alpaca-style rows, `instruction` / `input` (may be empty) / `output`.

Rendered by the template into a prompt and the output as the response; evaluated by eval loss and
perplexity on the response tokens for the base model and the adapter, with greedy sample
generations of both side by side; served by greedy generation up to EOS.
"""

from __future__ import annotations

import math

from datasets import load_from_disk

from pipeline.core.scoring import eval_loss, write_samples
from pipeline.tasks.base import EvalInputs, Task


class Instruction(Task):
    name = "instruction"

    def fields(self, p) -> tuple[str, ...]:
        return ("instruction", "input", "output")

    def columns(self, p, text) -> dict:
        return {"instruction": text("instruction", p.validate.min_chars), "input": text("input", 0),
                "output": text("output", 1)}

    def key(self, p, row: dict) -> tuple:
        return (str(row["instruction"]).strip().lower(), str(row["input"]).strip().lower())

    def evaluate(self, p, x: EvalInputs) -> dict:
        data = [{"input_ids": r["input_ids"], "labels": r["labels"]}
                for r in load_from_disk(str(x.tokenized / "validation"))]
        results = {}
        with x.model.disable_adapter():
            results["base"] = {"eval_loss": eval_loss(x.model, data, p.evaluate.batch_size)}
        results["adapter"] = {"eval_loss": eval_loss(x.model, data, p.evaluate.batch_size)}
        for m in results.values():
            m["perplexity"] = round(math.exp(min(m["eval_loss"], 50)), 3)
            m["eval_loss"] = round(m["eval_loss"], 4)
        results["adapter"]["stopped_ratio"] = write_samples(x.model, x.tok, x.rows, p.evaluate.samples,
                                                            p.evaluate.max_new_tokens, x.out / "samples.jsonl")
        results["gain"] = {"eval_loss": round(results["base"]["eval_loss"] - results["adapter"]["eval_loss"], 4)}
        results["rows"] = len(data)
        return results

    def prompt_field(self, text_field: str) -> str:
        return "instruction"

    def row_from_text(self, line: str, text_field: str) -> dict:
        return {"instruction": line, "input": ""}
