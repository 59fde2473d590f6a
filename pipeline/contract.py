"""The stage contract at run time: the params a stage may read are the ones it declares.

Each stage module declares `READS` (params keys in DVC's params syntax); its task adds its own
`reads[stage]` when the stage reads `task`, and a stage that builds a method (the train stage)
hands that method in, which adds its own (its section `train.<name>`). `view`
gives the stage its params limited to those keys (pipeline/core/params.py: `View`): reading any
other key is an error naming the stage and the key, in the tests as in a run. The same declarations
make each stage's `params:` in `dvc.yaml` (pipeline/dvcspec.py writes and checks them), so DVC
reruns a stage for exactly the keys its code can read.

Every stage checks the whole params file when it loads it (`load`: the schema and the task's own
checks; the train stage also checks its method's section): a bad value stops any stage, though only
declared keys can change what a stage writes.

Inputs: params.yaml (or a `Params`), a stage's name and its READS. Output: a `View`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline import tasks
from pipeline.core.params import Params, ParamsError, View, load_params, parse_params
from pipeline.core.params import view as restrict


def reads(p: Params, stage: str, own: Iterable[str], method: Any = None) -> list[str]:
    """The keys `stage` may read with these params: its own, its task's, its method's."""
    keys = list(own)
    if "task" in keys:
        keys += tasks.get(p.task).reads.get(stage, ())
    if method is not None:
        keys += method.reads.get(stage, ())
    return keys


def check(p: Params) -> Params:
    """The checks every stage runs on the whole params: the schema's (done when parsed) and the task's."""
    problem = tasks.get(p.task).check_params(p)
    if problem:
        raise ParamsError(problem)
    return p


def view(params: Params | View, stage: str, own: Iterable[str], method: Any = None) -> View:
    """`params` as `stage` may read them (a view of the same stage passes through)."""
    if isinstance(params, View):
        return restrict(params, stage, ())
    return restrict(params, stage, reads(params, stage, own, method))


def load(path: str | Path) -> Params:
    """params.yaml checked whole, as every stage checks it (the stage's `run` then takes its view)."""
    return check(load_params(path))


def parse(raw: dict) -> Params:
    """A params mapping checked whole, as every stage would (the tests' and the CLI's entry)."""
    return check(parse_params(raw))
