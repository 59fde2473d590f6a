"""`peftflow serve` for real: llama-server (built from the locked sdist) with three tiny adapters of three tasks
over one base, called by the real OpenAI client, concurrently; every answer is PyTorch's greedy answer with that
adapter; an unknown adapter and a malformed request get clear errors and the server stays up; an adapter trained
on another base is refused before anything starts."""

import json
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_base, make_params, prepare

from pipeline.core.loading import load_tokenizer
from pipeline.core.scoring import generate_many
from pipeline.core.stage import PipelineError
from pipeline.serve import free_port
from pipeline.stages import export, gguf, train

pytestmark = pytest.mark.slow
MAX_TOKENS = 8


def deploy(tmp: Path, base: Path, task: str, **over) -> dict:
    """validate -> ... -> gguf for one tiny adapter; returns its folders."""
    d = prepare(tmp, base, task=task, rows=32, **over)
    p = make_params(**{"task": task, "gguf.tokenizer_pre": "gpt-2", "gguf.outtype": "f32", "gguf.quantize": [],
                       "gguf.rows": 4,
                       "gguf.max_new_tokens": MAX_TOKENS, "export.check_rows": 2, **over})
    train.run(p, d["tokenized"], d["formatted"] / "format.json", base, tmp / "adapter", tmp / "live", tmp / "ckpt")
    export.run(p, base, tmp / "adapter", d["tokenized"], tmp / "export")
    gguf.run(p, tmp / "export", tmp / "adapter", base, d["formatted"], d["validated"], tmp / "gguf")
    return {**d, "export": tmp / "export", "gguf": tmp / "gguf"}


@pytest.fixture(scope="module")
def fleet(tiny_base, tmp_path_factory) -> dict:
    return {task: deploy(tmp_path_factory.mktemp(task), tiny_base, task) for task in ("classification", "instruction",
                                                                                       "chat")}


@torch.no_grad()
def pytorch_answers(export_dir: Path, prompts: list[str]) -> list[str]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32).eval()
    return [a.strip() for a in generate_many(model, load_tokenizer(export_dir), prompts, MAX_TOKENS, 8)]


@pytest.fixture(scope="module")
def server(fleet, tmp_path_factory):
    port = free_port()
    # f32 weights and KV cache: the tiny random adapters' greedy answers hang on logit gaps of 0.002 to 0.06,
    # which llama.cpp's default f16 cache moves (about one run in six answered a chat row otherwise)
    args = [f"{task}={d['gguf']}" for task, d in fleet.items()]
    log = tmp_path_factory.mktemp("serve") / "log"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", *args, "--port", str(port), "--threads",
                             "2", "--slots", "3", "--max-tokens", str(MAX_TOKENS), "--cache-type", "f32"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=1):
                break
        except OSError:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def rows_of(d: dict, n: int = 4) -> tuple[list[dict], list[str]]:
    """Validation rows (validated, as a user sends them) and their training prompts."""
    validated = [json.loads(x) for x in (d["validated"] / "validation.jsonl").read_text().splitlines()]
    formatted = {r["row"]: r["prompt"] for r in map(json.loads, (d["formatted"] / "validation.jsonl").read_text()
                                                    .splitlines())}
    rows = [r for r in validated if r["row"] in formatted and not r.get("input")][:n]
    return rows, [formatted[r["row"]] for r in rows]


def ask(client, task: str, row: dict) -> str:
    if task == "chat":
        messages = row["messages"][:-1]
    else:
        messages = [{"role": "user", "content": row["sentence" if task == "classification" else "instruction"]}]
    r = client.chat.completions.create(model=task, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    return r.choices[0].message.content


def test_three_adapters_answer_concurrently_as_pytorch_does(fleet, server):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    assert {m.id for m in client.models.list().data} == set(fleet)
    jobs, want = [], []
    for task, d in fleet.items():
        rows, prompts = rows_of(d)
        want += pytorch_answers(d["export"], prompts)
        jobs += [(task, r) for r in rows]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda j: ask(client, *j), jobs))
    assert len(jobs) >= 9 and got == want, [(j[0], g, w) for j, g, w in zip(jobs, got, want, strict=True) if g != w]
    # the completions endpoint fills the template with the prompt text the same way
    row = rows_of(fleet["classification"], 1)[0][0]
    text = client.completions.create(model="classification", prompt=row["sentence"], max_tokens=MAX_TOKENS)
    assert text.choices[0].text == ask(client, "classification", row)


def test_unknown_adapter_and_malformed_requests_get_clear_errors_and_the_server_stays_up(fleet, server):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="no adapter named 'nope'.*served: classification"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="instruction", messages=[{"role": "user", "content": 3}])
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="instruction", prompt=[1, 2, 3])
    req = urllib.request.Request(server + "/v1/chat/completions", data=b"{not json", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and "not JSON" in e.value.read().decode()
    assert ask(client, "instruction", rows_of(fleet["instruction"], 1)[0][0]) is not None  # still up


def test_the_server_reports_each_adapters_file_and_lineage(fleet, server):
    from pipeline.core import llamacpp

    with urllib.request.urlopen(server + "/v1/models", timeout=10) as r:
        served = {m["id"]: m for m in json.loads(r.read())["data"]}
    for task, d in fleet.items():
        rec, stamped, now = llamacpp.read_stamp(Path(served[task]["gguf"]))
        assert stamped == now and rec["export"]["prompt"]["task"] == task
        assert Path(served[task]["gguf"]) == (d["gguf"] / "adapter-f32.gguf").resolve()


def test_an_adapter_of_another_base_is_refused(fleet, tmp_path):
    from pipeline import serve

    (tmp_path / "other").mkdir()
    other = deploy(tmp_path / "other", build_tiny_base(tmp_path / "base2", seed=1), "classification")
    with pytest.raises(PipelineError, match="adapter 'b' was trained on another base model than 'a'"):
        serve.load_adapters([("a", fleet["classification"]["gguf"]), ("b", other["gguf"])])
    with pytest.raises(PipelineError, match="named alike"):
        serve.load_adapters([(None, fleet["classification"]["gguf"]), ("classification", fleet["chat"]["gguf"])])


def test_each_adapter_gets_slots_of_its_own_when_there_are_enough():
    from pipeline.serve import slot_plan

    assert slot_plan(3, 6) == [[0, 3], [1, 4], [2, 5]]
    assert slot_plan(3, 4) == [[0, 3], [1], [2]]
    assert slot_plan(3, 2) == [[], [], []]  # fewer slots than adapters: any free slot
