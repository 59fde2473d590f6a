"""Many adapters: what a fleet of N adapters costs when nothing has to run (docs/fleet.md#many-adapters).

On the tiny test model (tests/conftest.py's: a 2-layer random Llama, the example sentiment data), in a scratch
repository. The first adapter (`a000`, a LoRA) is made by `peftflow flow --fleet`; the fleet then grows to each
size of `--sizes` with adapters of the same params (`a001`, `a002`, ...): the `fleet` stage writes their params
files, their outputs are a000's copied into their folders (on one machine the same params give the same bytes:
docs/reproducibility.md) and `dvc commit` records them, so the lock is what N runs would have left at a fraction
of the time (a run costs about a minute of stage programs per adapter here; a no-op reads the lock, the params
and every file's hash, whoever made the files). With everything up to date, each no-op is timed `--repeats`
times (median): `dvc status fleet/dvc.yaml`, `dvc repro fleet/dvc.yaml` and `peftflow flow --fleet` (ephemeral
Prefect), each checked to have run nothing. DVC once committed foreach/matrix stages in quadratic time; the
per-adapter column shows whether a cost grows faster than the fleet.

    python -m bench.fleet_scale --sizes 10,25,50

Output: `bench/results/fleet_scale/<name>.{json,md}` (name: `--name`, else `tiny_<sizes>adapters_<class>`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.machine import class_tag, machine, save, table
from pipeline.core.stage import tool_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import ROOT, build_tiny_base, make_repo  # noqa: E402 - the tests' tiny model and repository

OUT = Path("bench/results/fleet_scale")
PY = sys.executable


def timed(repo: Path, *cmd: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=repo, env=tool_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {(r.stderr or r.stdout)[-2000:]}")
    return seconds, r.stdout + r.stderr


def write_fleet(repo: Path, n: int) -> None:
    """fleet/ with n adapters of the same params (the example sentiment data, a LoRA, seed 42)."""
    adapter = {"task": "classification", "seed": 42, "format": {"template": "prompts/sentiment.jinja"},
               "train": {"method": "lora"}, "data": {"train": "data/example/sentiment_train.jsonl",
                                                    "validation": "data/example/sentiment_validation.jsonl"}}
    (repo / "fleet").mkdir(exist_ok=True)
    (repo / "fleet" / "dvc.yaml").write_text((ROOT / "fleet" / "dvc.yaml").read_text())
    (repo / "fleet" / "params.yaml").write_text(yaml.safe_dump(
        {"concurrency": 2, "adapters": {f"a{i:03d}": adapter for i in range(n)}}))


def grow(repo: Path, n: int) -> float:
    """The fleet at n adapters, recorded: a000 made by the flow the first time, the new ones its copies,
    `dvc commit` of the lot. The seconds the recording took (the flow's, the first time)."""
    write_fleet(repo, n)
    if not (repo / "fleet" / "a000").exists():
        seconds, _ = timed(repo, PY, "-m", "pipeline.cli", "flow", "--fleet", "--root", ".")
        return seconds
    timed(repo, PY, "-m", "dvc", "repro", "--single-item", "fleet/dvc.yaml:fleet")  # the params files
    for i in range(1, n):
        if not (repo / "fleet" / f"a{i:03d}").exists():
            shutil.copytree(repo / "fleet" / "a000", repo / "fleet" / f"a{i:03d}", symlinks=True)
    seconds, _ = timed(repo, PY, "-m", "dvc", "commit", "--force", "fleet/dvc.yaml")
    return seconds


NO_OPS = {  # what each no-op runs, and the words that show it ran nothing
    "dvc status": ((PY, "-m", "dvc", "status", "fleet/dvc.yaml"), "Data and pipelines are up to date."),
    "dvc repro": ((PY, "-m", "dvc", "repro", "fleet/dvc.yaml"), "Data and pipelines are up to date."),
    "peftflow flow --fleet": ((PY, "-m", "pipeline.cli", "flow", "--fleet", "--root", "."), "nothing to do"),
}


def size(repo: Path, n: int, repeats: int) -> dict:
    """The fleet at n adapters: the seconds `dvc commit` took to record it, then each no-op's median seconds."""
    row = {"adapters": n, "stages": 7 * n + 2, "commit_seconds": round(grow(repo, n), 1)}
    for name, (cmd, quiet) in NO_OPS.items():
        runs = []
        for _ in range(repeats):
            seconds, out = timed(repo, *cmd)
            if quiet not in out:
                raise RuntimeError(f"{name} at {n} adapters did something:\n{out[-3000:]}")
            runs.append(seconds)
        row[name] = {"median_s": round(statistics.median(runs), 2), "runs_s": [round(s, 2) for s in runs]}
    print(json.dumps(row), flush=True)
    return row


def markdown(r: dict) -> str:
    """The result's table: per fleet size, the commit's seconds and each no-op's, per adapter and its growth."""
    first = r["sizes"][0]
    rows = []
    for row in r["sizes"]:
        cells = []
        for k in NO_OPS:
            per, per0 = row[k]["median_s"] / row["adapters"], first[k]["median_s"] / first["adapters"]
            cells.append(f"{row[k]['median_s']} ({per:.3f}, {per / per0:.2f}x)")
        rows.append([f"{row['adapters']} ({row['stages']})", row["commit_seconds"], *cells])
    return "\n".join([f"# No-op cost of a fleet of N adapters ({r['machine']}, {r['date']})", "",
                      f"Tiny test model; medians of {r['repeats']} runs; per adapter: the median divided by N, and "
                      f"its growth from {first['adapters']} adapters. The first adapter made by `peftflow flow "
                      f"--fleet` in {r['first_adapter_s']} s; the others its copies, recorded by `dvc commit --force "
                      "fleet/dvc.yaml` (every stage of the fleet: its seconds in the second column).", "",
                      table(["adapters (stages)", "dvc commit s", *(f"{k}: s (per adapter, x)" for k in NO_OPS)],
                            rows, "r" * (2 + len(NO_OPS)))]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,50")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name")
    a = ap.parse_args()
    sizes = sorted(int(x) for x in a.sizes.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="fleet-scale-"))
    try:
        repo = make_repo(tmp / "repo", build_tiny_base(tmp / "tiny"))
        made = grow(repo, 1)  # a000, by the flow
        rows = [size(repo, n, a.repeats) for n in sizes]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "repeats": a.repeats,
         "first_adapter_s": round(made, 1), "sizes": rows}
    save(OUT, a.name or f"tiny_{'-'.join(map(str, sizes))}adapters_{class_tag()}", r, markdown(r))


if __name__ == "__main__":
    main()
