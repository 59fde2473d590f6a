"""The stage contract: a stage reads only the params its dvc.yaml entry lists (enforced by its view), its
dvc.yaml params and code deps are generated from its code (drift fails), the house rules that make the
code deps exact hold, and, measured on the tiny pipeline (tests/contract_harness.py), every params key
and every project file reruns the stages whose outputs it changes and no stage is left stale."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, make_params

from pipeline import dvcspec, tasks
from pipeline.contract import view
from pipeline.core.lineage import md5_file
from pipeline.core.params import UndeclaredParam
from pipeline.stages import format as fmt

PIPELINE = ROOT / "pipeline"
BENCH = ROOT / "bench"
PLUGINS = ("pipeline.tasks", "pipeline.methods", "pipeline.recipes", "pipeline.stages", "pipeline.contract",
           "pipeline.dvcspec", "pipeline.cli", "pipeline.flow", "pipeline.predict", "pipeline.report",
           "pipeline.sweep", "pipeline.verify", "pipeline.importing")


# ---- the view -------------------------------------------------------------------------------------

def test_a_stage_reads_its_declared_keys_and_nothing_else():
    p = view(make_params(), "format", fmt.READS)
    assert p.task == "classification" and p.format.chat_template is True and p.labels  # own and task's keys
    with pytest.raises(UndeclaredParam, match=r"stage format read params key 'train', which it does not declare"):
        p.train.lr  # noqa: B018 (no key under train is format's)
    with pytest.raises(UndeclaredParam, match="'validate.max_chars'"):
        p.validate.max_chars  # noqa: B018  (validate.text_field and label_field are the task's; max_chars is not)
    assert p.dump() == {"task": "classification", "labels": ["negative", "neutral", "positive"],
                        "format": {"chat_template": True, "system_prompt": None},
                        "validate": {"text_field": "sentence", "label_field": "label"}}


def test_the_task_decides_what_else_a_stage_reads():
    """tokenize.loss_on is chat's key in the tokenize stage: a classification tokenize may not read it."""
    from pipeline.stages import tokenize

    assert view(make_params(task="chat", **{"format.template": "prompts/chat.jinja"}), "tokenize",
                tokenize.READS).tokenize.loss_on == "all"
    with pytest.raises(UndeclaredParam, match="stage tokenize read params key 'tokenize.loss_on'"):
        view(make_params(), "tokenize", tokenize.READS).tokenize.loss_on  # noqa: B018


def test_an_undeclared_read_in_a_stage_fails_its_run(prepared, tiny_base, tmp_path, monkeypatch):
    """A stage whose code reads a key it does not declare fails (in a test as in a run), naming both."""
    task = tasks.get("classification")
    real = type(task).render

    def render_reading_lr(self, p, r, row, where):
        p.train.lr  # noqa: B018 - the undeclared read
        return real(self, p, r, row, where)

    monkeypatch.setattr(type(task), "render", render_reading_lr)
    with pytest.raises(UndeclaredParam, match="stage format read params key 'train'"):
        fmt.run(prepared["params"], prepared["validated"], ROOT / "prompts" / "sentiment.jinja", tiny_base,
                tmp_path / "f")
    assert not (tmp_path / "f").exists()


# ---- dvc.yaml, generated ---------------------------------------------------------------------------

def test_dvc_yaml_says_what_each_stage_reads_and_runs():
    assert dvcspec.differences(ROOT) == []


def test_drift_is_named_and_mended_by_the_generator(tmp_path):
    shutil.copytree(PIPELINE, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "env", tmp_path / "env")
    shutil.copy(ROOT / "requirements.lock", tmp_path / "requirements.lock")
    text = (ROOT / "dvc.yaml").read_text()  # edited as a person would: comments and layout stay
    fmt_at = text.index("  format:")
    text = text[:fmt_at] + text[fmt_at:].replace("    - labels\n", "", 1)  # format's params lose `labels`
    text = text.replace("    - pipeline/stages/gguf.py\n", "")
    text = text.replace("    params:\n    - base\n", "    params:\n    - base\n    - train.lr\n", 1)
    (tmp_path / "dvc.yaml").write_text(text)
    report = tmp_path / "pipeline" / "report.py"
    validate = tmp_path / "pipeline" / "stages" / "validate.py"  # an import the generator must follow
    validate.write_text(validate.read_text().replace("from pipeline import contract\n",
                                                     "from pipeline import contract, report  # noqa: F401\n"))
    assert set(dvcspec.differences(tmp_path)) >= {
        "stage format: reads params key 'labels', not in its dvc.yaml params",
        "stage gguf: runs pipeline/stages/gguf.py, not in its dvc.yaml deps",
        "stage base: dvc.yaml lists params key 'train.lr', which its code does not read",
        "stage validate: runs pipeline/report.py, not in its dvc.yaml deps"}
    assert report.exists()
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "contract", "--root", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "peftflow contract --write" in r.stdout
    comments = [line for line in (ROOT / "dvc.yaml").read_text().splitlines() if line.lstrip().startswith("#")]
    dvcspec.write(tmp_path)
    assert dvcspec.differences(tmp_path) == []
    assert "pipeline/report.py" in yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]["validate"]["deps"]
    kept = (tmp_path / "dvc.yaml").read_text()
    assert all(c in kept for c in comments)  # the hand-written comments and entries stay


def test_a_package_no_stage_runs_on_changes_no_pins_file_and_an_upgrade_changes_those_that_run_on_it(tmp_path):
    """env/<stage>.txt is the lock's pins of what the stage imports and requires: a test or remote tool added to
    the lock (moto, dvc-s3) moves no stage's pins (so nothing reruns and no record changes); a new transformers
    moves every stage that runs on it, a new pandera only those that validate rows (not base, not export)."""
    shutil.copytree(PIPELINE, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    modules = dvcspec.pinned_stages(ROOT)
    lock = (ROOT / "requirements.lock").read_text()

    dists = {stage: dvcspec.stage_distributions(tmp_path, module) for stage, module in modules.items()}

    def pins(text: str) -> dict[str, str]:
        (tmp_path / "requirements.lock").write_text(text)
        return {stage: dvcspec.env_text(tmp_path, module, dists[stage]) for stage, module in modules.items()}

    now = pins(lock)
    assert now == {stage: (ROOT / "env" / f"{stage}.txt").read_text() for stage in modules}
    pinned = "".join(now.values())
    assert {"moto==", "dvc-s3==", "pytest=="} <= {n for n in ("moto==", "dvc-s3==", "pytest==") if n in lock}
    assert not {n for n in ("pytest==", "trl==", "moto==", "dvc-s3==", "boto3==", "openai==") if n in pinned}
    added = lock + "moto==5.1.0 \\\n    --hash=sha256:00\n    # via peftflow (pyproject.toml)\n" \
                   "dvc-s3==3.2.0 \\\n    --hash=sha256:00\n    # via peftflow (pyproject.toml)\n"
    assert pins(added) == now
    version = re.search(r"^transformers==(\S+)", lock, re.M).group(1)
    upgraded = pins(lock.replace(f"transformers=={version}", "transformers==99.0"))
    assert {s for s in modules if upgraded[s] != now[s]} == {s for s in modules if "transformers==" in now[s]} != set()
    version = re.search(r"^pandera==(\S+)", lock, re.M).group(1)
    upgraded = pins(lock.replace(f"pandera=={version}", "pandera==99.0"))
    changed = {s for s in modules if upgraded[s] != now[s]}
    assert "validate" in changed and not {"base", "export"} & changed


def test_every_file_hash_the_committed_lock_records_is_the_files_own():
    """dvc.lock is made by commands (`dvc repro`, `dvc commit`), never by hand: every file dep it records (code,
    pins, templates, data kept in git) has the md5 of the file as it is, so the committed lock says what the
    committed code makes."""
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    files = [(stage, d) for stage, s in lock.items() for d in s.get("deps", []) if (ROOT / d["path"]).is_file()]
    assert len(files) > 50
    assert [f"{stage}: {d['path']}" for stage, d in files if md5_file(ROOT / d["path"]) != d["md5"]] == []


def test_file_to_stages_table_in_the_docs_is_the_generated_one():
    """docs/architecture.md's table (project file -> stages that rerun) is what dvc.yaml says."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    for f, stages in dvcspec.file_stages(ROOT, "classification").items():
        assert f"| `{f}` | {', '.join(stages)} |" in text, f


# ---- the house rules that keep the deps exact ------------------------------------------------------

PROJECT = ("pipeline", "bench")  # the packages whose modules are the project's


def project_imports(path: Path):
    """(node, imported module, inside a function) for every import of a project module in a file, those
    under `if TYPE_CHECKING:` left out."""
    tree = ast.parse(path.read_text(), str(path))

    def walk(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith(PROJECT):
                yield child, child.module, inner
                yield from ((child, f"{child.module}.{a.name}", inner) for a in child.names)
            elif isinstance(child, ast.Import):
                yield from ((child, a.name, inner) for a in child.names if a.name.startswith(PROJECT))
            yield from walk(child, inner)

    yield from walk(tree, False)


def test_core_imports_no_plug_in_and_no_module_imports_a_project_module_inside_a_function():
    """pipeline/ and bench/ alike: a module's project imports are at its top (a program that must set its process
    up first does it in a block above them, as the train stage and the benchmarks' workers do)."""
    problems = []
    for f in sorted([*PIPELINE.rglob("*.py"), *BENCH.rglob("*.py")]):
        rel = f.relative_to(ROOT).as_posix()
        for node, module, inside in project_imports(f):
            if inside:
                problems.append(f"{rel}:{node.lineno}: imports {module} inside a function")
            if rel.startswith("pipeline/core/") and module.startswith(PLUGINS):
                problems.append(f"{rel}:{node.lineno}: the library imports {module}")
    assert problems == []


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of a module graph: its strongly connected components of more than one module
    (Tarjan's algorithm), or a module that imports itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_graph() -> dict[str, set[str]]:
    """file -> the project files it imports (at the top or inside a function), over pipeline/ and bench/."""
    graph = {}
    for f in sorted([*PIPELINE.rglob("*.py"), *BENCH.rglob("*.py")]):
        files = {dvcspec.module_file(ROOT, m) for _, m, _ in project_imports(f)}
        graph[f.relative_to(ROOT).as_posix()] = {g.relative_to(ROOT).as_posix() for g in files if g and g != f}
    return graph


def test_no_import_circle_anywhere_in_the_repository():
    """Counting imports inside functions: a circle there is still two modules that cannot be read apart."""
    assert circles(import_graph()) == []
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check can fail


def test_tasks_import_no_other_task_and_stages_no_other_stage():
    """A task module imports only the library and tasks/base.py, so `pipeline/tasks/${task}.py` and what
    every task imports are its deps; a stage imports no stage."""
    for f in sorted((PIPELINE / "tasks").glob("*.py")) + sorted((PIPELINE / "stages").glob("*.py")):
        folder = f.parent.name
        own = {f"pipeline.{folder}.{f.stem}", f"pipeline.{folder}", "pipeline.tasks.base"}
        others = {m for _, m, _ in project_imports(f) if m.startswith(f"pipeline.{folder}.") and m not in own
                  and dvcspec.module_file(ROOT, m) and f.stem != "__init__"}
        assert not others, f"{f.relative_to(ROOT)} imports {others}"


def test_a_registry_loads_only_the_plug_in_named():
    code = ("import sys\nfrom pipeline import methods, tasks\ntasks.get('chat'); methods.get('lora')\n"
            "print(sorted(m for m in sys.modules if m.startswith(('pipeline.tasks.', 'pipeline.methods.'))))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(["pipeline.methods.base", "pipeline.methods.peft",
                                                     "pipeline.tasks.base", "pipeline.tasks.chat"])


# ---- measured on the tiny pipeline -----------------------------------------------------------------

FAST_KEYS = os.environ.get("PEFTFLOW_CONTRACT_KEYS", "fast")  # all: every key, the accelerate launches too
# two harnesses at once, one torch thread each: on 2 cores, 2 threads each made this fixture 350 s, not 185 s
# (2026-12-06, Intel Xeon; the tiny model gains nothing from a second thread, the other harness loses its core)
HARNESS_ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, dict]:
    """tests/contract_harness.py for every task, two at a time: the default task with every key, the others
    with theirs (every key with PEFTFLOW_CONTRACT_KEYS=all); the default task also touches every project file,
    the others the task modules (the only code deps dvc.yaml names per task, `pipeline/tasks/${task}.py`: every
    other file marks the same stages whatever the task; with `all`, every task touches every file)."""
    out = tmp_path_factory.mktemp("contract")

    def run(task: str) -> dict:
        every = task == "classification" or FAST_KEYS == "all"
        keys = FAST_KEYS if every else task_keys(task)
        r = subprocess.run([sys.executable, str(ROOT / "tests" / "contract_harness.py"), "--task", task, "--keys",
                            keys, "--code", "pipeline/" if every else "pipeline/tasks/", "--out",
                            str(out / f"{task}.json"), "--scratch", str(out / task)],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, **HARNESS_ENV})
        assert r.returncode == 0, r.stderr[-4000:]
        return json.loads((out / f"{task}.json").read_text())

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(tasks.TASKS, pool.map(run, tasks.TASKS), strict=True))


def task_keys(task: str) -> str:
    """The keys a task's stages can read differently from the default task's: its own and its stages'."""
    keys = {"task", "seed", "labels", "data.license", "format.template", "format.system_prompt",
            "train.dpo.beta", "train.dpo.steps", "train.lr", "train.method"}
    keys |= {k for stage_keys in tasks.get(task).reads.values() for k in stage_keys}
    sections = {k for k in keys if "." not in k and k in ("validate", "tokenize", "evaluate")}
    keys = (keys - sections) | {f"{s}.{k}" for s in sections for k in yaml.safe_load(
        (ROOT / "params.yaml").read_text())[s]}
    return ",".join(sorted(keys))


def test_no_params_key_leaves_a_stage_stale(measured):
    """For every key checked, the stages whose outputs change are stages DVC reruns (stale: none)."""
    stale = {(task, key): r["stale"] for task, m in measured.items() for key, r in m["keys"].items() if r["stale"]}
    tracebacks = {(task, key, stage): e for task, m in measured.items() for key, r in m["keys"].items()
                  for stage, e in r["errors"].items() if e.startswith("TRACEBACK")}
    assert not tracebacks, tracebacks
    assert not stale, stale
    checked = sum(len(m["keys"]) for m in measured.values())
    wasted = {(task, key): r["wasted"] for task, m in measured.items() for key, r in m["keys"].items() if r["wasted"]}
    print(f"\ncontract: {checked} (task, key) pairs changed, none stale; wasted reruns in {len(wasted)}:")
    for (task, key), stages in sorted(wasted.items()):
        print(f"  {task:14s} {key:32s} {', '.join(stages)}")
    skipped = {(task, key): why for task, m in measured.items() for key, why in m["skipped"].items()}
    print(f"keys with no other valid value to try: {len(skipped)}")
    for (task, key), why in sorted(skipped.items()):
        print(f"  {task:14s} {key:32s} {why[:100]}")
    assert checked >= 100


def test_every_task_runs_through_every_stage_of_the_same_dvc_yaml(measured):
    """Each task's baseline ran every dvc.yaml stage through its own program: no stage expects outputs only
    classification makes, every task's loss mask passes its audit, and each writes a GGUF."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for task, m in measured.items():
        assert list(m["imports"]) == list(spec), task
        r = m["reports"]
        audit = r["reports/tokenize.json"]["train"]["mask_audit"]
        assert audit["checked"] > 0 and audit["failed"] == 0, (task, audit)
        key = {"classification": "accuracy", "preference": "reward_accuracy"}.get(task, "eval_loss")
        assert key in r["reports/evaluate/metrics.json"]["adapter"], task
        assert r["reports/gguf.json"]["written"], task


def test_the_loss_on_case_reruns_what_it_changes(measured):
    """tokenize.loss_on on a chat pipeline: tokenize reruns and its output changes (format, which no longer
    reads it, rightly does not); before, format read it undeclared and trained on stale loss spans."""
    r = measured["chat"]["keys"]["tokenize.loss_on"]
    assert "tokenize" in r["direct"] and "tokenize" in r["changed"] and "format" not in r["changed"]
    assert r["stale"] == []


def test_each_stage_imports_exactly_its_dvc_yaml_code_deps(measured):
    """The project files each stage imported when it ran (every project module unloaded first, so lazy and
    plug-in imports count) are exactly its code deps in dvc.yaml, `${task}` filled in."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for task, m in measured.items():
        for stage, files in m["imports"].items():
            declared = {d.replace("${task}", task) for d in spec[stage]["deps"]
                        if d.startswith("pipeline/") and d.endswith(".py")}
            loadable = declared - set(files)  # the method modules a stage may load (others than this run's)
            assert set(files) <= declared, (task, stage, set(files) - declared)
            assert loadable <= {"pipeline/methods/bitfit.py", "pipeline/methods/full.py"}, (task, stage, loadable)


def test_a_touched_project_file_marks_exactly_the_stages_that_import_it(measured):
    """A comment appended to any project file: DVC's status names the stages that imported it (the method
    modules: the stages that load a method, any of them) and no other."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for task, m in measured.items():
        for f, r in m["code"].items():
            expected = set(r["imported_by"])
            if f in ("pipeline/methods/bitfit.py", "pipeline/methods/full.py", "pipeline/stages/model_card.md.jinja"):
                expected = {s for s in spec if f in spec[s]["deps"]}
            assert set(r["marked"]) == expected, (task, f, r)
    gguf = measured["classification"]["code"]
    assert gguf["pipeline/stages/gguf.py"]["marked"] == ["gguf"]
    assert gguf["pipeline/core/varlen.py"]["marked"] == ["train"]  # a file only training imports
    assert gguf["pipeline/tasks/preference.py"]["marked"] == []  # another task's module


def test_no_function_in_the_pipeline_or_the_benchmarks_is_over_60_lines_nor_a_benchmark_module_over_400():
    long = [f"{f.relative_to(ROOT)}: {n} lines" for f in sorted(BENCH.rglob("*.py"))
            if (n := len(f.read_text().splitlines())) > 400]
    for f in sorted([*PIPELINE.rglob("*.py"), *BENCH.rglob("*.py")]):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert long == []
    assert len((PIPELINE / "stages" / "train.py").read_text().splitlines()) < 100
