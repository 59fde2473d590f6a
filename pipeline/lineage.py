"""Lineage: what made an adapter or an export, recorded when it is made and checked later.

`record(stage, params)` is called by the train and export stages (which DVC runs from the project
root): git commit and dirty flag, the dvc.lock entries of every upstream stage (hashes of data,
templates, base model and code, and the params they ran with), the md5 of this stage's own code
and inputs, base model id + revision + weights sha256, template and tokenizer sha256, seed,
library versions and hardware. The stage adds its timings and metrics, writes it as
`lineage.json` in its output folder and into the safetensors metadata (`peftflow.lineage`).

`check(folder)` (the `peftflow lineage` command) walks that record back: adapter -> train data ->
raw data -> base model, compares every recorded hash with the workspace (files hashed again,
folders against dvc.lock and `dvc status`) and with the DVC cache, and gives the commands that
reproduce the folder.
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

from pipeline.io import file_digest

SAFETENSORS_KEY = "peftflow.lineage"
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "dvc", "jinja2", "pandera")


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


def lock_outs(lock: dict) -> dict[str, str | None]:
    """Every output path in dvc.lock's stages -> its md5."""
    return {o["path"]: o.get("md5") for s in lock.values() for o in s.get("outs", [])}


def reproduce_commands(rec: dict, commit: str | None = None) -> list[str]:
    """How to get a recorded artifact back: the commit, then DVC's checkout and repro of its stage."""
    commit = commit or rec.get("git", {}).get("commit")
    stage = rec.get("stage", "")
    return ([f"git checkout {commit}"] if commit else []) + ["dvc checkout", f"dvc repro {stage}".strip()]


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


def hardware() -> dict:
    import torch

    info = {"machine": platform.machine(), "processor": platform.processor() or None, "cpus": os.cpu_count(),
            "system": platform.system()}
    if torch.cuda.is_available():
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = None
    return out


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
        else:
            own[d] = produced.get(d)  # a folder made by an upstream stage: its dvc.lock hash
    commit = git(root, "rev-parse", "HEAD")
    dirty = git(root, "status", "--porcelain", "--untracked-files=no")
    return {
        "stage": stage,
        "git": {"commit": commit, "dirty": bool(dirty) if dirty is not None else None,
                "dirty_files": dirty.splitlines() if dirty else []},
        "deps": own,
        "upstream": upstream(lock, deps),
        "params": params,
        "versions": versions(),
        "hardware": hardware(),
    }


def write_into_safetensors(path: Path, lineage: dict) -> None:
    """Rewrite a safetensors file with the lineage JSON in its metadata (atomically)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    meta[SAFETENSORS_KEY] = json.dumps(lineage, sort_keys=True, default=str)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def read(folder: Path) -> dict:
    """The lineage record of an adapter or export folder (lineage.json, else the safetensors metadata)."""
    from safetensors import safe_open

    from pipeline.stage import PipelineError

    if (folder / "lineage.json").exists():
        return json.loads((folder / "lineage.json").read_text())
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            meta = st.metadata() or {}
        if SAFETENSORS_KEY in meta:
            return json.loads(meta[SAFETENSORS_KEY])
    raise PipelineError(f"{folder}: no lineage record (lineage.json or safetensors metadata); "
                        "it was not made by this pipeline's train or export stage")


def cache_has(root: Path, md5: str | None) -> bool | None:
    """Whether the DVC cache holds an object (None when there is no hash to look for)."""
    if not md5:
        return None
    return (root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).exists()


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
    commit = found_in or rec.get("adapter", rec).get("git", {}).get("commit")
    commands = reproduce_commands(rec, commit)
    mismatches = [v for v in own + [x for c in chain for x in c["outs"] + c["deps"]] if v["workspace"] != "ok"]
    return {"record": rec, "own": own, "chain": chain, "mismatches": mismatches, "commands": commands,
            "found_in": found_in}
