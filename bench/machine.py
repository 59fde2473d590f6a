"""Which machine a benchmark ran on, said one way in every result: the CPU's model name and its hardware class
(pipeline/core/lineage.py: the best matrix instructions, which decide bf16/fp32 results and speed here), the
accelerator or the CPU threads, and torch's version; `table`, the one markdown table writer of bench/; and `save`,
one way to keep a result (JSON with the machine, markdown table). The ground floor of bench/: it imports no
benchmark.

Inputs: /proc/cpuinfo, torch. Outputs: strings for the `machine` field of bench/results/*.json and their tables;
the files `save` writes.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tabulate import tabulate

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


def table(columns: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """Every benchmark's markdown table, one way: `columns` the header, `rows` the cells as they should read
    (formatted by the caller; a short row or None leaves cells blank), `align` one letter a column, `l` or `r`
    (default: the first column left, the others right). tabulate's pipe format, which GitHub renders and whose
    padding keeps the raw file readable as a table; no trailing newline."""
    align = align or "l" + "r" * (len(columns) - 1)
    if len(align) != len(columns):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(columns)} columns")
    cells = [["" if c is None else str(c) for c in row] for row in rows]
    return tabulate(cells, headers=list(columns), tablefmt="pipe", disable_numparse=True,
                    colalign=[{"l": "left", "r": "right"}[a] for a in align])
