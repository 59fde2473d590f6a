"""Pull-request report: what a change did to params and metrics, as markdown with images.

Compares the working tree with another revision (default `main`) through DVC's own diff of
params and metrics (`dvc params diff`, `dvc metrics diff`), and draws the loss curves of both
revisions on one plot and the two confusion matrices side by side. Metrics and plots are small
files kept in git (`reports/`), so any commit can be compared.

With a fleet (docs/fleet.md) the report has one section per pipeline that changed: the default job,
then each adapter of the fleet whose params (its file fleet/resolved/<name>.yaml) or metrics
(fleet/<name>/reports/) changed, each with its own table and plots, so a pull request that changes one
adapter shows that one; the adapters left as they were are named in one line.

Metrics come as a reviewer reads them: what changed first, then the deltas within `--atol`/`--rtol`
(|delta| <= atol + rtol |before|, marked as such: DVC's own `metrics diff` has no tolerance), the unchanged
ones counted in one line, and last the run facts (`reports/train/run.json`: seconds, tokens per second,
memory), which are the machine's and the day's, not the change's. The hardware class of both runs (from
their run facts) is named; when they differ the report says so before any figure.

Inputs: a git + DVC project and a revision. Outputs: `<out>/report.md` and its images.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

from pipeline.audit import dvc_repo
from pipeline.core.layout import FLEET, FLEET_DVC_YAML, FLEET_PARAMS, adapter_dir, owner
from pipeline.core.lineage import hardware_class

LOSS = "reports/train/plots/metrics/train/loss.tsv"
CONFUSION = "reports/evaluate/confusion.png"
# the train run's facts, metrics files outside every stage's outs: what ran (in git: names the hardware class of a
# revision's run) and what it took (out of git: only this run's figures)
RUN_FACTS = "reports/train/run.json"
RESOURCES = "reports/train/resources.json"


def at_rev(root: Path, rev: str | None, path: str) -> bytes | None:
    """A git-tracked file at `rev` (None: the working tree), or None when it is not there."""
    if rev is None:
        f = root / path
        return f.read_bytes() if f.exists() else None
    r = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True)
    return r.stdout if r.returncode == 0 else None


def loss_plot(root: Path, base: str, out: Path, prefix: str = "") -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for label, rev in ((base, base), ("this change", None)):
        raw = at_rev(root, rev, prefix + LOSS)
        if raw:
            rows = list(csv.DictReader(io.StringIO(raw.decode()), delimiter="\t"))
            curves[label] = ([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


def hardware_at(root: Path, rev: str | None, prefix: str = "") -> str | None:
    """The hardware class of the run whose facts a revision holds (None: no run facts there)."""
    raw = at_rev(root, rev, prefix + RUN_FACTS)
    hw = json.loads(raw).get("hardware") if raw else None
    return hardware_class(hw) if hw else None


def within(d: dict, atol: float, rtol: float) -> bool:
    """A metric's delta inside the tolerance: |new - old| <= atol + rtol |old| (both numbers)."""
    old, new = d.get("old"), d.get("new")
    return isinstance(old, int | float) and abs(new - old) <= atol + rtol * abs(old)


def build(root: Path, base: str, out: Path, atol: float = 0.0, rtol: float = 0.0) -> str:
    """Write `<out>/report.md` (and images) comparing the working tree with `base`; returns the markdown."""

    out.mkdir(parents=True, exist_ok=True)
    with dvc_repo(root) as repo:
        params = repo.params.diff(a_rev=base).get("diff", {})
        metrics = repo.metrics.diff(a_rev=base, all=True).get("diff", {})
    changed = [(f, k, d) for f, keys in params.items() for k, d in keys.items()]
    rows = [(f, f"{f}:{k}", d) for f, keys in metrics.items() for k, d in keys.items()
            if isinstance(d.get("new"), int | float) and not isinstance(d.get("new"), bool)]
    owners = sorted({owner(f) for f, *_ in changed + rows}, key=lambda o: (o != "", o != FLEET, o))
    lines = [f"## peftflow: this change vs `{base}`", ""]
    quiet = []
    for who in owners or [""]:
        mine = [c for c in changed if owner(c[0]) == who]
        numbers = [r for r in rows if owner(r[0]) == who]
        moved = mine or any(r[2].get("diff") for r in numbers)
        if who not in ("", FLEET) and not moved:
            quiet.append(who)
            continue
        title = {"": "the default job (dvc.yaml)", FLEET: f"the fleet ({FLEET_PARAMS})"}.get(
            who, f"fleet adapter `{who}` ({FLEET_DVC_YAML})")
        if who or len(owners) > 1:
            lines += [f"### {title[0].upper()}{title[1:]}", ""]
        lines += section(root, base, out, who, mine, numbers, (atol, rtol))
    if quiet:
        lines += [f"Fleet adapters with no params or metrics change: {', '.join(quiet)}.", ""]
    text = "\n".join(lines).rstrip("\n") + "\n"
    (out / "report.md").write_text(text)
    return text


def section(root: Path, base: str, out: Path, who: str, changed: list, rows: list, tol: tuple) -> list[str]:
    """One pipeline's params table, metrics table and plots (`who`: owner(); its files under fleet/<who>/)."""
    prefix = f"{adapter_dir(Path(FLEET), who).as_posix()}/" if who not in ("", FLEET) else ""
    tag = f"{who}_" if prefix else ""
    lines = machines(root, base, prefix) + ["#### Params", ""]
    if changed:
        lines += ["| param | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {fmt(d.get('old'))} | {fmt(d.get('new'))} |" for _, k, d in changed]
    else:
        lines.append("No params changed.")
    if who == FLEET:
        return lines + [""]
    lines += ["", *metrics_table(rows, *tol), "#### Plots", ""]
    if loss_plot(root, base, out / f"{tag}loss.png", prefix):
        lines.append(f"![training loss, before and after]({tag}loss.png)")
    before, after = at_rev(root, base, prefix + CONFUSION), at_rev(root, None, prefix + CONFUSION)
    if before and after and before != after:
        (out / f"{tag}confusion_before.png").write_bytes(before)
        (out / f"{tag}confusion_after.png").write_bytes(after)
        lines += ["", f"| confusion matrix at `{base}` | this change |", "|---|---|",
                  f"| ![before]({tag}confusion_before.png) | ![after]({tag}confusion_after.png) |"]
    elif after:
        lines.append("Confusion matrix unchanged.")
    return lines + [""]


def machines(root: Path, base: str, prefix: str) -> list[str]:
    """The hardware class of both runs, and a warning first when they differ."""
    before, after = hardware_at(root, base, prefix), hardware_at(root, None, prefix)
    if before is None and after is None:
        return []
    if before != after:
        return [f"**Runs on different hardware classes**: `{base}` on {before or 'unknown'}, this change on "
                f"{after or 'unknown'}. Floating-point results differ between classes (docs/reproducibility.md): "
                "a delta may be the machine's, not the change's; see the tolerance column.", ""]
    return [f"Both runs on the same hardware class: {after}.", ""]


def metrics_table(rows: list, atol: float, rtol: float) -> list[str]:
    """The metrics that changed (beyond the tolerance first, then within it), the unchanged ones counted, then
    the run facts (not the change's)."""
    facts = [r for r in rows if r[0].endswith((RUN_FACTS, RESOURCES))]
    numbers = [r for r in rows if r not in facts]
    moved = [r for r in numbers if r[2].get("diff") or r[2].get("old") is None]
    moved.sort(key=lambda r: (within(r[2], atol, rtol), r[1]))  # beyond the tolerance first, then by name
    lines = ["#### Metrics", ""]
    if moved:
        lines += ["| metric | before | after | delta |", "|---|---:|---:|---:|"]
        for _, name, d in moved:
            delta = "" if d.get("diff") is None else f"{d['diff']:+.4g}"
            mark = f" (within atol {atol:g} + rtol {rtol:g})" if within(d, atol, rtol) else ""
            lines.append(f"| {name} | {fmt(d.get('old'))} | {fmt(d['new'])} | {delta}{mark} |")
    else:
        lines.append("No metric changed.")
    if len(numbers) > len(moved):
        lines += ["", f"{len(numbers) - len(moved)} metric(s) unchanged."]
    if facts:
        lines += ["", "Run facts (this machine and day, not the change):", "", "| fact | before | after |",
                  "|---|---:|---:|", *(f"| {name} | {fmt(d.get('old'))} | {fmt(d['new'])} |" for _, name, d in facts)]
    return lines + [""]

