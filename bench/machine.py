"""Which machine a benchmark ran on, said one way in every result: the CPU's model name and its hardware class
(pipeline/core/lineage.py: the best matrix instructions, which decide bf16/fp32 results and speed here), the
accelerator or the CPU threads, and torch's version; and `save`, one way to keep a result (JSON with the machine,
markdown table). The ground floor of bench/: it imports no benchmark.

Inputs: /proc/cpuinfo, torch. Outputs: strings for the `machine` field of bench/results/*.json and their tables;
the files `save` writes.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from pipeline.core.lineage import cpu_isa


def cpu_name() -> str:
    """The CPU's model name and its hardware class (amx_bf16, avx512_bf16, avx2, ...)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return f"{model}, {cpu_isa()}"


def class_tag() -> str:
    """The hardware class as a result's name says it: the CPU's family and its class (`epyc-avx512bf16`,
    `xeon-amxbf16`; `cpu-avx2` where the model names neither)."""
    model = cpu_name().lower()
    family = next((f for f in ("epyc", "xeon") if f in model), "cpu")
    return f"{family}-{cpu_isa().replace('_', '')}"


def machine() -> str:
    """cpu_name, then the GPU or the CPU threads torch uses, then torch's version."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{torch.get_num_threads()} CPU threads"
    return f"{cpu_name()}, {dev}, torch {torch.__version__}"


def save(out: Path, name: str, record: dict, markdown: str) -> None:
    """A benchmark's result as `<out>/<name>.json` (the record, with the machine it ran on) and `<name>.md` (its
    table, printed too): the one way every benchmark that uses it keeps a result."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"machine": machine(), **record}, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
