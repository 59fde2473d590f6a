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
  peftflow eval      lm-eval tasks (local files) on the base and the adapter; --agreement: against evaluate

One module per command group (pipeline/cli/*.py); this file builds the command from them, one registration
line per command, and imports nothing back into them.
"""

from __future__ import annotations

import typer

from pipeline.cli import answering, checking, judging, results, running

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def _root() -> None:
    """Reproducible PEFT fine-tuning: run the pipeline with `dvc repro`."""


app.command()(results.metrics)
app.command()(answering.predict)
app.command("flow")(running.run_flow)
app.command()(running.schedule)
app.command()(answering.serve)
app.command()(checking.lineage)
app.command()(checking.verify)
app.command("eval")(judging.lm_eval)
app.command()(checking.contract)
app.command()(results.report)
app.command("import-data")(running.import_data)
app.command()(running.sweep)
app.command()(results.compare)
