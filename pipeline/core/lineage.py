"""Lineage: the record an artifact carries of what made it, written by the stage that makes it.

`record(stage, params)` is what every artifact (adapter and export folder, GGUF file) carries, built only
from what its stage reads: the params it declares (its view), the packages it runs on (the names of its
pins file env/<stage>.txt with their installed versions, and the Python), the hardware class and the
determinism switches; the stage adds the hashes of its inputs (`digest`: DVC's own md5 of a file or
folder), the prompt and data records that came with them, and its deterministic metrics, and writes it
as `peftflow.json` in its output folder, also into the safetensors metadata (`peftflow.lineage`). No code
hash, commit, time, host, path of the machine or process id: an output changes only when what its stage
reads changes, so `dvc repro` reruns exactly the stages a change can alter. The code and the upstream
stages come from the lock files instead; the audit that reads them (`peftflow lineage`) is
pipeline/audit.py, outside every stage's code, so editing it reruns nothing.

Inputs: the stage's params view, env/<stage>.txt, the installed packages, the machine. Outputs: the record
(a dict), written by the stage; `read(folder)` gives it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pipeline.core.io import file_digest
from pipeline.core.layout import FLEET_DVC_YAML, env_pins, split_stage
from pipeline.core.stage import PipelineError

SAFETENSORS_KEY = "peftflow.lineage"
RECORD = "peftflow.json"  # the one record of an artifact folder (adapter, export)


def md5_file(path: Path) -> str:
    """DVC's content hash of a file (to compare with dvc.lock), not a security boundary."""
    return file_digest(path, "md5")


def md5_dir(path: Path) -> str:
    """DVC's hash of a source folder (as dvc.lock records a folder dep): the md5 of its sorted file list
    with each file's md5, plus ".dir"; Python's caches are left out, as .dvcignore leaves them out."""
    entries = sorted(({"md5": md5_file(f), "relpath": f.relative_to(path).as_posix()} for f in path.rglob("*")
                      if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"),
                     key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def reproduce_commands(rec: dict, commit: str | None = None, stage: str | None = None) -> list[str]:
    """How to get a recorded artifact back: the commit (when known), the locked environment, then DVC's
    checkout and repro of its stage (`peftflow verify` checks that the hashes come out the same; a fleet
    adapter's stage, `train@<name>`, is reproduced through fleet/dvc.yaml)."""
    stage = stage or rec.get("stage", "")
    if split_stage(stage)[1]:
        return ([f"git checkout {commit}"] if commit else []) + [
            "make setup", "dvc checkout", f"dvc repro {FLEET_DVC_YAML}:{stage}"]
    return ([f"git checkout {commit}"] if commit else []) + [
        "make setup", "dvc checkout", f"dvc repro {stage}".strip(), f"peftflow verify {stage}".strip()]


def cpu_isa() -> str:
    """The CPU's best matrix instructions (what decides bf16/fp32 matmul results here): amx_bf16,
    avx512_bf16, avx512f, avx2 or the machine name."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        return platform.machine()
    for isa in ("amx_bf16", "avx512_bf16", "avx512f", "avx2"):
        if isa in flags:
            return isa
    return platform.machine()


def hardware() -> dict:
    """The hardware class: the same class gives the same floating-point results (and hashes); two
    machines of one class may differ in everything else (host name, memory, ...)."""
    import torch

    info = {"machine": platform.machine(), "cpu_isa": cpu_isa(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda"] = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return info


def hardware_class(hw: dict) -> str:
    """The hardware class as one short string, e.g. `x86_64 avx512_bf16 2 threads`."""
    cuda = f" cuda {'+'.join(hw['cuda'])}" if hw.get("cuda") else ""
    return f"{hw.get('machine')} {hw.get('cpu_isa')} {hw.get('torch_threads')} threads{cuda}"


def environment(stage: str, root: Path = Path(".")) -> dict:
    """The packages `stage` runs on, as installed now: every name its pins file lists (env/<stage>.txt, written
    from requirements.lock by `peftflow contract --write`: what the stage's code imports and what those require),
    with its installed version (None when absent), and the Python. Only those: adding a package no stage imports
    (a test or remote tool) changes no record."""
    pins = root / env_pins(stage)
    if not pins.is_file():
        raise PipelineError(f"{pins}: no pins file for stage {stage} (`peftflow contract --write` writes it)")
    names = [line.split("==")[0] for line in pins.read_text().splitlines() if line and not line.startswith("#")]
    return {"python": sys.version.split()[0], "packages": {name: installed(name) for name in names}}


def installed(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def determinism() -> dict:
    """The determinism switches in force (params `deterministic`, set by modeling.seed_everything)."""
    import torch

    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def record(stage: str, params: dict, root: Path = Path(".")) -> dict:
    """The lineage of what `stage` is making now from `params` (the stage's view, dumped): run from the
    project root, as DVC runs stages."""
    return {"stage": stage, "params": params, "env": environment(stage, root), "hardware": hardware(),
            "determinism": determinism()}


def digest(path: Path) -> str:
    """DVC's content hash of a file or folder (as dvc.lock records it)."""
    return md5_dir(path) if Path(path).is_dir() else md5_file(path)


def write_into_safetensors(path: Path, lineage: dict) -> None:
    """Put the lineage JSON into a safetensors file's metadata, rewriting only its header (atomically).

    The header is written in one canonical form (keys sorted, padded with spaces to 8 bytes): the
    safetensors library writes metadata from a hash map, in an order that changes from process to
    process, so two identical runs would otherwise write different bytes."""
    import struct

    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        data_start = 8 + size
    meta = dict(header.get("__metadata__") or {})
    meta[SAFETENSORS_KEY] = json.dumps(lineage, sort_keys=True, default=str)
    header["__metadata__"] = meta
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(struct.pack("<Q", len(text)) + text)
        src.seek(data_start)
        while block := src.read(1 << 24):
            dst.write(block)
    tmp.replace(path)


def read(folder: Path) -> dict:
    """The record of an adapter or export folder (peftflow.json, else the safetensors metadata)."""
    from safetensors import safe_open

    if (folder / RECORD).exists():
        return json.loads((folder / RECORD).read_text())
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            meta = st.metadata() or {}
        if SAFETENSORS_KEY in meta:
            return json.loads(meta[SAFETENSORS_KEY])
    raise PipelineError(f"{folder}: no lineage record ({RECORD} or safetensors metadata); "
                        "it was not made by this pipeline's train or export stage")
