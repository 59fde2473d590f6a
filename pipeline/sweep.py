"""Sweeps on DVC's experiment queue, and the comparison of what they gave.

`sweep`: one DVC experiment per point of a grid of params values times seeds, queued with DVC's own
grid syntax (`dvc exp run --queue -n NAME -S key=a,b -S seed=42,43,44`), run by `dvc queue start -j N`,
waited for with progress. Every point is an ordinary experiment: `dvc exp show`, `dvc exp apply NAME-k`.
Queued experiments run in a copy of the project under `.dvc/tmp/exps`, so a data path outside the
project (`../shared/...`) is passed as an absolute path, and a file the sweep needs that git does not
track is refused (the copy would not have it).

`compare`: reads `dvc exp show --json`, groups the experiments by their params except `seed`, and
writes a markdown table (mean ± standard deviation over seeds, and the range, of the metric and of
the train stage's time) and a plot (metric against train time, one point per group with its spread,
the best named). Higher is better for accuracy and macro-F1, lower for eval loss and perplexity.

Inputs: params.yaml, the project's git and DVC state. Outputs: DVC experiments; `<out>.md`, `<out>.png`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.audit import git
from pipeline.core.allocator import beside_env
from pipeline.core.io import atomic_write_text
from pipeline.core.stage import PipelineError, tool_env

LOWER_IS_BETTER = {"eval_loss", "perplexity"}
PATH_KEYS = ("data.train", "data.validation", "format.template")


def dvc(*args: str, root: Path, at_once: int = 1) -> subprocess.CompletedProcess:
    """DVC's command line in `root`; `at_once`: the queue workers it starts run beside each other."""
    env = tool_env()
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env={**env, **beside_env(at_once, env)},
                          text=True, capture_output=True)


def lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def portable(key: str, value: str, root: Path) -> str:
    """A path value as the queued copy of the project can read it (absolute when outside the project);
    a path inside the project must be tracked by git, or the copy would not have it."""
    path = (root / value).resolve()
    if not path.exists():
        raise PipelineError(f"sweep: {key}={value}: no such file")
    if not path.is_relative_to(root.resolve()):
        return str(path)
    rel = str(path.relative_to(root.resolve()))
    if git(root, "ls-files", "--error-unmatch", rel) is None and not (root / f"{rel}.dvc").exists():
        raise PipelineError(f"sweep: {key}={value} is not tracked by git: queued experiments run on a copy of the "
                            f"tracked files; `git add {rel}` first")
    return value


def grid_args(sets: list[str], seeds: list[int], root: Path) -> list[str]:
    """`-S` arguments for `dvc exp run --queue`: the grid as given, seeds as one more axis, path values
    made readable from the queued copy."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    given = {}
    for s in sets:
        key, sep, values = s.partition("=")
        if not sep or not values:
            raise PipelineError(f"sweep: -S {s!r}: expected KEY=VALUE or KEY=V1,V2,...")
        if key.lstrip("+") == "seed":
            raise PipelineError("sweep: seeds are an axis of their own: use --seeds")
        given[key] = values
    for key in PATH_KEYS:  # the sweep's own values, or what params.yaml has
        values = given.get(key, lookup(params, key))
        if isinstance(values, str):
            given[key] = ",".join(portable(key, v, root) for v in values.split(","))
    return [a for key, values in given.items() for a in ("-S", f"{key}={values}")] + [
        "-S", "seed=" + ",".join(str(s) for s in seeds)]


def head(root: Path) -> str:
    sha = git(root, "rev-parse", "HEAD")
    if sha is None:
        raise PipelineError(f"sweep: {root} is not a git repository with a commit (DVC experiments need one)")
    return sha


def shown(root: Path, who: str, *flags: str) -> list[dict]:
    """The experiments `dvc exp show --json FLAGS` lists (queued, running and finished), as DVC gives them."""
    r = dvc("exp", "show", "--json", *flags, root=root)
    if r.returncode:
        raise PipelineError(f"{who}: dvc exp show failed: {r.stderr.strip()[-300:]}")
    return [e for commit in json.loads(r.stdout or "[]") for e in commit.get("experiments") or []]


def states(root: Path, prefix: str, rev: str = "HEAD") -> dict[str, str]:
    """Queue state of the experiments named PREFIX-* on baseline `rev` (queued, running, success, failed)."""
    return {e["name"]: (e.get("executor") or {}).get("state") or "success"
            for e in shown(root, "sweep", "--rev", rev) if (e.get("name") or "").startswith(f"{prefix}-")}


def sweep(root: Path, name: str, sets: list[str], seeds: list[int], jobs: int, target: str, wait: bool,
          echo=print, poll: float = 15.0) -> dict[str, str]:
    """Queue the grid (times seeds) as experiments NAME-1, NAME-2, ...; start `jobs` workers; with `wait`,
    report progress until every one has finished. Returns the experiments' final states."""
    rev = head(root)  # the baseline the queued experiments derive from (HEAD may be detached)
    if states(root, name, rev):
        raise PipelineError(f"sweep: experiments named {name}-* exist already: choose another --name "
                            f"(or `dvc exp remove` them)")
    r = dvc("exp", "run", "--queue", "-n", name, *grid_args(sets, seeds, root), target, root=root)
    if r.returncode:
        raise PipelineError(f"sweep: dvc exp run --queue failed: {(r.stderr or r.stdout).strip()[-500:]}")
    queued = states(root, name, rev)
    if not queued:
        raise PipelineError(f"sweep: dvc queued nothing named {name}-* on {rev[:7]} (`dvc queue status`)")
    echo(f"sweep: {len(queued)} experiments queued ({name}-1 ... {name}-{len(queued)}), {jobs} at a time")
    r = dvc("queue", "start", "-j", str(jobs), root=root, at_once=jobs)
    if r.returncode:
        raise PipelineError(f"sweep: dvc queue start failed: {r.stderr.strip()[-500:]}")
    if not wait:
        echo("sweep: running in the background; `dvc queue status` shows progress, `peftflow compare` the results")
        return queued
    t0, last = time.time(), None
    while True:
        now = states(root, name, rev)
        counts = {s: sum(v == s for v in now.values()) for s in ("queued", "running", "success", "failed")}
        line = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        if line != last:
            echo(f"sweep: [{time.time() - t0:6.0f} s] {line}")
            last = line
        if not counts["queued"] and not counts["running"]:
            failed = sorted(n for n, s in now.items() if s == "failed")
            if failed:
                raise PipelineError(f"sweep: {len(failed)} of {len(now)} experiments failed ({', '.join(failed)}); "
                                    f"`dvc queue logs {failed[0]}` shows why")
            return now
        time.sleep(poll)


# ---- compare

def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flat(v, f"{key}.")
        else:
            out[key] = v
    return out


def experiments(root: Path, prefix: str | None = None) -> list[dict]:
    """Finished experiments on any baseline commit (optionally those named PREFIX-*) as flat params and the
    figures compared."""
    out = []
    for e in shown(root, "compare", "--all-commits"):
        name, rev = e.get("name") or "", (e.get("revs") or [{}])[0]
        if (prefix and not name.startswith(f"{prefix}-")) or rev.get("error") or not rev.get("data"):
            continue
        data = rev["data"]
        metrics = {f: (m or {}).get("data") or {} for f, m in (data.get("metrics") or {}).items()}
        ev = metrics.get("reports/evaluate/metrics.json", {}).get("adapter", {})
        if not ev:
            continue
        params = flat((data.get("params") or {}).get("params.yaml", {}).get("data", {}))
        for key in PATH_KEYS:  # a sweep's absolute path and the same file named relative are one point
            if isinstance(params.get(key), str):
                params[key] = os.path.relpath((root / params[key]).resolve(), root.resolve())
        out.append({"name": name, "params": params, "metrics": ev,
                    "seconds": metrics.get("reports/train/run.json", {}).get("seconds"),
                    "steps": metrics.get("reports/train/metrics.json", {}).get("steps")})
    return out


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def group(exps: list[dict], metric: str) -> list[dict]:
    """One entry per params point (seed aside): the params that differ between points, the seeds and
    the spread of the metric and of the train time; best first."""
    keys = sorted({k for e in exps for k in e["params"]} - {"seed"})
    varying = [k for k in keys if len({json.dumps(e["params"].get(k), sort_keys=True) for e in exps}) > 1]
    points: dict[str, dict] = {}
    for e in exps:
        if metric not in e["metrics"]:
            continue
        point = {k: e["params"].get(k) for k in varying}
        g = points.setdefault(json.dumps(point, sort_keys=True), {"point": point, "runs": []})
        g["runs"].append(e)
    out = []
    for g in points.values():
        runs = sorted(g["runs"], key=lambda e: e["params"].get("seed", 0))
        secs = [e["seconds"] for e in runs if e["seconds"] is not None]
        out.append({"point": g["point"], "experiments": [e["name"] for e in runs],
                    "seeds": [e["params"].get("seed") for e in runs], "values": [e["metrics"][metric] for e in runs],
                    "metric": spread([e["metrics"][metric] for e in runs]), "seconds": spread(secs) if secs else None,
                    "steps": runs[0]["steps"]})
    sign = 1 if metric in LOWER_IS_BETTER else -1
    return sorted(out, key=lambda g: sign * g["metric"]["mean"])


def label(point: dict) -> str:
    text = ", ".join(f"{k}={json.dumps(v) if isinstance(v, list | dict) else v}" for k, v in point.items())
    return text or "(one point)"


def table(groups: list[dict], metric: str, title: str) -> str:
    lines = [f"# {title}", "",
             f"{len(groups)} points, {sum(len(g['values']) for g in groups)} experiments. {metric}: mean ± standard "
             f"deviation over seeds [min, max]; train time: the train stage's loop (`reports/train/run.json`). "
             f"Best: **{label(groups[0]['point'])}**." if groups else "no finished experiments", "",
             f"| point | seeds | {metric} | per seed | train time | steps | experiments |",
             "|---|---:|---:|---|---:|---:|---|"]
    for k, g in enumerate(groups):
        m, s = g["metric"], g["seconds"]
        cells = [("**" + label(g["point"]) + "**") if k == 0 else label(g["point"]), str(m["n"]),
                 f"{m['mean']:.4f} ± {m['std']:.4f} [{m['min']:.4f}, {m['max']:.4f}]",
                 ", ".join(f"{v:.4f}" for v in g["values"]),
                 f"{s['mean'] / 60:.1f} ± {s['std'] / 60:.1f} min" if s else "–", str(g["steps"] or "–"),
                 ", ".join(f"`{n}`" for n in g["experiments"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(groups: list[dict], metric: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for k, g in enumerate(groups):
        s = g["seconds"] or {"mean": 0.0, "std": 0.0}
        ax.errorbar(s["mean"] / 60, g["metric"]["mean"], xerr=s["std"] / 60, yerr=g["metric"]["std"], fmt="o",
                    color="#c44e52" if k == 0 else "#4c72b0", capsize=3)
        ax.annotate(("best: " if k == 0 else "") + label(g["point"]), (s["mean"] / 60, g["metric"]["mean"]),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("train time (min), mean ± sd over seeds")
    ax.set_ylabel(f"validation {metric}, mean ± sd over seeds")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(root: Path, out: Path, name: str | None, metric: str | None) -> list[dict]:
    """Write `<out>.md` and `<out>.png` comparing the finished experiments (those named NAME-* if given)."""
    exps = experiments(root, name)
    if not exps:
        raise PipelineError(f"compare: no finished experiments{f' named {name}-*' if name else ''} with evaluate "
                            "metrics (`dvc exp show` lists what there is)")
    metric = metric or ("accuracy" if "accuracy" in exps[0]["metrics"] else "eval_loss")
    groups = group(exps, metric)
    if not groups:
        raise PipelineError(f"compare: no experiment has the metric '{metric}' (have: {', '.join(exps[0]['metrics'])})")
    title = f"Sweep {name}" if name else "Experiments"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".md"), table(groups, metric, title))
    plot(groups, metric, title, out.with_suffix(".png"))
    return groups
