"""Method comparison on real data: every PEFT method (and full fine-tuning, zero-shot and 5-shot
prompting) through the pipeline on the same data, one DVC experiment per row.

Profiles and rows are in bench/methods.yaml (params.yaml keys). For each row this runs
`dvc exp run -n <profile>-<row> -S ... <target>` in the project (params.yaml is put back
between rows), reads the stages' own metrics files, and keeps every row's figures in
`bench/results/method_table/methods.json` (a row already there with the same overrides is not rerun unless
`--force`). Then it writes the table (`bench/results/method_table/<profile>.md`), a bar chart of
accuracy per method (`<profile>.png`), and puts the table into every docs page holding the
`<!-- methods:<profile> -->` markers (docs/results.md; docs/configuration.md for the preference profile).

Run: `python -m bench.method_table run --profile fpb [--rows a,b] [--force]`, then
`python -m bench.method_table table`. Each row is given back by `dvc exp apply <profile>-<row>`.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from datetime import date
from pathlib import Path

import typer
import yaml

from bench.machine import machine, table
from pipeline.core.io import atomic_write_json, atomic_write_text, read_jsonl
from pipeline.tasks.classification import ONE_CLASS

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "bench" / "results" / "method_table"
# The reference table (financial news sentiment, 1,200 training rows, an 8B model, 4 A100s).
REFERENCE = {"zero-shot": None, "5-shot": 0.74, "ia3": 0.81, "prefix-20": 0.83, "lora-r8": 0.89, "lora-r16": 0.91,
             "qlora-r16": 0.90, "full": 0.93}
app = typer.Typer(add_completion=False, no_args_is_help=True)


def hydra_value(v) -> str:
    """A YAML value written in the override syntax of `dvc exp run -S`."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, list):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, str) and not re.fullmatch(r"[\w./\-+:]+", v):
        return "'" + v.replace("'", "\\'") + "'"
    return str(v)


def override_args(overrides: dict, params_raw: dict) -> list[str]:
    """`-S` arguments. A dict value overrides a params section key by key where params.yaml has that
    section, else it is set whole; keys params.yaml does not have get the `+` that adds them."""
    args = []

    def walk(prefix: str, value, node) -> None:
        if isinstance(value, dict) and isinstance(node, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v, node.get(k, _MISSING))
        else:
            args.extend(["-S", f"{'+' if node is _MISSING else ''}{prefix}={hydra_value(value)}"])

    for key, value in overrides.items():
        node = params_raw
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        walk(key, value, node)
    return args


_MISSING = object()


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    if check and r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def load_results() -> dict:
    f = RESULTS / "methods.json"
    return json.loads(f.read_text()) if f.exists() else {}


def run_row(profile: str, spec: dict, row: str) -> dict:
    overrides = {**spec["common"], **spec["rows"][row]}
    sh("git", "checkout", "HEAD", "--", "params.yaml")
    params_raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    name = f"{profile}-{row}"
    sh("dvc", "exp", "remove", name, check=False)
    cmd = ["dvc", "exp", "run", "-n", name, *override_args(overrides, params_raw), spec.get("target", "evaluate")]
    typer.echo(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-4000:]}")
    train = {**json.loads((ROOT / "reports/train/metrics.json").read_text()),  # + the run facts (seconds, memory)
             **json.loads((ROOT / "reports/train/run.json").read_text())}
    ev = json.loads((ROOT / "reports/evaluate/metrics.json").read_text())
    record = {"experiment": name, "overrides": overrides, "command": " ".join(cmd),
              "wall_seconds": round(time.time() - t0),
              "train": {k: v for k, v in train.items() if k != "train"}, "evaluate": ev,
              "commit": sh("git", "rev-parse", "--short", "HEAD").stdout.strip()}
    samples = ROOT / "reports/evaluate/samples.jsonl"
    if samples.exists():  # model outputs only: the data's own text stays in ../shared, not in this repo
        record["samples"] = [{k: x[k] for k in ("row", "base", "adapter", "base_stopped", "adapter_stopped")}
                             for x in read_jsonl(samples)]
    typer.echo(f"  {name}: " + ", ".join(f"{k} {ev['adapter'][k]}" for k in ("accuracy", "macro_f1", "eval_loss")
                                         if k in ev["adapter"]) + f", train {train['seconds']} s")
    return record


@app.command()
def run(profile: str = typer.Option("fpb"), rows: str = typer.Option("", help="comma-separated rows (default: all)"),
        force: bool = typer.Option(False, help="rerun rows already in the results")) -> None:
    """Run a profile's rows as DVC experiments and record their metrics."""
    spec = yaml.safe_load((ROOT / "bench/methods.yaml").read_text())[profile]
    wanted = [r for r in rows.split(",") if r] or list(spec["rows"])
    unknown = set(wanted) - set(spec["rows"])
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; {profile} has: {', '.join(spec['rows'])}")
    branch = sh("git", "symbolic-ref", "--quiet", "--short", "HEAD", check=False).stdout.strip()
    commit = sh("git", "rev-parse", "HEAD").stdout.strip()
    try:
        for row in wanted:
            results = load_results()
            done = results.get(profile, {}).get("rows", {}).get(row)
            if done and done["overrides"] == {**spec["common"], **spec["rows"][row]} and not force:
                typer.echo(f"{profile}-{row}: in the results already (--force reruns it)")
                continue
            record = run_row(profile, spec, row)
            results = load_results()  # written again after each row: an interrupted run keeps what it did
            entry = results.setdefault(profile, {"rows": {}})
            entry["description"] = spec["description"]
            record |= {"machine": machine(), "date": date.today().isoformat()}
            entry.setdefault("machine", record["machine"])  # the table's caption: where most rows ran
            entry.setdefault("date", record["date"])
            entry["rows"][row] = record
            atomic_write_json(RESULTS / "methods.json", results)
    finally:  # the workspace back as committed (each experiment stays in `dvc exp show`)
        if branch and not sh("git", "symbolic-ref", "--quiet", "HEAD", check=False).stdout.strip() \
                and sh("git", "rev-parse", "HEAD").stdout.strip() == commit:
            # a `dvc exp run` stopped half way leaves HEAD detached
            sh("git", "checkout", "--quiet", branch, check=False)
        sh("git", "checkout", "HEAD", "--", "params.yaml", "dvc.lock", "reports", check=False)
        sh("dvc", "checkout", "--quiet", check=False)
    table()


def fmt_int(n: int) -> str:
    return f"{n:,}"


def flagged(m: dict) -> str:
    """An accuracy cell; a model that puts more than 90% of rows in one class is flagged (the share is read
    from the confusion matrix's columns for rows measured before evaluate reported it)."""
    share = m.get("top_class_share")
    if share is None and m.get("confusion"):
        share = max(map(sum, zip(*m["confusion"], strict=True))) / sum(map(sum, m["confusion"]))
    one_class = share is not None and share > ONE_CLASS
    return f"{m['accuracy']:.3f}" + (f" (one class: {share:.0%} of rows)" if one_class else "")


def shot_label(model: str) -> str:
    return "zero-shot" if model == "base" else f"{model.split('_')[1].replace('shot', '')}-shot"


def baseline_rows(first: dict) -> tuple[list[list], list[tuple[str, float, float | None]], str]:
    """The majority class, the base model by the headline rule, and the best prompting baseline (every rule
    of the base model, zero- and k-shot, on validation; named), as table rows, bars and a rule table."""
    rows, bars = [], []
    base_keys = ["base"] + [k for k in first if re.fullmatch(r"base_\d+shot", k)]
    if "majority" in first:
        m = first["majority"]
        rows.append([f"majority class (`{m['label']}` for every row)", flagged(m), f"{m['macro_f1']:.3f}", 0,
                     "–", "–", "–", "–"])
        bars.append(("majority class", m["accuracy"], None))
    for k in base_keys:
        m, label = first[k], shot_label(k)
        ref = REFERENCE.get(label)
        rows.append([f"{label} prompting, full-label log-likelihood (base model)", flagged(m), f"{m['macro_f1']:.3f}",
                     0, "–", "–", "–", "–" if ref is None else ref])
        bars.append((f"{label}, log-likelihood", m["accuracy"], ref))
    rules = ""
    if "prompting_baseline" in first:
        b = first["prompting_baseline"]
        model, rule = b["name"].split("/")
        rows.append([f"**prompting baseline: {shot_label(model)}, {rule}** (best rule on validation)",
                     f"**{flagged(b)}**", f"{b['macro_f1']:.3f}", 0, "–", "–", "–", "–"])
        bars.append((f"prompting baseline ({shot_label(model)}, {rule})", b["accuracy"], None))
        rules = ("\nThe base model and the adapter by every rule (accuracy / macro-F1; one class = more than "
                 "90% of rows in one class):\n\n"
                 + table(["rule", *(shot_label(k) for k in first["rules"] if k != "adapter"), "adapter"],
                         [[rule, *(f"{flagged(first['rules'][k][rule])} / {first['rules'][k][rule]['macro_f1']:.3f}"
                                   for k in first["rules"])] for rule in next(iter(first["rules"].values()))])
                 + "\n")
    return rows, bars, rules


def classification_table(name: str, entry: dict) -> tuple[str, list[tuple[str, float, float | None]]]:
    rows = entry["rows"]
    # the baselines from a row scored by every rule (all rows share the base model, except quantized ones)
    first = next((x["evaluate"] for x in rows.values() if "prompting_baseline" in x["evaluate"]),
                 next(iter(rows.values()))["evaluate"])
    base_keys = ["base"] + [k for k in first if re.fullmatch(r"base_\d+shot", k)]
    mismatch = [r for r, x in rows.items() if any(x["evaluate"].get(k, {}).get("accuracy") != first[k]["accuracy"]
                                                  for k in base_keys)]
    cells, bars, rules = baseline_rows(first)
    for row, x in rows.items():
        t, m = x["train"], x["evaluate"]["adapter"]
        ref = REFERENCE.get(row)
        share = 100 * t["trainable_params"] / t["total_params"]
        cells.append([f"`{row}`", flagged(m), f"{m['macro_f1']:.3f}",
                      f"{fmt_int(t['trainable_params'])} ({share:.2f}%)", t["steps"], f"{t['seconds'] / 60:.1f} min",
                      fmt_int(t["peak_rss_mb"]) + " MB" if t.get("peak_rss_mb") else "–", "–" if ref is None else ref])
        bars.append((row, m["accuracy"], ref))
    head = (f"{measured(entry)} Validation accuracy and "
            "macro-F1 (label scoring), training time of the train stage's loop, peak RSS of the train process. "
            "Each row: `dvc exp apply " + name + "-<row>`; overrides in bench/methods.yaml.")
    if mismatch:
        head += f" Note: base-model scores differ in rows {mismatch} (a different base: quantized, or another prompt)."
    return head + "\n\n" + table(["method", "accuracy", "macro-F1", "trainable params", "steps", "train time",
                                    "peak RSS", "reference (8B)"], cells) + "\n" + rules, bars


def measured(entry: dict) -> str:
    """The caption's where and when: the rows grouped by the day and machine they were measured on (a row
    recorded before rows carried their own date and machine counts as the profile's first run)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r, x in entry["rows"].items():
        groups.setdefault((x.get("date", entry["date"]), x.get("machine", entry["machine"])), []).append(r)
    if len(groups) == 1:
        (day, where), = groups
        return f"{entry['description']}; measured {day} on {where}."
    parts = [f"{day} on {where}: " + ", ".join(f"`{r}`" for r in rows)
             for (day, where), rows in sorted(groups.items(), key=lambda g: g[0][0], reverse=True)]
    return f"{entry['description']}; measured {'; '.join(parts)}."


def instruction_table(name: str, entry: dict) -> str:
    rows = []
    samples = []
    for row, x in entry["rows"].items():
        e, t = x["evaluate"], x["train"]
        rows.append([f"`{row}`", f"{e['base']['eval_loss']:.3f}", f"{e['adapter']['eval_loss']:.3f}",
                     f"{e['base']['perplexity']:.2f}", f"{e['adapter']['perplexity']:.2f}", t["steps"],
                     f"{t['seconds'] / 60:.1f} min"])
        for s in x.get("samples", [])[:3]:  # the prompt and reference are that row of the validation file
            samples.append(f"**{row}, validation row {s['row']}** (`{x['overrides']['data.validation']}`)\n\n"
                           f"- base: {one_line(s['base'])}\n- adapter: {one_line(s['adapter'])}\n")
    return (measured(entry) + "\n\n" + table(["row", "base eval loss", "adapter eval loss", "base perplexity",
                                              "adapter perplexity", "steps", "train time"], rows)
            + "\n\nGreedy generations, side by side:\n\n"
            + "\n".join(samples))


def preference_table(name: str, entry: dict) -> str:
    rows, notes = [], []
    for row, x in entry["rows"].items():
        e, t = x["evaluate"], x["train"]
        for model, label in (("base", "base"), ("sft", "SFT adapter"), ("adapter", "SFT + DPO adapter")):
            m = e.get(model, {})
            cells = [m.get(k, "–") for k in ("preference_accuracy", "reward_accuracy", "reward_margin", "eval_loss")]
            rows.append([f"`{row}`", label, *cells])
        dpo = t.get("dpo", {})
        dpo_s = t.get("dpo_seconds", dpo.get("seconds", 0))
        notes.append(f"`{row}`: SFT {t['steps']} steps in {t['seconds']:.0f} s, then DPO "
                     f"({x['overrides'].get('train.dpo', {})}) in {dpo_s:.0f} s; last DPO step: "
                     f"loss {dpo.get('loss')}, batch reward accuracy {dpo.get('reward_accuracy')}; "
                     f"{e['rows']} held-out pairs.")
    return (measured(entry) + "\n\n" + table(["row", "model", "prefers chosen (log-prob)", "reward accuracy vs base",
                                             "reward margin", "eval loss"], rows, "llrrrr")
            + "\n\n" + "\n".join(notes) + "\n")


def one_line(text: str, limit: int = 240) -> str:
    text = re.sub(r"<\|im_(start|end)\|>(assistant)?", " ", text)
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + " …"


def bar_chart(bars: list[tuple[str, float, float | None]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(bars) + 1.2))
    ys = range(len(bars))
    baseline = ("shot", "majority", "baseline")
    colors = ["#bbbbbb" if any(w in b[0] for w in baseline) else "#4c72b0" for b in bars]
    ax.barh(ys, [b[1] for b in bars], color=colors,
            label="SmolLM2-135M, this CPU")
    refs = [(y, b[2]) for y, b in zip(ys, bars, strict=True) if b[2] is not None]
    if refs:
        ax.scatter([r for _, r in refs], [y for y, _ in refs], marker="|", s=300, color="#c44e52", zorder=3,
                   label="reference, 8B model")
    for y, b in zip(ys, bars, strict=True):
        ax.text(b[1] + 0.01, y, f"{b[1]:.3f}", va="center", fontsize=8)
    ax.set_yticks(list(ys), [b[0] for b in bars])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("validation accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def into_results(profile: str, text: str) -> None:
    """The profile's table into every page of docs/ that holds its markers."""
    start, end = f"<!-- methods:{profile} -->", f"<!-- /methods:{profile} -->"
    for page in sorted((ROOT / "docs").glob("*.md")):
        body = page.read_text()
        if start in body and end in body:
            before, rest = body.split(start, 1)
            after = rest.split(end, 1)[1]
            atomic_write_text(page, f"{before}{start}\n{text}{end}{after}")


@app.command("table")
def tables() -> None:
    """Write the tables and charts from bench/results/method_table/methods.json (and into docs/)."""
    spec = yaml.safe_load((ROOT / "bench/methods.yaml").read_text())
    for profile, entry in load_results().items():
        if not entry.get("rows"):
            continue
        first = next(iter(entry["rows"].values()))["evaluate"]
        if "accuracy" in first["adapter"]:
            text, bars = classification_table(profile, entry)
            bar_chart(bars, entry["description"], RESULTS / f"{profile}.png")
        elif "reward_accuracy" in first["adapter"]:
            text = preference_table(profile, entry)
        else:
            text = instruction_table(profile, entry)
        missing = [r for r in spec.get(profile, {}).get("rows", {}) if r not in entry["rows"]]
        if missing:
            text += f"\nRows of bench/methods.yaml not measured yet: {', '.join(f'`{r}`' for r in missing)}.\n"
        atomic_write_text(RESULTS / f"{profile}.md", text)
        into_results(profile, text)
        typer.echo(text)


if __name__ == "__main__":
    app()
