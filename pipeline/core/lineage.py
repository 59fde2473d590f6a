"""Lineage: what made an adapter or an export, recorded when it is made and checked later.

`record(stage, params)` is called by the train and export stages (which DVC runs from the project
root). It holds only what the output's content depends on, so the same inputs give a
byte-identical record and the folder keeps its hash: the dvc.lock entries of every upstream stage
(hashes of data, templates, base model and code, and the params they ran with), the md5 of this
stage's own code and inputs, the environment (sha256 of requirements.lock and the installed version
of every runtime package), the hardware class and the determinism switches. No commit, time, host, path
or process id: the commit that made an output is found from git history (the commit whose
dvc.lock first records the folder's hash), timings go to the stage's run facts (`run.json`).
The stage adds its serving facts and its deterministic metrics and writes it as `peftflow.json`
in its output folder, also into the safetensors metadata (`peftflow.lineage`).

`check(folder)` (the `peftflow lineage` command) walks that record back: adapter -> train data ->
raw data -> base model, compares every recorded hash with the workspace (files hashed again,
folders against dvc.lock and `dvc status`) and with the DVC cache, names every package whose
installed version differs from the record, and gives the commands that reproduce the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.core.io import file_digest

SAFETENSORS_KEY = "peftflow.lineage"
RECORD = "peftflow.json"  # the one record of an artifact folder (adapter, export)
LOCK_FILE = "requirements.lock"


@contextlib.contextmanager
def dvc_repo(root: Path):
    """DVC's Repo for `root`, opened from inside it (DVC resolves outputs against the working folder)."""
    from dvc.repo import Repo

    before = os.getcwd()
    os.chdir(root)
    try:
        with Repo(".") as repo:
            yield repo
    finally:
        os.chdir(before)


def md5_file(path: Path) -> str:
    """DVC's content hash of a file (to compare with dvc.lock), not a security boundary."""
    return file_digest(path, "md5")


def md5_dir(path: Path) -> str:
    """DVC's hash of a source folder (as dvc.lock records a folder dep): the md5 of its sorted file list
    with each file's md5, plus ".dir"; Python's caches are left out, as .dvcignore leaves them out."""
    import hashlib

    entries = sorted(({"md5": md5_file(f), "relpath": f.relative_to(path).as_posix()} for f in path.rglob("*")
                      if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"),
                     key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def lock_outs(lock: dict, stages: list[str] | None = None) -> dict[str, str | None]:
    """Output path -> md5 for the named stages of dvc.lock's `stages` mapping (all when None)."""
    names = lock if stages is None else stages
    return {o["path"]: o.get("md5") for s in names for o in lock.get(s, {}).get("outs", [])}


def cache_object(cache: Path, md5: str) -> Path:
    """Where the DVC cache folder `cache` keeps the object with this md5 (a file, or a folder's list)."""
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def reproduce_commands(rec: dict, commit: str | None = None) -> list[str]:
    """How to get a recorded artifact back: the commit (when known), the locked environment, then DVC's
    checkout and repro of its stage (`peftflow verify` checks that the hashes come out the same)."""
    stage = rec.get("stage", "")
    return ([f"git checkout {commit}"] if commit else []) + [
        "make setup", "dvc checkout", f"dvc repro {stage}".strip(), f"peftflow verify {stage}".strip()]


def git(root: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def resolve(path: str, params: dict) -> str:
    """A dvc.yaml path with its `${a.b}` params interpolated."""
    def value(m: re.Match) -> str:
        node = params
        for k in m.group(1).split("."):
            node = node[k]
        return str(node)

    return re.sub(r"\$\{\s*([\w.]+)\s*\}", value, path)


def upstream(lock: dict, paths: list[str]) -> dict:
    """The dvc.lock entries of every stage that produced `paths`, and of their producers, recursively."""
    producers = {o["path"]: name for name, s in lock.items() for o in s.get("outs", [])}
    found: dict = {}
    todo = list(paths)
    while todo:
        name = producers.get(todo.pop())
        if name and name not in found:
            found[name] = lock[name]
            todo += [d["path"] for d in lock[name].get("deps", [])]
    return found


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


def runtime_packages() -> dict[str, str]:
    """Installed versions of what this project runs on: peftflow's dependencies and theirs, without the
    optional extras (pytest, trl, llama-cpp-python), so a test or bench install does not change a record."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    todo = ["peftflow"]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in found:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    found.pop("peftflow", None)
    return dict(sorted(found.items()))


def environment(root: Path = Path(".")) -> dict:
    """The locked environment: requirements.lock's sha256 and the installed version of every runtime package."""
    lock = root / LOCK_FILE
    return {"lock_sha256": file_digest(lock) if lock.exists() else None, "python": sys.version.split()[0],
            "packages": runtime_packages()}


def env_mismatches(rec: dict) -> list[tuple[str, str | None, str | None]]:
    """(package, recorded version, installed version) for every package that differs from the record."""
    recorded = rec.get("env", {}).get("packages", {})
    installed = environment()["packages"]
    return [(name, recorded.get(name), installed.get(name)) for name in sorted(set(recorded) | set(installed))
            if recorded.get(name) != installed.get(name)]


def determinism() -> dict:
    """The determinism switches in force (params `deterministic`, set by modeling.seed_everything)."""
    import torch

    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def record(stage: str, params: dict, root: Path = Path(".")) -> dict:
    """The lineage of what `stage` is making now (run from the project root by DVC)."""
    lock_file, spec_file = root / "dvc.lock", root / "dvc.yaml"
    lock = yaml.safe_load(lock_file.read_text()).get("stages", {}) if lock_file.exists() else {}
    spec = yaml.safe_load(spec_file.read_text())["stages"].get(stage, {}) if spec_file.exists() else {}
    deps = [resolve(d, params) for d in spec.get("deps", [])]
    produced = lock_outs(lock)
    own = {}
    for d in deps:
        if (root / d).is_file():
            own[d] = md5_file(root / d)
        elif d in produced:
            own[d] = produced[d]  # a folder made by an upstream stage: its dvc.lock hash
        else:
            own[d] = md5_dir(root / d) if (root / d).is_dir() else None  # a source folder (the library)
    up = upstream(lock, deps)
    rec = {
        "stage": stage,
        "deps": own,
        "upstream": up,
        "params": params,
        "env": environment(root),
        "hardware": hardware(),
        "determinism": determinism(),
    }
    sources = {d["path"]: m for s in up.values() for d in s.get("deps", []) if (m := data_source(root / d["path"]))}
    if sources:
        rec["sources"] = sources  # data imported from a hub: dataset, commit, file (peftflow import-data)
    return rec


def data_source(path: Path) -> dict | None:
    """Where a data file came from, if `peftflow import-data` brought it: its `.dvc` file's meta."""
    dvc_file = path.with_name(path.name + ".dvc")
    if not dvc_file.is_file():
        return None
    meta = (yaml.safe_load(dvc_file.read_text()) or {}).get("meta") or {}
    return meta if "source" in meta else None


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

    from pipeline.core.stage import PipelineError

    if (folder / RECORD).exists():
        return json.loads((folder / RECORD).read_text())
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            meta = st.metadata() or {}
        if SAFETENSORS_KEY in meta:
            return json.loads(meta[SAFETENSORS_KEY])
    raise PipelineError(f"{folder}: no lineage record ({RECORD} or safetensors metadata); "
                        "it was not made by this pipeline's train or export stage")


def cache_has(root: Path, md5: str | None) -> bool | None:
    """Whether the DVC cache holds an object (None when there is no hash to look for)."""
    if not md5:
        return None
    return cache_object(root / ".dvc" / "cache", md5).exists()


def check(folder: Path, root: Path = Path(".")) -> dict:
    """Every recorded hash against the workspace and the DVC cache; the lines to print."""
    rec = read(folder)
    lock_file = root / "dvc.lock"
    lock = yaml.safe_load(lock_file.read_text()).get("stages", {}) if lock_file.exists() else {}
    now_outs = lock_outs(lock)
    with dvc_repo(root) as repo:
        status = repo.status()
    modified = set()
    for changes in status.values():
        for change in changes:
            if isinstance(change, dict):
                for kind in ("changed outs", "changed deps"):
                    modified |= set(change.get(kind, {}))

    def verdict(path: str, md5: str | None) -> dict:
        p = root / path
        if md5 is None:
            return {"path": path, "md5": None, "workspace": "unknown", "cache": None}
        if p.is_file():
            here = md5_file(p)
            ws = "ok" if here == md5 else f"MISMATCH (workspace md5 {here[:12]})"
        elif p.is_dir() and path not in now_outs:  # a source folder (the library), hashed as DVC does
            here = md5_dir(p)
            ws = "ok" if here == md5 else f"MISMATCH (workspace md5 {here[:12]})"
        elif p.is_dir():
            if now_outs.get(path) != md5:
                ws = f"MISMATCH (dvc.lock now has {str(now_outs.get(path))[:12]})"
            else:
                ws = "MISMATCH (modified since dvc.lock)" if path in modified else "ok"
        else:
            ws = "MISSING"
        return {"path": path, "md5": md5, "workspace": ws, "cache": cache_has(root, md5)}

    chain = []
    for name, entry in rec.get("upstream", {}).items():
        chain.append({"stage": name, "outs": [verdict(o["path"], o.get("md5")) for o in entry.get("outs", [])],
                      "deps": [verdict(d["path"], d.get("md5")) for d in entry.get("deps", [])]})
    own = [verdict(p, m) for p, m in rec.get("deps", {}).items()]
    # the commit whose dvc.lock first recorded this very folder (when it is a pipeline output here)
    try:
        rel = str(Path(os.path.relpath(Path(folder).resolve(), Path(root).resolve())))
    except ValueError:
        rel = str(folder)
    own_md5 = now_outs.get(rel) if rel not in modified else None
    found = git(root, "log", "--format=%H", f"-S{own_md5}", "--", "dvc.lock") if own_md5 else None
    found_in = found.splitlines()[-1] if found else None
    commands = reproduce_commands(rec, found_in)
    mismatches = [v for v in own + [x for c in chain for x in c["outs"] + c["deps"]] if v["workspace"] != "ok"]
    return {"record": rec, "own": own, "chain": chain, "mismatches": mismatches, "commands": commands,
            "found_in": found_in, "env": env_mismatches(rec)}
