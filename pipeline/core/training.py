"""Training options shared by the recipes: quantized bases (QLoRA), optimizers, the optimizer step
(precision, clipping) and the processes of a multi-process run (accelerate).

`train.quantization` holds BitsAndBytesConfig's own arguments (4-bit NF4 or 8-bit bases, trained through
an adapter); `train.optimizer` picks AdamW or bitsandbytes' 8-bit / paged AdamW; `train.loraplus_lr_ratio`
gives LoRA's B matrices a larger learning rate (LoRA+). The methods themselves are in pipeline/methods/.
"""

from __future__ import annotations

import os
import sys

import torch


def quantization_config(q: dict | None):
    """`train.quantization` (BitsAndBytesConfig's own arguments) as a config object, or None."""
    if not q:
        return None
    from transformers import BitsAndBytesConfig

    q = dict(q)
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if isinstance(q.get(key), str):
            q[key] = getattr(torch, q[key])
    return BitsAndBytesConfig(**q)


OPTIMIZERS = {"adamw": "torch.optim.AdamW", "adamw_8bit": "bitsandbytes.optim.AdamW8bit",
              "paged_adamw_8bit": "bitsandbytes.optim.PagedAdamW8bit",
              "paged_adamw_32bit": "bitsandbytes.optim.PagedAdamW32bit"}


def optimizer_class(name: str) -> type:
    """`train.optimizer`: AdamW, or bitsandbytes' 8-bit / paged AdamW (8-bit states quarter the
    optimizer memory; paging moves states to CPU memory under GPU memory pressure, CUDA only:
    on a CPU bitsandbytes uses the same optimizer unpaged)."""
    import importlib

    module, cls = OPTIMIZERS[name].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


def optimizer(model, lr: float, weight_decay: float, loraplus_lr_ratio: float | None, name: str = "adamw"):
    """The optimizer over the trainable parameters; with LoRA+ the B matrices get `lr * loraplus_lr_ratio`."""
    cls = optimizer_class(name)
    if loraplus_lr_ratio:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, cls, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
                                         weight_decay=weight_decay)
    params = [q for q in model.parameters() if q.requires_grad]
    return cls(params, lr=lr, weight_decay=weight_decay)




class Stepper:
    """One optimizer step as every recipe takes it: fp16 loss scaling (a no-op for fp32 and bf16),
    gradient clipping at `train.grad_clip`, then the optimizer."""

    def __init__(self, optimizer, params: list, precision: str, grad_clip: float | None, dev) -> None:
        self.optimizer, self.params, self.grad_clip = optimizer, params, grad_clip
        self.scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")

    def zero(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()


def stepper(model, lr: float, t, dev, loraplus: bool = True) -> Stepper:
    """The optimizer over the trainable parameters (`train.optimizer`, LoRA+ when asked) in a Stepper."""
    opt = optimizer(model, lr, t.weight_decay, t.loraplus_lr_ratio if loraplus else None, t.optimizer)
    return Stepper(opt, [q for q in model.parameters() if q.requires_grad], t.precision, t.grad_clip, dev)


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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 2 << 20
# train.allocator -> (the wheel that carries it, its library's file name); "system" is the C library's malloc
ALLOCATORS = {"mimalloc": ("cmeel-mimalloc", "libmimalloc.so")}
# mimalloc keeps freed memory for reuse instead of handing it back to the OS after 10 ms (which cost a
# page fault per 4 KB on the next step's reuse: 10-15% of the step, measured in bench/train_throughput.py)
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
    default) grew ~12 MB a step; capped at 256 (set before the first matmul of the process; an explicit
    setting wins). Under the system allocator (glibc), whose threshold for mapping allocations directly
    climbs to 32 MB, the activations of each longer batch were left in a heap too fragmented for the next
    (GBs resident and free): allocations of 2 MB and more are mapped directly, and given back when freed.
    (mimalloc, `train.allocator`'s default, reuses freed memory without that: ~400 MB less at the peak.)"""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    os.environ.setdefault("LRU_CACHE_CAPACITY", "256")
    libc = _glibc()
    if libc is not None and allocator_in_use() == "system":
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def peak_rss_mb() -> int:
    """Peak resident memory of this process so far, in MiB."""
    import resource
    import sys

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (2**20 if sys.platform == "darwin" else 2**10))
