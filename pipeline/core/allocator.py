"""The train program's memory: its allocator (`train.allocator`: mimalloc preloaded, or the C library's
malloc), the settings that keep a long run's resident memory at what its steps use, and its peak.

Inputs: `train.allocator`. Outputs: the program re-executed on the allocator, settings in the process.
"""

from __future__ import annotations

import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 2 << 20
# train.allocator -> (the wheel that carries it, its library's file name); "system" is the C library's malloc
ALLOCATORS = {"mimalloc": ("cmeel-mimalloc", "libmimalloc.so")}
# mimalloc keeps freed memory for reuse instead of handing it back to the OS after 10 ms (which cost a
# page fault per 4 KB on the next step's reuse: docs/speed.md#the-allocator)
ALLOCATOR_ENV = {"mimalloc": {"MIMALLOC_PURGE_DELAY": "-1"}}


def allocator_library(name: str) -> str | None:
    """The shared library of allocator `name`, from its installed wheel; None for "system", or when the
    wheel is not installed, or not on Linux (where a preloaded library is how a program gets another malloc)."""
    import importlib.metadata

    if name not in ALLOCATORS or not sys.platform.startswith("linux"):
        return None
    wheel, stem = ALLOCATORS[name]
    try:
        files = importlib.metadata.files(wheel) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    libs = sorted(str(f.locate()) for f in files if f.name.startswith(stem))
    return next((f for f in libs if os.path.exists(f)), None)


def allocator_in_use() -> str:
    """The allocator this process runs with: the name of a preloaded one mapped into it, else "system"."""
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        return "system"
    return next((name for name, (_, stem) in ALLOCATORS.items() if f"/{stem}" in maps), "system")


def preload_allocator(name: str | None) -> None:
    """Make this program run on allocator `name` (`train.allocator`): unless it already does, replace the
    process by the same interpreter and arguments with the library in LD_PRELOAD (os.execve: same process
    id, so DVC, accelerate and a terminal see one program). Call it first thing in a program's main, before
    the imports worth avoiding twice. Without the library, the program goes on with the system allocator
    and says so. The allocator changes where tensors live, never their values: the adapter's bytes are the
    same with either (tests/test_train.py). "system" (or a name params.yaml does not allow, which
    load_params reports) keeps the process as it is."""
    if name not in ALLOCATORS or allocator_in_use() == name:
        return
    lib = allocator_library(name)
    if lib is None or lib in os.environ.get("LD_PRELOAD", "").split():  # preloaded, yet not mapped: not again
        why = "is not installed here" if lib is None else "could not be preloaded"
        print(f"train: allocator {name!r} {why} ({ALLOCATORS[name][0]}, Linux only): the system allocator "
              "runs instead", file=sys.stderr, flush=True)
        return
    preload = " ".join(x for x in (lib, os.environ.get("LD_PRELOAD", "")) if x)
    env = {**ALLOCATOR_ENV.get(name, {}), **os.environ, "LD_PRELOAD": preload}  # a setting of the user's wins
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _glibc():
    """glibc through ctypes, or None (another C library, another OS)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator() -> None:
    """Keep a long run's resident memory at what its steps use (measured in bench/step_memory.py): every
    batch width is a new matmul shape, and oneDNN's and PyTorch's per-shape caches (1,024 entries each by
    default) grew with every step; capped at 256 (set before the first matmul of the process; an explicit
    setting wins). Under the system allocator (glibc), whose threshold for mapping allocations directly
    climbs to 32 MB, the activations of each longer batch were left in a heap too fragmented for the next
    (GBs resident and free): allocations of 2 MB and more are mapped directly, and given back when freed.
    (mimalloc, `train.allocator`'s default, reuses freed memory without that; docs/speed.md#the-allocator.)"""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    os.environ.setdefault("LRU_CACHE_CAPACITY", "256")
    libc = _glibc()
    if libc is not None and allocator_in_use() == "system":
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def peak_rss_mb() -> int:
    """Peak resident memory of this process so far, in MiB."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (2**20 if sys.platform == "darwin" else 2**10))
