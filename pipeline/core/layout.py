"""Where the pipelines' files lie: the default job's (dvc.yaml) and the fleet's (fleet/, docs/fleet.md).

One home for the fleet's folder layout and for DVC's stage addresses, so the contract writer, the flow,
lineage, the CLI and the report agree by construction:

  fleet/params.yaml            the adapters (name -> overrides of params.yaml) and the flow's concurrency
  fleet/dvc.yaml, dvc.lock     the fleet's pipeline (written from dvc.yaml) and what DVC recorded of it
  fleet/resolved/<name>.yaml   an adapter's whole params (the `fleet` stage writes them)
  fleet/<name>/...             an adapter's outputs: dvc.yaml's paths under its own folder
  env/<stage>.txt              the packages a stage runs on, at the lock's versions (a dep of the stage;
                               a fleet adapter's stage runs on its stage's file)

A stage address is DVC's: `train` (dvc.yaml), `fleet/dvc.yaml:train@chat` (the fleet's adapter `chat`);
a lock file names the second `train@chat`.

Inputs: none (names and paths only; imports nothing of the project). Outputs: paths, names, addresses.
"""

from __future__ import annotations

from pathlib import Path

FLEET = "fleet"
FLEET_PARAMS = f"{FLEET}/params.yaml"
FLEET_DVC_YAML = f"{FLEET}/dvc.yaml"
RESOLVED = f"{FLEET}/resolved"
PIPELINE_LOCKS = ("dvc.lock", f"{FLEET}/dvc.lock")  # stage names never collide across them: read as one


def resolved_params(fleet: Path, name: str) -> Path:
    """An adapter's whole params file, in the fleet folder `fleet` (the project's fleet/)."""
    return fleet / "resolved" / f"{name}.yaml"


def adapter_dir(fleet: Path, name: str) -> Path:
    """An adapter's outputs folder (its models/, data/, reports/), in the fleet folder `fleet`."""
    return fleet / name


def adapter_names(fleet: Path) -> list[str]:
    """The adapters the `fleet` stage has written params for, sorted (none before its first run)."""
    return sorted(f.stem for f in (fleet / "resolved").glob("*.yaml"))


def split_stage(address: str) -> tuple[str, str | None]:
    """A DVC stage address or lock name as (stage, adapter): `fleet/dvc.yaml:train@chat` -> ("train", "chat"),
    `train` -> ("train", None)."""
    stage, _, adapter = address.rpartition(":")[2].partition("@")
    return stage, adapter or None


def lock_name(address: str) -> str:
    """The name a lock file gives the stage at this address: `fleet/dvc.yaml:train@chat` -> `train@chat`."""
    return address.rpartition(":")[2]


def lock_file(address: str) -> str:
    """The lock file that records the stage at this address: a fleet adapter's in fleet/dvc.lock, else dvc.lock."""
    return PIPELINE_LOCKS[1] if split_stage(address)[1] else PIPELINE_LOCKS[0]


def stage_of_params(stage: str, params: Path) -> str:
    """The lock name of `stage` run with this params file: `export@chat` for fleet/resolved/chat.yaml (a fleet
    adapter's), else `stage`."""
    parts = params.parts
    adapter = params.stem if parts[-3:-1] == (FLEET, "resolved") and params.suffix == ".yaml" else None
    return f"{stage}@{adapter}" if adapter else stage


def owner(path: str) -> str:
    """Whose file a project path is: "" (the default job), "fleet" (fleet/params.yaml and other fleet-wide
    files), or an adapter's name (fleet/resolved/<name>.yaml, fleet/<name>/...)."""
    parts = Path(path).parts
    if parts[:2] == (FLEET, "resolved"):
        return Path(path).stem if len(parts) == 3 else FLEET
    if parts[:1] == (FLEET,):
        return parts[1] if len(parts) > 2 else FLEET
    return ""


ENV = "env"  # each stage's pins file: the packages its code runs on, at the lock's versions


def env_pins(stage: str) -> str:
    """The pins file of a stage (or of a fleet adapter's stage: `train@chat` runs on train's): env/train.txt."""
    return f"{ENV}/{split_stage(stage)[0]}.txt"
