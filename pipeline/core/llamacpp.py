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

import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

from pipeline.core.stage import PipelineError

LINEAGE_KEY = "peftflow.lineage"
TENSORS_KEY = "peftflow.tensors_sha256"
QUANT_TYPES = ("q8_0", "q6_K", "q5_K_M", "q4_K_M", "q4_0")  # llama-quantize's names this project offers
# what llama.cpp's converters import besides the libraries this module names (env/<stage>.txt pins them)
PACKAGES = ("sentencepiece", "protobuf", "llama-cpp-python")


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
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise PipelineError(f"{what}: llama.cpp's {Path(cmd[0]).name} failed (exit {proc.returncode}): {tail}")


def convert_model(model_dir: Path, out: Path, outtype: str, tokenizer_pre: str | None = None) -> None:
    """A transformers checkpoint as one GGUF file, by llama.cpp's convert_hf_to_gguf.py. The converter names
    a byte-level BPE tokenizer's pre-tokenizer by hashing its ids for a test text, which only the published
    vocabularies it lists pass; `tokenizer_pre` is the name to write when it knows none (the base's source
    GGUF's, or params): the gguf stage then checks llama.cpp's ids against training's on every row."""
    _convert("convert_hf_to_gguf.py", [str(model_dir), "--outfile", str(out), "--outtype", outtype], tokenizer_pre,
             str(model_dir))


def convert_lora(adapter_dir: Path, base_dir: Path, out: Path, outtype: str) -> None:
    """A PEFT LoRA adapter as a GGUF LoRA adapter for `base_dir`'s model, by convert_lora_to_gguf.py."""
    _convert("convert_lora_to_gguf.py", [str(adapter_dir), "--base", str(base_dir), "--outfile", str(out),
                                         "--outtype", outtype], None, str(adapter_dir))


def _convert(script: str, args: list[str], tokenizer_pre: str | None, what: str) -> None:
    """Run one of llama.cpp's converters as its command line would, in this process (a process of its own
    would import torch and transformers again, seconds each time): with the gguf-py it comes with in place of
    this venv's for the time it runs, its output kept and given back only when it fails."""
    out = io.StringIO()
    with _converter_modules(home()) as conversion, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(out), _logging_to(out):
        _answer_unknown_tokenizer(conversion.base.TextModel, tokenizer_pre)
        sys.argv = [str(home() / script), *args]
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            error = None
        except SystemExit as e:
            error = None if e.code in (None, 0) else f"exit {e.code}"
        except Exception as e:  # the converter's own refusals are exceptions too
            error = f"{type(e).__name__}: {e}"
    if error:
        tail = " | ".join([*out.getvalue().strip().splitlines()[-3:], error][-3:])
        if "pre-tokenizer was not recognized" in tail:
            tail += (" | the converter does not know this tokenizer: give llama.cpp's name of its pre-tokenizer "
                     "as params.yaml gguf.tokenizer_pre (e.g. gpt-2, llama-bpe, qwen2, smollm)")
        raise PipelineError(f"{what}: llama.cpp's {script} failed: {tail}")


@contextlib.contextmanager
def _converter_modules(folder: Path):
    """While the converters run: their folder and gguf-py first on sys.path, their modules (and not this venv's
    gguf) in sys.modules; afterwards everything as it was. Yields their `conversion` package."""
    def ours(name: str) -> bool:
        return name.split(".")[0] in ("gguf", "conversion", "convert_hf_to_gguf")

    saved = {n: m for n, m in sys.modules.items() if ours(n)}
    path, argv = list(sys.path), list(sys.argv)
    for n in saved:
        del sys.modules[n]
    sys.path[:0] = [str(folder), str(folder / "gguf-py")]
    try:
        yield importlib.import_module("conversion")
    finally:
        for n in [n for n in sys.modules if ours(n)]:
            del sys.modules[n]
        sys.modules.update(saved)
        sys.path[:] = path
        sys.argv = argv


@contextlib.contextmanager
def _logging_to(out: io.StringIO):
    """The converters' log records (warnings and errors) into `out`; their logging.basicConfig then adds nothing."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    root.handlers[:] = [logging.StreamHandler(out)]
    try:
        yield
    finally:
        root.handlers[:] = handlers


def _answer_unknown_tokenizer(text_model: type, tokenizer_pre: str | None) -> None:
    """The converter refuses a byte-level BPE vocabulary it has no hash for; answer with `tokenizer_pre`."""
    if not tokenizer_pre:
        return
    recognise = text_model.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return recognise(self, tokenizer)
        except NotImplementedError:
            return tokenizer_pre

    text_model.get_vocab_base_pre = get_vocab_base_pre


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
