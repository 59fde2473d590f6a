"""`peftflow verify`: rerun stages in a scratch copy and compare every output hash with dvc.lock.

Job:
- `verify(root, stages)`: copies the workspace's git-tracked files into a scratch folder that shares
  the DVC cache, checks out the recorded inputs there, reruns the named stages with `dvc repro
  --force` (dvc.yaml's, or a fleet adapter's by its lock name: `train@chat`), and compares every
  output hash with the committed lock files (dvc.lock, fleet/dvc.lock). For a folder that
  differs it names the files inside; where the hardware class differs from the one recorded in an
  artifact, it compares the safetensors weights numerically instead of stopping at the hash.

Inputs: the project folder (dvc.yaml, dvc.lock, the DVC cache). Outputs: rows to print; nothing in
the workspace is changed (the reruns' outputs enter the shared, content-addressed cache).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.audit import cache_object, lock_outs, lock_stages, manifest
from pipeline.core.layout import FLEET_DVC_YAML, PIPELINE_LOCKS
from pipeline.core.lineage import hardware_class
from pipeline.core.stage import tool_env


@dataclass
class Row:
    stage: str
    path: str
    same: bool
    detail: str = ""
    files: list[str] = field(default_factory=list)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True)


def weights_diff(old: Path, new: Path) -> float | None:
    """Max abs difference between two safetensors files with the same tensors (None if they don't match)."""
    from safetensors import safe_open

    with safe_open(str(old), "pt") as a, safe_open(str(new), "pt") as b:
        if set(a.keys()) != set(b.keys()):
            return None
        worst = 0.0
        for k in a.keys():  # noqa: SIM118 - safe_open has no __iter__
            x, y = a.get_tensor(k).float(), b.get_tensor(k).float()
            if x.shape != y.shape:
                return None
            worst = max(worst, float((x - y).abs().max()) if x.numel() else 0.0)
    return worst


def explain(cache: Path, old_md5: str | None, new_md5: str | None) -> tuple[list[str], str]:
    """Which files inside a folder output differ, and for weights on another hardware class how much."""
    old, new = manifest(cache, old_md5), manifest(cache, new_md5)
    if old is None or new is None:
        folder = str(old_md5 or new_md5 or "").endswith(".dir")
        return [], "(the recorded folder's file list is not in the DVC cache)" if folder else ""
    files = sorted(f for f in set(old) | set(new) if old.get(f) != new.get(f))
    notes = []
    record = "peftflow.json"
    if record in old and record in new:
        hw_old = json.loads(cache_object(cache, old[record]).read_text()).get("hardware")
        hw_new = json.loads(cache_object(cache, new[record]).read_text()).get("hardware")
        if hw_old != hw_new:

            notes.append(f"hardware class differs: recorded {hardware_class(hw_old or {})}, "
                         f"here {hardware_class(hw_new or {})}")
            for f in files:
                if f.endswith(".safetensors") and f in old and f in new:
                    d = weights_diff(cache_object(cache, old[f]), cache_object(cache, new[f]))
                    notes.append(f"{f}: max |Δ| {d:.3g}" if d is not None else f"{f}: other tensors")
    return files, "; ".join(notes)


def scratch_copy(root: Path, dest: Path) -> list[str]:
    """The workspace's git-tracked files (as they are now) in `dest`, as a git + DVC repo sharing the
    workspace's DVC cache. Returns the tracked files that differ from HEAD (verified as they are)."""
    listed = _run(["git", "ls-files", "-z"], root)
    if listed.returncode:
        raise RuntimeError(f"verify: {root} is not a git repository: {listed.stderr.strip()}")
    for name in filter(None, listed.stdout.split("\0")):
        src = root / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], root).stdout.split("\n")
    cache = (root / ".dvc" / "cache").resolve()
    _run(["git", "init", "-q"], dest)
    _run([sys.executable, "-m", "dvc", "config", "--local", "cache.dir", str(cache)], dest)
    _run(["git", "add", "-A"], dest)  # a commit, as a clone has (dvclive reads it)
    _run(["git", "-c", "user.name=peftflow verify", "-c", "user.email=verify@localhost", "commit", "-qm",
          "peftflow verify: the workspace as it is"], dest)
    return [line[3:] for line in dirty if line.strip()]


def addresses(root: Path) -> dict[str, str]:
    """Lock name -> DVC address of every stage dvc.yaml declares and every fleet stage fleet/dvc.lock records
    (`train@chat` -> `fleet/dvc.yaml:train@chat`)."""
    out = {n: n for n in yaml.safe_load((root / "dvc.yaml").read_text())["stages"]}
    fleet_lock = root / PIPELINE_LOCKS[1]
    if fleet_lock.is_file():
        out |= {n: f"{FLEET_DVC_YAML}:{n}" for n in (yaml.safe_load(fleet_lock.read_text()) or {}).get("stages", {})}
    return out


def verify(root: Path = Path("."), stages: list[str] | None = None, keep: Path | None = None,
           log=print) -> list[Row]:
    """Rerun `stages` (dvc.yaml's, all when empty; a fleet stage by its lock name, `train@chat`) in a scratch copy
    and compare their outputs with what the lock files record."""
    root = root.resolve()
    lock = lock_stages(root)
    spec, known = yaml.safe_load((root / "dvc.yaml").read_text())["stages"], addresses(root)
    names = stages or list(spec)
    unknown = [s for s in names if s not in known]
    if unknown:
        raise ValueError(f"verify: no stage {', '.join(unknown)} in dvc.yaml or fleet/dvc.lock (dvc.yaml's: "
                         f"{', '.join(spec)}; a fleet adapter's: train@<name>, ...)")
    work = Path(tempfile.mkdtemp(prefix="peftflow-verify-")) if keep is None else keep
    try:
        dirty = scratch_copy(root, work)
        if dirty:
            log(f"verify: uncommitted changes are verified as they are: {', '.join(dirty)}")
        # the inputs the named stages read: every recorded output, from the cache (missing ones are rebuilt)
        # (--force: a scratch copy; an output left by a failed run, a quarantine file say, would stop it)
        _run([sys.executable, "-m", "dvc", "checkout", "--quiet", "--force"], work)
        runs = [[]] if set(names) == set(spec) else [["--single-item", known[n]] for n in names]  # all: one repro
        for extra in runs:
            log(f"verify: rerunning {'stage ' + extra[-1] if extra else 'every stage'}")
            r = _run([sys.executable, "-m", "dvc", "repro", "--force", *extra], work)
            if r.returncode:
                raise RuntimeError(f"verify: dvc repro {' '.join(extra)} failed in {work}:\n"
                                   f"{(r.stdout + r.stderr)[-3000:]}")
        relock = lock_stages(work)
        cache = root / ".dvc" / "cache"
        rows = []
        for stage in names:
            recorded, now = lock_outs(lock, [stage]), lock_outs(relock, [stage])
            for path in sorted(set(recorded) | set(now)):
                old, new = recorded.get(path), now.get(path)
                if old == new:
                    rows.append(Row(stage, path, True))
                    continue
                files, detail = explain(cache, old, new)
                if old is None:
                    detail = "not in the committed dvc.lock"
                rows.append(Row(stage, path, False, detail or f"md5 {str(old)[:12]} -> {str(new)[:12]}", files))
        return rows
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
