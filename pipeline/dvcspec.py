"""What `dvc.yaml` must say about each stage, made from the code: its `params` and its code `deps`.

- params: the keys the stage module declares (`READS`), with its task's and its method's
  (`Task.reads[stage]`, `Method.reads[stage]`) for every registered task and method, since params.yaml
  may name any of them. A section whose every key is listed is written as the section. Each stage
  reads its params through a view of exactly its own, its task's and its method's keys
  (pipeline/contract.py), so DVC watches every key a stage can read.
- code deps: the project files the stage module imports, transitively (`closure`), the files it
  reads beside its code (`FILES`), and the plug-ins it loads by name (`LOADS`): the task module as
  `pipeline/tasks/${task}.py` (DVC fills in params.yaml's task, so a change to another task's module
  reruns nothing here) with what the task modules import, and the method modules.

`expected(root)` computes both; `differences(root)` lists where dvc.yaml disagrees (the tests and
`peftflow contract` fail on any); `write(root)` rewrites those two lists in dvc.yaml, keeping every
other line and comment. `file_stages(root, task)` is the table of docs/architecture.md: project file ->
the stages that rerun when it changes.

Inputs: the project folder (dvc.yaml, pipeline/). Outputs: lists, dvc.yaml rewritten by `write`.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import yaml
from pydantic import BaseModel

from pipeline import methods, tasks
from pipeline.core.params import Params, Train

PACKAGE = "pipeline"
CODE = "pipeline/"  # deps under this prefix are generated; the others (data, models, lock) are kept as written
TASK_FILE = "pipeline/tasks/${task}.py"


def module_file(root: Path, module: str) -> Path | None:
    """The file of a project module (`pipeline.core.io` -> pipeline/core/io.py), or None if it is not one."""
    f = root / (module.replace(".", "/") + ".py")
    if f.exists():
        return f
    f = root / module.replace(".", "/") / "__init__.py"
    return f if f.exists() else None


def _nodes(tree: ast.AST):
    """Every node of a module's tree, except those under `if TYPE_CHECKING:` (imports for type hints only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in ast.walk(child))
            continue
        yield node
        yield from _nodes(node)


def imports(root: Path, path: Path) -> set[str]:
    """The project modules a file imports (and the packages on the way, whose __init__ runs first)."""
    found: set[str] = set()
    for node in _nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found |= {".".join(parts[:k]) for k in range(1, len(parts) + 1) if parts[0] == PACKAGE}
    return {m for m in found if module_file(root, m)}


def closure(root: Path, module: str) -> set[str]:
    """Every project file (relative path) importing `module` imports, itself included."""
    seen: set[str] = set()
    todo = [module, *[".".join(module.split(".")[:k]) for k in range(1, module.count(".") + 1)]]
    while todo:
        m = todo.pop()
        f = module_file(root, m)
        if f is None or m in seen:
            continue
        seen.add(m)
        todo += imports(root, f)
    return {module_file(root, m).relative_to(root).as_posix() for m in seen}


def stage_modules(root: Path) -> dict[str, str]:
    """Stage name -> the module its command runs (`python -m pipeline.stages.train ...`)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in spec.items():
        words = (" ".join(stage["cmd"]) if isinstance(stage["cmd"], list) else stage["cmd"]).split()
        if "-m" in words and words[words.index("-m") + 1].startswith(PACKAGE + "."):
            out[name] = words[words.index("-m") + 1]
    return out


def plugin_files(root: Path, kind: str) -> set[str]:
    """The code deps of loading a plug-in of `kind` by name: the task's own file through ${task} and what
    every task module imports; every method module and what it imports."""
    if kind == "task":
        own = {module_file(root, m).relative_to(root).as_posix() for m in tasks.modules()}
        return {TASK_FILE} | {f for m in tasks.modules() for f in closure(root, m)} - own
    if kind == "method":
        return {f for m in methods.modules() for f in closure(root, m)}
    raise ValueError(f"unknown plug-in kind {kind!r}")


def code_deps(root: Path, module: str) -> list[str]:
    """The project files a stage module's program runs: its import closure, its files, its plug-ins."""
    mod = importlib.import_module(module)
    files = closure(root, module) | set(getattr(mod, "FILES", ()))
    for kind in mod.LOADS:
        files |= plugin_files(root, kind)
    return sorted(files)


SECTIONS = {name: info.annotation for name, info in Params.model_fields.items()
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
            and info.annotation is not Train}


def compress(keys: set[str]) -> list[str]:
    """Keys in DVC's params syntax, a section in place of all its keys (not `train`: its method sections
    are keys no stage lists whole)."""
    out = set(keys)
    for field, model in SECTIONS.items():
        name = Params.model_fields[field].alias or field
        every = {f"{name}.{k}" for k in model.model_fields}
        if every <= out:
            out = (out - every) | {name}
    return sorted(out)


def stage_params(module: str) -> list[str]:
    """The params a stage's program may read, for any task and method params.yaml may name."""
    mod = importlib.import_module(module)
    stage, keys = mod.STAGE, set(mod.READS)
    if "task" in keys:
        keys |= {k for name in tasks.TASKS for k in tasks.get(name).reads.get(stage, ())}
    if "train.method" in keys:
        keys |= {k for name in (*methods.OWN, "lora") for k in methods.get(name).reads.get(stage, ())}
    return compress(keys)


def expected(root: Path) -> dict[str, dict[str, list[str]]]:
    """Stage -> {"params": ..., "code": ...} as the code says."""
    return {stage: {"params": stage_params(module), "code": code_deps(root, module)}
            for stage, module in stage_modules(root).items()}


def differences(root: Path) -> list[str]:
    """One line per params key or code dep where dvc.yaml and the code disagree (empty: they agree)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    lines = []
    for stage, want in expected(root).items():
        have_params = set(spec[stage].get("params", []))
        have_code = {d for d in spec[stage].get("deps", []) if isinstance(d, str) and d.startswith(CODE)}
        for key in sorted(set(want["params"]) - have_params):
            lines.append(f"stage {stage}: reads params key '{key}', not in its dvc.yaml params")
        for key in sorted(have_params - set(want["params"])):
            lines.append(f"stage {stage}: dvc.yaml lists params key '{key}', which its code does not read")
        for f in sorted(set(want["code"]) - have_code):
            lines.append(f"stage {stage}: runs {f}, not in its dvc.yaml deps")
        for f in sorted(have_code - set(want["code"])):
            lines.append(f"stage {stage}: dvc.yaml lists {f} among its deps, which it does not run")
    return lines


def write(root: Path) -> list[str]:
    """Rewrite each stage's params and code deps in dvc.yaml (other deps, lines and comments kept);
    returns the differences it mended."""
    from ruamel.yaml import YAML

    mended = differences(root)
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 120
    path = root / "dvc.yaml"
    doc = rt.load(path.read_text())
    for stage, want in expected(root).items():
        entry = doc["stages"][stage]
        others = [d for d in entry.get("deps", []) if not (isinstance(d, str) and d.startswith(CODE))]
        entry["deps"] = [*want["code"], *others]
        entry["params"] = want["params"]
    with path.open("w") as f:
        rt.dump(doc, f)
    return mended


def file_stages(root: Path, task: str) -> dict[str, list[str]]:
    """Project file -> the stages whose deps name it, with params.yaml's task `task` (the docs' table)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out: dict[str, list[str]] = {}
    for stage, entry in spec.items():
        for d in entry.get("deps", []):
            if isinstance(d, str) and d.startswith(CODE):
                out.setdefault(d.replace("${task}", task), []).append(stage)
    return dict(sorted(out.items()))
