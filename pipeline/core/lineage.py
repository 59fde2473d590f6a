"""Lineage: what made an adapter or an export, recorded when it is made and checked later.

`record(stage, params)` is what every artifact folder (adapter, export) carries, built only from what
its stage reads: the params it declares (its view), the environment (sha256 of requirements.lock and
the installed version of every runtime package), the hardware class and the determinism switches;
the stage adds the hashes of its inputs (`digest`: DVC's own md5 of a file or folder), the prompt and
data records that came with them, and its deterministic metrics, and writes it as `peftflow.json` in
its output folder, also into the safetensors metadata (`peftflow.lineage`). No code hash, commit,
time, host, path of the machine or process id: an output changes only when what its stage reads
changes, so `dvc repro` reruns exactly the stages a change can alter. The code and the upstream
stages come from `dvc.lock` instead: the commit whose `dvc.lock` first records the folder's hash
made it, and that `dvc.lock` holds every upstream stage's code, params and data hashes.

`check(folder)` (the `peftflow lineage` command) walks that back: the folder's hash -> the commit ->
its `dvc.lock` -> adapter -> train data -> raw data -> base model, every hash compared with the
workspace (files hashed again, folders against dvc.lock and `dvc status`) and with the DVC cache,
every package whose installed version differs from the record named, the data brought by
`peftflow import-data` named with its hub source, and the commands that reproduce the folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.core.io import file_digest
from pipeline.core.layout import FLEET_DVC_YAML, PIPELINE_LOCKS, lock_name, split_stage
from pipeline.core.stage import PipelineError

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


def lock_stages(root: Path, commit: str | None = None) -> dict:
    """The `stages` of every pipeline lock file (PIPELINE_LOCKS), at a commit or in the workspace, as one."""
    stages: dict = {}
    for name in PIPELINE_LOCKS:
        text = git(root, "show", f"{commit}:{name}") if commit else None
        if text is None and commit is None and (root / name).exists():
            text = (root / name).read_text()
        stages.update((yaml.safe_load(text or "{}") or {}).get("stages", {}))
    return stages


def lock_history(root: Path) -> list[tuple[str, dict]]:
    """(commit, the `stages` of its lock files as one) for every commit that changed a pipeline lock file, newest
    first, read by one `git cat-file --batch` (not two `git show` per commit)."""
    commits = (git(root, "log", "--format=%H", "--", *PIPELINE_LOCKS) or "").splitlines()
    asked = "".join(f"{c}:{name}\n" for c in commits for name in PIPELINE_LOCKS).encode()
    try:
        out = subprocess.run(["git", "cat-file", "--batch"], cwd=root, input=asked, capture_output=True,
                             timeout=300, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    history, at = [], 0
    for commit in commits:
        stages: dict = {}
        for _ in PIPELINE_LOCKS:  # each answer: "<sha> blob <size>\n<bytes>\n", or "<name> missing\n"
            end = out.index(b"\n", at)
            head, at = out[at:end].split(), end + 1
            if head[-1] != b"missing":
                size = int(head[2])
                stages.update((yaml.safe_load(out[at:at + size]) or {}).get("stages", {}))
                at += size + 1
        history.append((commit, stages))
    return history


def producer(lock: dict, md5: str | None, default: str | None) -> str | None:
    """The lock's stage that wrote an output of this md5 (the adapter's own `train@<name>` in a fleet)."""
    return next((n for n, s in lock.items() if md5 and any(o.get("md5") == md5 for o in s.get("outs", []))), default)


def git(root: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


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
    """Installed versions of what this project runs on (see `_runtime_packages`)."""
    return dict(_runtime_packages())


@functools.cache
def _runtime_packages() -> tuple[tuple[str, str], ...]:
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
    return tuple(sorted(found.items()))


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
    """The lineage of what `stage` is making now from `params` (the stage's view, dumped): run from the
    project root, as DVC runs stages."""
    return {"stage": stage, "params": params, "env": environment(root), "hardware": hardware(),
            "determinism": determinism()}


def digest(path: Path) -> str:
    """DVC's content hash of a file or folder (as dvc.lock records it)."""
    return md5_dir(path) if Path(path).is_dir() else md5_file(path)


def data_source(path: Path) -> dict | None:
    """Where a data file came from, if `peftflow import-data` brought it: its `.dvc` file's meta."""
    dvc_file = path.with_name(path.name + ".dvc")
    if not dvc_file.is_file():
        return None
    meta = (yaml.safe_load(dvc_file.read_text()) or {}).get("meta") or {}
    return meta if "source" in meta else None


def data_sources(root: Path, paths: list[str]) -> dict[str, dict]:
    """Path -> hub source, for the paths that `peftflow import-data` brought (their `.dvc` file's meta)."""
    return {p: m for p in paths if (m := data_source(root / p))}


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


def cache_has(root: Path, md5: str | None) -> bool | None:
    """Whether the DVC cache holds an object (None when there is no hash to look for)."""
    if not md5:
        return None
    return cache_object(root / ".dvc" / "cache", md5).exists()


def modified_paths(root: Path, ran: dict) -> set[str]:
    """The paths `dvc status` reports changed in the workspace (outputs and deps), by the stages the workspace's
    lock files record (`ran`: lock_stages; a stage that never ran, as the default job's beside a fleet, calls
    every dep of it changed)."""
    with dvc_repo(root) as repo:
        status = repo.status()
    modified = set()
    for stage, changes in status.items():
        if lock_name(stage) not in ran:
            continue
        for change in changes:
            if isinstance(change, dict):
                for kind in ("changed outs", "changed deps"):
                    modified |= set(change.get(kind, {}))
    return modified


def made_in(root: Path, md5: str) -> tuple[str | None, dict]:
    """The commit whose dvc.lock first records `md5`, and the `stages` of that dvc.lock (of the workspace's
    dvc.lock when no commit records it)."""
    found = git(root, "log", "--format=%H", f"-S{md5}", "--", *PIPELINE_LOCKS)
    commit = found.splitlines()[-1] if found else None
    return commit, lock_stages(root, commit)


def check(folder: Path, root: Path = Path(".")) -> dict:
    """Every hash of the folder's lineage against the workspace and the DVC cache; the lines to print."""
    rec, md5 = read(folder), digest(folder)
    return _check(rec, *made_in(root, md5), root, md5)


def commit_of_file(root: Path, stage: str, md5: str) -> tuple[str | None, dict]:
    """The first commit whose dvc.lock has `stage` write a folder holding a file of this md5 (looked up in
    the folder manifests of the DVC cache), and its dvc.lock `stages`."""
    found = None
    for commit, stages in lock_history(root):
        for out in (o for name, s in stages.items() if split_stage(name)[0] == stage for o in s.get("outs", [])):
            if not str(out.get("md5")).endswith(".dir"):
                continue
            manifest = cache_object(root / ".dvc" / "cache", str(out.get("md5")))
            if manifest.is_file() and any(e.get("md5") == md5 for e in json.loads(manifest.read_text())):
                found = (commit, stages)
    return found or (None, {})


def check_gguf(path: Path, stamp: tuple[dict, str | None, str], root: Path = Path(".")) -> dict:
    """A GGUF file's lineage, wherever the file lies, from its `stamp` (`llamacpp.read_stamp`: the record in its
    metadata, the tensor digest written there and the one of its bytes now): the commit whose gguf stage wrote it
    (else the one that first recorded the export it was made from), every recorded hash against the workspace,
    and its tensor bytes against the written digest."""
    rec, stamped, now = stamp
    commit, lock = commit_of_file(root, rec.get("stage", "gguf"), md5_file(path))
    export_md5 = next((m for p, m in rec.get("inputs", {}).items() if Path(p).name == "export"), None)
    if commit is None:
        commit, lock = made_in(root, export_md5) if export_md5 else (None, {})
    # its stage: the one that read this export (the default job's gguf, or an adapter's gguf@<name>)
    name = next((n for n, s in lock.items() if split_stage(n)[0] == rec.get("stage", "gguf")
                 and any(d.get("md5") == export_md5 for d in s.get("deps", []))), None)
    r = _check(rec, commit, lock, root, stage=name)
    if stamped != now:
        r["mismatches"].append(v := {"path": str(path), "md5": stamped, "cache": None,
                                     "workspace": f"MISMATCH (tensor bytes changed: sha256 now {now[:12]})"})
        r["own"].insert(0, v)
    return r


def _check(rec: dict, commit: str | None, lock: dict, root: Path, md5: str | None = None,
           stage: str | None = None) -> dict:
    """`md5`: the folder's own hash (its stage is the one that wrote it); or `stage` named."""
    now = lock_stages(root)
    now_outs, modified = lock_outs(now), modified_paths(root, now)

    def verdict(path: str, md5: str | None) -> dict:
        p = root / path
        if md5 is None:
            return {"path": path, "md5": None, "workspace": "unknown", "cache": None}
        if p.is_file() or (p.is_dir() and path not in now_outs):  # a file, or a folder no stage makes here
            here = digest(p)
            ws = "ok" if here == md5 else f"MISMATCH (workspace md5 {here[:12]})"
        elif p.is_dir():
            if now_outs.get(path) != md5:
                ws = f"MISMATCH (dvc.lock now has {str(now_outs.get(path))[:12]})"
            else:
                ws = "MISMATCH (modified since dvc.lock)" if path in modified else "ok"
        else:
            ws = "MISSING"
        return {"path": path, "md5": md5, "workspace": ws, "cache": cache_has(root, md5)}

    name = stage or producer(lock, md5, rec.get("stage"))
    stage = lock.get(name, {})
    own = [verdict(path, md5) for path, md5 in rec.get("inputs", {}).items()]
    own += [verdict(d["path"], d.get("md5")) for d in stage.get("deps", []) if d["path"] not in rec.get("inputs", {})]
    chain = [{"stage": name, "outs": [verdict(o["path"], o.get("md5")) for o in entry.get("outs", [])],
              "deps": [verdict(d["path"], d.get("md5")) for d in entry.get("deps", [])]}
             for name, entry in upstream(lock, [d["path"] for d in stage.get("deps", [])]).items()]
    sources = data_sources(root, [v["path"] for v in own + [x for c in chain for x in c["deps"]]])
    mismatches = [v for v in own + [x for c in chain for x in c["outs"] + c["deps"]] if v["workspace"] != "ok"]
    return {"record": rec, "own": own, "chain": chain, "mismatches": mismatches, "sources": sources,
            "commands": reproduce_commands(rec, commit, name), "found_in": commit, "env": env_mismatches(rec),
            "stage": name}
