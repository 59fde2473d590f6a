"""`peftflow import-data`: a data file from a dataset on the Hugging Face hub, pinned to a commit,
copied into the project and tracked by DVC.

Job: resolve `ID` at commit `REVISION` and `FILE` in that dataset repository through huggingface_hub
(its local cache first: a folder in the hub's cache layout, `datasets--<owner>--<name>/snapshots/
<commit>/<file>`, works offline; the network only when the file is not there and HF_HUB_OFFLINE is
not set), copy it to `OUT` and `dvc add` it with the source in the `.dvc` file's `meta`. A branch or
tag is refused (it moves). Point `data.train` / `data.validation` at `OUT`: DVC then hashes the file
itself (dvc.lock holds its md5 like any local file's), and the lineage of everything made from it
names the dataset, commit and file (from the `.dvc` file's `meta`).

Inputs: dataset id, commit, file path in the dataset repository, the hub cache folder (optional).
Outputs: `OUT` (DVC-tracked, git-ignored) and `OUT.dvc` (commit it).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from pipeline.core.io import atomic_write_text, sha256_file
from pipeline.core.stage import PipelineError

COMMIT = re.compile(r"^[0-9a-f]{40}$")


def source_url(dataset: str, revision: str, file: str) -> str:
    return f"hf://datasets/{dataset}@{revision}/{file}"


def resolve(dataset: str, revision: str, file: str, cache_dir: Path | None = None) -> Path:
    """The local path of `file` of `dataset` at `revision`, from the hub cache or downloaded into it."""
    if not COMMIT.match(revision):
        raise PipelineError(f"import-data: revision {revision!r} of {dataset} is not a commit (40 hex digits); "
                            "a branch or tag moves, so the data would change under the same params: pin the commit sha "
                            "(the hub page's 'History', or `huggingface_hub.HfApi().dataset_info(id).sha`)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(dataset, file, revision=revision, repo_type="dataset",
                                    cache_dir=str(cache_dir) if cache_dir else None))
    except LocalEntryNotFoundError:
        where = cache_dir or "the hub cache (HF_HUB_CACHE)"
        raise PipelineError(
            f"import-data: {source_url(dataset, revision, file)} is not in {where} and the hub cannot be reached "
            f"(offline); on a connected machine run `huggingface-cli download {dataset} {file} --repo-type dataset "
            f"--revision {revision} --cache-dir DIR` and pass --cache-dir DIR here") from None
    except (EntryNotFoundError, HfHubHTTPError) as e:
        raise PipelineError(f"import-data: {source_url(dataset, revision, file)}: {str(e).splitlines()[0]}") from None


def import_data(dataset: str, revision: str, file: str, out: Path, cache_dir: Path | None = None,
                root: Path = Path(".")) -> dict:
    """Copy the pinned file to `out`, `dvc add` it and record its source in `out.dvc`; returns the source."""
    src = resolve(dataset, revision, file, cache_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(out)
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.add(str(out))
    meta = {"source": source_url(dataset, revision, file), "dataset": dataset, "revision": revision, "file": file,
            "sha256": sha256_file(out)}
    dvc_file = out.with_name(out.name + ".dvc")
    spec = yaml.safe_load(dvc_file.read_text())
    spec["meta"] = meta
    atomic_write_text(dvc_file, yaml.safe_dump(spec, sort_keys=False))
    return meta

