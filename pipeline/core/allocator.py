"""The train program's process: its allocator (`train.allocator`: mimalloc preloaded, or the C library's
malloc), how its compute threads wait, the settings that keep a long run's resident memory at what its steps use,
and its peak memory.

Inputs: `train.allocator`. Outputs: the program re-executed on the allocator with the thread settings, settings
in the process.
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
# How torch's compute threads (OpenMP, libgomp) wait for their next piece of work: spinning for up to 300,000
# turns (libgomp's default) or asleep at once. A step is thousands of small operators, each a barrier. On a
# quiet machine spinning is fastest (waking a sleeping thread per operator cost 10% on the default job's
# prompt, 17% on the short one); beside other busy processes the spinning thread holds a core they need and
# the next operator waits for the thread the OS took off its core: 0.35x the speed alone, asleep 0.80x
# (docs/speed.md#a-busy-machine). The train program looks once, at its start, and chooses. How threads wait
# never changes a result; how many threads share the work does (a reduction splits by thread), so their number
# stays torch's (the hardware class).
SPIN, SLEEP = "300000", "0"  # GOMP_SPINCOUNT: libgomp's own default, written out; asleep at once
BUSY_CORES = 0.5  # other processes' use of the cores (in cores) from which the threads sleep
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # a user's own either of them wins

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


def preload_allocator(name: str | None, env: dict[str, str]) -> None:
    """Make this program run on allocator `name` (`train.allocator`) with the environment settings `env`
    (thread_env() for the train program; read once, when the libraries start): unless it already does, replace
    the process by the same interpreter and arguments with the library in LD_PRELOAD and the settings added
    (os.execve: same process id, so DVC, accelerate and a terminal see one program). Call it first thing in a
    program's main, before the imports worth avoiding twice. Without the library, the program goes on with the
    system allocator and says so. The allocator changes where tensors live, never their values: the adapter's
    bytes are the same with either (tests/test_train.py). "system" (or a name params.yaml does not allow,
    which load_params reports) keeps the C library's malloc. A setting the user made wins over `env`'s."""
    missing = {k: v for k, v in env.items() if k not in os.environ}
    lib = None
    if name in ALLOCATORS and allocator_in_use() != name:
        lib = allocator_library(name)
        if lib is None or lib in os.environ.get("LD_PRELOAD", "").split():  # preloaded, yet not mapped: not again
            why = "is not installed here" if lib is None else "could not be preloaded"
            print(f"train: allocator {name!r} {why} ({ALLOCATORS[name][0]}, Linux only): the system allocator "
                  "runs instead", file=sys.stderr, flush=True)
            lib = None
    if lib is None and not missing:
        return
    new = {**missing, **os.environ}
    if lib is not None:
        preload = " ".join(x for x in (lib, os.environ.get("LD_PRELOAD", "")) if x)
        new = {**ALLOCATOR_ENV.get(name, {}), **new, "LD_PRELOAD": preload}  # a setting of the user's wins
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], new)


def others_busy_cores(seconds: float = 0.25) -> float:
    """How many cores other processes kept busy over the next `seconds` (Linux's /proc/stat, less this
    process's own CPU time); 0.0 where /proc/stat cannot be read."""
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        idle = cpu[3] + (cpu[4] if len(cpu) > 4 else 0)  # idle + iowait
        return sum(cpu[:8]) - idle, sum(cpu[:8])  # busy, total (steal counted, guests are inside user)

    try:
        (b0, t0), own0 = sample(), os.times()
        time.sleep(seconds)
        (b1, t1), own1 = sample(), os.times()
    except (OSError, ValueError, IndexError):
        return 0.0
    if t1 <= t0:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    own = (own1.user + own1.system - own0.user - own0.system) * ticks
    return max(0.0, (b1 - b0 - own) / (t1 - t0) * (os.cpu_count() or 1))


def thread_env() -> dict[str, str]:
    """The train program's OpenMP waiting for this run: the threads spin while no other process keeps
    BUSY_CORES busy at its start, else they sleep at once (GOMP_SPINCOUNT; read by libgomp when torch loads it).
    Nothing when the user set a waiting policy of their own."""
    if any(k in os.environ for k in WAIT_SETTINGS):
        return {}
    return {"GOMP_SPINCOUNT": SLEEP if others_busy_cores() >= BUSY_CORES else SPIN}


def beside_env(at_once: int, env: dict[str, str]) -> dict[str, str]:
    """For programs started `at_once` beside each other (a fleet's adapters, a sweep's queue workers): their
    OpenMP threads sleep as soon as they wait (spinning threads take the cores the others compute on), unless
    `env` sets a waiting policy of the user's. Waiting changes when a thread wakes, never a number."""
    if at_once > 1 and not any(k in env for k in WAIT_SETTINGS):
        return {"GOMP_SPINCOUNT": SLEEP}
    return {}


def thread_facts() -> dict:
    """How this process's compute threads run, for the run facts: torch's thread count and the OpenMP waiting
    settings in force."""
    import torch

    return {"threads": torch.get_num_threads(),
            **{k.lower(): os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}}


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
