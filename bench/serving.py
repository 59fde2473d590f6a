"""Serving many adapters: one llama-server holding the base once with 3 LoRA adapters, against 3 merged
models each in a llama-server of its own (what serving 3 fine-tunes costs without adapters).

Three adapters of the default job (params.yaml; seeds 42, 43, 44, `--steps` train steps each) are made by
the project's own train, export and gguf stages into `--work` (kept: a second run reuses them), from the
workspace's `dvc repro` outputs (models/base, data/tokenized, data/formatted, data/validated). Then, in
`--rounds` rounds, each mode in turn (the order alternating), on loopback:
  adapters  one llama-server: base-f16.gguf and the 3 adapter files (`--lora-init-without-apply`), `-np K`
            slots; each request names its adapter in `lora` (scale 1, the others 0), as `peftflow serve` does;
  adapters, pinned slots  the same, adapter k's requests always on slots k, k + 3, ... (`id_slot`), so that
            no slot changes adapter (llama-server clears a slot's prompt cache when it does): what `peftflow
            serve` sends (pipeline.serve.slot_plan);
  one adapter  the same server, every request to the first adapter (what changing adapters costs);
  merged    3 llama-servers, one per model-f16.gguf, K/3 slots each.
Each server gets `--threads` (each merged one `--merged-threads`: 3 servers on few cores share them);
K requests at a time (`--concurrency`), `--requests` in all, spread over the 3 adapters in turn: the training
ids of the validation prompts, greedy, up to `--max-tokens`, KV cache reuse on (`cache_prompt`) in both
modes. Measured: peak resident memory of the server processes together (VmHWM), requests/s and generated
tokens/s over the round, per-request latency p50/p95; every request has a timeout and the whole run a bound
(`--budget` seconds). Reported: medians over the rounds and merged / adapters.

Outputs: bench/results/serving/<name>.{json,md} (`--name`, else from threads, answer length and class).
Run: `python -m bench.serving` after `dvc repro` (~6 min).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import date
from pathlib import Path

import httpx

from bench.machine import class_tag, machine, save, table
from pipeline.backend import Backend
from pipeline.core.encoding import encode_prompt
from pipeline.core.io import read_jsonl
from pipeline.core.loading import load_tokenizer
from pipeline.core.params import parse_params
from pipeline.serve import free_port, llama_server_cmd, slot_plan
from pipeline.stages import export, gguf, train

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (42, 43, 44)


def make_adapters(work: Path, steps: int, precision: str | None = None) -> list[Path]:
    """The 3 adapters' gguf stage folders (made once: train -> export -> gguf on the workspace's data), trained in
    params.yaml's precision or `precision` (fp32 where the CPU has no bf16 instructions: a serving bench needs
    adapters, not the lock's)."""
    import yaml

    base, tokenized, formatted = ROOT / "models" / "base", ROOT / "data" / "tokenized", ROOT / "data" / "formatted"
    folders = []
    for seed in SEEDS:
        d = work / f"seed{seed}"
        if not (d / "gguf" / "gguf.json").exists():
            raw = yaml.safe_load((ROOT / "params.yaml").read_text())
            raw["seed"] = seed
            raw["train"] |= {"max_steps": steps, "checkpoint_every": 0}
            raw["train"] |= {"precision": precision} if precision else {}
            raw["gguf"] |= {"quantize": [], "rows": 4}
            p = parse_params(raw)
            print(f"adapter seed {seed}: train {steps} steps, export, gguf -> {d}", flush=True)
            train.run(p, tokenized, formatted / "format.json", base, d / "adapter", d / "live", d / "ckpt")
            export.run(p, base, d / "adapter", tokenized, d / "export")
            gguf.run(p, d / "export", d / "adapter", base, formatted, ROOT / "data" / "validated", d / "gguf")
        folders.append(d / "gguf")
    return folders


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def load(urls: list[str], prompts: list[list[int]], args, mode: str) -> dict:
    """`args.requests` requests, `args.concurrency` at a time; request i goes to adapter i % 3 (its server, or
    its `lora` entry; mode `one adapter`: every request to the first)."""
    latencies, generated, sent, plan = [], 0, [0, 0, 0], slot_plan(3, args.concurrency)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal generated
        while not queue.empty():
            i = queue.get_nowait()
            which = 0 if mode == "one adapter" else i % 3
            body = {"prompt": prompts[i % len(prompts)], "n_predict": args.max_tokens, "temperature": 0.0,
                    "top_k": 1, "cache_prompt": True, "ignore_eos": args.ignore_eos}
            if mode != "merged":
                body["lora"] = [{"id": k, "scale": 1.0 if k == which else 0.0} for k in range(3)]
            if mode == "adapters, pinned slots":  # as peftflow serve sends them
                body["id_slot"] = plan[which][sent[which] % len(plan[which])]
            sent[which] += 1
            t0 = time.perf_counter()
            r = await client.post(f"{urls[which if mode == 'merged' else 0]}/completion", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            generated += r.json()["tokens_predicted"]

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=args.timeout) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20)
    return {"seconds": round(wall, 2), "requests_per_s": round(args.requests / wall, 3),
            "tokens_per_s": round(generated / wall, 2), "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(q[18], 3), "generated_tokens": generated}


def one_round(mode: str, folders: list[Path], prompts: list[list[int]], args) -> dict:
    """Start the mode's servers, run the load, read their peak memory, stop them."""
    ctx = 512
    if mode != "merged":
        specs = [(folders[0] / "base-f16.gguf", [f / "adapter-f16.gguf" for f in folders], args.concurrency,
                  args.threads)]
    else:
        specs = [(f / "model-f16.gguf", [], max(1, args.concurrency // 3), args.merged_threads or args.threads)
                 for f in folders]
    servers = []
    try:
        for model, loras, slots, threads in specs:
            port = free_port()
            servers.append(Backend(llama_server_cmd(model, loras, port, threads, slots, ctx), port,
                                   args.work / f"llama-server-{port}.log"))
            servers[-1].start()
        result = asyncio.run(asyncio.wait_for(load([s.url for s in servers], prompts, args, mode), args.budget))
        result["peak_rss_mb"] = round(sum(peak_rss_mb(s.proc.pid) for s in servers), 1)
        result["servers"] = len(servers)
        return result
    finally:
        for s in servers:
            s.stop()


def markdown(results: dict, args) -> str:
    """The result's table: per figure, the median of each mode and merged / adapters; then every round's."""
    keys = [("peak_rss_mb", "peak RSS (MiB, servers together)"), ("requests_per_s", "requests/s"),
            ("tokens_per_s", "generated tokens/s"), ("p50_s", "latency p50 (s)"), ("p95_s", "latency p95 (s)")]
    med = {m: {k: statistics.median(r[k] for r in results[m]) for k, _ in keys} for m in results}
    rows = [[name, f"{med['adapters'][k]:g}", f"{med['adapters, pinned slots'][k]:g}", f"{med['one adapter'][k]:g}",
             f"{med['merged'][k]:g}", f"{med['merged'][k] / med['adapters'][k]:.2f}"] for k, name in keys]
    lines = [f"# Serving 3 adapters: one llama-server with LoRA adapters vs 3 merged models ({date.today()})", "",
             f"{machine()}; {args.requests} requests per round, {args.concurrency} at a time, up to "
             f"{args.max_tokens} tokens{' (EOS ignored: every answer that long)' if args.ignore_eos else ''}, greedy, "
             f"`--threads {args.threads}` for the adapters' server, {args.merged_threads or args.threads} for each "
             f"merged model's; median of {args.rounds} rounds (each mode once per round, order alternating).", "",
             table(["", "1 server, base + 3 adapters", "the same, each adapter on its own slots",
                    "the same, every request to one adapter", "3 servers, merged models", "merged / adapters"],
                   rows, "llllll"),
             "", "Every round: " + "; ".join(
                 f"{m} " + ", ".join(f"{r['peak_rss_mb']:g} MiB {r['requests_per_s']:g} req/s" for r in results[m])
                 for m in results)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/peftflow-bench-serving"))
    ap.add_argument("--steps", type=int, default=8, help="train steps of each adapter")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="train precision (default: params')")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="llama-server threads (the adapters' server)")
    ap.add_argument("--merged-threads", type=int, default=None, help="each merged model's server (default: --threads)")
    ap.add_argument("--ignore-eos", action="store_true", help="every answer --max-tokens long (decode throughput)")
    ap.add_argument("--name", default=None, help="results name (default: from the options)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take")
    ap.add_argument("--budget", type=float, default=600.0, help="seconds one round's load may take")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving")
    args = ap.parse_args()
    folders = make_adapters(args.work, args.steps, args.precision)
    tok = load_tokenizer(folders[0] / "tokenizer")
    prompts = [encode_prompt(tok, r["prompt"]) for r in read_jsonl(ROOT / "data" / "formatted" / "validation.jsonl")]
    results: dict[str, list[dict]] = {"adapters": [], "adapters, pinned slots": [], "one adapter": [], "merged": []}
    for i in range(args.rounds):
        for mode in list(results) if i % 2 == 0 else reversed(list(results)):
            results[mode].append(one_round(mode, folders, prompts, args))
            print(mode, results[mode][-1], flush=True)
    name = args.name or (f"one-vs-merged_threads{args.threads}-{args.merged_threads or args.threads}_"
                         f"{'decode' if args.ignore_eos else 'answers'}{args.max_tokens}_{class_tag()}")
    save(args.out, name, {"date": str(date.today()), "args": {k: str(v) for k, v in vars(args).items()},
                          "results": results}, markdown(results, args))


if __name__ == "__main__":
    main()
