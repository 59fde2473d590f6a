"""The example fleet on one Prefect worker vs two (docs/scaling.md#5-the-fleet-on-prefect-workers): wall time of
`peftflow flow --fleet --workers ...` and each worker's peak resident memory (its process tree, sampled every
0.5 s), in the same run.

Per configuration (`--workers 1,2`) everything starts empty but the base model: a fresh bucket on moto's S3
server (the DVC remote, also holding the Prefect results), seeded with `models/base` from this clone's DVC
cache; fresh worker clones of the commit at HEAD, each with its own DVC cache and PREFECT_HOME, started as
`prefect worker start --pool fleet --limit 1` with one thread per stage (docs/prefect.yaml's `fleet`
deployment); one Prefect server (SQLite) for the whole run. `-S KEY=VALUE` lays an override over every adapter of
fleet/params.yaml (committed in the scratch clone; `-S train.max_steps=8` keeps a run short).

    python -m bench.fleet_workers --workers 1,2 -S train.max_steps=8

Output: `bench/results/fleet_workers/<name>.{json,md}` (name: `--name`, else `example_<workers>workers_<class>`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import boto3
import psutil
import yaml

from bench.fleet_memory import tree_rss
from bench.machine import class_tag, machine, save, table
from pipeline.core.stage import tool_env

OUT = Path("bench/results/fleet_workers")
PY = sys.executable
KEY = "bench"  # moto takes any credentials


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(cmd: list[str], health: str, env: dict, log: Path):
    """A server process until the block ends, up when `health` answers."""
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        end = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(health, timeout=2)
                break
            except OSError:
                if time.time() > end or proc.poll() is not None:
                    raise RuntimeError(f"{cmd[2]} did not start: {log}") from None
                time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        proc.wait(30)


def bucket_on(s3_url: str, name: str) -> None:
    boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id=KEY,
                 aws_secret_access_key=KEY).create_bucket(Bucket=name)


def run(cwd: Path, env: dict, *cmd: str) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} in {cwd}: {(r.stderr or r.stdout)[-2000:]}")
    return r.stdout


def scratch_origin(tmp: Path, env: dict, overrides: list[str]) -> Path:
    """A bare origin of HEAD, with the overrides laid over every adapter and committed."""
    work = tmp / "seed"
    run(tmp, env, "git", "clone", "-q", str(Path.cwd()), str(work))
    if overrides:
        spec = yaml.safe_load((work / "fleet" / "params.yaml").read_text())
        for adapter in spec["adapters"].values():
            for o in overrides:
                key, value = o.split("=", 1)
                *path, last = key.split(".")
                node = adapter
                for part in path:
                    node = node.setdefault(part, {})
                node[last] = yaml.safe_load(value)
        (work / "fleet" / "params.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        run(work, env, "git", "commit", "-qam", "bench: " + " ".join(overrides))
    run(tmp, env, "git", "clone", "-q", "--bare", str(work), str(tmp / "origin.git"))
    return tmp / "origin.git"


def clone(origin: Path, to: Path, env: dict, bucket: str, s3_url: str) -> Path:
    to.parent.mkdir(parents=True, exist_ok=True)
    run(to.parent, env, "git", "clone", "-q", str(origin), str(to))
    dvc = (PY, "-m", "dvc")
    run(to, env, *dvc, "remote", "add", "--local", "-d", "-f", "store", f"s3://{bucket}/dvc")
    run(to, env, *dvc, "remote", "modify", "--local", "store", "endpointurl", s3_url)
    return to


def stop_worker(proc: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL to the whole process tree if the worker is not gone in 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait(30)


def sample(procs: list[subprocess.Popen], peaks: list[int], stop: threading.Event) -> None:
    """Each worker's peak summed RSS over its process tree, until `stop`."""
    tops = [psutil.Process(p.pid) for p in procs]
    while not stop.is_set():
        for i, top in enumerate(tops):
            peaks[i] = max(peaks[i], sum(r for r, _ in tree_rss(top)))
        time.sleep(0.5)


def one(tmp: Path, origin: Path, env: dict, n: int, s3_url: str) -> dict:
    """The fleet on `n` fresh workers and a fresh bucket: wall seconds, each worker's peak RSS and adapters."""
    bucket = f"fleet-{n}-workers"
    bucket_on(s3_url, bucket)
    home = clone(origin, tmp / f"{n}w" / "orchestrator", env, bucket, s3_url)
    run(home, env, PY, "-m", "dvc", "cache", "dir", "--local", str(Path.cwd() / ".dvc" / "cache"))
    run(home, env, PY, "-m", "dvc", "push", "-q", "base")  # the base model, as a fleet's remote already holds it
    clones = [clone(origin, tmp / f"{n}w" / f"worker{i}" / "clone", env, bucket, s3_url) for i in range(n)]
    procs = [subprocess.Popen([PY, "-m", "prefect", "worker", "start", "--pool", "fleet", "--limit", "1"], cwd=c,
                              env={**env, "PEFTFLOW_CLONE": str(c), "PREFECT_HOME": str(c.parent / "home")},
                              stdout=open(c.parent / "worker.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
             for c in clones]
    peaks, stop = [0] * n, threading.Event()
    sampler = threading.Thread(target=sample, args=(procs, peaks, stop), daemon=True)
    sampler.start()
    t0 = time.time()
    try:
        out = run(Path.cwd(), env, PY, "-m", "pipeline.cli", "flow", "--fleet", "--root", str(home),
                  "--workers", "peftflow-fleet-adapter/fleet")
    finally:
        seconds = time.time() - t0
        stop.set()
        for p in procs:
            stop_worker(p)
    names = yaml.safe_load((home / "fleet" / "params.yaml").read_text())["adapters"]
    return {"workers": n, "seconds": round(seconds, 1), "flow_output": out.strip().splitlines(),
            "per_worker": [{"peak_rss_mb": round(p / 2**20),
                            "adapters": sorted(a for a in names if (c / "fleet" / a / "models" / "adapter").is_dir())}
                           for p, c in zip(peaks, clones, strict=True)]}


def prefect_setup(env: dict, s3_url: str) -> None:
    """The result storage every worker writes to, the pool, and docs/prefect.yaml's `fleet` deployment."""
    bucket_on(s3_url, "results")
    code = ("from prefect.filesystems import RemoteFileSystem; RemoteFileSystem(basepath='s3://results/prefect', "
            f"settings={{'client_kwargs': {{'endpoint_url': '{s3_url}'}}}}).save('peftflow-results', overwrite=True)")
    run(Path.cwd(), env, PY, "-c", code)
    run(Path.cwd(), env, PY, "-m", "prefect", "work-pool", "create", "fleet", "--type", "process")
    doc = yaml.safe_load(Path("docs/prefect.yaml").read_text())
    doc["deployments"] = [d for d in doc["deployments"] if d["name"] == "fleet"]
    spec = Path(env["PREFECT_HOME"]) / "prefect.yaml"
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    run(Path.cwd(), env, PY, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(spec))


def markdown(r: dict) -> str:
    """The result's table: per worker count, the wall time, its ratio to one worker, each worker's RSS and adapters."""
    base = r["runs"][0]["seconds"]
    rows = [[x["workers"], x["seconds"], f"{base / x['seconds']:.2f}x",
             "; ".join(f"{w['peak_rss_mb']} MB: {', '.join(w['adapters'])}" for w in x["per_worker"])]
            for x in r["runs"]]
    return "\n".join([f"# The example fleet on Prefect workers ({r['machine']}, {r['date']})", "",
                      f"Commit {r['commit'][:12]}; overrides on every adapter: {', '.join(r['overrides']) or 'none'}. "
                      "Each worker runs one adapter at a time, one thread per stage.", "",
                      table(["workers", "wall s", "vs 1 worker", "per worker: peak RSS (its process tree), adapters"],
                            rows, "rrrl")]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2", help="worker counts, one configuration each")
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="KEY=VALUE over every adapter")
    ap.add_argument("--name")
    a = ap.parse_args()
    counts = [int(x) for x in a.workers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="fleet-workers-"))
    s3_port, api_port = free_port(), free_port()
    s3_url, api = f"http://127.0.0.1:{s3_port}", f"http://127.0.0.1:{api_port}/api"
    env = {**tool_env(), "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": KEY,
           "AWS_DEFAULT_REGION": "us-east-1", "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "remote-file-system/peftflow-results",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
    (tmp / "prefect").mkdir()
    try:
        with server([PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)], s3_url, env, tmp / "moto.log"), \
                server([PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(api_port)],
                       f"{api}/health", env, tmp / "prefect.log"):
            prefect_setup(env, s3_url)
            origin = scratch_origin(tmp, env, a.overrides)
            runs = []
            for n in counts:
                runs.append(one(tmp, origin, env, n, s3_url))
                print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "overrides": a.overrides,
         "commit": run(Path.cwd(), env, "git", "rev-parse", "HEAD").strip(), "runs": runs}
    save(OUT, a.name or f"example_{'-'.join(map(str, counts))}workers_{class_tag()}", r, markdown(r))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
