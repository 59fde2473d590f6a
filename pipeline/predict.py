"""Serving: answer rows with one or more adapters on one base model, asked the way they were trained.

Each adapter folder carries the template it was trained with (`format.json`: template text, chat
template flag, system prompt) and its task and labels (`peftflow.json`). `Predictor` renders every
row with that adapter's own template through the same `Renderer` and `encode_prompt` as training,
so training and serving see the same tokens. Several adapters share one copy of the base weights
and are switched per request (`set_adapter`); the base model's own answer is `adapter=None`
(`disable_adapter`).

Classification adapters answer with the label whose continuation scores highest (as in
evaluate); instruction adapters generate greedily until EOS or `max_new_tokens`.
Used by `peftflow predict` (see cli.py).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from pipeline.core.modeling import check_adapter, load_adapter, load_tokenizer, record_method
from pipeline.core.prompting import Renderer
from pipeline.core.stage import PipelineError
from pipeline.tasks import get as get_task


class Predictor:
    """A base model with named adapters loaded once; `predict(rows, adapter)` switches between them."""

    def __init__(self, base_dir: str | Path, adapters: dict[str, str | Path], max_new_tokens: int = 64,
                 allow_other_base: bool = False) -> None:
        if not adapters:
            raise PipelineError("predict: give at least one adapter folder")
        self.tokenizer = load_tokenizer(base_dir)
        self.max_new_tokens = max_new_tokens
        self.records: dict[str, dict] = {}
        self.renderers: dict[str, Renderer] = {}
        self.model = None
        for name, path in adapters.items():
            path = Path(path)
            method = record_method(path)
            if not method.peft and len(adapters) > 1:
                raise PipelineError(f"predict: {path} holds the base model's own weights trained (train.method: "
                                    f"{method.name}), not a PEFT adapter; it cannot share a base with other "
                                    "adapters: predict with it alone")
            if self.model is None:
                self.model = load_adapter(base_dir, path, adapter_name=name, allow_other_base=allow_other_base)
            else:
                check_adapter(Path(base_dir), path, allow_other_base)
                self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            record = json.loads((path / "peftflow.json").read_text())
            fmt = json.loads((path / "format.json").read_text())
            self.records[name] = record
            self.renderers[name] = Renderer(fmt["template_text"], f"{path}/format.json", tokenizer=self.tokenizer,
                                            chat_template=fmt["chat_template"], system_prompt=fmt["system_prompt"])
        self.model.eval()

    @property
    def adapters(self) -> list[str]:
        return list(self.records)

    def _use(self, adapter: str | None):
        if adapter is None:
            return self.model.disable_adapter()
        if adapter not in self.records:
            raise PipelineError(f"predict: no adapter named '{adapter}' (loaded: {', '.join(self.adapters)})")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    @torch.no_grad()
    def predict(self, rows: list[dict], adapter: str | None) -> list[str]:
        """Answers for `rows` from `adapter` (None: the base model, rendered with the first adapter's template)."""
        name = adapter or self.adapters[0]
        record, renderer = self.records[name], self.renderers[name]
        task = get_task(record["task"])
        prompts = [task.prompt(renderer, {**r, "labels": record["labels"]}, f"input row {i + 1}")
                   for i, r in enumerate(rows)]
        with self._use(adapter):
            return task.answer(self.model, self.tokenizer, renderer, record, rows, prompts, self.max_new_tokens)

