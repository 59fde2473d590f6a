"""Serving: answer rows with one or more adapters on one base model, asked the way they were trained.

Each adapter folder's record (`peftflow.json`) carries the prompt it was trained with (the task,
template text, chat template flag, system prompt and, for classification, the labels). `Predictor`
renders every row with that adapter's own prompt through the same `Renderer` and `encode_prompt` as
training, so training and serving see the same tokens. Several adapters share one copy of the base weights
and are switched per request (`set_adapter`); the base model's own answer is `adapter=None`
(`disable_adapter`).

Classification adapters answer with the label whose continuation scores highest (as in
evaluate); instruction adapters generate greedily until EOS or `max_new_tokens`.
Used by `peftflow predict` (see cli.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from pipeline import tasks
from pipeline.core.loading import adapter_misfit, load_tokenizer
from pipeline.core.prompting import Prompt, Renderer
from pipeline.core.scoring import Scorer
from pipeline.core.stage import PipelineError
from pipeline.methods.adapters import check_adapter, load_adapter, record_of, trained_method


class Predictor:
    """A base model with named adapters loaded once; `predict(rows, adapter)` switches between them."""

    def __init__(self, base_dir: str | Path, adapters: dict[str, str | Path], max_new_tokens: int,
                 batch_size: int, allow_other_base: bool = False) -> None:
        if not adapters:
            raise PipelineError("predict: give at least one adapter folder")
        self.tokenizer = load_tokenizer(base_dir)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.prompts: dict[str, Prompt] = {}
        self.renderers: dict[str, Renderer] = {}
        self.prompt_learning: dict[str, bool] = {}
        self.model = None
        for name, path in adapters.items():
            path = Path(path)
            method = trained_method(path)
            if not method.peft and len(adapters) > 1:
                raise PipelineError(f"predict: {path} holds the base model's own weights trained (train.method: "
                                    f"{method.name}), not a PEFT adapter; it cannot share a base with other "
                                    "adapters: predict with it alone")
            try:
                if self.model is None:
                    self.model = load_adapter(base_dir, path, adapter_name=name, allow_other_base=allow_other_base)
                else:
                    check_adapter(Path(base_dir), path, allow_other_base)
                    self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            except PipelineError:
                raise
            except Exception as e:  # PyTorch lists every tensor that does not fit: one short line instead
                raise PipelineError(adapter_misfit(path, e)) from None
            self.prompts[name] = Prompt.from_record(record_of(path))
            self.renderers[name] = self.prompts[name].renderer(self.tokenizer)
            self.prompt_learning[name] = method.prompt_learning
        self.model.eval()

    @property
    def adapters(self) -> list[str]:
        return list(self.prompts)

    def _use(self, adapter: str | None):
        if adapter is None:
            return self.model.disable_adapter()
        if adapter not in self.prompts:
            raise PipelineError(f"predict: no adapter named '{adapter}' (loaded: {', '.join(self.adapters)})")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    @torch.no_grad()
    def predict(self, rows: list[dict], adapter: str | None) -> list[str]:
        """Answers for `rows` from `adapter` (None: the base model, rendered with the first adapter's template)."""
        name = adapter or self.adapters[0]
        prompt, renderer = self.prompts[name], self.renderers[name]
        task = tasks.get(prompt.task)
        prompts = [task.prompt(prompt, renderer, r, f"input row {i + 1}") for i, r in enumerate(rows)]
        scorer = Scorer(self.model, self.tokenizer, self.batch_size, adapter is not None and self.prompt_learning[name])
        with self._use(adapter):
            return task.answer(scorer, prompt, renderer, rows, prompts, self.max_new_tokens)
