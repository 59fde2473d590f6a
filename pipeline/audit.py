"""The lineage audit (`peftflow lineage`): an artifact, wherever it lies, checked against the pipeline's history.

An artifact (an adapter or export folder, a GGUF file) is found by its hash in the lock files
(dvc.lock, fleet/dvc.lock): in the workspace's, then in every commit reachable from HEAD that changed
one (`lock_history`, newest first). The newest lock that records it is the one it is checked against
(healthy history has later commits that changed code, not outputs: their locks record the same hash
with today's code deps); the oldest names the commit that made it. Against that lock, every hash of
the artifact's chain (its own inputs, then adapter -> train data -> raw data -> base model, upstream)
is compared with:
  - the workspace, when the workspace's lock records the artifact: files and folders hashed again
    (a DVC output that is not checked out is said so, and is no difference: "not in the cache" or
    "not checked out" is not "modified");
  - the tree of that commit, when only an older commit records it (a deployed copy made earlier): the
    git-tracked files as that commit holds them, DVC outputs by the DVC cache.
An artifact in the workspace at a path whose current lock records another hash is stale; a folder no
lock records is compared file by file with the recorded folder of its path (or, for a copy, with the
recorded folder that holds its record file): the files that differ are named (tampering).

Inputs: the project folder (git history, lock files, DVC cache, workspace) and the artifact.
Outputs: a result dict (`check`, `check_gguf`); `show` prints it. No stage imports this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from pipeline.core.layout import PIPELINE_LOCKS, lock_file, split_stage
from pipeline.core.lineage import RECORD, digest, hardware, hardware_class, installed, md5_file, read
from pipeline.core.lineage import reproduce_commands as commands_for

WORKSPACE = "workspace"  # the commit name of the workspace's own lock files


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


def git(root: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def cat_files(root: Path, names: list[str]) -> list[bytes | None]:
    """The bytes of git objects named `<commit>:<path>`, in one `git cat-file --batch` (None where missing)."""
    if not names:
        return []
    try:
        out = subprocess.run(["git", "cat-file", "--batch"], cwd=root, input="".join(f"{n}\n" for n in names).encode(),
                             capture_output=True, timeout=300, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return [None] * len(names)
    found, at = [], 0
    for _ in names:  # each answer: "<sha> <type> <size>\n<bytes>\n", or "<name> missing\n"
        end = out.index(b"\n", at)
        head, at = out[at:end].split(), end + 1
        if head[-1] in (b"missing", b"ambiguous") or head[1] != b"blob":
            found.append(None)
            continue
        size = int(head[2])
        found.append(out[at:at + size])
        at += size + 1
    return found


def lock_outs(lock: dict, stages: list[str] | None = None) -> dict[str, str | None]:
    """Output path -> md5 for the named stages of a lock's `stages` mapping (all when None)."""
    names = lock if stages is None else stages
    return {o["path"]: o.get("md5") for s in names for o in lock.get(s, {}).get("outs", [])}


def cache_object(cache: Path, md5: str) -> Path:
    """Where the DVC cache folder `cache` keeps the object with this md5 (a file, or a folder's list)."""
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def cache_of(root: Path) -> Path:
    """The project's DVC cache folder."""
    return root / ".dvc" / "cache"


def cache_has(root: Path, md5: str | None) -> bool | None:
    """Whether the DVC cache holds an object (None when there is no hash to look for)."""
    return cache_object(cache_of(root), md5).exists() if md5 else None


def manifest(cache: Path, md5: str | None) -> dict[str, str] | None:
    """A recorded folder's files (relpath -> md5) from the DVC cache folder `cache`, or None when it lacks them."""
    if not md5 or not str(md5).endswith(".dir") or not cache_object(cache, md5).exists():
        return None
    return {e["relpath"]: e["md5"] for e in json.loads(cache_object(cache, md5).read_text())}


def lock_stages(root: Path) -> dict:
    """The `stages` of the workspace's lock files (PIPELINE_LOCKS), as one mapping."""
    stages: dict = {}
    for name in PIPELINE_LOCKS:
        if (root / name).is_file():
            stages.update((yaml.safe_load((root / name).read_text()) or {}).get("stages", {}))
    return stages


def lock_history(root: Path) -> list[tuple[str, dict]]:
    """(commit, the `stages` of its lock files as one) for every commit reachable from HEAD that changed a
    pipeline lock file, newest first, read by one `git cat-file --batch`."""
    commits = (git(root, "log", "--format=%H", "--", *PIPELINE_LOCKS) or "").splitlines()
    texts = cat_files(root, [f"{c}:{name}" for c in commits for name in PIPELINE_LOCKS])
    history = []
    for i, commit in enumerate(commits):
        stages: dict = {}
        for text in texts[i * len(PIPELINE_LOCKS):(i + 1) * len(PIPELINE_LOCKS)]:
            stages.update((yaml.safe_load(text or b"") or {}).get("stages", {}))
        history.append((commit, stages))
    return history


def upstream(lock: dict, paths: list[str]) -> dict:
    """The lock entries of every stage that produced `paths`, and of their producers, recursively."""
    producers = {o["path"]: name for name, s in lock.items() for o in s.get("outs", [])}
    found: dict = {}
    todo = list(paths)
    while todo:
        name = producers.get(todo.pop())
        if name and name not in found:
            found[name] = lock[name]
            todo += [d["path"] for d in lock[name].get("deps", [])]
    return found


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


def env_mismatches(rec: dict) -> list[tuple[str, str | None, str | None]]:
    """(package, recorded version, installed version) for every package of the record installed otherwise."""
    recorded = rec.get("env", {}).get("packages", {})
    return [(name, v, installed(name)) for name, v in sorted(recorded.items()) if installed(name) != v]


@dataclass
class Found:
    """Where the lock files record an artifact: `lock` (the `stages` it is checked against) is the newest
    lock that records it, `checked_at` its commit (WORKSPACE for the workspace's own lock files), `made_in`
    the oldest commit that records it (None while only the workspace's uncommitted lock does)."""

    lock: dict
    checked_at: str
    made_in: str | None
    newest: str | None = None  # the newest commit that records it (what to check out to reproduce it)
    stale: list[dict] = field(default_factory=list)  # problems of the artifact itself (stale, tampered)


def find(root: Path, records) -> Found | None:
    """The locks that record an artifact: `records(stages)` says whether a lock's stages record it."""
    here, history = lock_stages(root), lock_history(root)
    commits = [(c, stages) for c, stages in history if records(stages)]
    if records(here):
        return Found(here, WORKSPACE, commits[-1][0] if commits else None, commits[0][0] if commits else None)
    if commits:
        return Found(commits[0][1], commits[0][0], commits[-1][0], commits[0][0])
    return None


def producer(lock: dict, md5: str | None, default: str | None) -> str | None:
    """The lock's stage that wrote an output of this md5 (the adapter's own `train@<name>` in a fleet)."""
    return next((n for n, s in lock.items() if md5 and any(o.get("md5") == md5 for o in s.get("outs", []))), default)


def relative(root: Path, path: Path) -> str | None:
    """`path` as a project path (as the lock files write it), or None when it lies outside the project."""
    try:
        return Path(os.path.abspath(path)).relative_to(Path(os.path.abspath(root))).as_posix()
    except ValueError:
        return None


def changed_files(folder: Path, recorded: dict[str, str]) -> list[str]:
    """The files of `folder` that differ from a recorded folder's file list (changed, added or missing)."""
    now = {f.relative_to(folder).as_posix(): md5_file(f) for f in folder.rglob("*") if f.is_file()}
    return sorted(f for f in set(now) | set(recorded) if now.get(f) != recorded.get(f))


def tampered(root: Path, folder: Path, rec: dict) -> tuple[str | None, list[str]]:
    """For a folder no lock records: the recorded folder it was (that of its workspace path in the current
    lock, else the one whose record file is this folder's, else the closest of its stage) and the files that
    differ from it; (None, []) when the DVC cache holds no recorded folder to compare with."""
    path = relative(root, folder)
    now_md5 = lock_outs(lock_stages(root)).get(path) if path else None
    if (files := manifest(cache_of(root), now_md5)) is not None:
        return now_md5, changed_files(folder, files)
    candidates = {o.get("md5") for _, stages in lock_history(root) for name, s in stages.items()
                  if split_stage(name)[0] == rec.get("stage") for o in s.get("outs", [])}
    manifests = {m: f for m in candidates if (f := manifest(cache_of(root), m)) is not None}
    if not manifests:
        return None, []
    own = md5_file(folder / RECORD) if (folder / RECORD).is_file() else None
    best = min(manifests, key=lambda m: (manifests[m].get(RECORD) != own, len(changed_files(folder, manifests[m]))))
    return best, changed_files(folder, manifests[best])


class Reference:
    """What the chain's recorded hashes are compared with: the workspace (the workspace's lock records the
    artifact) or the tree of the commit whose lock does, with DVC outputs looked for in the DVC cache."""

    def __init__(self, root: Path, found: Found) -> None:
        self.root, self.at = root, found.checked_at
        self.dvc_made = set(lock_outs(found.lock)) | set(lock_outs(lock_stages(root)))
        self.blobs: dict[str, bytes | None] = {}

    def prefetch(self, paths: list[str]) -> None:
        """The commit's blobs of these paths, in one git call."""
        if self.at != WORKSPACE:
            todo = [p for p in dict.fromkeys(paths) if p not in self.blobs]
            self.blobs.update(zip(todo, cat_files(self.root, [f"{self.at}:{p}" for p in todo]), strict=True))

    def managed_by_dvc(self, path: str) -> bool:
        inside = any(path == o or path.startswith(o + "/") for o in self.dvc_made)
        return inside or (self.root / (path + ".dvc")).is_file()

    def verdict(self, path: str, md5: str | None) -> dict:
        """One recorded hash against the reference: "ok", a MISMATCH, MISSING, or a neutral state of a DVC
        output that is not there to hash ("not checked out", "DVC output")."""
        v = {"path": path, "md5": md5, "cache": cache_has(self.root, md5) if self.managed_by_dvc(path) else None}
        if md5 is None:
            return v | {"workspace": "unknown"}
        if self.at == WORKSPACE or Path(path).is_absolute():
            p = self.root / path
            if not p.exists():
                return v | {"workspace": "not checked out" if self.managed_by_dvc(path) else "MISSING"}
            now = digest(p)
            return v | {"workspace": "ok" if now == md5 else f"MISMATCH (workspace md5 {now[:12]})"}
        if self.managed_by_dvc(path):
            return v | {"workspace": "DVC output" if v["cache"] else "DVC output, not in the cache"}
        blob = self.blobs.get(path)
        if blob is None:
            return v | {"workspace": f"MISSING at {self.at[:12]}"}
        now = hashlib.md5(blob).hexdigest()
        return v | {"workspace": "ok" if now == md5 else f"MISMATCH (md5 {now[:12]} at {self.at[:12]})"}


NEUTRAL = ("ok", "not checked out", "DVC output", "DVC output, not in the cache", "unknown")


def audit(rec: dict, found: Found, root: Path, stage: str | None) -> dict:
    """Every hash of an artifact's chain in `found.lock` against the reference; the result `show` prints."""
    lock = found.lock
    entry = lock.get(stage, {})
    chain_entries = upstream(lock, [d["path"] for d in entry.get("deps", [])])
    inputs = rec.get("inputs", {})
    ref = Reference(root, found)
    ref.prefetch([*inputs, *(d["path"] for d in entry.get("deps", [])),
                  *(x["path"] for s in chain_entries.values() for x in s.get("deps", []) + s.get("outs", []))])
    own = [ref.verdict(path, md5) for path, md5 in inputs.items()]
    own += [ref.verdict(d["path"], d.get("md5")) for d in entry.get("deps", []) if d["path"] not in inputs]
    chain = [{"stage": name, "outs": [ref.verdict(o["path"], o.get("md5")) for o in s.get("outs", [])],
              "deps": [ref.verdict(d["path"], d.get("md5")) for d in s.get("deps", [])]}
             for name, s in chain_entries.items()]
    every = own + [x for c in chain for x in c["outs"] + c["deps"]]
    env = env_mismatches(rec)
    return {"record": rec, "own": own, "chain": chain, "stage": stage, "found": found,
            "mismatches": [v for v in every if v["workspace"] not in NEUTRAL] + found.stale,
            "sources": data_sources(root, [v["path"] for v in every]),
            "commands": commands_for(rec, found.newest, stage),
            # the installed packages are the workspace's promise: an older commit's artifact may predate them
            "env": env if found.checked_at == WORKSPACE else [], "env_notes": env if found.checked_at != WORKSPACE
            else []}


def stale_note(root: Path, path: str | None, md5: str, found: Found) -> list[dict]:
    """A workspace output (or a file inside one) whose current lock records another hash: stale (checked out or
    made before)."""
    outs = lock_outs(lock_stages(root))
    now = outs.get(path) if path else None
    folder = next((o for o in outs if path and path.startswith(o + "/")), None)
    if now is None and folder is not None and (files := manifest(cache_of(root), outs[folder])) is not None:
        now = files.get(path[len(folder) + 1:])  # a file of a folder output: its md5 in the current folder list
    if found.checked_at == WORKSPACE or now is None or now == md5:
        return []
    return [{"path": path, "md5": md5, "cache": None,
             "workspace": f"MISMATCH (stale: {lock_file(producer(lock_stages(root), now, '') or '')} now records "
                          f"{now[:12]}; this is commit {found.checked_at[:12]}'s; `dvc checkout` or `dvc repro`)"}]


def check(folder: Path, root: Path = Path(".")) -> dict:
    """An adapter or export folder's lineage (see the module's docstring)."""
    rec, md5 = read(folder), digest(folder)
    found = find(root, lambda stages: md5 in lock_outs(stages).values())
    if found is None:
        recorded, files = tampered(root, folder, rec)
        found = find(root, lambda stages: recorded in lock_outs(stages).values()) if recorded else None
        why = (f"MISMATCH (changed since it was recorded: {', '.join(files)})" if files else
               "MISMATCH (no lock records this folder, and the DVC cache holds no recorded folder to compare "
               "with: `dvc pull`, or it was not made by this project)")
        found = found or Found({}, WORKSPACE, None)
        found.stale.append({"path": str(folder), "md5": md5, "cache": None, "workspace": why})
        return audit(rec, found, root, producer(found.lock, recorded, rec.get("stage")))
    found.stale += stale_note(root, relative(root, folder), md5, found)
    return audit(rec, found, root, producer(found.lock, md5, rec.get("stage")))


def check_gguf(path: Path, stamp: tuple[dict, str | None, str], root: Path = Path(".")) -> dict:
    """A GGUF file's lineage, wherever the file lies, from its `stamp` (`llamacpp.read_stamp`: the record in its
    metadata, the tensor digest written there and the one of its bytes now): the locks whose gguf stage wrote a
    folder holding this file (looked up in the DVC cache's folder lists), else those recording the export it
    was made from; its tensor bytes against the written digest."""
    rec, stamped, now = stamp
    md5, stage_name = md5_file(path), rec.get("stage", "gguf")

    def holds(stages: dict) -> bool:
        return any(md5 in (manifest(cache_of(root), o.get("md5")) or {}).values() for name, s in stages.items()
                   if split_stage(name)[0] == stage_name for o in s.get("outs", []))

    export_md5 = next((m for p, m in rec.get("inputs", {}).items() if Path(p).name == "export"), None)
    found = find(root, holds) or (find(root, lambda s: export_md5 in lock_outs(s).values()) if export_md5 else None)
    found = found or Found({}, WORKSPACE, None, [{"path": str(path), "md5": md5, "cache": None,
                                                  "workspace": "MISMATCH (no lock records this file or its export)"}])
    # its stage: the one that read this export (the default job's gguf, or an adapter's gguf@<name>)
    name = next((n for n, s in found.lock.items() if split_stage(n)[0] == stage_name
                 and any(d.get("md5") == export_md5 for d in s.get("deps", []))), None)
    found.stale += stale_note(root, relative(root, path), md5, found)
    if stamped != now:
        found.stale.append({"path": str(path), "md5": stamped, "cache": None,
                            "workspace": f"MISMATCH (tensor bytes changed: sha256 now {now[:12]})"})
    return audit(rec, found, root, name)


def show(r: dict, path: str, label: str = "", console: Console | None = None) -> bool:
    """Print one artifact's lineage; whether every hash and package version matched."""
    console = console or Console()
    rec, found = r["record"], r["found"]
    made = rec.get("export", rec)
    made = made.get("adapter", made)
    console.print(f"{label}[bold]{path}[/bold] made by stage {r.get('stage') or rec.get('stage')}")
    if found.lock:
        at = "the workspace's lock (HEAD's, as committed or since reproduced)" if found.checked_at == WORKSPACE \
            else f"commit {found.checked_at} (the newest that records it; not the workspace's lock)"
        made_in = found.made_in or "(not yet committed)"
        console.print(f"recorded in {lock_file(str(r.get('stage')))}; made in commit {made_in}; checked against {at}")
    else:
        console.print("[yellow]no commit's lock file records this artifact[/yellow]")
    env, hw = rec.get("env", {}), rec.get("hardware", {})
    console.print(f"environment: Python {env.get('python')}, {len(env.get('packages', {}))} packages recorded")
    console.print(f"hardware class: {hardware_class(hw)}")
    b = made.get("base", {})
    console.print(f"base model: {b.get('source')} revision {b.get('revision')} gguf {b.get('gguf_file')} "
                  f"weights sha256 {str(b.get('weights_sha256'))[:16]}")
    t = made.get("prompt", {})
    console.print(f"template: {t.get('template')} sha256 {str(t.get('template_sha256'))[:16]}; tokenizer sha256 "
                  f"{str(made.get('tokenizer_sha256'))[:16]}; seed {made.get('params', {}).get('seed')}")
    for split, d in made.get("data", {}).items():
        if isinstance(d, dict):
            console.print(f"data {split}: {d.get('path')} md5 {str(d.get('md5'))[:12]}, {d.get('accepted')} of "
                          f"{d.get('rows')} rows accepted")
    for p, meta in r["sources"].items():
        console.print(f"source of {p}: {meta.get('source')} at commit {meta.get('revision')}, file {meta.get('file')}")
    console.print(table(r, rec.get("stage", "")))
    console.print("reproduce with:\n  " + "\n  ".join(r["commands"]))
    return verdict(r, hw, console)


def table(r: dict, own_stage: str) -> Table:
    """The chain as a table: the artifact's own inputs, then each upstream stage's outputs and inputs."""
    t = Table("stage", "role", "path", "md5", "workspace", "DVC cache", title="lineage (newest first)")

    def row(stage: str, role: str, v: dict) -> None:
        ws = v["workspace"] if v["workspace"] in NEUTRAL else f"[red]{v['workspace']}[/red]"
        t.add_row(stage, role, v["path"], str(v["md5"])[:12], ws, {True: "yes", False: "no", None: "-"}[v["cache"]])

    for v in r["found"].stale:
        row(own_stage, "itself", v)
    for v in r["own"]:
        row(own_stage, "input", v)
    for c in r["chain"]:
        for v in c["outs"]:
            row(c["stage"], "output", v)
        for v in c["deps"]:
            row(c["stage"], "input", v)
    return t


def verdict(r: dict, hw: dict, console: Console) -> bool:
    """The closing lines: the machine's class, package differences, and ok or what differs."""
    here = hardware()
    if hardware_class(here) != hardware_class(hw):
        console.print(f"[yellow]this machine is another hardware class ({hardware_class(here)}): "
                      "floating-point results may differ from the record[/yellow]")
    for name, recorded, now in r["env_notes"]:
        console.print(f"[yellow]installed here: {name} {now or 'absent'} (the artifact's commit ran "
                      f"{recorded or 'without it'})[/yellow]")
    for name, recorded, now in r["env"]:
        console.print(f"[red]environment mismatch: {name} recorded {recorded or 'absent'}, "
                      f"installed {now or 'absent'}[/red]")
    if r["mismatches"] or r["env"]:
        console.print(f"[red]{len(r['mismatches'])} recorded hash(es) and {len(r['env'])} package version(s) "
                      "differ[/red] (make setup installs the locked versions)")
        return False
    console.print("ok: every recorded hash and package version matches")
    return True
