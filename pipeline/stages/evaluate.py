"""Stage `evaluate`: score the adapter and the base model the same way on validation data.

The task (pipeline/tasks/) decides how: classification scores every label's response as a
continuation of the prompt (accuracy, macro-F1, per class, confusion matrix; `evaluate.shots: k`
also scores the base model k-shot), reads every model by each standard rule (length-normalised,
first token, calibrated, generation) and names the best prompting baseline; instruction reports
eval loss and perplexity on the response tokens and greedy samples side by side; preference
reports how often base, SFT adapter and DPO adapter prefer the chosen answer, and DPO's reward
accuracy and margin. The base model is the adapter disabled: no second copy of the weights.

Inputs: base model folder, adapter folder, formatted and tokenized validation data (and the prompt
record `format.json`), validated training rows (few-shot examples).
Outputs: `<out>/metrics.json`, `<out>/samples.jsonl`, and what the task adds (classification:
`<out>/predictions.json`, a DVC confusion plot, and `<out>/confusion.png`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from pipeline import contract, tasks
from pipeline.core.io import atomic_dir, atomic_write_json, read_jsonl
from pipeline.core.loading import load_tokenizer
from pipeline.core.modeling import device
from pipeline.core.params import Params
from pipeline.core.prompting import Prompt
from pipeline.core.scoring import Scorer
from pipeline.core.stage import entry
from pipeline.methods.adapters import load_adapter, record_of, trained_method

STAGE = "evaluate"
READS = ("seed", "task", "evaluate.batch_size")  # + the task's
LOADS = ("task", "method")


def run(params: Params, base_dir: Path, adapter_dir: Path, formatted: Path, tokenized: Path, out: Path,
        validated: Path | None = None) -> dict:
    """The task's metrics of base and adapter, written with its plots and samples into `out` (atomically)."""
    p = contract.view(params, STAGE, READS)
    torch.manual_seed(p.seed)
    tok, prompt = load_tokenizer(base_dir), Prompt.load(formatted)
    model = load_adapter(base_dir, adapter_dir, device())
    scorer = Scorer(model, tok, p.evaluate.batch_size, trained_method(adapter_dir).prompt_learning)
    rows = read_jsonl(formatted / "validation.jsonl")
    with atomic_dir(out) as tmp:
        x = tasks.EvalInputs(scorer, prompt, prompt.renderer(tok), rows, tokenized, validated, Path(adapter_dir),
                             record_of(adapter_dir), tmp)
        results = tasks.get(p.task).evaluate(p, x)
        atomic_write_json(tmp / "metrics.json", results)
    return results


def main(
    base: Path = typer.Option(...),
    adapter: Path = typer.Option(...),
    formatted: Path = typer.Option(...),
    tokenized: Path = typer.Option(...),
    out: Path = typer.Option(...),
    validated: Path = typer.Option(None, help="validated data folder (few-shot examples, evaluate.shots)"),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    r = run(contract.load(params), base, adapter, formatted, tokenized, out, validated)
    keys = [k for k in ("accuracy", "macro_f1", "eval_loss", "perplexity", "preference_accuracy") if k in r["adapter"]]
    for k in ("reward_accuracy", "reward_margin"):
        if k in r["adapter"]:
            typer.echo(f"evaluate: {k}: sft {r.get('sft', {}).get(k)} -> dpo adapter {r['adapter'][k]}")
    for k in keys:
        typer.echo(f"evaluate: {k}: base {r['base'][k]} -> adapter {r['adapter'][k]}")
        for name in (n for n in r if n.startswith("base_") and k in r[n]):
            typer.echo(f"evaluate: {k}: {name} {r[name][k]}")
    if "prompting_baseline" in r:
        b = r["prompting_baseline"]
        typer.echo(f"evaluate: best prompting baseline: {b['name']} accuracy {b['accuracy']}"
                   f"{' (one class)' if b['one_class'] else ''}; "
                   f"majority class {r.get('majority', {}).get('accuracy')}")
    typer.echo(f"evaluate: metrics in {out / 'metrics.json'}")


if __name__ == "__main__":
    entry(main)
