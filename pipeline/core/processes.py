"""The processes of a training run started by `accelerate launch` (DDP, FSDP, DeepSpeed; gloo on a CPU):
each process's share of a batch, totals across processes, waiting for the main one. With one process
every method is a no-op.

Inputs: the environment accelerate sets (WORLD_SIZE, RANK, ACCELERATE_USE_*). Output: `Processes`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch


class Processes:
    """This process's share of a run started by `accelerate launch` (DDP, FSDP, ...); with one
    process every method is a no-op. Each process takes every `world`-th row of each batch; the
    loss is scaled so the averaged gradients equal the one-process gradient of the whole batch."""

    def __init__(self, dev: torch.device) -> None:
        self.acc = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.acc = Accelerator(cpu=dev.type == "cpu")
        self.rank = self.acc.process_index if self.acc else 0
        self.world = self.acc.num_processes if self.acc else 1
        self.main = self.rank == 0
        asked = [k for k in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{k}", "").lower() == "true"]
        if self.acc and asked and self.acc.distributed_type.value != asked[0] and self.main:
            print(f"train: warning: the accelerate config asks for {asked[0]} but accelerate runs it as "
                  f"{self.acc.distributed_type.value} on {dev.type}: every process holds the whole model "
                  "(FSDP and DeepSpeed shard only on GPUs)", file=sys.stderr, flush=True)

    def wrap(self, model):
        return self.acc.prepare_model(model) if self.acc else model

    def kind(self, model) -> str:
        """How the run was spread: "single", or accelerate's distributed type, marked "sharded" when
        the parameters became DTensors (FSDP2)."""
        if not self.acc:
            return "single"
        sharded = any(type(q).__name__ == "DTensor" for q in model.parameters())
        return f"{self.acc.distributed_type.value}{', sharded' if sharded else ''}"

    def share(self, rows: list) -> tuple[list, int]:
        """This process's rows of a micro-batch and the loss scale (a batch smaller than the number
        of processes is run whole by each, unscaled)."""
        if self.world == 1 or len(rows) < self.world:
            return rows, 1
        return rows[self.rank :: self.world], self.world

    def total(self, x: float) -> float:
        if not self.acc:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def wait(self) -> None:
        if self.acc:
            self.acc.wait_for_everyone()


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def end_processes() -> None:
    """Every process waits for the main one's save, then leaves the process group (a process that exits
    inside it can abort in gloo's threads)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


LAUNCHED = "PEFTFLOW_LAUNCHED"  # set in the processes `relaunch` starts: they must not launch again


def launch_command(t, module: str, argv: list[str]) -> list[str] | None:
    """`accelerate launch` of `module` with `argv`, when the train params ask for several processes or an
    accelerate config (FSDP, DeepSpeed, ...) and this process was not launched so already (accelerate
    sets LOCAL_RANK only for several processes: a one-process config must not launch itself forever)."""
    if (t.num_processes == 1 and not t.accelerate_config) or LAUNCHED in os.environ or "LOCAL_RANK" in os.environ:
        return None
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if t.accelerate_config:
        cmd += ["--config_file", t.accelerate_config]
    else:  # plain DDP; on a CPU the processes talk over gloo
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*cmd, "--num_processes", str(t.num_processes), "--module", module, *argv]


def relaunch(cmd: list[str]) -> int:
    """Run `launch_command`'s command, its processes marked as launched; returns its exit code."""
    return subprocess.run(cmd, env={**os.environ, LAUNCHED: "1"}).returncode
