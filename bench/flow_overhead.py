"""Overhead of running an all-up-to-date pipeline through the Prefect flow instead of `dvc repro`.

In the project root (run `dvc repro` first so nothing is left to do), one after another and
interleaved, `--repeats` times each: plain `dvc repro`; `peftflow flow` in Prefect's ephemeral
mode (no server configured); `peftflow flow` reporting to a local Prefect server started here on a
free loopback port. Reports the best time of each, the seconds the flow adds and the ratio.

Outputs: bench/results/flow_overhead/flow-vs-dvc-repro_<class>_<stages>stages.{json,md}.
Run: `python -m bench.flow_overhead` (or `make bench BENCH=flow_overhead`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import date
from pathlib import Path

import yaml

from bench.machine import class_tag, machine, save, table

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return time.time() - t0


def start_server(home: Path, env: dict) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env={**env, "PREFECT_HOME": str(home)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return proc, url
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise SystemExit("the Prefect server did not start")


def measure(repeats: int) -> dict[str, list[float]]:
    """Seconds of each way to run the up-to-date pipeline, `repeats` times each, interleaved after a warm-up."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    if status.returncode or json.loads(status.stdout or "{}"):
        raise SystemExit("the pipeline is not up to date: run `dvc repro` first")
    flow_cmd = [sys.executable, "-m", "pipeline.cli", "flow"]
    with tempfile.TemporaryDirectory(prefix="peftflow-prefect-") as home:
        ephemeral_env = {**env, "PREFECT_HOME": str(Path(home) / "ephemeral")}
        server, url = start_server(Path(home) / "server", env)
        server_env = {**env, "PREFECT_HOME": str(Path(home) / "server"), "PREFECT_API_URL": url}
        times: dict[str, list[float]] = {"dvc repro": [], "flow, ephemeral Prefect": [], "flow, local server": []}
        try:
            timed(flow_cmd, server_env)  # warm-up: the first run creates the flow record (and the databases)
            timed(flow_cmd, ephemeral_env)
            for _ in range(repeats):
                times["dvc repro"].append(timed([sys.executable, "-m", "dvc", "repro"], env))
                times["flow, ephemeral Prefect"].append(timed(flow_cmd, ephemeral_env))
                times["flow, local server"].append(timed(flow_cmd, server_env))
        finally:
            server.terminate()
            server.wait(30)
    return times


def markdown(res: dict) -> str:
    """The result's table: each way's best seconds, what it adds to `dvc repro` and the ratio."""
    rows = [[k, f"{v:.2f}", "" if k == "dvc repro" else f"+{res['added_seconds'][k]:.2f} s",
             "1.00x" if k == "dvc repro" else f"{res['ratio'][k]:.2f}x"] for k, v in res["best"].items()]
    return (f"Measured {res['date']} on {res['machine']}: an all-up-to-date pipeline ({res['stages']} stages), best "
            f"of {res['repeats']}.\n\n" + table(["how", "seconds", "added vs dvc repro", "ratio"], rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "flow_overhead")
    ap.add_argument("--name", help="the result's file name (default: what, class, stages)")
    args = ap.parse_args()
    times = measure(args.repeats)
    best = {k: min(v) for k, v in times.items()}
    stages = len(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    res = {"date": date.today().isoformat(), "machine": machine(), "stages": stages,
           "repeats": args.repeats, "times": times, "best": best,
           "added_seconds": {k: best[k] - best["dvc repro"] for k in best if k != "dvc repro"},
           "ratio": {k: best[k] / best["dvc repro"] for k in best if k != "dvc repro"}}
    save(args.out, args.name or f"flow-vs-dvc-repro_{class_tag()}_{stages}stages", res, markdown(res))


if __name__ == "__main__":
    main()
