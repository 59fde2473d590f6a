"""A benchmark's process set up as the train stage's program sets itself up, and the params every run starts from.

Light on purpose (the standard library, yaml and two small modules of pipeline/core): a benchmark program calls
`as_stage` or `as_user` first thing when run as a program, *before* its heavy imports, as
pipeline/stages/train.py does, since the allocator is preloaded by re-executing the process and bitsandbytes is
left out only if PEFT has not been imported yet.

- `PARAMS`, `PARAMS_COMMIT`: params.yaml as committed at HEAD (what the workspace holds does not change what a
  bench run measures), and that commit.
- `LORA`, `LR`, `WARMUP`, `SCHEDULE`: theirs, for the baselines and the single-step benchmarks.
- `CASES`: the prompt shapes a run is measured on (`--case`).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from pipeline.core.allocator import preload_allocator, thread_env
from pipeline.core.stage import without_bitsandbytes

ROOT = Path(__file__).resolve().parents[1]


def committed_params() -> tuple[dict, str]:
    """The project's default params: params.yaml as committed at HEAD, and that commit (a `dvc exp run`, a profile
    copied over it, an edit: none of them changes a bench run); outside a git checkout, the file ("workspace")."""
    git = ["git", "-C", str(ROOT)]
    show = subprocess.run(git + ["show", "HEAD:params.yaml"], capture_output=True, text=True)
    if show.returncode:
        return yaml.safe_load((ROOT / "params.yaml").read_text()), "workspace"
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return yaml.safe_load(show.stdout), head


PARAMS, PARAMS_COMMIT = committed_params()
# what the baselines and the single-step benchmarks take from them: the same LoRA, learning rate, warm-up, schedule
LORA, LR, WARMUP = PARAMS["train"]["lora"], PARAMS["train"]["lr"], PARAMS["train"]["warmup_ratio"]
SCHEDULE = PARAMS["train"]["lr_scheduler"]
# the default job's chat prompt (the chat template's system prompt: a long prefix every row shares) and the short
# plain prompt of the fpb-fast profile, whatever the params hold
CASES = {"chat": {"template": "prompts/sentiment.jinja", "chat_template": True, "system_prompt": None},
         "short": {"template": "prompts/sentiment_short.jinja", "chat_template": False, "system_prompt": None}}


def as_stage(allocator: str | None = None, threads: dict[str, str] | None = None, quantizes: bool = False,
             purge_ms: int | None = None) -> None:
    """This process as the train program runs: the committed params' allocator (or `allocator`) preloaded, the
    stage's thread settings (or `threads`), bitsandbytes left out unless the run `quantizes`; `purge_ms` sets
    mimalloc's purge delay (its default, 10, against the stage's own). Re-executes the process once."""
    if purge_ms is not None:
        os.environ["MIMALLOC_PURGE_DELAY"] = str(purge_ms)  # an explicit setting wins over the stage's
    preload_allocator(allocator or PARAMS["train"]["allocator"], thread_env() if threads is None else threads)
    if not quantizes:
        without_bitsandbytes(None, "adamw")


def as_user(allocator: str = "system") -> None:
    """This process as a baseline's users run it: `allocator` (the system's unless named), OpenMP's defaults."""
    preload_allocator(allocator, {})
