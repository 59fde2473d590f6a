"""Stage `export`: merge the adapter into the base model and check the merge.

The merged model (`merge_and_unload`) is saved as safetensors with the tokenizer and chat
template. Before saving, its logits on `export.check_rows` validation rows are compared with
base + adapter: they must agree within `export.atol` and must differ from the base model's, or
the stage fails. Methods that cannot be merged (prompt learning: prefix, prompt, P-tuning)
export the adapter alone, with a note saying why.

Inputs: base model folder, adapter folder, tokenized validation data.
Outputs: `<out>/` (merged model or adapter, tokenizer, `peftflow.json`) and a metrics file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import typer

from pipeline.io import atomic_dir, atomic_write_json
from pipeline.modeling import device, is_prompt_learning, left_pad, load_adapter, load_tokenizer
from pipeline.params import Export, load_params
from pipeline.stage import PipelineError, entry


class ExportError(PipelineError, RuntimeError):
    """The merged model does not reproduce base + adapter."""


@torch.no_grad()
def logits(model, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    return out.logits.float() * batch["attention_mask"].unsqueeze(-1)


def run(p: Export, base_dir: Path, adapter_dir: Path, tokenized: Path, out: Path) -> dict:
    from datasets import load_from_disk

    dev = device()
    tok = load_tokenizer(base_dir)
    model = load_adapter(base_dir, adapter_dir, dev, quantized=False)  # merge into full-precision weights
    record = json.loads((adapter_dir / "peftflow.json").read_text())
    with atomic_dir(out) as tmp:
        if is_prompt_learning(model):
            model.save_pretrained(str(tmp), safe_serialization=True)
            metrics = {"merged": False, "reason": f"{record['train']['method']} adds virtual tokens; "
                       "it cannot be merged into the weights, so the adapter is exported alone"}
        else:
            rows = [{"input_ids": r["input_ids"]} for r in load_from_disk(str(tokenized / "validation"))]
            batch = left_pad(rows[: p.check_rows], tok.pad_token_id or 0, dev)
            with_adapter = logits(model, batch)
            with model.disable_adapter():
                base = logits(model, batch)
            merged = model.merge_and_unload()
            after = logits(merged, batch)
            diff = float((after - with_adapter).abs().max())
            moved = float((with_adapter - base).abs().max())
            metrics = {"merged": True, "max_abs_diff_vs_adapter": diff, "max_abs_diff_vs_base": moved,
                       "atol": p.atol, "rows_checked": len(batch["input_ids"])}
            if diff > p.atol:
                raise ExportError(f"export: merged logits differ from base+adapter by {diff:.2e} "
                                  f"> export.atol={p.atol}")
            if moved <= p.atol:
                raise ExportError(f"export: the adapter does not change the base model's logits "
                                  f"(max diff {moved:.2e} <= export.atol={p.atol}); nothing was learned")
            merged.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        for name in ("peftflow.json", "format.json"):
            shutil.copy(adapter_dir / name, tmp / name)
    return metrics


def main(
    base: Path = typer.Option(...),
    adapter: Path = typer.Option(...),
    tokenized: Path = typer.Option(...),
    out: Path = typer.Option(...),
    metrics: Path = typer.Option(...),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    m = run(load_params(params).export, base, adapter, tokenized, out)
    atomic_write_json(metrics, m)
    if m["merged"]:
        typer.echo(f"export: merged model -> {out} (max |merged - adapter| = {m['max_abs_diff_vs_adapter']:.2e})")
    else:
        typer.echo(f"export: {m['reason']} -> {out}")


if __name__ == "__main__":
    entry(main)
