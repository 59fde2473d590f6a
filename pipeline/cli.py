"""The `peftflow` command: helpers around the DVC pipeline (the stages themselves run from
dvc.yaml as `python -m pipeline.<stage>`).

  peftflow contract  check (--write: make) each stage's dvc.yaml params and code deps from its code
  peftflow metrics   print the latest metrics of every stage as one table, and where they are
  peftflow predict   answer rows with one or more adapters, rendered as they were trained
  peftflow flow      run the DVC stages once as a Prefect flow (ephemeral, or on PREFECT_API_URL); --fleet
  peftflow schedule  serve the flow as a scheduled Prefect deployment (cron or interval)
  peftflow serve     adapters over one base in llama.cpp's llama-server, OpenAI-compatible, on 127.0.0.1
  peftflow lineage   what made an adapter, export or GGUF file (or what a server serves), checked
  peftflow report    markdown report of params and metrics changes against another revision
  peftflow import-data   a data file of a hub dataset, pinned to a commit, copied in and tracked by DVC
  peftflow sweep     a grid of params values x seeds as DVC experiments on DVC's queue, run and waited for
  peftflow compare   a table and a plot of experiments (mean ± spread over seeds against train time)
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import typer
from rich.console import Console
from rich.table import Table

from pipeline import audit
from pipeline.core.io import read_jsonl
from pipeline.core.layout import FLEET, adapter_dir, adapter_names, resolved_params
from pipeline.core.stage import PipelineError, error_line, peek
from pipeline.importing import import_data as run_import
from pipeline.report import build as build_report
from pipeline.sweep import compare as compare_runs
from pipeline.sweep import label
from pipeline.sweep import sweep as run_sweep
from pipeline.verify import verify as run_verify

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def later(module: str) -> ModuleType:
    """A command's module that imports PyTorch, transformers or Prefect (seconds), loaded when that command runs,
    so `peftflow --help` and the light commands answer at once: the CLI's one lazy load, like the plug-in
    registries' (the CLI is no DVC stage: nothing depends on its import closure)."""
    return importlib.import_module(module)


def one_line_errors(fn: Callable) -> Callable:
    """A command whose PipelineError is one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            typer.echo(error_line(e, kwargs.get("params")), err=True)
            raise typer.Exit(2) from None

    return wrapper


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def train_seconds(train_reports: Path) -> str:
    """The train run's seconds: resources.json (what it took); run.json in an experiment or an older run."""
    took = _load(train_reports / "resources.json") or _load(train_reports / "run.json") or {}
    return str(took.get("seconds", "?"))


@app.callback()
def _root() -> None:
    """Reproducible PEFT fine-tuning: run the pipeline with `dvc repro`."""



def gguf_score(c: dict) -> float:
    """A GGUF file's figure in llama.cpp: its accuracy (classification), else its answers as PyTorch's (near ties
    counted where measured)."""
    return c.get("accuracy", c.get("agreement_within_ties", c["answer_agreement"]))


def fleet_names(fleet: Path) -> list[str]:
    """The fleet's adapters (those the `fleet` stage has written params for); an error before its first run."""
    names = adapter_names(fleet)
    if not names:
        raise PipelineError(f"{fleet}/resolved: no adapters yet; run `dvc repro {fleet}/dvc.yaml` first")
    return names


def fleet_table(fleet: Path) -> Table:
    """One row per adapter of a fleet (fleet/resolved/<name>.yaml, fleet/<name>/reports/)."""
    table = Table("adapter", "task", "method", "train loss (steps)", "train s", "evaluate: base -> adapter", "gguf",
                  title=f"peftflow metrics: the fleet in {fleet}/")
    for name in fleet_names(fleet):
        resolved, reports = resolved_params(fleet, name), adapter_dir(fleet, name) / "reports"
        t = _load(reports / "train" / "metrics.json") or {}
        e, g = _load(reports / "evaluate" / "metrics.json") or {}, _load(reports / "gguf.json") or {}
        key = next((k for k in ("accuracy", "eval_loss") if k in e.get("adapter", {})), None)
        score = f"{key} {e['base'][key]} -> {e['adapter'][key]}" if key else "not yet"
        files = g.get("llama_cpp", {})
        gguf = (", ".join(f"{f.split('.')[0]}: {gguf_score(c)}" for f, c in files.items())
                if files else g.get("reason", "not yet"))
        table.add_row(name, str(peek(resolved, "task")), str(peek(resolved, "train.method")),
                      f"{t['final_loss']} ({t['steps']})" if t else "not yet", train_seconds(reports / "train"),
                      score, gguf)
    return table


def fleet_adapters(fleet: Path) -> list[tuple[str, Path]]:
    """(name, its gguf stage folder) for every adapter of a fleet (fleet/resolved/<name>.yaml)."""
    return [(name, adapter_dir(fleet, name) / "models" / "gguf") for name in fleet_names(fleet)]


@app.command()
@one_line_errors
def metrics(reports: Path = typer.Option(Path("reports"), help="the pipeline's reports folder"),
            fleet: Path = typer.Option(None, help="a fleet folder (fleet): one row per adapter instead")) -> None:
    """Print the latest metrics of the pipeline, or of every adapter of a fleet (after `dvc repro`)."""
    console = Console()
    if fleet is not None:
        console.print(fleet_table(fleet))
        return
    table = Table("stage", "metric", "base", "adapter", "gain", title="peftflow metrics")
    v = _load(reports / "validate.json")
    if v:
        for split, r in v.items():
            table.add_row("validate", f"{split} accepted / rejected", "", f"{r['accepted']} / {r['rejected']}", "")
    t = _load(reports / "train" / "metrics.json")
    if t:
        table.add_row("train", f"{t['method']}: final loss, {t['steps']} steps", "", str(t["final_loss"]), "")
        table.add_row("train", "trainable params / seconds", "",
                      f"{t['trainable_params']:,} / {train_seconds(reports / 'train')}", "")
    e = _load(reports / "evaluate" / "metrics.json")
    if e:
        for k in ("accuracy", "macro_f1", "eval_loss", "perplexity"):
            if k in e["adapter"]:
                gain = e.get("gain", {}).get(k, "")
                table.add_row("evaluate", k, str(e["base"][k]), str(e["adapter"][k]), str(gain))
    x = _load(reports / "export.json")
    if x:
        merged = x.get("merged")
        detail = f"max |merged - adapter| {x['max_abs_diff_vs_adapter']:.1e}" if merged else x.get("reason", "")
        table.add_row("export", "merged" if x.get("merged") else "adapter only", "", detail, "")
    g = _load(reports / "gguf.json")
    if g:
        if not g.get("written"):
            table.add_row("gguf", "not written", "", g.get("reason", ""), "")
        for name, c in g.get("llama_cpp", {}).items():  # each file answered in llama.cpp (pytorch: the reference)
            size = g["files"][name]["bytes"] / 2**20
            what = "accuracy" if "accuracy" in c else "as PyTorch"
            table.add_row("gguf", f"{name} ({size:.0f} MiB) in llama.cpp: {what}",
                          str(g["pytorch"].get("accuracy", "")), str(gguf_score(c)), "")
    if not table.rows:
        console.print(f"no metrics under {reports}/ yet: run `dvc repro` first")
        raise typer.Exit(1)
    console.print(table)
    console.print(f"metrics: {reports}/*.json, {reports}/train/metrics.json, {reports}/evaluate/metrics.json; "
                  f"plots: {reports}/evaluate/confusion.png and `dvc plots show`")


@app.command()
@one_line_errors
def predict(
    adapter: list[str] = typer.Option(..., help="adapter folder, or NAME=FOLDER; repeat for several adapters"),
    base: Path = typer.Option(Path("models/base"), help="base model folder (the base stage's output)"),
    input: str = typer.Option("-", help="jsonl file of rows, or - for stdin (JSON objects or plain text lines)"),
    with_base: bool = typer.Option(False, "--with-base", help="also answer with the base model (adapter disabled)"),
    max_new_tokens: int = typer.Option(None, help="generation limit for free-text answers (default: params.yaml's "
                                                  "serve.max_new_tokens)"),
    params: Path = typer.Option(Path("params.yaml"), help="where the defaults come from (section serve)"),
    allow_other_base: bool = typer.Option(False, "--allow-other-base",
                                          help="load adapters onto base weights other than the recorded ones"),
    id_field: str = typer.Option(None, "--id", help="keep only this field of each input row beside the answers "
                                                   "(default: the whole row, as `input`)"),
) -> None:
    """Answer rows with each adapter, rendered with the template that adapter was trained with. Each output line:
    the row number, each adapter's answer by its name, and the input row (`input`) or its `--id` field."""
    limit, batch = max_new_tokens or peek(params, "serve.max_new_tokens"), peek(params, "serve.batch_size")
    if not isinstance(limit, int) or not isinstance(batch, int):
        raise PipelineError(f"predict: {params} has no serve.max_new_tokens and serve.batch_size (run where the "
                            "project's params.yaml is, or give --params)")
    named = dict(_split_adapter(a) for a in adapter)
    taken = ({"row", "input", id_field} | ({"base"} if with_base else set())) & set(named)
    if taken:
        raise PipelineError(f"predict: an adapter may not be named {', '.join(sorted(taken))}: the output uses the "
                            "name for another field")
    p = later("pipeline.predict").Predictor(base, named, max_new_tokens=limit, batch_size=batch,
                                            allow_other_base=allow_other_base)
    prompt = next(iter(p.prompts.values()))
    rows = [_stdin_row(line, prompt) for line in sys.stdin if line.strip()] if input == "-" else read_jsonl(input)
    missing = next((i for i, r in enumerate(rows) if id_field is not None and id_field not in r), None)
    if missing is not None:
        raise PipelineError(f"predict: {input} row {missing + 1} field '{id_field}': missing (--id names it)")
    answers = {name: p.predict(rows, name) for name in p.adapters}
    if with_base:
        answers["base"] = p.predict(rows, None)
    for i, row in enumerate(rows):
        kept = {id_field: row[id_field]} if id_field is not None else {"input": row}
        typer.echo(json.dumps({"row": i + 1, **{k: v[i] for k, v in answers.items()}, **kept}, ensure_ascii=False))


@app.command("flow")
def run_flow(
    set_: list[str] = typer.Option([], "--set-param", "-S", help="params override key=value, as `dvc exp run -S`"),
    experiment: str = typer.Option(None, help="save the run as a DVC experiment with this name"),
    pull: bool = typer.Option(False, help="`dvc pull` before the run (retried)"),
    push: bool = typer.Option(False, help="`dvc push` after the run (retried)"),
    root: Path = typer.Option(Path("."), help="the DVC project folder"),
    fleet: bool = typer.Option(False, help="run fleet/dvc.yaml instead: every adapter of the fleet (docs/fleet.md)"),
    concurrency: int = typer.Option(None, help="--fleet: adapters at once (default: fleet/params.yaml's)"),
) -> None:
    """Run the pipeline's DVC stages as a Prefect flow: each stage a task, run or skipped by DVC."""
    if fleet:
        if set_ or experiment:
            typer.echo("error: --fleet takes --concurrency, --pull, --push and --root (edit fleet/params.yaml for "
                       "params)", err=True)
            raise typer.Exit(2)
        chains = later("pipeline.flow").fleet(root=str(root.resolve()), concurrency=concurrency, pull=pull, push=push)
        for name, chain in chains.items():
            typer.echo(f"{name}: " + " ".join(f"{k.split(':')[-1].split('@')[0]}:{v}" for k, v in chain.items()))
        return
    states = later("pipeline.flow").pipeline(root=str(root.resolve()), overrides=set_, experiment=experiment,
                                             pull=pull, push=push)
    typer.echo(" ".join(f"{k}:{v}" for k, v in states.items()))


@app.command()
def schedule(
    name: str = typer.Option("nightly", help="deployment name"),
    cron: str = typer.Option(None, help='cron schedule, e.g. "0 2 * * *" (02:00 every night)'),
    interval: float = typer.Option(None, help="or: seconds between runs"),
    set_: list[str] = typer.Option([], "--set-param", "-S", help="params override key=value for every run"),
    root: Path = typer.Option(Path("."), help="the DVC project folder"),
    fleet: bool = typer.Option(False, help="the fleet's flow (fleet/dvc.yaml) instead"),
) -> None:
    """Serve the flow as a deployment on the Prefect server in PREFECT_API_URL, with a schedule;
    runs until stopped. A run with unchanged data and params does nothing and says so."""
    if (cron is None) == (interval is None):
        typer.echo("error: give exactly one of --cron or --interval", err=True)
        raise typer.Exit(2)
    if fleet:
        later("pipeline.flow").fleet.serve(name=name, cron=cron, interval=interval,
                                           parameters={"root": str(root.resolve())},
                                           description="peftflow: every adapter of fleet/dvc.yaml as Prefect tasks")
        return
    later("pipeline.flow").pipeline.serve(name=name, cron=cron, interval=interval,
                   parameters={"root": str(root.resolve()), "overrides": list(set_)},
                   description="peftflow: the DVC stages of dvc.yaml as Prefect tasks")


@app.command()
@one_line_errors
def serve(
    adapter: list[str] = typer.Argument(None, help="gguf stage folders (NAME=FOLDER or FOLDER, named by its task); "
                                                   "default: models/gguf"),
    port: int = typer.Option(8080, help="the port on 127.0.0.1"),
    threads: int = typer.Option(0, help="llama-server's threads (0: every core)"),
    slots: int = typer.Option(4, help="requests llama-server answers at once"),
    ctx: int = typer.Option(2048, help="context length of each slot"),
    cache_type: str = typer.Option("f16", help="llama-server's KV cache type (f16: its default; f32: answers "
                                               "closest to PyTorch's float32; q8_0: half the memory)"),
    max_tokens: int = typer.Option(None, help="default answer limit (default: params.yaml's serve.max_new_tokens)"),
    params: Path = typer.Option(Path("params.yaml"), help="where the default answer limit comes from"),
    fleet: Path = typer.Option(None, help="a fleet folder (fleet): every adapter of it, by its name, beside any given"),
    log: Path = typer.Option(None, help="llama-server's log file (default: peftflow-serve-PORT-llama-server.log in "
                                        "the temporary folder)"),
) -> None:
    """Serve adapters over one base model with llama.cpp's llama-server, OpenAI-compatible on 127.0.0.1: the
    `model` field names the adapter, whose training template is applied to the user's text. llama-server is
    restarted if it dies (GET /health says how it is). Runs until SIGINT or SIGTERM (docs/serving.md)."""
    specs = [(n, Path(f)) if sep else (None, Path(n)) for n, sep, f in (a.partition("=") for a in adapter or
                                                                          ([] if fleet else ["models/gguf"]))]
    specs += fleet_adapters(fleet) if fleet else []
    limit = max_tokens or peek(params, "serve.max_new_tokens") or 64
    srv = later("pipeline.serve")
    adapters = srv.load_adapters(specs)  # checked before anything starts
    typer.echo(f"serving {', '.join(a.name for a in adapters)} over {adapters[0].base} on "
               f"http://127.0.0.1:{port}/v1")
    srv.serve(adapters, port, threads or os.cpu_count() or 1, slots, ctx, limit, cache_type, log)


@app.command()
@one_line_errors
def lineage(
    path: str = typer.Argument(..., help="an adapter or export folder, a GGUF file, a `peftflow serve` URL, or the "
                                         "name of an adapter of the fleet (its adapter folder)"),
    root: Path = typer.Option(Path("."), help="the DVC project folder"),
) -> None:
    """Print the chain adapter -> train data -> raw data -> base model with every hash checked
    against the workspace and the DVC cache, and the commands that reproduce it (for a server: for each
    adapter it serves). Exit code 1 if anything differs."""
    if path.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(path.rstrip("/") + "/v1/models", timeout=10) as r:
            served = json.loads(r.read())["data"]
        failed = [m["id"] for m in served if not _lineage(m["gguf"], root, f"adapter '{m['id']}': ")]
        if failed:
            raise typer.Exit(1)
        return
    if not Path(path).exists() and resolved_params(root / FLEET, path).exists():
        path = str(adapter_dir(root / FLEET, path) / "models" / "adapter")  # a fleet adapter by its name
    if not _lineage(path, root):
        raise typer.Exit(1)


def _lineage(path: str, root: Path, label: str = "") -> bool:
    """Print one artifact's lineage; whether every hash and package version matched."""
    if path.endswith(".gguf"):
        r = audit.check_gguf(Path(path), later("pipeline.core.llamacpp").read_stamp(Path(path)), root)
    else:
        r = audit.check(Path(path), root)
    return audit.show(r, path, label)


@app.command()
def verify(
    stages: list[str] = typer.Argument(None, help="stages to rerun (default: all)"),
    root: Path = typer.Option(Path("."), help="the DVC project folder"),
    keep: Path = typer.Option(None, help="rerun in this folder and keep it (default: a temporary one)"),
) -> None:
    """Rerun stages in a scratch copy of the workspace and compare every output hash with dvc.lock: one
    row per output (same / differs, with the files inside a folder that differ). Exit code 1 on any
    difference."""
    console = Console()
    undeclared = later("pipeline.dvcspec").differences(root)
    for line in undeclared:
        console.print(f"[red]{line}[/red]")
    try:
        rows = run_verify(root, stages or None, keep, log=lambda m: console.print(m, style="dim"))
    except (ValueError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    table = Table("stage", "output", "result", "files that differ", title="outputs against dvc.lock")
    for r in rows:
        result = "same" if r.same else f"[red]differs[/red] {r.detail}"
        table.add_row(r.stage, r.path, result, "\n".join(r.files[:10]) + (" …" if len(r.files) > 10 else ""))
    console.print(table)
    bad = [r for r in rows if not r.same]
    if bad or undeclared:
        console.print(f"[red]{len(bad)} of {len(rows)} outputs differ from dvc.lock[/red]")
        raise typer.Exit(1)
    console.print(f"all {len(rows)} outputs are the same as in dvc.lock")


@app.command()
def contract(
    write: bool = typer.Option(False, "--write", help="rewrite each stage's params and code deps in dvc.yaml, and "
                                                     "fleet/dvc.yaml from it"),
    table: str = typer.Option(None, help="print the table project file -> stages that rerun, for this task"),
    root: Path = typer.Option(Path("."), help="the DVC project folder"),
) -> None:
    """Check that each stage's dvc.yaml params and code deps are exactly what its code reads and runs (the
    keys it, its task and its method declare; its import closure and the plug-ins it loads). Exit code 1
    if not; --write makes dvc.yaml say so."""
    dvcspec = later("pipeline.dvcspec")
    if table:
        typer.echo("| project file | stages that rerun when it changes |\n|---|---|")
        for f, stages in dvcspec.file_stages(root, table).items():
            typer.echo(f"| `{f}` | {', '.join(stages)} |")
        return
    if write:
        mended = dvcspec.write(root)
        typer.echo(f"dvc.yaml: {len(mended)} line(s) mended" + "".join(f"\n  {m}" for m in mended))
        return
    lines = dvcspec.differences(root)
    for line in lines:
        typer.echo(line)
    if lines:
        typer.echo("run `peftflow contract --write` to make dvc.yaml say what the code does")
        raise typer.Exit(1)
    typer.echo("every stage's dvc.yaml params and code deps are what its code reads and runs")


@app.command()
def report(
    base: str = typer.Option("main", help="the revision to compare the working tree with"),
    out: Path = typer.Option(Path("pr-report"), help="folder for report.md and its images"),
    root: Path = typer.Option(Path("."), help="the DVC project folder"),
    atol: float = typer.Option(0.0, help="a metric delta with |delta| <= atol + rtol |before| is marked as within"),
    rtol: float = typer.Option(0.0, help="relative part of that tolerance"),
) -> None:
    """Markdown report for a pull request: what changed first (params, metrics beyond the tolerance), the
    hardware class of both runs, changed plots; run facts last."""
    typer.echo(build_report(root, base, out, atol, rtol))
    typer.echo(f"written to {out / 'report.md'}", err=True)


def _split_adapter(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    return (name, Path(path)) if sep else (Path(spec).name, Path(spec))


def _stdin_row(line: str, prompt) -> dict:
    """A JSON object as it is, or a plain line of text as the row its task expects."""
    line = line.strip()
    if line.startswith("{"):
        return json.loads(line)
    return later("pipeline.tasks").get(prompt.task).row_from_text(line, prompt)


@app.command("import-data")
@one_line_errors
def import_data(
    dataset: str = typer.Argument(..., help="dataset id on the Hugging Face hub, e.g. owner/name"),
    file: str = typer.Argument(..., help="the file in the dataset repository, e.g. data/train.jsonl"),
    revision: str = typer.Option(..., help="the commit (40 hex digits); branches and tags move, so they are refused"),
    out: Path = typer.Option(..., help="where the file goes in this project, e.g. data/hub/train.jsonl"),
    cache_dir: Path = typer.Option(None, help="a folder in the hub's cache layout (offline); default: HF_HUB_CACHE"),
) -> None:
    """Copy a pinned file of a hub dataset into the project and track it with DVC (source in OUT.dvc)."""
    meta = run_import(dataset, revision, file, out, cache_dir)
    typer.echo(f"import-data: {meta['source']} -> {out} (sha256 {meta['sha256'][:12]}); commit {out}.dvc, then "
               f"`dvc exp run -S data.train={out}` (or data.validation)")


@app.command()
@one_line_errors
def sweep(
    sets: list[str] = typer.Option(..., "--set", "-S", help="KEY=V1,V2,... (one axis of the grid) or KEY=VALUE; "
                                   "repeat for more axes; the same syntax as `dvc exp run -S`"),
    name: str = typer.Option(..., "--name", "-n", help="the experiments are named NAME-1, NAME-2, ..."),
    seeds: str = typer.Option("42,43,44", help="comma-separated seeds: every point runs once per seed"),
    jobs: int = typer.Option(1, "--jobs", "-j", help="experiments at a time (1 keeps train times comparable)"),
    target: str = typer.Option("evaluate", help="the stage to reproduce up to"),
    wait: bool = typer.Option(True, help="wait for the queue, showing progress (--no-wait: run in the background)"),
    root: Path = typer.Option(Path("."), help="the DVC project folder"),
) -> None:
    """Queue a grid of params values times seeds as DVC experiments and run them (`dvc queue start -j N`)."""
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise PipelineError(f"--seeds {seeds!r}: expected integers separated by commas") from None
    done = run_sweep(root, name, sets, seed_list, jobs, target, wait, echo=typer.echo)
    if wait:
        typer.echo(f"sweep: {len(done)} experiments done; `peftflow compare --name {name}` compares them")


@app.command()
@one_line_errors
def compare(
    name: str = typer.Option(None, "--name", "-n", help="only the experiments named NAME-* (a sweep)"),
    metric: str = typer.Option(None, help="adapter metric to compare (default: accuracy, else eval_loss)"),
    out: Path = typer.Option(None, help="output path without suffix (default: docs/results/sweep-NAME)"),
    root: Path = typer.Option(Path("."), help="the DVC project folder"),
) -> None:
    """Compare experiments from `dvc exp show --json`: mean ± spread over seeds per params point, against
    train time, as a markdown table and a plot; the best is named."""
    out = out or root / "docs" / "results" / f"sweep-{name or 'all'}"
    groups = compare_runs(root, out, name, metric)
    best = groups[0]
    typer.echo(f"compare: {len(groups)} points; best {label(best['point'])}: {best['metric']['mean']:.4f} ± "
               f"{best['metric']['std']:.4f} over {best['metric']['n']} seed(s); {out.with_suffix('.md')}, "
               f"{out.with_suffix('.png')}")


if __name__ == "__main__":
    app()
