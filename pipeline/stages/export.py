"""Stage `export`: merge the adapter into the base model and check the merge.

The merged model (`merge_and_unload`) is saved as safetensors with the tokenizer and chat
template. Before saving, its logits on `export.check_rows` validation rows are compared with
base + adapter: they must agree within `export.atol` and must differ from the base model's, or
the stage fails. Methods that cannot be merged (prompt learning: prefix, prompt, P-tuning)
export the adapter alone, with a note saying why.

Every export carries one record (`peftflow.json`, also in the safetensors metadata): the serving
facts of its adapter (task, labels, fields, method), this stage's lineage, the adapter's whole
record and the metrics (see pipeline/lineage.py); and a model card (`README.md`, rendered with
jinja2 from that record, the evaluation metrics and the data license). Nothing in the folder
depends on when or where it was made: the same inputs give the same bytes.

Inputs: base model folder, adapter folder, tokenized validation data, evaluation metrics.
Outputs: `<out>/` (merged model or adapter, tokenizer, `peftflow.json`, `format.json`,
`README.md`) and a metrics file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import typer

from pipeline.core import lineage
from pipeline.core.io import atomic_dir, atomic_write_json, atomic_write_text
from pipeline.core.modeling import device, is_prompt_learning, left_pad, load_adapter, load_tokenizer, record_method
from pipeline.core.params import Params, load_params, params_dict
from pipeline.core.stage import PipelineError, entry

# the adapter record's keys that serving (predict, gguf) reads from an export folder
SERVING = ("seed", "task", "labels", "text_field", "label_field", "train", "fingerprint", "base", "template")


class ExportError(PipelineError, RuntimeError):
    """The merged model does not reproduce base + adapter."""


@torch.no_grad()
def logits(model, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    return out.logits.float() * batch["attention_mask"].unsqueeze(-1)


def data_license(path: str) -> str:
    """The first line of a LICENSE / DATA_LICENSE file beside a data file, if there is one."""
    folder = Path(path).parent
    for f in sorted(folder.glob("*LICENSE*")):
        lines = [x.strip() for x in f.read_text(errors="replace").splitlines() if x.strip()]
        if lines:
            return f"{lines[0]} (from `{f}`)"
    return f"not recorded (no LICENSE file beside {path})"


def model_card(params: Params, lin: dict, export_metrics: dict, evaluation: dict | None) -> str:
    """The export folder's README.md, rendered from its lineage record (sandboxed jinja2)."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    adapter = lin["adapter"]
    validate = adapter.get("upstream", {}).get("validate", {})
    md5 = {d["path"]: d.get("md5") for d in validate.get("deps", [])}
    rows = adapter.get("data_rows", {})
    data = {split: {"path": path, "md5": md5.get(path, "?"), "rows": rows.get(split, "?")}
            for split, path in (("train", params.data.train), ("validation", params.data.validation))}
    keys = [k for k in ("accuracy", "macro_f1", "eval_loss", "perplexity", "preference_accuracy")
            if evaluation and k in evaluation["adapter"] and k in evaluation["base"]]
    method = params.train.method
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    template = env.from_string((Path(__file__).parent / "model_card.md.jinja").read_text())
    return template.render(
        title=f"{Path(str(adapter['base']['source'])).name} + {method} ({params.task})", lin=lin, method=method,
        merged=export_metrics["merged"], export=export_metrics, task=params.task, labels=params.labels, data=data,
        license=data_license(params.data.train), evaluation=evaluation, metric_keys=keys,
        train_metrics=adapter["metrics"], params=params_dict(params),
        method_args=json.dumps(params.train.peft_kwargs, sort_keys=True),
        commands=lineage.reproduce_commands({**adapter, "stage": "export"}))


def run(params: Params, base_dir: Path, adapter_dir: Path, tokenized: Path, out: Path,
        evaluation: Path | None = None) -> dict:
    """Merge (or export alone) and check; writes the folder with its record and model card. Returns the
    export metrics."""
    from datasets import load_from_disk

    p = params.export
    dev = device()
    tok = load_tokenizer(base_dir)
    model = load_adapter(base_dir, adapter_dir, dev, quantized=False)  # merge into full-precision weights
    record = json.loads((adapter_dir / "peftflow.json").read_text())
    with atomic_dir(out) as tmp:
        if is_prompt_learning(model):
            record_method(adapter_dir).save(model, tmp)
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
        shutil.copy(adapter_dir / "format.json", tmp / "format.json")
        ev = json.loads(evaluation.read_text()) if evaluation and evaluation.exists() else None
        serving = {k: v for k, v in record.items() if k in SERVING}
        lin = {**serving, **lineage.record("export", params_dict(params)), "adapter": record,
               "metrics": {"export": metrics, "evaluate": ev}}
        atomic_write_json(tmp / lineage.RECORD, lin)
        for f in tmp.glob("*.safetensors"):
            lineage.write_into_safetensors(f, lin)
        atomic_write_text(tmp / "README.md", model_card(params, lin, metrics, ev))
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
    p = load_params(params)
    m = run(p, base, adapter, tokenized, out, evaluation=evaluation)
    atomic_write_json(metrics, m)
    if m["merged"]:
        typer.echo(f"export: merged model -> {out} (max |merged - adapter| = {m['max_abs_diff_vs_adapter']:.2e})")
    else:
        typer.echo(f"export: {m['reason']} -> {out}")


if __name__ == "__main__":
    entry(main)
