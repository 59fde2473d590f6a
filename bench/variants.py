"""The train_throughput benchmark's variants: their names, which run the train stage, how each process is set up.

Light (bench/stage_process.py's imports only), so a worker sets its process up before its heavy imports.

  a  tutorial recipe: HF Trainer, every row padded to 512 (`padding="max_length"`), loss on all tokens, fp32
  b  well-set HF Trainer: dynamic padding, `group_by_length`, loss on the response only, bf16
  c  TRL SFTTrainer with its defaults for prompt/completion data (completion-only loss), bf16
  e  c with `padding_free=True` (each batch flattened into one sequence, position ids restarting per row)
  f  c with `packing=True` (best-fit decreasing into sequences of batch size x the mean row length, one
     sequence per step, so a step holds about as many rows as the others' batches)
  d  this project's train stage (the SFT recipe as `fit` sets it up), bf16, in a process set up as the stage program
     sets itself up (`train.allocator` preloaded, bitsandbytes skipped when the params need none)
  s  d on the system allocator (`train.allocator: system`: glibc's malloc, as tuned by the stage)
  g  b on mimalloc (preloaded as the stage preloads it): how much of d's lead is the allocator
  x  c on mimalloc (the TRL baseline on the stage's allocator)
  u  d with mimalloc handing freed memory back to the OS after 10 ms (its default; the stage keeps it)
  w  d with its OpenMP threads always spinning before they sleep (libgomp's default)
  v  d with its OpenMP threads always asleep at once (the stage chooses one of the two at its start: docs/speed.md)
  p  d with `train.shared_prefix: false` (left-padded batches: what the shared prefix saves)
  l  d with `train.lean: false` (frozen weights cast on every call, fp32 dropout masks, eager attention and
     MLP activations kept: what pipeline/core/lean.py saves)
  t  d with `train.max_batch_tokens: --budget` (1024: every batch of 16 rows longer than 64 tokens in two
     passes or more: memory against speed)
  k  d packed instead (`train.packing: true`, `shared_prefix: false`; attention `auto`: on CPU eager with a
     block-diagonal mask, on a GPU one flat sequence through torch's flash varlen kernel)
  m  k with `train.attn_implementation: sdpa` (on a GPU: the block-diagonal mask instead of varlen)
  q  d with QLoRA (4-bit NF4), for memory
"""

from __future__ import annotations

from bench.stage_process import as_stage, as_user
from pipeline.core.allocator import SLEEP, SPIN

NAMES = {"a": "HF Trainer, pad to 512 (tutorial)", "b": "HF Trainer, dynamic padding + group_by_length",
         "c": "TRL SFTTrainer (completion only)", "d": "peftflow train stage",
         "e": "TRL SFTTrainer, padding_free", "f": "TRL SFTTrainer, packing (bfd)",
         "p": "peftflow train stage, padded (train.shared_prefix false)",
         "l": "peftflow train stage, train.lean false",
         "t": "peftflow train stage, train.max_batch_tokens --budget", "q": "peftflow train stage, QLoRA 4-bit",
         "k": "peftflow train stage, packing", "m": "peftflow train stage, packing, sdpa mask",
         "s": "peftflow train stage, train.allocator system (glibc)", "g": "HF Trainer as b, on mimalloc",
         "u": "peftflow train stage, mimalloc purging freed memory after 10 ms",
         "w": "peftflow train stage, OpenMP threads always spinning",
         "v": "peftflow train stage, OpenMP threads always asleep", "x": "TRL SFTTrainer as c, on mimalloc"}
STAGE = "dpltkmqsuwv"  # the variants that run the train stage (the others are the baselines)
# the stage's variants whose OpenMP threads wait as set here, not as the stage chooses at its start (thread_env)
WAITING = {"w": {"GOMP_SPINCOUNT": SPIN}, "v": {"GOMP_SPINCOUNT": SLEEP}}
# else: the stage's variants the committed params' allocator, the baselines the system's
ALLOCATOR = {"s": "system", "g": "mimalloc", "x": "mimalloc"}


def set_up(name: str) -> None:
    """Variant `name`'s process as its users get it: the train stage's variants as the stage program sets itself
    up, the baselines on the system allocator (g, x: on mimalloc) with OpenMP's defaults. Re-executes once."""
    if name in STAGE:
        as_stage(ALLOCATOR.get(name), WAITING.get(name), quantizes=name == "q", purge_ms=10 if name == "u" else None)
    else:
        as_user(ALLOCATOR.get(name, "system"))
