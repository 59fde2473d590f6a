"""Stage `format`: render each validated row into a prompt and a response with a jinja2 template.

The template (`prompts/`, blocks `prompt` and `response`) runs in the sandboxed Renderer of
pipeline/core/prompting.py, inside the base model's chat template when `format.chat_template`;
the task (pipeline/tasks/) decides what a row becomes. The same Renderer serves evaluation,
prediction and the GGUF Modelfile, so a model is always asked the way it was trained.

Inputs: validated `train.jsonl` / `validation.jsonl`, the template, the base tokenizer folder.
Outputs: `<out>/{train,validation}.jsonl` rows `{row, prompt, response[, label, choices]}` where
`choices` are the rendered responses for every label (for scoring classification); preference
rows have `response` (the chosen answer) and `rejected`, each rendered by the response block
with the answer as `response`; and
`<out>/format.json` recording the template text and sha256.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.core.io import atomic_dir, atomic_write_json, read_jsonl, sha256_text, write_jsonl
from pipeline.core.params import Params, load_params
from pipeline.core.prompting import Renderer, renderer_for
from pipeline.core.stage import entry
from pipeline.tasks import get as get_task


def format_rows(p: Params, r: Renderer, rows: list[dict], src: Path) -> list[dict]:
    """Every row rendered by the task (prompt, response, and what the task adds: label choices, rejected)."""
    t = get_task(p.task)
    return [t.render(p, r, {**row, "labels": list(p.labels)}, f"{src} row {row.get('row', '?')}") for row in rows]


def run(p: Params, validated: Path, template: Path, tokenizer_dir: Path | None, out: Path) -> dict:
    r = renderer_for(p, template, tokenizer_dir)
    counts = {}
    with atomic_dir(out) as tmp:
        for split in ("train", "validation"):
            src = validated / f"{split}.jsonl"
            rows = format_rows(p, r, read_jsonl(src), src)
            write_jsonl(tmp / f"{split}.jsonl", rows)
            counts[split] = len(rows)
        atomic_write_json(tmp / "format.json", {
            "template": str(template), "template_sha256": sha256_text(r.text), "template_text": r.text,
            "chat_template": p.format.chat_template, "system_prompt": p.format.system_prompt,
            "task": p.task, "labels": list(p.labels), "rows": counts,
        })
    return counts


def main(
    validated: Path = typer.Option(...),
    template: Path = typer.Option(...),
    tokenizer: Path = typer.Option(..., help="base model folder (for its chat template)"),
    out: Path = typer.Option(...),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    counts = run(load_params(params), validated, template, tokenizer, out)
    typer.echo(f"format: {counts} rows rendered with {template}")


if __name__ == "__main__":
    entry(main)
