"""Stage `fleet`: each adapter of the fleet as a whole params file, the input of its own chain of stages.

A fleet is many adapters over the one base model of params.yaml (one per task, per customer, ...),
declared in `fleet/params.yaml` as `adapters:`, a mapping from an adapter's name to its overrides of
params.yaml (the shared defaults): a nested mapping merges into the default's, any other value replaces
it. Beside it, `concurrency` is the Prefect flow's (adapters run at once; checked here, written nowhere).
`fleet/dvc.yaml` (written from dvc.yaml by `peftflow contract --write`) runs, per adapter, the chain
validate -> format -> tokenize -> train -> evaluate -> export -> gguf under `fleet/<name>/`, each stage
reading `fleet/resolved/<name>.yaml`, the file this stage writes, and all sharing the `base` stage.

DVC compares each adapter stage's params keys in its own resolved file: an edit to one adapter reruns
that adapter's stages that read the key; an edit to a shared default reruns the stages of the adapters
that do not override it; a new adapter runs only its own chain. This stage reruns on any of those
edits (it reads everything) and takes a second.

Rules (each broken one is one line naming fleet/params.yaml and the key, and nothing is written):
  - a name is lower-case letters, digits, `-` and `_` (it becomes a folder and part of DVC's stage names);
  - each adapter states the keys fleet/dvc.yaml fills in per adapter (`REQUIRED`: DVC reads them before
    any stage runs, to name the adapter's data, template and task files);
  - no adapter sets `base`: the fleet shares one base model (one conversion, one copy in memory);
  - the merged params pass every check a stage makes (schema, task, method).

Inputs: params.yaml, fleet/params.yaml. Output: `<out>/<name>.yaml` per adapter (the folder replaced whole).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer
import yaml

from pipeline import contract, methods, tasks
from pipeline.core.io import atomic_dir
from pipeline.core.layout import FLEET_PARAMS
from pipeline.core.overlay import merge
from pipeline.core.params import Params, ParamsError
from pipeline.core.stage import PipelineError, entry

STAGE = "fleet"
READS = tuple(info.alias or name for name, info in Params.model_fields.items())  # all of it: it copies it
LOADS = ("task", "method")  # it checks each adapter as a stage would: any task, any method
REQUIRED = ("task", "data.train", "data.validation", "format.template", "train.method")
NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


def _has(tree: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def read_fleet(path: Path) -> tuple[dict[str, dict], int]:
    """fleet/params.yaml's adapters (name -> overrides) and concurrency, each rule above checked but the merge's."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: fleet file not found.") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict) or "adapters" not in raw or set(raw) - {"adapters", "concurrency"}:
        extra = sorted(set(raw) - {"adapters", "concurrency"}) if isinstance(raw, dict) else []
        what = f"unknown key '{extra[0]}'" if extra else "no 'adapters' mapping"
        raise ParamsError(f"{path}: {what}; the file holds 'adapters' (name -> overrides of params.yaml) and "
                          "'concurrency' (adapters the Prefect flow runs at once).")
    c = raw.get("concurrency", 1)
    if not isinstance(c, int) or isinstance(c, bool) or c < 1:
        raise ParamsError(f"{path}: 'concurrency' must be an integer >= 1, got {c!r}.")
    adapters = raw["adapters"]
    if not isinstance(adapters, dict) or not adapters:
        raise ParamsError(f"{path}: 'adapters' must be a mapping of at least one adapter name to its overrides.")
    for name, over in adapters.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ParamsError(f"{path}: adapter name {name!r}: lower-case letters, digits, '-' and '_' only "
                              "(it names a folder and DVC stages).")
        if not isinstance(over, dict):
            raise ParamsError(f"{path}: 'adapters.{name}' must be a mapping of params.yaml keys.")
        if "base" in over:
            raise ParamsError(f"{path}: 'adapters.{name}.base': the fleet shares params.yaml's base model; an "
                              "adapter cannot set its own (a second base is a second fleet).")
        for key in REQUIRED:
            if not _has(over, key):
                raise ParamsError(f"{path}: 'adapters.{name}' must set '{key}' (fleet/dvc.yaml names each "
                                  f"adapter's files from it): required keys: {', '.join(REQUIRED)}.")
    return adapters, c


def resolve(defaults: dict, adapters: dict[str, dict], where: Path) -> dict[str, dict]:
    """Name -> the adapter's whole params (defaults merged with its overrides), each checked as a stage would."""
    out = {}
    for name, over in adapters.items():
        merged = merge(defaults, over)
        try:
            p = contract.parse(merged)
            methods.check(p.train, tasks.get(p.task).dpo)
        except PipelineError as e:
            msg = re.sub(r"^params\.yaml: ", "", str(e))
            raise ParamsError(f"{where}: adapter '{name}' (params.yaml with its overrides): {msg}") from None
        out[name] = merged
    return out


def run(params: Path, fleet: Path, out: Path) -> dict[str, dict]:
    """Write `<out>/<name>.yaml` for every adapter of `fleet` over the defaults in `params`."""
    contract.load(params)  # the defaults must be valid params themselves
    defaults = yaml.safe_load(params.read_text(encoding="utf-8-sig"))
    resolved = resolve(defaults, read_fleet(fleet)[0], fleet)
    with atomic_dir(out) as tmp:
        for name, merged in resolved.items():
            head = (f"# adapter {name}: params.yaml with the fleet's adapters.{name} laid over it, written by the "
                    "fleet stage (do not edit: edit those two)\n")
            (tmp / f"{name}.yaml").write_text(head + yaml.safe_dump(merged, sort_keys=False, allow_unicode=True),
                                              encoding="utf-8")
    return resolved


def main(
    fleet: Path = typer.Option(Path(FLEET_PARAMS), help="the fleet: adapters and their overrides"),
    out: Path = typer.Option(..., help="folder of the adapters' whole params files"),
    params: Path = typer.Option(Path("params.yaml"), help="the shared defaults"),
) -> None:
    resolved = run(params, fleet, out)
    typer.echo(f"fleet: {len(resolved)} adapters -> {out}: "
               + ", ".join(f"{n} ({p['task']}, {p['train']['method']})" for n, p in resolved.items()))


if __name__ == "__main__":
    entry(main)
