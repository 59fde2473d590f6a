"""Task `preference`: prompt / chosen / rejected pairs (the two answers different).

Rendered with each answer through the template's response block; trained with SFT on the chosen
answers, then DPO on the pairs against the base model (`dpo = True`: the recipe in
pipeline/recipes/dpo.py, `train.dpo`); evaluated on held-out pairs: how often base, SFT adapter and
DPO adapter prefer the chosen answer, and DPO's reward accuracy and margin (against the base, with
the beta the adapter was trained with) for both adapters; served by greedy generation.
"""

from __future__ import annotations

import numpy as np
from datasets import load_from_disk

from pipeline.core.encoding import sides, token_count
from pipeline.tasks.base import EvalInputs, Task


def reward_metrics(policy: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray],
                   beta: float) -> dict:
    """DPO's implicit reward against the reference: how often chosen beats rejected, and by how much."""
    chosen = beta * (policy[0] - reference[0])
    rejected = beta * (policy[1] - reference[1])
    return {"reward_accuracy": round(float((chosen > rejected).mean()), 4),
            "reward_margin": round(float((chosen - rejected).mean()), 4)}


def preference_accuracy(scores: tuple[np.ndarray, np.ndarray]) -> float:
    """How often a model gives the chosen answer more probability than the rejected one."""
    return round(float((scores[0] > scores[1]).mean()), 4)


class Preference(Task):
    name = "preference"
    dpo = True
    reads = {
        "validate": ("validate.min_chars",),
        "tokenize": ("tokenize.max_length", "tokenize.truncation"),
        "train": ("train.dpo",),
        "evaluate": ("evaluate.max_new_tokens", "evaluate.samples"),
    }

    def fields(self, p) -> tuple[str, ...]:
        return ("prompt", "chosen", "rejected")

    def columns(self, p, text) -> dict:
        import pandera.pandas as pa

        return {"prompt": text("prompt", p.validate.min_chars), "chosen": text("chosen", 1),
                "rejected": pa.Column(object, checks=text("rejected", 1).checks)}

    def row_checks(self, p) -> list:
        import pandera.pandas as pa

        return [pa.Check(lambda df: df["chosen"].astype(str).str.strip() != df["rejected"].astype(str).str.strip(),
                         error="rejected is the same as chosen")]

    def key(self, p, row: dict) -> tuple:
        return (str(row["prompt"]).strip().lower(),)

    def key_field(self, p) -> str:
        return "prompt"

    def render(self, p, r, row: dict, where: str) -> dict:
        return {"row": row.get("row"), "prompt": r.prompt(row, where),
                "response": r.response({**row, "response": row["chosen"]}, f"{where} chosen"),
                "rejected": r.response({**row, "response": row["rejected"]}, f"{where} rejected")}

    def encode(self, p, tok, rows: list[dict]) -> list[dict | None]:
        """Both sides of each pair after the same prompt; a pair is dropped when either side is."""
        chosen = super().encode(p, tok, rows)
        worse = super().encode(p, tok, [{**r, "response": r["rejected"]} for r in rows])
        return [None if e is None or w is None else
                {**e, "rejected_input_ids": w["input_ids"], "rejected_labels": w["labels"],
                 "rejected_expected": w["expected"], "truncated": e["truncated"] or w["truncated"]}
                for e, w in zip(chosen, worse, strict=True)]

    def evaluate(self, p, x: EvalInputs) -> dict:
        beta = x.adapter_record["params"]["train"]["dpo"]["beta"]  # the beta the adapter was trained with
        pairs = list(load_from_disk(str(x.tokenized / "validation")))
        tokens = token_count(sides(pairs)[0])

        def loss(scores) -> float:  # mean NLL per chosen-answer token, as eval_loss computes it
            return round(float(-scores[0].sum() / tokens), 4)

        with x.scorer.base() as base_scorer:
            base = base_scorer.pairs(pairs)
        results = {"base": {"preference_accuracy": preference_accuracy(base), "eval_loss": loss(base)}}
        scored = {"adapter": x.scorer.pairs(pairs)}
        model = x.scorer.model
        if (x.adapter_dir / "sft").exists():  # the SFT adapter DPO started from, on the same base weights
            model.load_adapter(str(x.adapter_dir / "sft"), adapter_name="sft", is_trainable=False)
            model.set_adapter("sft")
            scored["sft"] = x.scorer.pairs(pairs)
            model.set_adapter("default")
        for name, s in scored.items():
            results[name] = {"eval_loss": loss(s), "preference_accuracy": preference_accuracy(s),
                             **reward_metrics(s, base, beta)}
        if "sft" in results:
            results["gain"] = {k: round(results["adapter"][k] - results["sft"][k], 4)
                               for k in ("reward_accuracy", "reward_margin", "preference_accuracy")}
        results["adapter"]["stopped_ratio"] = x.scorer.samples(x.rows, p.evaluate.samples, p.evaluate.max_new_tokens,
                                                               x.out / "samples.jsonl")
        results["rows"] = len(pairs)
        return results

    def prompt_field(self, prompt) -> str:
        return "prompt"
