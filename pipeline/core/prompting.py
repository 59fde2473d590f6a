"""Prompts: the one sandboxed jinja2 `Renderer`, and the one prompt record (`Prompt`) every reader uses.

A template file in `prompts/` defines two blocks, `prompt` and `response`, over the row's
fields. Templates run in jinja2's immutable sandbox with `StrictUndefined`: an unknown variable
or an attempt to reach Python internals is an error naming the template and row. With
`format.chat_template: true` the rendered prompt becomes the user turn of the base model's own
chat template (plus `format.system_prompt` if set).

The format stage writes the prompt once (`Prompt.record()`, the `prompt` of `format.json`); the
train stage puts the same record into the adapter's record, export into the export's. Evaluate,
export, gguf, predict and serving rebuild it with `Prompt.from_record` and render with
`Prompt.renderer(tokenizer)`, so a model is always asked the way it was trained.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from pipeline.core.stage import PipelineError, TemplateError

RECORD_FILE = "format.json"  # the format stage's record: {"prompt": ..., "data": ..., "rows": ...}
# a template comes from whoever opened the pull request: one row's block renders within these or fails naming it
# (a row renders in well under a millisecond; the sandbox already caps one range() at 100,000 items)
RENDER_SECONDS = 2.0
RENDER_CHARS = 1_000_000


class RenderTimeout(Exception):
    """A block's rendering ran past RENDER_SECONDS (raised by the timer's signal handler)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise RenderTimeout in this code if it runs over `seconds` (a real-time timer signal: in the main thread;
    elsewhere, as in a server's worker thread, only the size bound holds)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise RenderTimeout

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


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
            with time_limit(RENDER_SECONDS):
                ctx = self.template.new_context(dict(row))
                parts, size = [], 0
                for part in self.template.blocks[block](ctx):
                    parts.append(part)
                    size += len(part)
                    if size > RENDER_CHARS:
                        raise TemplateError(f"{self.name}: {where}: the {block} block renders over {RENDER_CHARS:,} "
                                            "characters (a loop without end?)")
                return "".join(parts).strip()
        except RenderTimeout:
            raise TemplateError(f"{self.name}: {where}: the {block} block took over {RENDER_SECONDS:g} s to render "
                                "(a loop without end?)") from None
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

    def choices(self, row: dict, label_field: str, labels: list[str], where: str = "row") -> list[str]:
        """The rendered response for every label, in label order (what classification scores)."""
        return [self.response({**row, label_field: lab}, where) for lab in labels]


@dataclass(frozen=True)
class Prompt:
    """How a model is asked: the task, the template (path and text), the chat template switch and system
    prompt, and the facts the task adds for serving (classification: labels, text and label fields)."""

    task: str
    template: str
    template_text: str
    chat_template: bool
    system_prompt: str | None
    facts: dict = field(default_factory=dict)

    @property
    def template_sha256(self) -> str:
        return hashlib.sha256(self.template_text.encode("utf-8")).hexdigest()

    def renderer(self, tokenizer) -> Renderer:
        return Renderer(self.template_text, self.template, tokenizer=tokenizer, chat_template=self.chat_template,
                        system_prompt=self.system_prompt)

    def record(self) -> dict:
        return {**asdict(self), "template_sha256": self.template_sha256}

    @classmethod
    def from_record(cls, record: dict) -> Prompt:
        """The prompt of a record that carries one (format.json, an adapter's or an export's peftflow.json)."""
        if "prompt" not in record:
            raise PipelineError("the record holds no prompt: it was not made by this pipeline's format, train or "
                                "export stage (or by an older version of it)")
        rec = dict(record["prompt"])
        rec.pop("template_sha256", None)
        return cls(**rec)

    @classmethod
    def load(cls, folder: Path) -> Prompt:
        """The prompt the format stage wrote into `folder`."""
        return cls.from_record(json.loads((Path(folder) / RECORD_FILE).read_text(encoding="utf-8")))
