"""Stage `format`: render each validated row into a prompt and a response with a jinja2 template.

The template (`prompts/`, blocks `prompt` and `response`) runs in the sandboxed Renderer of
pipeline/core/prompting.py, inside the base model's chat template when `format.chat_template`;
the task (pipeline/tasks/) decides what a row becomes. The prompt is recorded once here (the
`prompt` of `format.json`: template path and text, chat template switch, system prompt, and what the
task adds for serving, e.g. the label set); evaluation, the adapter's record, export, the GGUF
Modelfile and predict all rebuild the same Renderer from it, so a model is always asked the way it
was trained.

Inputs: validated `train.jsonl` / `validation.jsonl` and `data.json`, the template, the base tokenizer
folder.
Outputs: `<out>/{train,validation}.jsonl` rows `{row, prompt, response[, label, choices]}` where
`choices` are the rendered responses for every label (for scoring classification); preference
rows have `response` (the chosen answer) and `rejected`, each rendered by the response block
with the answer as `response`; chat rows the rendered conversation and every assistant turn's loss
span; and `<out>/format.json`: the prompt record, the data record (validate's `data.json`) and the
row counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline import contract
from pipeline.core.io import atomic_dir, atomic_write_json, read_jsonl, write_jsonl
from pipeline.core.loading import load_tokenizer
from pipeline.core.params import Params
from pipeline.core.prompting import RECORD_FILE, Prompt
from pipeline.core.stage import TemplateError, entry
from pipeline.tasks import get as get_task

STAGE = "format"
READS = ("task", "format.chat_template", "format.system_prompt")  # + the task's; the template comes as a path
LOADS = ("task",)


def prompt_for(p: Params, template: Path) -> Prompt:
    """The prompt record of these params and template file."""
    try:
        text = template.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else e
        raise TemplateError(f"{template}: cannot read the template: {why}") from None
    return Prompt(task=p.task, template=str(template), template_text=text,
                  chat_template=p.format.chat_template, system_prompt=p.format.system_prompt,
                  facts=get_task(p.task).facts(p))


def run(params: Params, validated: Path, template: Path, tokenizer_dir: Path | None, out: Path) -> dict:
    """Render both splits; returns the row counts."""
    p = contract.view(params, STAGE, READS)
    prompt, task = prompt_for(p, template), get_task(p.task)
    r = prompt.renderer(load_tokenizer(tokenizer_dir) if p.format.chat_template else None)
    counts = {}
    with atomic_dir(out) as tmp:
        for split in ("train", "validation"):
            src = validated / f"{split}.jsonl"
            rows = [task.render(p, r, row, f"{src} row {row.get('row', '?')}") for row in read_jsonl(src)]
            write_jsonl(tmp / f"{split}.jsonl", rows)
            counts[split] = len(rows)
        data = json.loads((validated / "data.json").read_text(encoding="utf-8"))
        atomic_write_json(tmp / RECORD_FILE, {"prompt": prompt.record(), "data": data, "rows": counts})
    return counts


def main(
    validated: Path = typer.Option(...),
    template: Path = typer.Option(...),
    tokenizer: Path = typer.Option(..., help="base model folder (for its chat template)"),
    out: Path = typer.Option(...),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    counts = run(contract.load(params), validated, template, tokenizer, out)
    typer.echo(f"format: {counts} rows rendered with {template}")


if __name__ == "__main__":
    entry(main)
