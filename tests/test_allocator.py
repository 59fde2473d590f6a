"""pipeline/core/allocator.py: a library the loader refused is not preloaded again (no loop of
re-executions). The allocator's effect on a run (same tensors) is tested with the train stage."""

import pytest

from pipeline.core import allocator


def test_an_allocator_that_cannot_be_preloaded_is_not_retried(monkeypatch, capsys):
    """A library already in LD_PRELOAD that is not mapped (the loader refused it) is not exec'd again: the
    program says so and goes on with the system allocator (no loop of re-executions)."""
    lib = allocator.allocator_library("mimalloc")
    assert lib, "cmeel-mimalloc is in the lock: its library must be found"
    monkeypatch.setenv("LD_PRELOAD", lib)
    monkeypatch.setattr(allocator.os, "execve", lambda *a: pytest.fail("re-executed"))
    allocator.preload_allocator("mimalloc", {})
    assert "could not be preloaded" in capsys.readouterr().err
    allocator.preload_allocator("system", {})  # nothing to do


def test_the_thread_settings_are_added_once_and_a_users_own_wins(monkeypatch):
    """The train program re-executes itself once with its thread settings added (libgomp reads them when torch
    loads it); a value the user set stays, and with every setting there (after the re-execution) nothing happens."""
    execs = []
    monkeypatch.setattr(allocator.os, "execve", lambda exe, argv, env: execs.append(env))
    for k in allocator.WAIT_SETTINGS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(allocator, "others_busy_cores", lambda: 0.0)
    allocator.preload_allocator("system", allocator.thread_env())
    assert len(execs) == 1 and execs[0]["GOMP_SPINCOUNT"] == allocator.SPIN
    monkeypatch.setenv("GOMP_SPINCOUNT", "1234")  # the user's own (or the re-executed program's)
    assert allocator.thread_env() == {}
    allocator.preload_allocator("system", allocator.thread_env())
    assert len(execs) == 1  # all there: no re-execution, the user's value kept
    facts = allocator.thread_facts()
    assert facts["gomp_spincount"] == "1234" and facts["threads"] >= 1


def test_the_threads_sleep_when_other_processes_keep_the_cores_busy(monkeypatch):
    """thread_env chooses from other processes' use of the cores: spinning on a quiet machine, asleep at once
    beside a busy process (measured for real: a process spinning on a core while the train program starts)."""
    import subprocess
    import sys

    for k in allocator.WAIT_SETTINGS:
        monkeypatch.delenv(k, raising=False)
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"])
    try:
        assert allocator.others_busy_cores(0.5) >= allocator.BUSY_CORES
        assert allocator.thread_env() == {"GOMP_SPINCOUNT": allocator.SLEEP}
    finally:
        busy.kill()
        busy.wait()
    monkeypatch.setattr(allocator, "others_busy_cores", lambda: 0.1)
    assert allocator.thread_env() == {"GOMP_SPINCOUNT": allocator.SPIN}


def test_programs_started_beside_each_other_sleep_when_they_wait():
    assert allocator.beside_env(1, {}) == {} and allocator.beside_env(2, {}) == {"GOMP_SPINCOUNT": "0"}
    assert allocator.beside_env(3, {"OMP_WAIT_POLICY": "active"}) == {}  # the user's own policy wins
    assert allocator.beside_env(2, {"GOMP_SPINCOUNT": "1000"}) == {}
