"""llama.cpp's own tools, from the llama-cpp-python sdist pinned in requirements.lock.

`make setup` (the `.gguf` step) builds them once per machine from that sdist's vendored llama.cpp tree
and links them as `<venv>/llama.cpp`: `convert_hf_to_gguf.py` and `convert_lora_to_gguf.py` with the
gguf-py they come with, `bin/llama-quantize` and `bin/llama-server`. Using them keeps every GGUF this
project writes in step with the llama.cpp version that runs it (the Python binding is the same version).

Also the lineage inside a GGUF file: `stamp` writes a record into the file's metadata
(`peftflow.lineage`, JSON) with the sha256 of its tensor data (`peftflow.tensors_sha256`), so that a
file copied anywhere says what made it and whether a byte of its weights changed (`read_stamp`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.core.stage import PipelineError

LINEAGE_KEY = "peftflow.lineage"
TENSORS_KEY = "peftflow.tensors_sha256"
QUANT_TYPES = ("q8_0", "q6_K", "q5_K_M", "q4_K_M", "q4_0")  # llama-quantize's names this project offers


def home() -> Path:
    """The llama.cpp tools folder (PEFTFLOW_LLAMA_CPP, else the one `make setup` links into the venv)."""
    path = Path(os.environ.get("PEFTFLOW_LLAMA_CPP") or Path(sys.prefix) / "llama.cpp")
    if not (path / "convert_hf_to_gguf.py").is_file():
        raise PipelineError(f"{path}: llama.cpp's converters and tools are not there; `make setup` builds them "
                            "from the llama-cpp-python sdist pinned in requirements.lock (or set PEFTFLOW_LLAMA_CPP "
                            "to such a folder)")
    return path


def tool(name: str) -> Path:
    """A llama.cpp program built from the locked sdist (llama-server, llama-quantize)."""
    path = home() / "bin" / name
    if not os.access(path, os.X_OK):
        raise PipelineError(f"{path}: not built; `make setup` builds llama.cpp's tools from the locked sdist")
    return path


def _run(cmd: list[str], what: str) -> None:
    """Run one of llama.cpp's programs; a failure is one error with the end of what it said."""
    proc = subprocess.run(cmd, capture_output=True, text=True)  # (the converters put their own gguf-py first)
    if proc.returncode:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        if "pre-tokenizer was not recognized" in tail:
            tail += (" | the converter does not know this tokenizer: give llama.cpp's name of its pre-tokenizer as "
                     "params.yaml gguf.tokenizer_pre (e.g. gpt-2, llama-bpe, qwen2, smollm)")
        raise PipelineError(f"{what}: llama.cpp's {Path(cmd[3] if cmd[0] == sys.executable else cmd[0]).name} "
                            f"failed (exit {proc.returncode}): {tail}")


def _converter(script: str, args: list[str], tokenizer_pre: str | None, what: str) -> None:
    """Run one of llama.cpp's converters in a process of its own (through this module's `__main__`)."""
    _run([sys.executable, "-m", "pipeline.core.llamacpp", str(home() / script), tokenizer_pre or "", *args], what)


def convert_model(model_dir: Path, out: Path, outtype: str, tokenizer_pre: str | None = None) -> None:
    """A transformers checkpoint as one GGUF file, by llama.cpp's convert_hf_to_gguf.py. The converter names
    a byte-level BPE tokenizer's pre-tokenizer by hashing its ids for a test text, which only the published
    vocabularies it lists pass; `tokenizer_pre` is the name to write when it knows none (the base's source
    GGUF's, or params): the gguf stage then checks llama.cpp's ids against training's on every row."""
    _converter("convert_hf_to_gguf.py", [str(model_dir), "--outfile", str(out), "--outtype", outtype],
               tokenizer_pre, str(model_dir))


def convert_lora(adapter_dir: Path, base_dir: Path, out: Path, outtype: str) -> None:
    """A PEFT LoRA adapter as a GGUF LoRA adapter for `base_dir`'s model, by convert_lora_to_gguf.py."""
    _converter("convert_lora_to_gguf.py", [str(adapter_dir), "--base", str(base_dir), "--outfile", str(out),
                                           "--outtype", outtype], None, str(adapter_dir))


def quantize(src: Path, out: Path, kind: str, threads: int) -> None:
    """`src` (f32/f16/bf16 GGUF) quantized to `kind` by llama-quantize."""
    _run([str(tool("llama-quantize")), str(src), str(out), kind.upper(), str(threads)], f"{src} -> {kind}")


def tensors_sha256(path: Path) -> str:
    """sha256 over every tensor's name, type, shape and bytes, in file order (metadata left out)."""
    from gguf import GGUFReader

    h = hashlib.sha256()
    for t in GGUFReader(path).tensors:
        h.update(f"{t.name}\0{int(t.tensor_type)}\0{list(map(int, t.shape))}\0".encode())
        h.update(memoryview(t.data).cast("B"))
    return h.hexdigest()


def stamp(path: Path, record: dict, floats: dict[str, float] | None = None) -> None:
    """Write `record` and the tensor digest into the GGUF file's metadata (and any `floats` keys given, as
    float32 values); the file is replaced atomically."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(path)
    arch = str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    tmp = path.with_name(path.name + ".tmp")
    string = gguf.GGUFValueType.STRING
    new = {LINEAGE_KEY: MetadataDetails(string, json.dumps(record, sort_keys=True, default=str)),
           TENSORS_KEY: MetadataDetails(string, tensors_sha256(path))}
    new |= {k: MetadataDetails(gguf.GGUFValueType.FLOAT32, float(v)) for k, v in (floats or {}).items()}
    writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, new, [LINEAGE_KEY, TENSORS_KEY])
    del reader
    tmp.replace(path)


def read_stamp(path: Path) -> tuple[dict, str | None, str]:
    """(record, the tensor digest written in the file, the digest of its tensors now)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # not a GGUF file, or a truncated one
        raise PipelineError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    field = reader.get_field(LINEAGE_KEY)
    if field is None:
        raise PipelineError(f"{path}: no lineage record in its metadata ({LINEAGE_KEY}); it was not written by "
                            "this pipeline's gguf stage")
    written = reader.get_field(TENSORS_KEY)
    return json.loads(str(field.contents())), str(written.contents()) if written else None, tensors_sha256(path)


def _main(script: str, tokenizer_pre: str, *args: str) -> None:
    """`python -m pipeline.core.llamacpp SCRIPT PRE ARGS...`: run a converter as its own command line, its
    unrecognised-tokenizer refusal answered with PRE when PRE is given."""
    import runpy

    sys.path[:0] = [str(Path(script).parent), str(Path(script).parent / "gguf-py")]
    if tokenizer_pre:
        from conversion.base import TextModel

        recognise = TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return recognise(self, tokenizer)
            except NotImplementedError:
                return tokenizer_pre

        TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    _main(*sys.argv[1:])
