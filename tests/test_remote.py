"""A DVC remote on a real S3-compatible server (moto's, on 127.0.0.1): a push that the remote drops in the
middle leaves only whole objects behind, a second push completes it, and a fresh clone pulls everything,
finds the pipeline up to date and the adapter's lineage whole. moto[server] and dvc-s3 are the lock's `remote`
extra (docs/fleet.md#a-remote-on-an-object-store)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from conftest import Cuttable, add_remote, copy_repo, sh


def remote_objects(s3: dict, bucket: str) -> dict[str, bytes]:
    """Every object of the bucket (read from the server directly), by key."""
    client, out = s3["client"], {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def whole(key: str, body: bytes) -> bool:
    """A DVC remote object is named by its content's md5 (files/md5/ab/cdef...; a folder's list ends in .dir)."""
    name = "".join(key.split("/")[-2:]).removesuffix(".dir")
    if key.endswith(".dir"):
        json.loads(body)  # a folder's list is whole JSON
    return hashlib.md5(body).hexdigest() == name


def test_a_push_cut_off_midway_leaves_only_whole_objects_and_a_rerun_completes(history, s3, tmp_path):
    repo = copy_repo(history["root"], tmp_path / "repo")
    cache = [f for f in (repo / ".dvc" / "cache" / "files").rglob("*") if f.is_file()]
    proxy = Cuttable(s3["port"])
    add_remote(repo, s3, "cut", endpoint=f"http://127.0.0.1:{proxy.port}")
    sh(repo, "git", "commit", "-qam", "remote")
    proxy.cut_after = sum(f.stat().st_size for f in cache) // 3  # the store goes away a third of the way in
    # botocore's own retries (5, with backoff) under s3fs's (5): one attempt each, so the failure comes in seconds
    env = {"PATH": f"{sys.executable.rsplit('/', 1)[0]}:/usr/bin:/bin", "AWS_MAX_ATTEMPTS": "1",
           "AWS_RETRY_MODE": "standard", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "dvc", "push"], cwd=repo, capture_output=True, text=True, env=env)
    assert r.returncode != 0 and proxy.down
    partial = remote_objects(s3, "cut")
    assert len(partial) < len(cache)
    assert all(whole(k, b) for k, b in partial.items()), "a half-written object on the remote"

    proxy.restore()
    sh(repo, sys.executable, "-m", "dvc", "push")
    pushed = remote_objects(s3, "cut")
    assert len(pushed) > len(partial) and all(whole(k, b) for k, b in pushed.items())
    assert "in sync" in sh(repo, sys.executable, "-m", "dvc", "status", "--cloud")

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    add_remote(clone, s3, None)
    sh(clone, sys.executable, "-m", "dvc", "pull", "-q")
    assert sh(clone, sys.executable, "-m", "dvc", "status").strip() == "Data and pipelines are up to date."
    assert "MISMATCH" not in sh(clone, sys.executable, "-m", "pipeline.cli", "lineage", "models/adapter")
