"""bench.train_throughput's result as a markdown table: per variant tokens/s, seconds per epoch, peak RSS, losses
and d's speed-up over it; the loaded runs' shares; how each process ran; MFU, tokenize, dvc and evaluate lines.

Input: the run's result dict (bench/results/train_throughput/*.json). Output: markdown text.
"""

from __future__ import annotations

from bench.machine import table
from bench.variants import NAMES, STAGE


def train_rows(res: dict, gpu: bool) -> list[list]:
    """One row per variant: its speed, seconds per epoch, peak RSS, losses (mean ± sd over seeds) and d's speed-up."""
    d, many = res["train"]["d"], len(res.get("seeds", [42])) > 1
    names = {k: v.replace("--budget", str(res.get("budget", 1024))) for k, v in NAMES.items()}

    def loss(r: dict, k: str) -> str:
        return f"{r[k]:.3f} ± {r[k + '_sd']:.3f}" if many else f"{r[k]:.3f}"

    return [[f"{k}: {names[k]}", f"failed: {r['error']}"] if "error" in r else
            [f"{k}: {names[k]}", f"{r['tokens_per_second']:.0f}", f"{r['seconds_per_epoch']:.0f}", r["peak_rss_mb"],
             loss(r, "final_train_loss"), loss(r, "heldout_loss"),
             f"{d['tokens_per_second'] / r['tokens_per_second']:.2f}x", *([r.get("peak_gpu_mb")] if gpu else [])]
            for k, r in res["train"].items()]


def markdown(res: dict) -> str:
    gpu = any("peak_gpu_mb" in r for r in res["train"].values())
    seeds = res.get("seeds", [42])
    many = len(seeds) > 1
    case = res.get("case")
    prompt = (f"; prompt `{case}` ({res['prompt']['template']}, chat template "
              f"{'on' if res['prompt']['chat_template'] else 'off'}, {res['tokens_per_row']} tokens a row), "
              f"params.yaml of {res['params_commit']}" if case else "")
    lines = [f"Measured {res['date']} on {res['machine']}, torch {res['torch']}; SmolLM2-135M, Financial PhraseBank "
             f"train, LoRA r=16 alpha=32 q/k/v/o, batch {res['batch_size']}, {res['steps']} steps each{prompt}"
             + (f"; every figure is the mean over seeds {', '.join(map(str, seeds))} (± sample standard deviation), "
                "but peak RSS, the largest of the seeds'."
                if many else "."), "",
             table(["variant", "non-pad tok/s", "s/epoch", "peak RSS MB", "final train loss", "held-out loss",
                    "d speed-up", *(["peak GPU MB"] if gpu else [])], train_rows(res, gpu))]
    lines += loaded_table(res)
    lines += ran_lines(res)
    if many:
        lines += ["", "Per seed, held-out loss: " + "; ".join(
            f"{k}: " + ", ".join(f"{x['heldout_loss']:.3f}" for x in r["per_seed"].values())
            for k, r in res["train"].items() if "per_seed" in r) + "."]
    if "mfu" not in res:
        return "\n".join(lines) + "\n"
    m, t, v = res["mfu"], res["tokenize"], res["dvc"]
    lines += ["", f"- MFU of d: {m['achieved_gflops']:.0f} GFLOP/s achieved (torch-counted FLOPs) = "
              f"{m['mfu_bf16']:.1%} of the measured bf16 matmul peak ({m['peak_bf16_gflops']:.0f} GFLOP/s; "
              f"fp32 peak {m['peak_fp32_gflops']:.0f}).",
              f"- Tokenize {t['rows']} rows: batched {t['batched_rows_per_second']:.0f} rows/s vs per row "
              f"{t['per_row_rows_per_second']:.0f} rows/s = "
              f"{t['batched_rows_per_second'] / t['per_row_rows_per_second']:.1f}x (identical ids).",
              "- `dvc repro` with nothing to do: " + (f"{v['repro_noop_seconds']:.2f} s (best of 3)"
                                                      if "repro_noop_seconds" in v else v["skipped"]) + "."]
    for who, e in ((k, res["evaluate"][k]) for k in ("adapter", "base")):
        lines.append(f"- Evaluate {res['evaluate']['rows']} validation rows, {who}: label scoring "
                     f"{e['score_seconds']:.1f} s vs greedy generation (up to 8 tokens) {e['generate_seconds']:.1f} s "
                     f"= {e['generate_seconds'] / e['score_seconds']:.2f}x; accuracy {e['score_accuracy']:.3f} vs "
                     f"{e['generate_accuracy']:.3f} ({e['generate_unparsed']} unparseable answers), predictions agree "
                     f"on {e['agreement']:.1%}.")
    return "\n".join(lines) + "\n"


def ran_lines(res: dict) -> list[str]:
    """How each variant's process ran (its last seed's record), and what the stage chose under load where that
    differs from what it chose alone."""
    def last(r: dict) -> dict:
        return list(r.get("per_seed", {}).values())[-1] if r.get("per_seed") else {}

    ran = {k: last(r) for k, r in res["train"].items() if "threads" in last(r)}
    if not ran:
        return []
    chose = [f"{k} beside {level} busy: {how_ran(last(r))}" for level, out in sorted(res.get("loaded", {}).items())
             for k, r in out.items() if k in STAGE and k in ran and how_ran(last(r)) != how_ran(ran[k])]
    return (["", "How each ran: " + "; ".join(f"{k}: {how_ran(r)}" for k, r in ran.items()) + "."]
            + (["", "Under load: " + "; ".join(chose) + "."] if chose else []))


def how_ran(r: dict) -> str:
    """A worker's process settings as it recorded them: allocator, threads, how OpenMP's threads waited."""
    return (f"{r.get('allocator')}, {r.get('threads')} threads, OpenMP waiting {r.get('omp_wait_policy') or 'default'}"
            + (f", GOMP_SPINCOUNT={r['gomp_spincount']}" if r.get("gomp_spincount") else ""))


def loaded_table(res: dict) -> list[str]:
    """Tokens/s beside busy processes against tokens/s alone, per variant (the same seeds): how a variant's speed
    holds up on a machine others use."""
    if not res.get("loaded"):
        return []
    levels = sorted(res["loaded"], key=int)
    rows = []
    for name, alone in res["train"].items():
        if "tokens_per_second" not in alone:
            continue
        cells = []
        for k in levels:
            r = res["loaded"][k].get(name)
            cells.append("not run" if r is None else "failed" if "tokens_per_second" not in r else
                         f"{r['tokens_per_second']:.0f} ({r['tokens_per_second'] / alone['tokens_per_second']:.2f})")
        rows.append([f"{name}: {NAMES[name]}", f"{alone['tokens_per_second']:.0f}", *cells])
    lines = ["", "Beside busy processes (each keeps one core busy for the whole run; tok/s, and as a share of the "
             "variant's tok/s alone):", "", table(["variant", "alone", *(f"{k} busy" for k in levels)], rows)]
    return lines
