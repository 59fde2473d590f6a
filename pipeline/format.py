"""Stage `format`: render each validated row into a prompt and a response with a jinja2 template.

A template file in `prompts/` defines two blocks, `prompt` and `response`, over the row's
fields. Templates run in jinja2's immutable sandbox with `StrictUndefined`: an unknown variable
or an attempt to reach Python internals is an error naming the template and row. With
`format.chat_template: true` the rendered prompt becomes the user turn of the base model's own
chat template (plus `format.system_prompt` if set). The same `Renderer` serves training,
evaluation and prediction, so a model is always asked the way it was trained.

Inputs: validated `train.jsonl` / `validation.jsonl`, the template, the base tokenizer folder.
Outputs: `<out>/{train,validation}.jsonl` rows `{row, prompt, response[, label, choices]}` where
`choices` are the rendered responses for every label (for scoring classification); preference
rows have `response` (the chosen answer) and `rejected`, each rendered by the response block
with the answer as `response`; and
`<out>/format.json` recording the template text and sha256.
"""

from __future__ import annotations

import random
from pathlib import Path

import jinja2
import typer
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from pipeline.io import atomic_dir, atomic_write_json, read_jsonl, sha256_text, write_jsonl
from pipeline.params import Params, load_params
from pipeline.stage import PipelineError, entry


class TemplateError(PipelineError, ValueError):
    """A template could not render a row; the message names the template and row."""


class Renderer:
    """Renders rows with one template (and optionally the tokenizer's chat template)."""

    def __init__(self, template_text: str, name: str, tokenizer=None, chat_template: bool = False,
                 system_prompt: str | None = None) -> None:
        env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
        try:
            self.template = env.from_string(template_text)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{name}: line {e.lineno}: {e.message}") from None
        for block in ("prompt", "response"):
            if block not in self.template.blocks:
                raise TemplateError(f"{name}: template must define {{% block {block} %}}")
        if chat_template and (tokenizer is None or not tokenizer.chat_template):
            raise TemplateError(f"{name}: format.chat_template is true but the tokenizer has no chat template")
        self.name, self.text = name, template_text
        self.tokenizer, self.chat, self.system = tokenizer, chat_template, system_prompt

    @classmethod
    def from_file(cls, path: str | Path, **kw) -> Renderer:
        path = Path(path)
        return cls(path.read_text(encoding="utf-8"), str(path), **kw)

    def _block(self, block: str, row: dict, where: str) -> str:
        try:
            ctx = self.template.new_context(dict(row))
            return "".join(self.template.blocks[block](ctx)).strip()
        except jinja2.UndefinedError as e:
            raise TemplateError(f"{self.name}: {where}: {e.message}") from None
        except SecurityError as e:
            raise TemplateError(f"{self.name}: {where}: blocked by the sandbox: {e}") from None

    def prompt(self, row: dict, where: str = "row", shots: list[dict] = ()) -> str:
        """The prompt for `row`; with `shots`, solved examples (rows with their answers) come first,
        as earlier chat turns or, without a chat template, as prompt + response paragraphs."""
        text = self._block("prompt", row, where)
        examples = [(self._block("prompt", s, f"{where} shot {k}"), self._block("response", s, f"{where} shot {k}"))
                    for k, s in enumerate(shots)]
        if not self.chat:
            return "".join(f"{q}\n{a}\n\n" for q, a in examples) + text
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for q, a in examples:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": text})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def response(self, row: dict, where: str = "row") -> str:
        return self._block("response", row, where)


def label_choices(r: Renderer, row: dict, label_field: str, labels: list[str], where: str = "row") -> list[str]:
    """The rendered response for every label, in label order (what classification scores)."""
    return [r.response({**row, label_field: lab}, where) for lab in labels]


def pick_shots(rows: list[dict], label_field: str, labels: list[str], k: int, seed: int) -> list[dict]:
    """`k` solved examples for few-shot prompts: drawn with `seed`, taking the labels in turn so every
    label is shown (then shuffled, so the last example's label is no hint)."""
    rng = random.Random(seed)
    pools = {lab: [r for r in rows if r.get(label_field) == lab] for lab in labels}
    for pool in pools.values():
        rng.shuffle(pool)
    picked: list[dict] = []
    while len(picked) < k and any(pools.values()):
        for lab in labels:
            if pools[lab] and len(picked) < k:
                picked.append(pools[lab].pop())
    rng.shuffle(picked)
    return [{**r, "labels": list(labels)} for r in picked]


def renderer_for(p: Params, template: Path, tokenizer_dir: Path | None) -> Renderer:
    tok = None
    if p.format.chat_template:
        from pipeline.modeling import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
    return Renderer.from_file(template, tokenizer=tok, chat_template=p.format.chat_template,
                              system_prompt=p.format.system_prompt)


def format_rows(p: Params, r: Renderer, rows: list[dict], src: Path, shots: list[dict] = ()) -> list[dict]:
    """Rendered rows; with `shots`, every prompt starts with those solved examples (see Renderer.prompt)."""
    out = []
    for row in rows:
        row = {**row, "labels": list(p.labels)}
        where = f"{src} row {row.get('row', '?')}"
        if p.task == "preference":  # the response block renders each answer as `response`
            out.append({"row": row.get("row"), "prompt": r.prompt(row, where),
                        "response": r.response({**row, "response": row["chosen"]}, f"{where} chosen"),
                        "rejected": r.response({**row, "response": row["rejected"]}, f"{where} rejected")})
            continue
        item = {"row": row.get("row"), "prompt": r.prompt(row, where, shots), "response": r.response(row, where)}
        if p.task == "classification":
            label = row[p.validate.label_field]
            item["label"] = label
            item["choices"] = label_choices(r, row, p.validate.label_field, list(p.labels), where)
            if len(set(item["choices"])) != len(item["choices"]):
                raise TemplateError(f"{r.name}: two labels render to the same response: {item['choices']}")
        out.append(item)
    return out


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
