"""`peftflow serve` under a mix of good and bad requests from concurrent `openai` clients, with llama-server
killed (SIGKILL) in the middle: latency and throughput, and what every request got.

`drive()` is the load (tests/test_serve.py runs it bounded, on tiny adapters): `clients` threads, each with its
own `openai.OpenAI` client (no retries), share a list of `Call`s (an adapter, a request, and for a good request
the answer it must get); once `kill_at` of them are answered, the llama-server the server's /health names is
killed with SIGKILL. Each outcome is kept: status (200, the 4xx, 503) and latency. `check()` says what went
wrong, if anything: a good request must be answered correctly or get a 503 with Retry-After; a bad one its 4xx,
always.

As a benchmark (`python -m bench.serve_load`, after `dvc repro`; ~4 min): the three adapters bench.serving makes
(the default job, seeds 42-44) behind `peftflow serve`, `--rounds` rounds of three runs in turn: clean; the
kill, clients not retrying; the kill, clients sending a 503 again after its Retry-After (up to 3 times, as the
openai client does by default). Reported per run: requests/s, p50/p95 latency of answered requests, how many got
503 and for how long the server answered 503 (first to last), and how long llama-server took to come back
(from the server's log). Outputs: bench/results/serve_load/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import openai

from bench.machine import class_tag, machine, save, table
from bench.serving import make_adapters
from pipeline.core.io import read_jsonl
from pipeline.serve import free_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Call:
    """One request: `body` for chat.completions; `want` the answer (good) or the 4xx status (bad)."""

    body: dict
    want: str | int


@dataclass
class Outcome:
    call: Call
    status: int
    seconds: float
    text: str | None = None
    retry_after: str | None = None
    at: float = 0.0


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    killed_pid: int | None = None
    killed_at: float | None = None  # seconds into the run


def health(url: str) -> dict:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def wait_ready(url: str, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            h = health(url)
            if h.get("status") == "ok":
                return h
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready in {seconds} s")


def ask(client: openai.OpenAI, call: Call, t0: float) -> Outcome:
    start = time.perf_counter()
    try:
        r = client.chat.completions.create(**call.body)
        return Outcome(call, 200, time.perf_counter() - start, r.choices[0].message.content, at=start - t0)
    except openai.APIStatusError as e:
        return Outcome(call, e.status_code, time.perf_counter() - start, e.message,
                       e.response.headers.get("retry-after"), start - t0)
    except openai.APIConnectionError as e:
        return Outcome(call, 0, time.perf_counter() - start, str(e), at=start - t0)


def drive(url: str, calls: list[Call], clients: int, kill_at: int | None, retries: int = 0) -> Run:
    """Send every call once, `clients` at a time; kill llama-server with SIGKILL once `kill_at` requests are
    answered (None: not). With `retries`, a 503 is sent again after its Retry-After, up to that many times (as
    the openai client does by default), and the outcome is the last answer, timed from the first send."""
    todo, lock, run = list(reversed(calls)), threading.Lock(), Run()
    t0 = time.perf_counter()

    def client_loop() -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        while True:
            with lock:
                if not todo:
                    return
                call = todo.pop()
            first = time.perf_counter()
            outcome = ask(client, call, t0)
            for _ in range(retries):
                if outcome.status != 503:
                    break
                time.sleep(float(outcome.retry_after or 1))
                outcome = ask(client, call, t0)
            outcome.seconds = time.perf_counter() - first
            with lock:
                run.outcomes.append(outcome)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    if kill_at is not None:
        while len(run.outcomes) < kill_at and any(t.is_alive() for t in threads):
            time.sleep(0.005)
        run.killed_pid = health(url)["llama_server"]["pid"]
        os.kill(run.killed_pid, signal.SIGKILL)
        run.killed_at = time.perf_counter() - t0
    for t in threads:
        t.join()
    run.seconds = time.perf_counter() - t0
    return run


def check(run: Run) -> list[str]:
    """What went wrong: a good request neither answered right nor a clean 503; a bad one without its 4xx."""
    wrong = []
    for o in run.outcomes:
        if isinstance(o.call.want, int):
            if o.status != o.call.want:
                wrong.append(f"bad request got {o.status}, not {o.call.want}: {o.call.body} {o.text}")
        elif o.status == 503:
            if not o.retry_after:
                wrong.append(f"503 without Retry-After: {o.text}")
        elif o.status != 200 or o.text != o.call.want:
            wrong.append(f"good request got {o.status} {o.text!r}, not {o.call.want!r}")
    return wrong


def bad_calls(model: str) -> list[Call]:
    """A client's usual mistakes, each with the status it must get."""
    user = [{"role": "user", "content": "hello"}]
    return [Call({"model": model, "messages": user, "max_tokens": -5}, 400),
            Call({"model": "no-such-adapter", "messages": user}, 404),
            Call({"model": model, "messages": []}, 400),
            Call({"model": model, "messages": user, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
            Call({"model": model, "messages": [{"role": "user", "content": "word " * 5000}]}, 400)]


def mix(good: list[Call], bad: list[Call], total: int) -> list[Call]:
    """`total` calls: the good ones in turn, every fourth a bad one."""
    return [bad[(i // 4) % len(bad)] if i % 4 == 3 else good[i % len(good)] for i in range(total)]


def summary(run: Run) -> dict:
    answered = [o.seconds for o in run.outcomes if o.status == 200]
    down = [o.at + o.seconds for o in run.outcomes if o.status == 503]  # when each 503 came back
    q = statistics.quantiles(answered, n=20) if len(answered) > 1 else [float("nan")] * 19
    return {"requests": len(run.outcomes), "seconds": round(run.seconds, 2),
            "requests_per_s": round(len(run.outcomes) / run.seconds, 2), "answered": len(answered),
            "client_errors": sum(400 <= o.status < 500 for o in run.outcomes), "unavailable_503": len(down),
            "last_503_after_kill_s": round(max(down) - run.killed_at, 2) if down else 0.0,
            "p50_s": round(statistics.median(answered), 3) if answered else None, "p95_s": round(q[18], 3),
            "wrong": len(check(run))}


def start_server(folders: dict[str, Path], log: Path, slots: int = 3, threads: int = 2) -> tuple[subprocess.Popen,
                                                                                                  str]:
    """`peftflow serve` over the gguf folders given (name -> folder), on a free port; returns when it answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", *[f"{n}={f}" for n, f in folders.items()],
                             "--port", str(port), "--threads", str(threads), "--slots", str(slots), "--cache-type",
                             "f32", "--max-tokens", "8", "--ctx", "512", "--log", str(log.with_suffix(".llama.log"))],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 120)
    except TimeoutError:
        proc.kill()
        raise
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/peftflow-bench-serving"))
    ap.add_argument("--steps", type=int, default=8, help="train steps of each adapter (bench.serving's)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="train precision (default: params')")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--kill-at", type=int, default=40, help="kill llama-server once this many requests are answered")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_load")
    args = ap.parse_args()
    folders = {f"seed{42 + i}": f for i, f in enumerate(make_adapters(args.work, args.steps, args.precision))}
    sentences = [r["sentence"] for r in read_jsonl(ROOT / "data" / "validated" / "validation.jsonl")][:24]
    modes = {"clean": (None, 0), "llama-server killed": (args.kill_at, 0), "killed, clients retry": (args.kill_at, 3)}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    good: list[Call] = []
    for r in range(args.rounds):  # a server per round: two kills each, within its 5 restarts in 10 minutes
        proc, url = start_server(folders, args.work / f"serve-{r}.log")
        try:
            if not good:
                client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
                for i, s in enumerate(sentences):
                    body = {"model": list(folders)[i % 3], "messages": [{"role": "user", "content": s}]}
                    good.append(Call(body, client.chat.completions.create(**body).choices[0].message.content))
            calls = mix(good, bad_calls(list(folders)[0]), args.requests)
            for mode in list(runs) if r % 2 == 0 else reversed(list(runs)):
                wait_ready(url)
                runs[mode].append(summary(drive(url, calls, args.clients, *modes[mode])))
                print(mode, runs[mode][-1], flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    restarts = [float(x) for r in range(args.rounds) for x in re.findall(
        r"llama-server back \(pid \d+\) after ([\d.]+) s", (args.work / f"serve-{r}.log").read_text())]
    write(args, runs, restarts)


def write(args, runs: dict[str, list[dict]], restarts: list[float]) -> None:
    """The record and its table (the medians of each mode) as mix_<clients>clients_<requests>req_kill-at-<n>_<class>."""
    med = {m: {k: statistics.median(x[k] for x in v) for k in v[0]} for m, v in runs.items()}
    keys = ["requests_per_s", "p50_s", "p95_s", "answered", "client_errors", "unavailable_503",
            "last_503_after_kill_s", "wrong"]
    text = "\n".join([
        f"# peftflow serve under a mix of good and bad requests, llama-server killed ({date.today()})", "",
        f"{machine()}; 3 adapters (default job, seeds 42-44, {args.steps} steps, {args.precision or 'params'} "
        f"precision), {args.requests} chat requests per run (every fourth a client error), {args.clients} clients at "
        f"a time, greedy up to 8 tokens; SIGKILL once {args.kill_at} are answered; with retries, a 503 is sent again "
        f"after its Retry-After (up to 3 times, as the openai client does by default); median of {args.rounds} runs "
        f"each, in turn. llama-server came back in {', '.join(f'{x:g}' for x in restarts)} s.", "",
        table(["", *runs], [[k, *(f"{med[m][k]:g}" for m in runs)] for k in keys])]) + "\n"
    save(args.out, f"mix_{args.clients}clients_{args.requests}req_kill-at-{args.kill_at}_{class_tag()}",
         {"date": str(date.today()), "args": {k: str(v) for k, v in vars(args).items()}, "restarts_s": restarts,
          "runs": runs}, text)


if __name__ == "__main__":
    main()
