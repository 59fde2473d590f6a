"""Stage `export`: merge the adapter into the base model and check the merge.

The merged model (`merge_and_unload`) is saved as safetensors with the tokenizer and chat
template. Before saving, its logits on `export.check_rows` validation rows are compared with
base + adapter: they must agree within `export.atol` plus `RTOL` of each logit's size (float32 sums
of the merged weights round otherwise than base + adapter's two products, in proportion to the logit)
and must differ from the base model's by more than `export.atol`, or the stage fails. Methods that
cannot be merged (prompt learning: prefix, prompt, P-tuning) export the adapter alone, with a note
saying why.

Every export carries one record (`peftflow.json`, also in the safetensors metadata): the prompt it
answers to, this stage's lineage (pipeline/core/lineage.py), the adapter's whole record and the
metrics; and a model card (`README.md`, rendered with jinja2 from that record and the evaluation
metrics: data, license, training, evaluation, how to reproduce). Nothing in the folder depends on
when or where it was made: the same inputs give the same bytes.

Inputs: base model folder, adapter folder, tokenized validation data, evaluation metrics.
Outputs: `<out>/` (merged model or adapter, tokenizer, `peftflow.json`, `README.md`) and a metrics file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer
from datasets import load_from_disk
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline.core import lineage
from pipeline.core.io import atomic_dir, atomic_write_json, atomic_write_text
from pipeline.core.layout import stage_of_params
from pipeline.core.loading import copy_tokenizer, load_tokenizer
from pipeline.core.modeling import device, left_pad
from pipeline.core.params import Params, load_params, view
from pipeline.core.stage import PipelineError, entry
from pipeline.methods.adapters import load_adapter, record_of, trained_method

STAGE = "export"
READS = ("export",)
LOADS = ("method",)
# the merge check's relative part: float32 rounds the merged weights' sums otherwise than base + adapter's
# products, in proportion to the logit (LoRA lr 3e-3 on FPB: 1.4e-3 apart, over an absolute 1e-3; docs/results.md)
RTOL = 1e-4
FILES = ("pipeline/stages/model_card.md.jinja",)  # read by this stage beside its code
CARD = Path(__file__).with_name("model_card.md.jinja")


class ExportError(PipelineError, RuntimeError):
    """The merged model does not reproduce base + adapter."""


@torch.no_grad()
def logits(model, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    return out.logits.float() * batch["attention_mask"].unsqueeze(-1)


def model_card(lin: dict, evaluation: dict | None, stage: str = STAGE) -> str:
    """The export folder's README.md, rendered from its lineage record (sandboxed jinja2); `stage`: the lock
    name of this export (`export@<adapter>` in a fleet), whose repro command the card gives."""
    adapter = lin["adapter"]
    train = adapter["params"]["train"]
    keys = [k for k in ("accuracy", "macro_f1", "eval_loss", "perplexity", "preference_accuracy")
            if evaluation and k in evaluation["adapter"] and k in evaluation["base"]]
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    return env.from_string(CARD.read_text()).render(
        title=f"{Path(str(adapter['base']['source'])).name} + {train['method']} ({adapter['prompt']['task']})",
        lin=lin, adapter=adapter, export=lin["metrics"]["export"], merged=lin["metrics"]["export"]["merged"],
        task=adapter["prompt"]["task"], labels=adapter["prompt"]["facts"].get("labels", []),
        data=adapter["data"], evaluation=evaluation, metric_keys=keys, train_metrics=adapter["metrics"],
        params=adapter["params"], method=train["method"],
        method_args=json.dumps(train.get(train["method"], {}), sort_keys=True),
        commands=lineage.reproduce_commands({"stage": stage}))


def within(merged: torch.Tensor, with_adapter: torch.Tensor, atol: float) -> bool:
    """Whether merged logits equal base + adapter's: |merged - adapter| <= atol + RTOL * |adapter| everywhere."""
    return torch.allclose(merged, with_adapter, rtol=RTOL, atol=atol)


def merge(model, tokenized: Path, tok, p, dev) -> tuple[object, dict]:
    """The merged model and the check's figures: merged logits on `export.check_rows` validation rows must
    equal base + adapter's (`within`) and differ from the base model's."""
    rows = [{"input_ids": r["input_ids"]} for r in load_from_disk(str(tokenized / "validation"))]
    batch = left_pad(rows[: p.check_rows], tok.pad_token_id or 0, dev)
    with_adapter = logits(model, batch)
    with model.disable_adapter():
        base = logits(model, batch)
    merged = model.merge_and_unload()
    out = logits(merged, batch)
    diff = float((out - with_adapter).abs().max())
    moved = float((with_adapter - base).abs().max())
    if not within(out, with_adapter, p.atol):
        raise ExportError(f"export: merged logits differ from base+adapter by {diff:.2e}, beyond export.atol={p.atol} "
                          f"+ {RTOL:g} x |logit|")
    if moved <= p.atol:
        raise ExportError(f"export: the adapter does not change the base model's logits (max diff {moved:.2e} <= "
                          f"export.atol={p.atol}); nothing was learned")
    return merged, {"merged": True, "max_abs_diff_vs_adapter": diff, "max_abs_diff_vs_base": moved, "atol": p.atol,
                    "rows_checked": len(batch["input_ids"])}


def run(params: Params, base_dir: Path, adapter_dir: Path, tokenized: Path, out: Path,
        evaluation: Path | None = None, stage: str = STAGE) -> dict:
    """Merge (or export alone) and check; writes the folder with its record and model card (`stage`: this
    export's lock name, `export@<adapter>` for a fleet adapter's). Returns the export metrics."""
    pv = view(params, STAGE, READS)
    p = pv.export
    dev, tok = device(), load_tokenizer(base_dir)
    model = load_adapter(base_dir, adapter_dir, dev, quantized=False)  # merge into full-precision weights
    method, record = trained_method(adapter_dir), record_of(adapter_dir)
    with atomic_dir(out) as tmp:
        if method.mergeable:
            merged, metrics = merge(model, tokenized, tok, p, dev)
            merged.save_pretrained(str(tmp), safe_serialization=True)
        else:
            method.save(model, tmp)
            metrics = {"merged": False, "reason": f"{method.name} adds virtual tokens; it cannot be merged into "
                       "the weights, so the adapter is exported alone"}
        copy_tokenizer(base_dir, tmp)  # the files training read, as they are
        ev = json.loads(evaluation.read_text()) if evaluation and evaluation.exists() else None
        inputs = {str(f): lineage.digest(f) for f in (adapter_dir, tokenized, evaluation) if f and f.exists()}
        lin = {**lineage.record(STAGE, pv.dump()), "prompt": record["prompt"], "inputs": inputs,
               "adapter": record, "metrics": {"export": metrics, "evaluate": ev}}
        atomic_write_json(tmp / lineage.RECORD, lin)
        for f in tmp.glob("*.safetensors"):
            lineage.write_into_safetensors(f, lin)
        atomic_write_text(tmp / "README.md", model_card(lin, ev, stage))
    return metrics


def main(
    base: Path = typer.Option(...),
    adapter: Path = typer.Option(...),
    tokenized: Path = typer.Option(...),
    out: Path = typer.Option(...),
    metrics: Path = typer.Option(...),
    evaluation: Path = typer.Option(None, help="the evaluate stage's metrics.json, for the model card"),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    m = run(load_params(params), base, adapter, tokenized, out, evaluation=evaluation,
            stage=stage_of_params(STAGE, params))
    atomic_write_json(metrics, m)
    if m["merged"]:
        typer.echo(f"export: merged model -> {out} (max |merged - adapter| = {m['max_abs_diff_vs_adapter']:.2e})")
    else:
        typer.echo(f"export: {m['reason']} -> {out}")


if __name__ == "__main__":
    entry(main)
