"""Many adapters: what a fleet of N adapters costs when nothing has to run (docs/fleet.md#many-adapters).

On the tiny test model (tests/conftest.py's: a 2-layer random Llama, the example sentiment data), in a scratch
repository, the fleet grows to each size of `--sizes` (adapters `a000`, `a001`, ..., each a LoRA of its own
seed), its new adapters made by `peftflow flow --fleet` (2 at a time); then, with everything up to date, each
no-op is timed `--repeats` times (median): `dvc status fleet/dvc.yaml`, `dvc repro fleet/dvc.yaml` and
`peftflow flow --fleet` (ephemeral Prefect), each checked to have run nothing. DVC once committed
foreach/matrix stages in quadratic time; the per-adapter column shows whether the cost grows faster than the
fleet.

    python -m bench.fleet_scale --sizes 10,50

Output: `bench/results/fleet_scale/<name>.{json,md}` (name: `--name`, else `tiny_<sizes>_<class>`).
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

from bench.machine import machine, save
from pipeline.core.lineage import cpu_isa
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
    adapters = {f"a{i:03d}": {"task": "classification", "seed": i, "format": {"template": "prompts/sentiment.jinja"},
                              "train": {"method": "lora"},
                              "data": {"train": "data/example/sentiment_train.jsonl",
                                       "validation": "data/example/sentiment_validation.jsonl"}} for i in range(n)}
    (repo / "fleet").mkdir(exist_ok=True)
    (repo / "fleet" / "dvc.yaml").write_text((ROOT / "fleet" / "dvc.yaml").read_text())
    (repo / "fleet" / "params.yaml").write_text(yaml.safe_dump({"concurrency": 2, "adapters": adapters}))


NO_OPS = {  # what each no-op runs, and the words that show it ran nothing
    "dvc status": ((PY, "-m", "dvc", "status", "fleet/dvc.yaml"), "Data and pipelines are up to date."),
    "dvc repro": ((PY, "-m", "dvc", "repro", "fleet/dvc.yaml"), "Data and pipelines are up to date."),
    "peftflow flow --fleet": ((PY, "-m", "pipeline.cli", "flow", "--fleet", "--root", "."), "nothing to do"),
}


def size(repo: Path, n: int, repeats: int) -> dict:
    """The fleet at n adapters: the seconds its new adapters took, then each no-op's median seconds."""
    write_fleet(repo, n)
    build, _ = timed(repo, PY, "-m", "pipeline.cli", "flow", "--fleet", "--root", ".")
    row = {"adapters": n, "stages": 7 * n + 2, "build_seconds": round(build, 1)}
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


def table(r: dict) -> str:
    first = r["sizes"][0]
    lines = [f"# No-op cost of a fleet of N adapters ({r['machine']}, {r['date']})", "",
             f"Tiny test model; medians of {r['repeats']} runs; per adapter: the median divided by N, and its growth "
             f"from {first['adapters']} adapters.",
             "", "| adapters (stages) | made in s | " + " | ".join(f"{k}: s (per adapter, x)" for k in NO_OPS) + " |",
             "|---:|---:|" + "---:|" * len(NO_OPS)]
    for row in r["sizes"]:
        cells = []
        for k in NO_OPS:
            per, per0 = row[k]["median_s"] / row["adapters"], first[k]["median_s"] / first["adapters"]
            cells.append(f"{row[k]['median_s']} ({per:.3f}, {per / per0:.2f}x)")
        lines.append(f"| {row['adapters']} ({row['stages']}) | {row['build_seconds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
        rows = [size(repo, n, a.repeats) for n in sizes]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "repeats": a.repeats, "sizes": rows}
    save(OUT, a.name or f"tiny_{'-'.join(map(str, sizes))}_{cpu_isa()}", r, table(r))


if __name__ == "__main__":
    main()
