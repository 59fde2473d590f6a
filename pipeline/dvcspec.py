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

The fleet's `fleet/dvc.yaml` is written whole from dvc.yaml (`fleet_spec`): the `fleet` stage, then
every stage but the shared `base` once per adapter (DVC's `foreach` over fleet/params.yaml's adapters),
its outputs under `fleet/<name>/`, its params the same keys in the adapter's own resolved file, its
`${...}` filled from the adapter's entry. So the fleet runs the DAG dvc.yaml defines, never another.

Inputs: the project folder (dvc.yaml, pipeline/). Outputs: lists, dvc.yaml and fleet/dvc.yaml written by `write`.
"""

from __future__ import annotations

import ast
import functools
import importlib
import re
import sys
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from pydantic import BaseModel

from pipeline import methods, tasks
from pipeline.core.layout import ENV, FLEET, FLEET_DVC_YAML, FLEET_PARAMS, RESOLVED, env_pins
from pipeline.core.params import Params, Train

PACKAGE = "pipeline"
CODE = "pipeline/"  # deps under this prefix are generated, and the stage's pins file (ENV); the others are kept
LOCK = "requirements.lock"
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


def tasks_files(root: Path) -> list[str]:
    """Every task module (the `${task}` of a stage that checks every adapter's task)."""
    return [module_file(root, m).relative_to(root).as_posix() for m in tasks.modules()]


def code_deps(root: Path, module: str) -> list[str]:
    """The project files a stage module's program runs: its import closure, its files, its plug-ins."""
    mod = importlib.import_module(module)
    files = closure(root, module) | set(getattr(mod, "FILES", ()))
    for kind in mod.LOADS:
        files |= plugin_files(root, kind)
    return sorted(files)



# ---- the packages a stage runs on: env/<stage>.txt, from requirements.lock -------------------------------

ENV_HEAD = """\
# The packages the {stage} stage runs on, at the versions of requirements.lock: the distributions its
# code imports (and those its files name in PACKAGES), with everything they require. WRITTEN BY
# `peftflow contract --write`; a dep of the stage in dvc.yaml, so a new version of one of these reruns
# the stage, and a package it does not run on (a test or remote tool) reruns nothing.
"""


def normal(name: str) -> str:
    """A distribution name as the lock writes it (PEP 503: lower case, runs of -_. as one -)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party(root: Path, files: list[str]) -> set[str]:
    """The top-level modules outside the standard library and the project that these files import."""
    found: set[str] = set()
    for f in files:
        for node in ast.walk(ast.parse((root / f).read_text(encoding="utf-8"), f)):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return {m for m in found if m != PACKAGE and m not in sys.stdlib_module_names}


def declared(root: Path, files: list[str]) -> set[str]:
    """The distributions these files name in a module-level `PACKAGES` tuple: what their code runs without
    importing it by name (a package found by params, bitsandbytes through transformers, llama.cpp's converters)."""
    found: set[str] = set()
    for f in files:
        for node in ast.parse((root / f).read_text(encoding="utf-8"), f).body:
            names = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            if isinstance(node, ast.Assign) and "PACKAGES" in names:
                found |= set(ast.literal_eval(node.value))
    return found


def requirement_closure(names: set[str]) -> set[str]:
    """These distributions and every one they require (no extras), as installed (the lock's environment)."""
    seen: set[str] = set()
    todo = [normal(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += requires(name)
    return seen


@functools.cache
def requires(name: str) -> tuple[str, ...]:
    """What an installed distribution requires without extras (none when it is not installed)."""
    try:
        lines = distribution(name).requires or []
    except PackageNotFoundError:
        return ()
    reqs = map(Requirement, lines)
    return tuple(normal(r.name) for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""}))


@functools.cache
def module_distributions() -> dict[str, list[str]]:
    """Top-level module -> the installed distributions that provide it."""
    return packages_distributions()


def lock_versions(root: Path) -> dict[str, str]:
    """Distribution -> version, as requirements.lock pins it."""
    pin = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")
    return {normal(m.group(1)): m.group(2) for line in (root / LOCK).read_text().splitlines()
            if (m := pin.match(line))}


def stage_distributions(root: Path, module: str) -> set[str]:
    """The distributions a stage runs on: what its code (any task's, any method's) imports or names in PACKAGES,
    and everything those require."""
    files = sorted({f for d in code_deps(root, module) for f in (tasks_files(root) if d == TASK_FILE else [d])
                    if f.endswith(".py")})
    by_module = module_distributions()
    return requirement_closure({d for m in third_party(root, files) for d in by_module.get(m, ())}
                               | declared(root, files))


def env_text(root: Path, module: str, dists: set[str] | None = None) -> str:
    """A stage's pins file: the lock's pins of the distributions it runs on (`dists`, else worked out)."""
    versions = lock_versions(root)
    names = sorted(n for n in (stage_distributions(root, module) if dists is None else dists) if n in versions)
    stage = importlib.import_module(module).STAGE
    return ENV_HEAD.format(stage=stage) + "".join(f"{n}=={versions[n]}\n" for n in names)


FLEET_STAGE = "pipeline.stages.fleet"  # a stage like the others: loaded by name, as stage_modules loads them


def fleet_stage():
    """The fleet stage's module (its STAGE, READS and the REQUIRED keys each adapter sets)."""
    return importlib.import_module(FLEET_STAGE)


def pinned_stages(root: Path) -> dict[str, str]:
    """Stage -> module of every stage that has a pins file: dvc.yaml's and the fleet's own stage."""
    return {**stage_modules(root), fleet_stage().STAGE: FLEET_STAGE}


def env_differences(root: Path, modules: dict[str, str]) -> list[str]:
    """One line per stage whose pins file is not what the lock and its code make."""
    return [f"{env_pins(stage)}: not what requirements.lock and the stage's imports make (peftflow contract --write)"
            for stage, module in modules.items()
            if not (root / env_pins(stage)).is_file() or (root / env_pins(stage)).read_text() != env_text(root, module)]

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


def generated(dep: object) -> bool:
    """Whether a dvc.yaml dep is written by `write` (code, the pins file; the whole lock it replaced), not by hand."""
    return isinstance(dep, str) and (dep.startswith((CODE, ENV + "/")) or dep == LOCK)


def expected(root: Path) -> dict[str, dict[str, list[str]]]:
    """Stage -> {"params": ..., "code": ...} as the code says (code: the project files it runs, its pins file)."""
    return {stage: {"params": stage_params(module), "code": [*code_deps(root, module), env_pins(stage)]}
            for stage, module in stage_modules(root).items()}


def differences(root: Path) -> list[str]:
    """One line per params key or code dep where dvc.yaml and the code disagree (empty: they agree)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    lines = []
    for stage, want in expected(root).items():
        have_params = set(spec[stage].get("params", []))
        have_code = {d for d in spec[stage].get("deps", []) if generated(d)}
        for key in sorted(set(want["params"]) - have_params):
            lines.append(f"stage {stage}: reads params key '{key}', not in its dvc.yaml params")
        for key in sorted(have_params - set(want["params"])):
            lines.append(f"stage {stage}: dvc.yaml lists params key '{key}', which its code does not read")
        for f in sorted(set(want["code"]) - have_code):
            lines.append(f"stage {stage}: runs {f}, not in its dvc.yaml deps")
        for f in sorted(have_code - set(want["code"])):
            lines.append(f"stage {stage}: dvc.yaml lists {f} among its deps, which it does not run")
    return lines + env_differences(root, pinned_stages(root)) + fleet_differences(root)


# ---- the fleet: fleet/dvc.yaml, made from dvc.yaml ---------------------------------------------------

SHARED = ("base",)  # the stages every adapter of the fleet shares (their outputs are not per adapter)
INTERPOLATION = re.compile(r"\$\{\s*([\w.]+)\s*\}")


def _paths(stage: dict) -> list[str]:
    """A stage's outputs: outs, metrics and plots (plain paths or {path: options})."""
    return [next(iter(o)) if isinstance(o, dict) else o for kind in ("outs", "metrics", "plots")
            for o in stage.get(kind, [])]


def _per_adapter(value: str) -> str:
    """`${x.y}` of dvc.yaml as the adapter's own `${item.x.y}` (a key the fleet stage's REQUIRED makes every
    adapter set)."""
    def item(m: re.Match) -> str:
        if m.group(1) not in fleet_stage().REQUIRED:
            raise ValueError(f"dvc.yaml interpolates ${{{m.group(1)}}}, which pipeline/stages/fleet.py's REQUIRED "
                             "does not make every adapter set: add it there")
        return "${item." + m.group(1) + "}"

    return INTERPOLATION.sub(item, value)


def fleet_spec(root: Path) -> dict:
    """fleet/dvc.yaml as dvc.yaml and the code make it."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    own = [p for name, s in spec.items() if name not in SHARED for p in _paths(s)]

    def path(p: str) -> str:  # an output of an adapter's stages (or a folder of them) moves under fleet/<name>/
        if "${" in p:
            return _per_adapter(p)
        mine = any(p == o or p.startswith(o + "/") or o.startswith(p + "/") for o in own)
        return f"{FLEET}/${{key}}/{p}" if mine else p

    def outputs(entries: list) -> list:
        return [{path(next(iter(o))): o[next(iter(o))]} if isinstance(o, dict) else path(o) for o in entries]

    shared = [p for name in SHARED for p in _paths(spec[name])]

    def argument(p: str) -> str:  # a path an adapter's command reads or writes: all its own (checkpoints too)
        if "${" in p or any(p == o or p.startswith(o + "/") for o in shared):
            return path(p)
        return f"{FLEET}/${{key}}/{p}"

    def command(cmd: str) -> str:  # every option's value is a path: the shared stages' stay, the others move
        words = cmd.split()
        words = [w if w.startswith("-") or i == 0 or not words[i - 1].startswith("--") else argument(w)
                 for i, w in enumerate(words)]
        return " ".join([*words, "--params", f"{RESOLVED}/${{key}}.yaml"])

    fleet = fleet_stage()
    stages: dict = {fleet.STAGE: {
        "wdir": "..",
        "cmd": f"python -m {FLEET_STAGE} --fleet {FLEET_PARAMS} --out {RESOLVED}",
        "deps": [*sorted({f for d in code_deps(root, FLEET_STAGE)  # every adapter's task: any of them
                          for f in (tasks_files(root) if d == TASK_FILE else [d])}), env_pins(fleet.STAGE)],
        "params": [*fleet.READS, {FLEET_PARAMS: ["adapters"]}],
        "outs": [{RESOLVED: {"cache": False}}]}}
    for name, s in spec.items():
        if name in SHARED:
            continue
        do = {"wdir": "..", "cmd": command(s["cmd"]), "deps": [path(d) for d in s.get("deps", [])],
              "params": [{f"{RESOLVED}/${{key}}.yaml": [_per_adapter(k) for k in s.get("params", [])]}]}
        do.update({kind: outputs(s[kind]) for kind in ("outs", "metrics", "plots") if kind in s})
        stages[name] = {"foreach": "${adapters}", "do": do}
    return {"stages": stages}


FLEET_HEAD = """\
# The fleet: many adapters over the one base model of params.yaml, declared in fleet/params.yaml
# (`adapters`: name -> overrides of params.yaml). WRITTEN BY `peftflow contract --write` FROM dvc.yaml:
# edit dvc.yaml (the one DAG) and the code, not this file (`peftflow contract` and the tests fail when it
# differs). The `fleet` stage writes each adapter's whole params file into fleet/resolved/; every other
# stage runs once per adapter (`train@<name>`, ...), in the repository root (wdir ..), its outputs under
# fleet/<name>/ and its params compared in fleet/resolved/<name>.yaml; all share dvc.yaml's `base`.
# Run: `dvc repro fleet/dvc.yaml` (docs/fleet.md).
"""


def fleet_text(root: Path) -> str:
    return FLEET_HEAD + yaml.safe_dump(fleet_spec(root), sort_keys=False, width=120)


def fleet_differences(root: Path) -> list[str]:
    """One line per fleet stage where fleet/dvc.yaml is not what dvc.yaml and the code make."""
    f = root / FLEET_DVC_YAML
    have = (yaml.safe_load(f.read_text()) or {}).get("stages", {}) if f.exists() else {}
    want = fleet_spec(root)["stages"]
    return [f"{FLEET_DVC_YAML}: stage {name} is not what dvc.yaml makes of it" for name in want
            if have.get(name) != want[name]] + [f"{FLEET_DVC_YAML}: stage {name} is not in dvc.yaml"
                                                for name in have if name not in want]


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
        others = [d for d in entry.get("deps", []) if not generated(d)]
        entry["deps"] = [*want["code"], *others]
        entry["params"] = want["params"]
    with path.open("w") as f:
        rt.dump(doc, f)
    (root / FLEET).mkdir(exist_ok=True)
    (root / FLEET_DVC_YAML).write_text(fleet_text(root))
    (root / ENV).mkdir(exist_ok=True)
    for stage, module in pinned_stages(root).items():
        (root / env_pins(stage)).write_text(env_text(root, module))
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
