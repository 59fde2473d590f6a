"""pipeline/core/processes.py: one process runs every row, and the stage relaunches itself under
`accelerate launch` once, never from a process it launched (a one-process accelerate config, where
accelerate sets no LOCAL_RANK, used to relaunch the stage forever)."""

import torch
from conftest import make_params

from pipeline.core.processes import LAUNCHED, Processes, launch_command


def test_one_process_takes_every_row_unscaled():
    procs = Processes(torch.device("cpu"))
    assert (procs.world, procs.main, procs.kind(torch.nn.Linear(1, 1))) == (1, True, "single")
    assert procs.share([1, 2, 3]) == ([1, 2, 3], 1) and procs.total(2.5) == 2.5


def test_the_relaunch_happens_once(monkeypatch):
    monkeypatch.delenv(LAUNCHED, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert launch_command(make_params().train, "pipeline.stages.train", []) is None  # one process, no config
    t = make_params(**{"train.accelerate_config": "ddp.yaml"}).train  # a config asking for one process
    cmd = launch_command(t, "pipeline.stages.train", ["--data", "d"])
    assert cmd[-5:] == ["1", "--module", "pipeline.stages.train", "--data", "d"] and "ddp.yaml" in cmd
    monkeypatch.setenv(LAUNCHED, "1")  # what `relaunch` sets in the processes it starts
    assert launch_command(t, "pipeline.stages.train", []) is None
    cmd = launch_command(make_params(**{"train.num_processes": 2}).train, "m", [])
    assert cmd is None
