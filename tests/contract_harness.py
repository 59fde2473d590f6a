"""The stage contract measured: for one task on the tiny model, which stages DVC reruns after a change, and
which stages' outputs the change really alters.

In a scratch DVC project (this repository's dvc.yaml, prompts and example data cut short, the tiny base
model), every stage runs once in this process, in the DAG's order, as DVC would run its command (the
command DVC resolves from dvc.yaml, through the stage's own typer program), and `dvc commit` records the
result in dvc.lock. Then:

- imports: each stage runs with every project module unloaded first, so the project files it imports (at
  the top of a module, inside a function, or by a registry loading a plug-in by name) are exactly the ones
  that come back: the ground truth its code deps in dvc.yaml are compared with.
- params: for every leaf key of params.yaml, the key is set to another valid value; DVC's own status names
  the stages it would rerun directly, and every stage then runs again in order on whatever its inputs now
  are. A stage whose outputs' bytes change although DVC would not rerun it (neither for its own deps and
  params, nor because an output it reads changed) is a stale result; a stage DVC reruns whose outputs do
  not change is a wasted rerun. Then everything is put back.
- code: every project file gets a comment appended; DVC's status must name exactly the stages that
  imported it.

Run by tests/test_contract.py in a subprocess per task (it unloads and reloads project modules, which a
shared test process must not do): `python tests/contract_harness.py --task chat --keys all --out r.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

TEMPLATES = {"classification": "sentiment", "instruction": "alpaca", "preference": "preference", "chat": "chat"}
DATA = {"classification": "sentiment", "instruction": "instruction", "preference": "preference", "chat": "chat"}
# the tiny pipeline: few rows and steps, so that every stage runs in well under a second
TINY = {"train.max_steps": 2, "train.batch_size": 4, "train.checkpoint_every": 0, "train.dpo.steps": 2,
        "train.dpo.batch_size": 2, "evaluate.shots": 1, "evaluate.samples": 1, "evaluate.max_new_tokens": 2,
        "export.check_rows": 2, "export.atol": 0.01, "gguf.rows": 2, "gguf.quantize": [], "gguf.tokenizer_pre": "gpt-2",
        "gguf.max_new_tokens": 3, "gguf.outtype": "f32", "validate.max_reject_ratio": 0.2, "train.lr": 0.05}
ROWS = {"train": 16, "validation": 8}
# a section no default run reads: its keys must rerun nothing, and it makes `train.method: ia3` a valid change
IA3 = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
# keys a fast check leaves to the exhaustive one: each starts `accelerate launch` processes (~30 s)
SLOW_KEYS = ("train.num_processes", "train.accelerate_config")


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of every leaf of a params mapping (a list, or an empty mapping, is one leaf)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(leaves(v, key + "."))
        elif not (isinstance(v, dict) and not v):
            out[key] = v
    return out


def put(tree: dict, key: str, value) -> dict:
    """A copy of a params mapping with one dotted key set."""
    tree = node = copy.deepcopy(tree)
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return tree


def literal_choices(key: str) -> list:
    """The choices of a Literal-typed params key (for another valid value)."""
    import typing

    from pipeline.core.params import Params

    model = Params
    for part in key.split("."):
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return []
        ann = field.annotation
        nested = [a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and hasattr(a, "model_fields")]
        if nested:
            model = nested[0]
    for a in (ann, *typing.get_args(ann)):
        if typing.get_origin(a) is typing.Literal:
            return list(typing.get_args(a))
    return []


def alternatives(key: str, value, scratch: Path) -> list:
    """Other valid values for a key, most likely first."""
    special = {
        "task": [t for t in TEMPLATES if t != value], "train.method": ["ia3", "full"],
        "base.model": [str(scratch / "base_copy")], "base.gguf_file": ["base.gguf"], "base.revision": ["main"],
        "data.train": ["data/alt/train.jsonl"], "data.validation": ["data/alt/validation.jsonl"],
        "format.template": [f"prompts/{Path(str(value)).stem}_alt.jinja"], "format.system_prompt": ["Be brief."],
        "train.activation_checkpointing": [{"every_n_layers": 1, "offload": False}],
        "train.quantization": [{"load_in_8bit": True}], "train.accelerate_config": [str(scratch / "ddp.yaml")],
        "train.max_steps": [1], "train.max_batch_tokens": [48], "train.loraplus_lr_ratio": [4.0],
        "train.grad_clip": [0.5], "gguf.tokenizer_pre": ["llama-bpe"], "gguf.rows": [2], "gguf.quantize": [["q8_0"]],
        "gguf.min_agreement": [0.0], "train.lora.target_modules": [["q_proj", "v_proj"]],
        "train.num_processes": [2], "data.license": ["CC0-1.0"], "evaluate.shots": [1],
        "validate.text_field": ["text"], "validate.label_field": ["answer"],
    }
    if key in special:
        return special[key]
    choices = literal_choices(key)
    if choices:
        return [c for c in choices if c != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1]
    if isinstance(value, float):
        return [value * 2 if value else 0.01]
    if isinstance(value, list):
        return [list(reversed(value))]
    if value is None:
        return []
    return [f"{value}-alt"]


def valid(raw: dict) -> str | None:
    """None when the params pass every check a stage makes, else the reason."""
    from pipeline import methods, tasks
    from pipeline.contract import parse
    from pipeline.core.stage import PipelineError

    try:
        p = parse(raw)
        methods.check(p.train, tasks.get(p.task).dpo)
    except PipelineError as e:
        return str(e)
    return None


def fresh_process_state() -> None:
    """What a stage program finds in a new process, where an earlier stage run here may have changed it."""
    import torch

    torch.set_grad_enabled(True)
    torch.use_deterministic_algorithms(False)


class Project:
    """The scratch DVC project of one task and the stages' runs in it."""

    def __init__(self, scratch: Path, task: str) -> None:
        self.dir, self.task = scratch, task
        self.backup = scratch.parent / f"{scratch.name}.outs"

    # ---- setup
    def create(self) -> None:
        from conftest import TINY_TRAIN, build_tiny_base, raw_params
        from dvc.repo import Repo

        d = self.dir
        d.mkdir(parents=True)
        for name in ("dvc.yaml", "requirements.lock"):
            shutil.copy(ROOT / name, d / name)
        shutil.copytree(ROOT / "prompts", d / "prompts")
        shutil.copytree(ROOT / "env", d / "env")
        shutil.copytree(ROOT / "pipeline", d / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
        for f in list((d / "prompts").glob("*.jinja")):
            (d / "prompts" / f"{f.stem}_alt.jinja").write_text(f.read_text() + "{# another template file #}\n")
        base = build_tiny_base(d / "base_src")
        shutil.copytree(base, d / "base_copy")
        for folder in ("example", "alt"):
            (d / "data" / folder).mkdir(parents=True, exist_ok=True)
        for split, n in ROWS.items():
            lines = (ROOT / "data" / "example" / f"{DATA[self.task]}_{split}.jsonl").read_text().splitlines()[:n]
            rows = [json.loads(x) for x in lines]
            for r in rows:  # the same text under other field names, for the text / label field keys
                if "sentence" in r:
                    r["text"], r["answer"] = r["sentence"], r["label"]
            text = "".join(json.dumps(r) + "\n" for r in rows)
            (d / "data" / "example" / f"{DATA[self.task]}_{split}.jsonl").write_text(text)
            (d / "data" / "alt" / f"{split}.jsonl").write_text(text)
        (d / "ddp.yaml").write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_machines: 1\n"
                                    "num_processes: 2\nmixed_precision: 'no'\n")
        over = {**TINY_TRAIN, **TINY, "task": self.task, "train.ia3": IA3, "base.model": str(d / "base_src"), "base.gguf_file": None,
                "format.template": f"prompts/{TEMPLATES[self.task]}.jinja",
                "data.train": f"data/example/{DATA[self.task]}_train.jsonl",
                "data.validation": f"data/example/{DATA[self.task]}_validation.jsonl"}
        self.params = raw_params(**over)
        self.write_params(self.params)
        Repo.init(str(d), no_scm=True)

    def write_params(self, raw: dict) -> None:
        (self.dir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    def stages(self) -> list:
        """DVC's stages, dependencies first, with commands resolved from the params as they are now."""
        import networkx as nx
        from dvc.repo import Repo

        with contextlib.chdir(self.dir), Repo(".") as repo:
            graph = repo.index.graph
            return [s for s in reversed(list(nx.topological_sort(graph))) if hasattr(s, "cmd")]

    # ---- runs
    def run(self, stage, fresh: bool = False) -> tuple[str | None, set[str]]:
        """Run a stage's command in this process (as DVC would start it); returns (error line or None, the
        project files imported, when `fresh`: every project module unloaded first)."""
        from pipeline.core.stage import command

        words = shlex.split(stage.cmd)
        module, args = words[words.index("-m") + 1], words[words.index("-m") + 2:]
        if fresh:
            for name in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
                del sys.modules[name]
        before = set(sys.modules)
        fresh_process_state()
        mod = importlib.import_module(module)
        if hasattr(mod, "preload_allocator"):  # it re-executes the program: in a test process, not again
            mod.preload_allocator = lambda *a: None
        err, argv = io.StringIO(), sys.argv
        sys.argv = [module, *args]  # what the program sees (the train stage relaunches itself with it)
        with contextlib.chdir(self.dir), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                command(mod.main, whole_process=False)(args, standalone_mode=False)
                error = None
            except SystemExit as e:
                error = (err.getvalue().strip().splitlines() or [f"exit {e.code}"])[-1] if e.code else None
            except Exception as e:  # a traceback a user would see: the test fails on it
                error = f"TRACEBACK {type(e).__name__}: {e} | {traceback.format_exc()[-1500:]}"
            finally:
                sys.argv = argv
        files = {Path(sys.modules[m].__file__).resolve().relative_to(ROOT).as_posix() for m in set(sys.modules) - before
                 if (m == "pipeline" or m.startswith("pipeline.")) and getattr(sys.modules[m], "__file__", None)}
        return error, files

    def outputs(self, stage) -> dict[str, str | None]:
        """Each of a stage's outputs (outs, metrics, plots) and its DVC hash (None when missing)."""
        from pipeline.core.lineage import digest

        return {str(o.def_path): (digest(self.dir / str(o.def_path)) if (self.dir / str(o.def_path)).exists()
                                  else None) for o in stage.outs}

    def status(self) -> set[str]:
        """The stages DVC's status names as changed."""
        from dvc.repo import Repo

        with contextlib.chdir(self.dir), Repo(".") as repo:
            return set(repo.status())

    def commit(self) -> None:
        """`dvc commit` of every stage; keeps each stage's deps as dvc.lock records them (path -> md5)."""
        from dvc.repo import Repo

        with contextlib.chdir(self.dir), Repo(".") as repo:
            repo.commit(force=True)
        lock = yaml.safe_load((self.dir / "dvc.lock").read_text())["stages"]
        self.lock_deps = {name: {d["path"]: d["md5"] for d in s.get("deps", [])} for name, s in lock.items()}

    def save_outputs(self, stages) -> None:
        for s in stages:
            for o in s.outs:
                src, dst = self.dir / str(o.def_path), self.backup / str(o.def_path)
                dst.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)

    def restore(self, stages) -> None:
        """params.yaml and every output as committed; no checkpoint left behind."""
        self.write_params(self.params)
        shutil.rmtree(self.dir / "checkpoints", ignore_errors=True)
        for s in stages:
            for o in s.outs:
                dst, src = self.dir / str(o.def_path), self.backup / str(o.def_path)
                if dst.is_dir():
                    shutil.rmtree(dst)
                elif dst.exists():
                    dst.unlink()
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def baseline(project: Project) -> tuple[list, dict, dict]:
    """Every stage once, each with the project modules unloaded first; committed. Returns the stages, the
    files each imported and each one's outputs."""
    stages = project.stages()
    imports, outs = {}, {}
    for s in stages:
        error, files = project.run(s, fresh=True)
        if error:
            raise RuntimeError(f"baseline: stage {s.name} failed: {error}")
        imports[s.name] = sorted(files)
        outs[s.name] = project.outputs(s)
    project.commit()
    if project.status():
        raise RuntimeError(f"baseline: dvc status is not clean after the commit: {project.status()}")
    project.save_outputs(stages)
    return stages, imports, outs


def perturb(project: Project, stages: list, outs: dict, key: str, value) -> dict:
    """Set one key, then: DVC's verdict and the real changes, stage by stage (see the module docstring)."""
    from pipeline.core.lineage import digest

    t0 = time.time()
    raw = put(project.params, key, value)
    project.write_params(raw)
    direct = project.status()
    timing = {"status": round(time.time() - t0, 2)}
    now = {s.name: s for s in project.stages()}

    def producer(dep: str) -> str | None:  # the stage whose output is `dep` or holds it
        return next((name for name, o in outs.items() for path in o if dep == path or dep.startswith(path + "/")),
                    None)

    changed, reran, result = set(), set(), {"value": value, "direct": sorted(direct), "errors": {}}
    for s in stages:
        ups = {producer(str(d.def_path)) for d in now[s.name].deps} - {None}
        # as DVC decides once the stages before it have run: a dep whose hash differs from dvc.lock's
        upstream_changed = any(digest(project.dir / path) != md5 for path, md5 in project.lock_deps[s.name].items()
                               if producer(path) and (project.dir / path).exists())
        blocked = sorted(ups & set(result["errors"]))
        if blocked:
            result["errors"][s.name] = f"not run: {blocked[0]} failed"
            continue
        if s.name in direct or upstream_changed:
            reran.add(s.name)
        t1 = time.time()
        error, _ = project.run(now[s.name])
        timing[s.name] = round(time.time() - t1, 2)
        if error:
            result["errors"][s.name] = error
            changed.add(s.name)
        elif project.outputs(now[s.name]) != outs[s.name]:
            changed.add(s.name)
    result.update(changed=sorted(changed), reran=sorted(reran), stale=sorted(changed - reran),
                  wasted=sorted(reran - changed - set(result["errors"])))
    t1 = time.time()
    project.restore(stages)
    timing["restore"] = round(time.time() - t1, 2)
    result["seconds"] = timing
    return result


def code_sensitivity(project: Project, imports: dict, under: str = "pipeline/") -> dict:
    """For every project file (under `under`): the stages DVC's status names after a comment is appended to it,
    against the stages that imported it."""
    out = {}
    for f in sorted(ROOT.glob("pipeline/**/*.py")) + sorted(ROOT.glob("pipeline/**/*.jinja")):
        rel = f.relative_to(ROOT).as_posix()
        if not rel.startswith(under):
            continue
        target = project.dir / rel
        original = target.read_text()
        target.write_text(original + ("\n# touched\n" if rel.endswith(".py") else "{# touched #}\n"))
        marked = project.status()
        target.write_text(original)
        importers = sorted(s for s, files in imports.items() if rel in files)
        out[rel] = {"marked": sorted(marked), "imported_by": importers}
    return out


# ---- the fleet (fleet/dvc.yaml): the same rules, adapter by adapter ------------------------------------

# two adapters of different tasks; b overrides train.lr, so a shared train.lr must rerun a's train only
FLEET = {"a": {"task": "classification", "data": {"train": "data/example/sentiment_train.jsonl",
                                                   "validation": "data/example/sentiment_validation.jsonl"},
               "format": {"template": "prompts/sentiment.jinja"}, "train": {"method": "lora"}},
         "b": {"task": "instruction", "data": {"train": "data/example/instruction_train.jsonl",
                                               "validation": "data/example/instruction_validation.jsonl"},
               "format": {"template": "prompts/alpaca.jinja"}, "train": {"method": "lora", "lr": 0.02}}}
# shared keys whose reruns the fleet must mirror (root stages read them; none is overridden but train.lr by b)
FLEET_KEYS = ("seed", "task", "labels", "data.license", "validate.min_chars", "format.system_prompt",
              "tokenize.max_length", "train.lr", "train.epochs", "train.lora.r", "evaluate.samples", "export.atol",
              "gguf.min_agreement", "serve.batch_size", "base.dtype")


def _overrides(entry: dict, key: str) -> bool:
    node = entry
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


class Fleet(Project):
    """The scratch project of Project (root pipeline, classification) with fleet/dvc.yaml and two adapters."""

    def create(self) -> None:
        super().create()
        d = self.dir
        (d / "fleet").mkdir()
        shutil.copy(ROOT / "fleet" / "dvc.yaml", d / "fleet" / "dvc.yaml")
        for split, n in ROWS.items():
            lines = (ROOT / "data" / "example" / f"instruction_{split}.jsonl").read_text().splitlines(True)[:n]
            (d / "data" / "example" / f"instruction_{split}.jsonl").write_text("".join(lines))
        self.adapters = copy.deepcopy(FLEET)
        self.write_fleet(self.adapters)

    def write_fleet(self, adapters: dict) -> None:
        (self.dir / "fleet" / "params.yaml").write_text(yaml.safe_dump({"adapters": adapters}, sort_keys=False))

    def verdict(self) -> set[str]:
        """The stages DVC names once the fleet stage has rewritten the adapters' params (as `dvc repro` runs it
        first): each as `stage` (root) or `stage@adapter`; the fleet stage itself left out."""
        stage = next(s for s in self.stages() if s.addressing.endswith(":fleet"))
        error, _ = self.run(stage)
        if error:
            raise RuntimeError(f"fleet stage: {error}")
        return {name.split(":")[-1] for name in self.status()} - {"fleet"}


def fleet_rules(scratch: Path) -> dict:
    """The rerun rules of the fleet, measured: each case's stages DVC names against the expected ones."""
    project = Fleet(scratch, "classification")
    project.create()
    stages, imports, _ = baseline(project)
    cases = {}

    def case(name: str, expected, edit, undo) -> None:
        """`expected`: the stages, or a function of the root stages DVC names for the same edit."""
        edit()
        got = project.verdict()
        undo()
        left = project.verdict()
        want = expected({s for s in got if "@" not in s}) if callable(expected) else expected
        cases[name] = {"expected": sorted(want), "got": sorted(got), "after_undo": sorted(left)}

    keys = leaves(project.params)
    for key in FLEET_KEYS:
        value = next(v for v in alternatives(key, keys[key], project.dir) if valid(put(project.params, key, v)) is None)
        # each root stage DVC reruns, and the same stage of every adapter that takes the key from params.yaml
        case(f"params.yaml {key}", lambda root, key=key: root | {
            f"{s}@{a}" for s in root - {"base"} for a, e in FLEET.items() if not _overrides(e, key)},
            lambda key=key, value=value: project.write_params(put(project.params, key, value)),
            lambda: project.write_params(project.params))

    def put_adapter(name, key, value):
        return lambda: project.write_fleet({**project.adapters, name: put(project.adapters[name], key, value)})

    def reset_fleet():
        project.write_fleet(project.adapters)

    case("adapters.b.train.lr", {"train@b"}, put_adapter("b", "train.lr", 0.03), reset_fleet)
    case("adapters.a.train.lora", {"train@a"}, lambda: project.write_fleet(
        {**project.adapters, "a": {**project.adapters["a"], "train": {"method": "lora", "lora": {"r": 4}}}}),
        reset_fleet)
    added = {f"{s.addressing.split(':')[-1].split('@')[0]}@c" for s in stages if "@a" in s.addressing}
    case("a new adapter c", added, lambda: project.write_fleet({**project.adapters, "c": FLEET["a"]}), reset_fleet)
    data = project.dir / "data" / "example" / "instruction_train.jsonl"
    text = data.read_text()
    case("b's data file", {"validate@b"}, lambda: data.write_text(text + text.splitlines(True)[0]),
         lambda: data.write_text(text))
    template = project.dir / "prompts" / "alpaca.jinja"
    jinja = template.read_text()
    case("b's template", {"format@b"}, lambda: template.write_text(jinja + "{# edited #}\n"),
         lambda: template.write_text(jinja))
    task_code = project.dir / "pipeline" / "tasks" / "instruction.py"
    code = task_code.read_text()
    b_stages = {f"{s.addressing.split(':')[-1]}" for s in stages if s.addressing.endswith("@b")
                and "pipeline/tasks/instruction.py" in {str(d.def_path) for d in s.deps}}
    case("b's task module", b_stages, lambda: task_code.write_text(code + "\n# touched\n"),
         lambda: task_code.write_text(code))
    fleet_stage = next(s for s in stages if s.addressing.endswith(":fleet"))
    declared = {str(d.def_path) for d in fleet_stage.deps if str(d.def_path).startswith("pipeline/")}
    return {"cases": cases, "fleet_stage": {"declared": sorted(declared),
                                            "imported": imports[fleet_stage.name]},
            "stages": sorted(s.addressing for s in stages)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", required=True)
    ap.add_argument("--keys", default="all", help="all | fast (without SLOW_KEYS) | comma-separated keys")
    ap.add_argument("--out", required=True)
    ap.add_argument("--scratch", required=True)
    ap.add_argument("--code", nargs="?", const="pipeline/", default=None,
                    help="also touch every project file (those under this folder: pipeline/tasks/)")
    ap.add_argument("--fleet", action="store_true", help="the fleet's rerun rules instead (fleet_rules)")
    a = ap.parse_args()
    if a.fleet:
        Path(a.out).write_text(json.dumps(fleet_rules(Path(a.scratch)), indent=1))
        return
    t0 = time.time()
    project = Project(Path(a.scratch), a.task)
    project.create()
    stages, imports, outs = baseline(project)
    report = {"task": a.task, "imports": imports, "keys": {}, "skipped": {},
              "reports": {f.relative_to(project.dir).as_posix(): json.loads(f.read_text())
                          for f in sorted((project.dir / "reports").glob("**/*.json"))}}
    keys = leaves(project.params)
    wanted = (list(keys) if a.keys == "all" else [k for k in keys if k not in SLOW_KEYS] if a.keys == "fast"
              else [k for given in a.keys.split(",") for k in keys if k == given or k.startswith(given + ".")])
    for key in wanted:
        for value in alternatives(key, keys[key], project.dir):
            reason = valid(put(project.params, key, value))
            if reason is None:
                report["keys"][key] = perturb(project, stages, outs, key, value)
                break
            report["skipped"][key] = f"{value!r}: {reason}"
        else:
            report["skipped"].setdefault(key, "no other value to try")
        if key in report["keys"]:
            report["skipped"].pop(key, None)
    if a.code:
        report["code"] = code_sensitivity(project, imports, a.code)
    report["seconds"] = round(time.time() - t0, 1)
    Path(a.out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
