"""Prompt rendering: the one sandboxed jinja2 `Renderer` used by format, evaluate, predict and gguf.

A template file in `prompts/` defines two blocks, `prompt` and `response`, over the row's
fields. Templates run in jinja2's immutable sandbox with `StrictUndefined`: an unknown variable
or an attempt to reach Python internals is an error naming the template and row. With
`format.chat_template: true` the rendered prompt becomes the user turn of the base model's own
chat template (plus `format.system_prompt` if set). The same `Renderer` serves training,
evaluation and prediction, so a model is always asked the way it was trained.
"""

from __future__ import annotations

import random
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from pipeline.core.params import Params
from pipeline.core.stage import PipelineError


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

    def block(self, block: str, row: dict, where: str) -> str:
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
        text = self.block("prompt", row, where)
        examples = [(self.block("prompt", s, f"{where} shot {k}"), self.block("response", s, f"{where} shot {k}"))
                    for k, s in enumerate(shots)]
        if not self.chat:
            return "".join(f"{q}\n{a}\n\n" for q, a in examples) + text
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for q, a in examples:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": text})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def response(self, row: dict, where: str = "row") -> str:
        return self.block("response", row, where)


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
        from pipeline.core.modeling import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
    return Renderer.from_file(template, tokenizer=tok, chat_template=p.format.chat_template,
                              system_prompt=p.format.system_prompt)
