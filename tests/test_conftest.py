"""The test suite's own set-up in tests/conftest.py: which files share one unit of work under pytest-xdist, and
how many compute threads each worker takes."""

import os

import pytest
import torch
from conftest import ROOT, share_the_cores, sharing_groups


def test_the_files_sharing_an_expensive_fixture_are_one_unit():
    groups = sharing_groups(ROOT / "tests")
    real = sorted(f for f, g in groups.items() if g == "real_base")
    assert real == ["tests/test_chat.py", "tests/test_real_model.py"]
    history = {f for f, g in groups.items() if g == "history"}
    assert {"tests/test_audit.py", "tests/test_report.py"} <= history and len(history) >= 4
    assert "tests/test_conftest.py" not in groups and "tests/test_validate.py" not in groups


def test_each_worker_takes_its_share_of_the_cores():
    cores = len(os.sched_getaffinity(0))
    env = {"PYTEST_XDIST_WORKER_COUNT": "2"}
    assert share_the_cores(env) == max(1, cores // 2) and env["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert env["GOMP_SPINCOUNT"] == "0"  # asleep at once when waiting, whatever the load at a program's start
    env = {"PYTEST_XDIST_WORKER_COUNT": str(4 * cores)}
    assert share_the_cores(env) == 1  # never none
    env = {"PYTEST_XDIST_WORKER_COUNT": "2", "OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "active"}
    assert share_the_cores(env) is None and env["OMP_NUM_THREADS"] == "7"  # the user's count wins
    assert "GOMP_SPINCOUNT" not in env  # and the user's waiting policy
    for env in ({}, {"PYTEST_XDIST_WORKER_COUNT": "1"}):
        before = dict(env)
        assert share_the_cores(env) is None and env == before  # one process: torch's and libgomp's defaults


def test_this_worker_computes_on_its_share():
    """Under `make test` (two workers): torch in this process took the count set before it loaded."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")) < 2:
        pytest.skip("one process: torch keeps its own default")
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
