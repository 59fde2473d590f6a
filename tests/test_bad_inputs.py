"""Every kind of bad input gives one line on stderr naming the file, row and field (or the params
key), a non-zero exit code, and no output written. Each case runs the stage as DVC runs it:
`python -m pipeline.stages.<stage> ...` in a workspace prepared on the tiny model. Last, a fault test:
SIGKILL during training, then `dvc repro` resumes from the checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLE, ROOT, TINY_TRAIN, build_tiny_base, copy_repo, prompt_of, raw_params, sh

GOOD = [json.loads(x) for x in (EXAMPLE / "sentiment_train.jsonl").read_text().splitlines()[:40]]
VAL = [json.loads(x) for x in (EXAMPLE / "sentiment_validation.jsonl").read_text().splitlines()[:10]]


@pytest.fixture(scope="module")
def ready(tmp_path_factory, tiny_base):
    """A workspace with params, data and every stage's output, made once for all cases."""
    from pipeline.contract import parse as parse_params
    from pipeline.stages import format as fmt
    from pipeline.stages import tokenize, train, validate

    w = tmp_path_factory.mktemp("ws")
    shutil.copytree(tiny_base, w / "base")
    shutil.copytree(ROOT / "prompts", w / "prompts")
    params = raw_params(**{**TINY_TRAIN, "base.model": str(tiny_base), "base.gguf_file": None,
                           "validate.max_reject_ratio": 0.0, "train.epochs": 1})
    (w / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write(w / "train.jsonl", GOOD)
    write(w / "val.jsonl", VAL)
    p = parse_params(params)
    validate.run(p, w / "train.jsonl", w / "val.jsonl", w / "validated", w / "v.json")
    fmt.run(p, w / "validated", w / "prompts" / "sentiment.jinja", w / "base", w / "formatted")
    tokenize.run(p, w / "formatted", w / "base", w / "tokenized")
    train.run(p, w / "tokenized", prompt_of(w / "tokenized"), w / "base", w / "adapter", w / "live", w / "ckpt")
    return w


def write(path: Path, rows: list) -> Path:
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return path


def stage(w: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PEFTFLOW_VERBOSE")}
    return subprocess.run([sys.executable, "-m", f"pipeline.stages.{name}", *args], cwd=w, capture_output=True,
                          text=True, env=env)


def validate_cmd(w: Path):
    return stage(w, "validate", "--train", "train.jsonl", "--validation", "val.jsonl", "--out", "out",
                 "--metrics", "out.json")


def set_params(w: Path, **overrides) -> None:
    raw = yaml.safe_load((w / "params.yaml").read_text())
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        for k in parents:
            node = node[k]
        node[last] = value
    (w / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def bad_data(train_rows=None, val_rows=None):
    def setup(w):
        write(w / "train.jsonl", train_rows if train_rows is not None else GOOD)
        write(w / "val.jsonl", val_rows if val_rows is not None else VAL)
        return validate_cmd(w), w / "out" / "train.jsonl"
    return setup


def bad_template(text):
    def setup(w):
        (w / "prompts" / "bad.jinja").write_text(text)
        return stage(w, "format", "--validated", "validated", "--template", "prompts/bad.jinja",
                     "--tokenizer", "base", "--out", "out"), w / "out"
    return setup


def bad_params(**overrides):
    def setup(w):
        set_params(w, **overrides)
        return train_cmd(w), w / "out"
    return setup


def train_cmd(w: Path, *more: str):
    return stage(w, "train", "--data", "tokenized", "--prompt", "formatted/format.json", "--base", "base", "--out",
                 "out", "--live", "live2", "--checkpoints", "ckpt2", *more)


def other_params_file(w: Path):
    """A params error names the file the stage read (`--params`), not params.yaml."""
    raw = yaml.safe_load((w / "params.yaml").read_text())
    raw["train"]["bacth_size"] = 4
    (w / "exp.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return train_cmd(w, "--params", "exp.yaml"), w / "out"


LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}BODY{% endfor %}{% endfor %}"


def evaluate_cmd(w: Path, base: str = "base"):
    return stage(w, "evaluate", "--base", base, "--adapter", "adapter", "--formatted", "formatted",
                 "--tokenized", "tokenized", "--out", "out")


def missing_base(w):
    set_params(w, **{"base.model": str(w / "no_such_model")})
    return stage(w, "base", "--out", "out"), w / "out"


def truncated_base_weights(w):
    f = w / "base" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return train_cmd(w), w / "out"


def corrupted_adapter(w):
    f = w / "adapter" / "adapter_model.safetensors"
    f.write_bytes(b"\x00" * 64)
    return evaluate_cmd(w), w / "out"


def pickle_adapter(w):
    import torch
    from safetensors.torch import load_file

    f = w / "adapter" / "adapter_model.safetensors"
    torch.save(load_file(str(f)), w / "adapter" / "adapter_model.bin")
    f.unlink()
    return evaluate_cmd(w), w / "out"


def adapter_of_another_shape(w):
    config = json.loads((w / "adapter" / "adapter_config.json").read_text())
    (w / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))  # the weights are r=8
    return evaluate_cmd(w), w / "out"


def other_base(w):
    build_tiny_base(w / "base_other", seed=1)
    return evaluate_cmd(w, "base_other"), w / "out"


G = GOOD
CASES = {
    "malformed jsonl line": (bad_data(G[:2] + [b'{"sentence": "Sales rose", \n'] + G[2:]), ["train.jsonl row 3: malformed JSON"]),
    "missing field": (bad_data(G[:4] + [{"sentence": "Sales rose sharply ."}]), ["row 5 field 'label': missing field"]),
    "wrong type": (bad_data(G[:1] + [{"sentence": 12345, "label": "neutral"}]), ["row 2 field 'sentence': expected text, got a number"]),
    "unknown label": (bad_data(G[:3] + [{"sentence": "Sales rose .", "label": "bullish"}]), ["row 4 field 'label': unknown label"]),
    "empty text": (bad_data([{"sentence": "  ", "label": "neutral"}] + G), ["row 1 field 'sentence': empty text"]),
    "invalid utf-8": (bad_data(G[:6] + [b'{"sentence": "Caf\xe9 sales", "label": "neutral"}\n']), ["row 7: invalid UTF-8"]),
    "enormous row": (bad_data(G[:2] + [{"sentence": "profit " * 200_000, "label": "positive"}]), ["row 3 field 'sentence': over-long text"]),
    "duplicate rows": (bad_data(G + [G[5]]), ["row 41 field 'sentence': duplicate of row 6"]),
    "train/validation leakage": (bad_data(G, VAL[:3] + [G[7]]), ["val.jsonl row 4 field 'sentence': leakage: also in train.jsonl row 8"]),
    "template undefined variable": (bad_template("{% block prompt %}{{ sentense }}{% endblock %}{% block response %}{{ label }}{% endblock %}"),
                                    ["prompts/bad.jinja", "row 1", "'sentense' is undefined"]),
    "template reaching python internals": (bad_template("{% block prompt %}{{ sentence.__class__.__mro__[1].__subclasses__() }}{% endblock %}{% block response %}x{% endblock %}"),
                                           ["prompts/bad.jinja", "row 1", "sandbox"]),
    "template looping without end": (bad_template("{% block prompt %}" + LOOPS.replace("BODY", "") + "{% endblock %}"
                                                  "{% block response %}{{ label }}{% endblock %}"),
                                     ["prompts/bad.jinja", "row 1", "prompt block took over 2 s"]),
    "template growing without end": (bad_template("{% block prompt %}" + LOOPS.replace("BODY", "{{ sentence }}") +
                                                  "{% endblock %}{% block response %}{{ label }}{% endblock %}"),
                                     ["prompts/bad.jinja", "row 1", "renders over 1,000,000 characters"]),
    "params of another file": (other_params_file, ["error: exp.yaml: unknown key 'train.bacth_size'"]),
    "params typo": (bad_params(**{"train.bacth_size": 4}), ["unknown key 'train.bacth_size'", "Did you mean 'batch_size'"]),
    "unknown method": (bad_params(**{"train.method": "lora2"}), ["'train.method' is 'lora2'; valid choices:", "lora"]),
    "target modules match nothing": (bad_params(**{"train.lora": {"r": 4, "target_modules": ["attn"]}}),
                                     ["train.lora.target_modules ['attn'] matches no supported module", "q_proj"]),
    "missing base model path": (missing_base, ["base.model", "no_such_model", "no such folder"]),
    "truncated safetensors": (truncated_base_weights, ["base/model.safetensors: sha256 differs", "corrupted"]),
    "corrupted adapter safetensors": (corrupted_adapter, ["adapter: cannot load the adapter"]),
    "adapter of another shape": (adapter_of_another_shape, [
        "adapter: cannot load the adapter: its weights do not fit adapter_config.json and the base:",
        "tensors differ in shape, first model.layers.0.self_attn.q_proj.lora_A.default.weight: [8, ",
        "likely the rank: the file holds rank-8 weights, adapter_config.json says r=4"]),
    "pickle adapter": (pickle_adapter, ["adapter: no adapter_model.safetensors; pickle weights are refused"]),
    "adapter for a different base model": (other_base, ["adapter was trained on base weights", "base_other holds"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_writes_nothing(case, ready, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(ready, w)
    setup, expected = CASES[case]
    r, output = setup(w)
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-2000:]}"
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for text in expected:
        assert text in errors[0], errors[0]
    assert len(errors[0]) < 600, f"{len(errors[0])} characters: {errors[0][:600]}"
    assert not any(x in r.stderr for x in ("Warning", "Failed to load", "warnings.warn")), r.stderr[-2000:]
    assert not output.exists(), f"{output} was written"
    assert not [p for p in w.rglob("*.tmp")], "temporary files left behind"


KILLER = """
import json, os, signal, sys
from pathlib import Path

_POINTS = json.loads(Path(os.environ["PEFTFLOW_KILL_POINTS"]).read_text())
_DONE = Path(os.environ["PEFTFLOW_KILL_DONE"])
_SEEN = {}


def _hook(event, args):
    if event != "open" or not args or not isinstance(args[0], str) or not args[1] or "w" not in str(args[1]):
        return
    program = " ".join(sys.orig_argv)
    for name, point in _POINTS.items():
        if f"pipeline.stages.{point['stage']}" not in program or (_DONE / name).exists():
            continue
        if not all(part in args[0] for part in point["path"]):
            continue
        if point.get("after") and not Path(point["after"]).exists():
            continue
        _SEEN[name] = _SEEN.get(name, 0) + 1
        if _SEEN[name] == point.get("nth", 1):
            (_DONE / name).touch()
            os.kill(os.getpid(), signal.SIGKILL)


sys.addaudithook(_hook)
"""
# where each stage is killed (SIGKILL, no cleanup), each once: the file a write opens (all parts in its path)
KILL_POINTS = {
    "train, before its first checkpoint": {"stage": "train", "path": ["reports/train/metrics.json"], "nth": 3},
    "train, while a checkpoint is written": {"stage": "train", "path": ["checkpoints/.train.", "checkpoint.json"]},
    "train, just after a checkpoint": {"stage": "train", "path": ["reports/train/metrics.json"],
                                       "after": "checkpoints/train/checkpoint.json"},
    "train, while the adapter is written": {"stage": "train", "path": ["models/.adapter.", "peftflow.json"]},
    "evaluate, while writing": {"stage": "evaluate", "path": ["reports/.evaluate.", "predictions.json"]},
    "export, while writing": {"stage": "export", "path": ["models/.export.", "README.md"]},
    "gguf, while writing": {"stage": "gguf", "path": ["models/.gguf.", "Modelfile"]},
}


@pytest.mark.slow
def test_kill_9_at_every_point_then_repro_gives_the_same_dvc_lock(history, tmp_path):
    """Every stage's outputs gone, then `dvc repro` until it succeeds, each stage SIGKILLed at the points above
    (before a checkpoint, while one is written, just after one, while the adapter, the evaluation, the export
    and the GGUF are written): resumed or rerun, every output comes out as in the uninterrupted run, hash for
    hash (the committed dvc.lock), and nothing half written is left where DVC looks."""
    repo = copy_repo(history["root"], tmp_path / "repo")
    for out in ("models", "data/validated", "data/formatted", "data/tokenized", "reports", "checkpoints",
                ".dvc/cache"):  # (with the cache, DVC would check the outputs out instead of running the stages)
        shutil.rmtree(repo / out, ignore_errors=True)
    hooks, done = tmp_path / "hooks", tmp_path / "done"
    hooks.mkdir()
    done.mkdir()
    (hooks / "sitecustomize.py").write_text(KILLER)
    (tmp_path / "points.json").write_text(json.dumps(KILL_POINTS))
    env = {**os.environ, "PYTHONPATH": str(hooks), "PEFTFLOW_KILL_POINTS": str(tmp_path / "points.json"),
           "PEFTFLOW_KILL_DONE": str(done), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    runs = []
    for _ in range(len(KILL_POINTS) + 1):
        r = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
        runs.append(r)
        if r.returncode == 0:
            break
    assert runs[-1].returncode == 0, runs[-1].stdout[-3000:] + runs[-1].stderr[-3000:]
    ran_stages = [[line for line in r.stdout.splitlines() if line.startswith(("Running stage", "ERROR"))] for r in runs]
    assert sorted(p.name for p in done.iterdir()) == sorted(KILL_POINTS), ran_stages
    assert len(runs) == len(KILL_POINTS) + 1
    facts = json.loads((repo / "reports" / "train" / "run.json").read_text())
    assert facts["resumed_from_step"] == 20  # the last run resumed from the step-20 checkpoint
    assert (repo / "dvc.lock").read_text() == sh(repo, "git", "show", "HEAD:dvc.lock")
    assert not [p for p in repo.rglob(".*.tmp") if ".dvc" not in p.parts], "half-written output left behind"
    assert "Data and pipelines are up to date" in sh(repo, sys.executable, "-m", "dvc", "status")


def default_sigint() -> None:
    """In the child before exec: Ctrl-C's default action, as a terminal's foreground program has it. A command started
    in the background of a shell without job control (`make test &`, some CI runners) inherits SIGINT ignored, and
    Python then installs no KeyboardInterrupt handler: the signal would be lost, as the user who ran it so asked."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_training_says_where_it_stopped_and_the_checkpoint_is_readable(ready, tmp_path):
    """SIGINT (Ctrl-C) once a checkpoint is written: one line with the step and where a rerun resumes, exit 130,
    no adapter written; the checkpoint's files are readable by others (0644 under umask 022)."""

    w = tmp_path / "w"
    shutil.copytree(ready, w)
    set_params(w, **{"train.max_steps": 2000, "train.checkpoint_every": 2})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.stages.train", "--data", "tokenized", "--prompt",
                             "formatted/format.json", "--base", "base", "--out", "out", "--live", "live2",
                             "--checkpoints", "ckpt2"], cwd=w, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, umask=0o022, preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while not (w / "ckpt2" / "checkpoint.json").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 130 and len(errors) == 1, stderr[-2000:]
    assert re.fullmatch(r"error: train: interrupted in step \d+ of 2000; a rerun \(dvc repro\) resumes from the "
                        r"checkpoint of step \d+ in ckpt2", errors[0]), errors[0]
    assert not (w / "out").exists() and "Traceback" not in stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in (w / "ckpt2").iterdir() if p.is_file()}
    assert modes["trainable.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
