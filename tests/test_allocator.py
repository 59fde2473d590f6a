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
    allocator.preload_allocator("mimalloc")
    assert "could not be preloaded" in capsys.readouterr().err
    allocator.preload_allocator("system")  # nothing to do
