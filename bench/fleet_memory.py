"""Memory and time of a command that runs the fleet (docs/fleet.md): the resident memory of its whole process
tree, sampled every 0.2 s, summed (what the machine must hold at once) and per process (no process may hold
more than one copy of the base weights), and the wall time.

    python -m bench.fleet_memory --name prefect_concurrency_2 -- peftflow flow --fleet --concurrency 2
    python -m bench.fleet_memory --name dvc_repro -- dvc repro fleet/dvc.yaml

Run it where the fleet's stages will rerun (after a change they depend on, or in a fresh clone), on a quiet
machine. Output: `bench/results/fleet_memory/<name>_<class>.{json,md}`: peak summed RSS, peak RSS of one process and
its command line, wall seconds, the base model's weights on disk beside them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bench.machine import class_tag, save, table
from pipeline.core.lineage import cpu_isa
from pipeline.core.stage import tool_env

OUT = Path("bench/results/fleet_memory")


def tree_rss(root: psutil.Process) -> list[tuple[int, str]]:
    """(RSS bytes, command line) of a process and every descendant alive now."""
    out = []
    for p in [root, *root.children(recursive=True)]:
        try:
            out.append((p.memory_info().rss, " ".join(p.cmdline())[:160]))
        except psutil.Error:  # ended between the listing and the read
            continue
    return out


def measure(cmd: list[str], every: float = 0.2) -> dict:
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=tool_env())
    top = psutil.Process(proc.pid)
    peak_sum, peak_one, who, processes = 0, 0, "", 0
    while proc.poll() is None:
        rows = tree_rss(top)
        processes = max(processes, len(rows))
        peak_sum = max(peak_sum, sum(r for r, _ in rows))
        for rss, line in rows:
            if rss > peak_one:
                peak_one, who = rss, line
        time.sleep(every)
    return {"command": " ".join(cmd), "exit_code": proc.returncode, "seconds": round(time.time() - t0, 1),
            "peak_rss_sum_mb": round(peak_sum / 2**20), "peak_rss_one_mb": round(peak_one / 2**20),
            "peak_one_command": who, "most_processes_at_once": processes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, help="what was run; the file is <name>_<class>")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    r = measure(cmd)
    weights = Path("models/base/model.safetensors")
    r["base_weights_mb"] = round(weights.stat().st_size / 2**20) if weights.exists() else None
    r["cpu"] = f"{psutil.cpu_count()} cores, {cpu_isa()}"
    save(OUT, f"{a.name}_{class_tag()}", r,
         f"# {a.name}\n\n`{r['command']}` (exit {r['exit_code']}, {r['cpu']})\n\n"
         + table(["wall s", "peak RSS, all processes", "peak RSS, one process", "processes at once",
                  "base weights on disk"],
                 [[r["seconds"], f"{r['peak_rss_sum_mb']} MB", f"{r['peak_rss_one_mb']} MB",
                   r["most_processes_at_once"], f"{r['base_weights_mb']} MB"]], "rrrrr")
         + f"\n\nThe largest process: `{r['peak_one_command']}`\n")
    sys.exit(r["exit_code"])


if __name__ == "__main__":
    main()
