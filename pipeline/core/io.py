"""Reading records with row numbers, atomic writes and content hashes.

Job: every stage reads and writes through here, so that bad input names its file and row and
no output is ever half written (temp file or temp folder + rename).

Inputs: jsonl / csv / parquet files. Outputs: files and folders written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.stage import PipelineError


@dataclass
class Record:
    """One input row: its 1-based row number (line number for jsonl), the fields, or why not."""

    row: int
    data: dict[str, Any] | None
    error: str | None = None


def read_records(path: str | Path) -> list[Record]:
    """Read every row of a jsonl, csv or parquet file. Unreadable rows carry an `error`."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".parquet"):
        raise PipelineError(f"{path}: unsupported data format '{suffix}' (use .jsonl, .csv or .parquet)")
    if suffix in (".jsonl", ".json"):
        records = list(_read_jsonl(path))
    elif suffix == ".csv" and not path.read_bytes().lstrip(b"\xef\xbb\xbf").strip():
        records = []
    elif suffix == ".csv":
        import pandas as pd

        # utf-8-sig: a spreadsheet's byte-order mark is not part of the first column's name
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        records = [Record(2 + i, dict(r)) for i, r in enumerate(df.to_dict(orient="records"))]  # row 1: header
    else:
        import pyarrow.parquet as pq

        # as Python lists and dicts (a hub dataset's `messages` column is a list of structs)
        records = [Record(1 + i, r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    if not records:
        raise PipelineError(f"{path}: file is empty (no rows)")
    return records


def _read_jsonl(path: Path) -> Iterator[Record]:
    with path.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            if not raw.strip() or (i == 1 and raw.strip() == b"\xef\xbb\xbf"):
                continue
            try:  # a byte-order mark (Windows editors) and CRLF line ends are accepted
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield Record(i, None, f"invalid UTF-8 at byte {e.start}")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Record(i, None, f"malformed JSON: {e.msg} at column {e.colno}")
                continue
            if not isinstance(obj, dict):
                yield Record(i, None, f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield Record(i, obj)


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a jsonl file written by this pipeline (any bad line is an error naming it)."""
    out = []
    for rec in read_records(path):
        if rec.error:
            raise PipelineError(f"{path}: row {rec.row}: {rec.error}")
        out.append(rec.data)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_sibling(path: Path, is_dir: bool) -> Path:
    """A new temporary file or folder beside `path`, with the mode a plain new one gets (tempfile makes them
    0600 / 0700, which a teammate or a server under another user could not read once renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:  # what a killed run left half written (a stage's outputs are written by one process at a time)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        tmp.chmod(0o777 & ~_umask())
        return tmp
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    Path(name).chmod(0o666 & ~_umask())
    return Path(name)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = _tmp_sibling(path, is_dir=False)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def plain_modes(folder: Path) -> None:
    """Every file and folder under `folder` given the mode a new one gets under the user's umask (0644 / 0755)."""
    mask = _umask()
    for f in folder.rglob("*"):
        if not f.is_symlink():
            f.chmod((0o777 if f.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path` whole, on error it is removed. What the libraries
    wrote in it gets a plain new file's mode (safetensors writes 0600 files: unreadable to a teammate or a server
    under another user)."""
    path = Path(path)
    tmp = _tmp_sibling(path, is_dir=True)
    try:
        yield tmp
        plain_modes(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_digest(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks (sha256 for our records; md5 is DVC's content hash)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
