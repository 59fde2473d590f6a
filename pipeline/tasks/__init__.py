"""The tasks, registered here by name (`params.yaml: task`), loaded when asked for. Adding a task is one
new module implementing `pipeline.tasks.base.Task` and one line in TASKS. A task's module is imported
only when `get` names it, so a stage imports the task it runs (`dvc.yaml` lists `pipeline/tasks/${task}.py`
among its deps), not every task."""

from __future__ import annotations

import importlib

from pipeline.core.params import ParamsError
from pipeline.tasks.base import EvalInputs, Task

# name -> "module:Class"; the module is pipeline/tasks/<name>.py, so dvc.yaml can name it by ${task}
TASKS = {
    "classification": "pipeline.tasks.classification:Classification",
    "instruction": "pipeline.tasks.instruction:Instruction",
    "preference": "pipeline.tasks.preference:Preference",
    "chat": "pipeline.tasks.chat:Chat",
}

LOADED: list[str] = []  # the modules `get` imported in this process, in order (the deps tests read it)

__all__ = ["TASKS", "EvalInputs", "Task", "get"]


def modules() -> list[str]:
    """Every module a task can come from."""
    return sorted(spec.split(":")[0] for spec in TASKS.values())


def get(name: str) -> Task:
    """The task registered as `name` (params.yaml's `task`), or a one-line error listing the valid ones."""
    if name not in TASKS:
        raise ParamsError(f"params.yaml: 'task' is {name!r}; valid choices: {', '.join(TASKS)}.")
    module, cls = TASKS[name].split(":")
    if module not in LOADED:
        LOADED.append(module)
    return getattr(importlib.import_module(module), cls)()
