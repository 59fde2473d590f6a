"""Pull-request report: what a change did to params and metrics, as markdown with images.

Compares the working tree with another revision (default `main`) through DVC's own diff of
params and metrics (`dvc params diff`, `dvc metrics diff`), and draws the loss curves of both
revisions on one plot and the two confusion matrices side by side. Metrics and plots are small
files kept in git (`reports/`), so any commit can be compared.

With a fleet (docs/fleet.md) the report has one section per pipeline that changed: the default job,
then each adapter of the fleet whose params (its file fleet/resolved/<name>.yaml) or metrics
(fleet/<name>/reports/) changed, each with its own table and plots, so a pull request that changes one
adapter shows that one; the adapters left as they were are named in one line.

Inputs: a git + DVC project and a revision. Outputs: `<out>/report.md` and its images.
"""

from __future__ import annotations

import csv
import io
import subprocess
from pathlib import Path

from pipeline.core.layout import FLEET, FLEET_DVC_YAML, FLEET_PARAMS, adapter_dir, owner
from pipeline.core.lineage import dvc_repo

LOSS = "reports/train/plots/metrics/train/loss.tsv"
CONFUSION = "reports/evaluate/confusion.png"


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


def build(root: Path, base: str, out: Path) -> str:
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
        lines += section(root, base, out, who, mine, numbers)
    if quiet:
        lines += [f"Fleet adapters with no params or metrics change: {', '.join(quiet)}.", ""]
    text = "\n".join(lines).rstrip("\n") + "\n"
    (out / "report.md").write_text(text)
    return text


def section(root: Path, base: str, out: Path, who: str, changed: list, rows: list) -> list[str]:
    """One pipeline's params table, metrics table and plots (`who`: owner(); its files under fleet/<who>/)."""
    prefix = f"{adapter_dir(Path(FLEET), who).as_posix()}/" if who not in ("", FLEET) else ""
    tag = f"{who}_" if prefix else ""
    lines = ["#### Params", ""]
    if changed:
        lines += ["| param | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {fmt(d.get('old'))} | {fmt(d.get('new'))} |" for _, k, d in changed]
    else:
        lines.append("No params changed.")
    if who == FLEET:
        return lines + [""]
    lines += ["", "#### Metrics", "", "| metric | before | after | delta |", "|---|---:|---:|---:|"]
    rows = sorted(rows, key=lambda r: (not r[2].get("diff"), r[1]))  # what changed first, then by name
    for _, name, d in rows:
        delta = d.get("diff")
        lines.append(f"| {name} | {fmt(d.get('old'))} | {fmt(d['new'])} | {'' if delta is None else f'{delta:+.4g}'} |")
    lines += ["", "#### Plots", ""]
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
