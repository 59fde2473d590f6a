"""The tasks: one module each, registered here by name (`params.yaml: task`). Adding a task is one new
module implementing `pipeline.tasks.base.Task` and one line in TASKS (with its import)."""

from __future__ import annotations

from pipeline.tasks.base import EvalInputs, Task
from pipeline.tasks.chat import Chat
from pipeline.tasks.classification import Classification
from pipeline.tasks.instruction import Instruction
from pipeline.tasks.preference import Preference

TASKS: dict[str, Task] = {t.name: t for t in (Classification(), Instruction(), Preference(), Chat())}

__all__ = ["TASKS", "EvalInputs", "Task", "get"]


def get(name: str) -> Task:
    """The task registered as `name` (params.yaml's `task`), or a one-line error listing the valid ones."""
    from pipeline.core.params import ParamsError

    if name not in TASKS:
        raise ParamsError(f"params.yaml: 'task' is {name!r}; valid choices: {', '.join(TASKS)}.")
    return TASKS[name]
