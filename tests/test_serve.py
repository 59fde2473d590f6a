"""`peftflow serve` for real: llama-server (built from the locked sdist) with three tiny adapters of three tasks
over one base, called by the real OpenAI client, concurrently; every answer is PyTorch's greedy answer with that
adapter; an unknown adapter and a malformed request get clear errors and the server stays up; an adapter trained
on another base is refused before anything starts."""

import json
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_base, make_params, prepare

from pipeline.api import trimmed
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
    # trimmed as the server trims: a character cut by the answer limit is left out (api.trimmed)
    return [trimmed(a) for a in generate_many(model, load_tokenizer(export_dir), prompts, MAX_TOKENS, 8)]


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
    for _ in range(3):  # rounds 2 and 3 meet warm caches: a prompt state of one adapter must not serve another
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda j: ask(client, *j), jobs))
        assert len(jobs) >= 9 and got == want, [(j[0], g, w) for j, g, w in zip(jobs, got, want, strict=True)
                                                if g != w]
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


def client_of(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def streamed(stream) -> tuple[list[str], list]:
    """The joined text of each choice of a stream, and its chunks."""
    chunks = list(stream)
    texts: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            piece = ch.delta.content if hasattr(ch, "delta") else ch.text
            texts[ch.index] = texts.get(ch.index, "") + (piece or "")
    return [texts[i] for i in sorted(texts)], chunks


def test_streaming_gives_the_answer_a_whole_request_gets(fleet, server):
    client = client_of(server)
    for task, d in fleet.items():
        rows, _ = rows_of(d, 2)
        for row in rows:
            messages = row["messages"][:-1] if task == "chat" else [
                {"role": "user", "content": row["sentence" if task == "classification" else "instruction"]}]
            whole = client.chat.completions.create(model=task, messages=messages, max_tokens=MAX_TOKENS)
            texts, chunks = streamed(client.chat.completions.create(
                model=task, messages=messages, max_tokens=MAX_TOKENS, stream=True,
                stream_options={"include_usage": True}))
            assert texts == [whole.choices[0].message.content], task
            assert chunks[-1].usage.model_dump() == whole.usage.model_dump()  # the last chunk: usage, no choices
            assert chunks[0].choices[0].delta.role == "assistant"
            assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == \
                [whole.choices[0].finish_reason]
    row = rows_of(fleet["instruction"], 1)[0][0]
    whole = client.completions.create(model="instruction", prompt=row["instruction"], max_tokens=MAX_TOKENS)
    texts, _ = streamed(client.completions.create(model="instruction", prompt=row["instruction"],
                                                  max_tokens=MAX_TOKENS, stream=True))
    assert texts == [whole.choices[0].text]


def test_content_parts_and_sampling_fields_are_honoured(fleet, server):
    client = client_of(server)
    row = rows_of(fleet["instruction"], 1)[0][0]
    text = row["instruction"]
    plain = client.chat.completions.create(model="instruction", messages=[{"role": "user", "content": text}])
    parts = client.chat.completions.create(model="instruction", messages=[
        {"role": "user", "content": [{"type": "text", "text": text}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content

    def sample(seed: int) -> list[str]:
        r = client.chat.completions.create(model="instruction", messages=[{"role": "user", "content": text}], n=3,
                                           temperature=1.5, seed=seed, max_tokens=MAX_TOKENS)
        assert [c.index for c in r.choices] == [0, 1, 2]
        return [c.message.content for c in r.choices]

    first = sample(7)
    assert sample(7) == first  # seeded: repeatable
    assert sample(8) != first and len(set(first)) > 1  # a tiny random model at temperature 1.5: answers differ
    greedy = client.chat.completions.create(model="instruction", messages=[{"role": "user", "content": text}], n=2)
    assert [c.message.content for c in greedy.choices] == [plain.choices[0].message.content] * 2
    short = client.chat.completions.create(model="instruction", messages=[{"role": "user", "content": text}],
                                           max_tokens=1)
    assert short.usage.completion_tokens == 1 and short.choices[0].finish_reason == "length"
    two = client.completions.create(model="instruction", prompt=[text, text], max_tokens=MAX_TOKENS)
    assert [c.text for c in two.choices] == [plain.choices[0].message.content] * 2


def test_each_client_error_is_a_4xx_naming_the_field(fleet, server):
    import openai

    client = client_of(server)
    user = [{"role": "user", "content": "Sales rose ."}]
    cases = [
        ({"model": "instruction", "messages": user, "max_tokens": -5}, 400, "max_tokens"),
        ({"model": "instruction", "messages": [{"role": "user", "content": "word " * 3000}]}, 400, "messages"),
        ({"model": "instruction", "messages": user, "max_tokens": 2040}, 400, "max_tokens"),
        ({"model": "instruction", "messages": user, "n": 20}, 400, "n"),
        ({"model": "instruction", "messages": user, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
         "tools"),
        ({"model": "instruction", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages[0].content"),
        ({"model": "classification", "messages": user, "temperature": 1.0}, 400, "temperature"),
        ({"model": "classification", "messages": user, "n": 2}, 400, "n"),
        ({"model": "nope", "messages": user}, 404, "model"),
    ]
    for body, status, param in cases:
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(**body)
        assert (e.value.status_code, e.value.body["param"]) == (status, param), (body, e.value.message)
        assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="answers with one of its labels"):
        client.chat.completions.create(model="classification", messages=user, temperature=0.7)
    with pytest.raises(openai.APIStatusError) as e:  # a body over the limit, refused before it is read whole
        client.chat.completions.create(model="instruction", messages=[{"role": "user", "content": "x" * (2 << 20)}])
    assert e.value.status_code == 413
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        assert json.loads(r.read())["llama_server"]["state"] == "ready"


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


def test_llama_server_killed_under_load_comes_back_and_nothing_is_left_running(fleet, tmp_path):
    """6 clients, 96 requests (every fourth a client error), llama-server SIGKILLed once 30 are answered: each good request
    is answered right or gets a 503 with Retry-After, each bad one its 4xx; the server serves again; the killed
    process is reaped; SIGTERM ends the server and its llama-server."""
    from bench import serve_load

    folders = {task: d["gguf"] for task, d in fleet.items()}
    proc, url = serve_load.start_server(folders, tmp_path / "serve.log")
    try:
        client = client_of(url)
        good = []
        for task, d in fleet.items():
            for row in rows_of(d, 3)[0]:
                messages = row["messages"][:-1] if task == "chat" else [
                    {"role": "user", "content": row["sentence" if task == "classification" else "instruction"]}]
                body = {"model": task, "messages": messages}
                good.append(serve_load.Call(body, client.chat.completions.create(**body).choices[0].message.content))
        run = serve_load.drive(url, serve_load.mix(good, serve_load.bad_calls("instruction"), 96), 6, 30)
        assert serve_load.check(run) == [], serve_load.check(run)[:5]
        statuses = {o.status for o in run.outcomes}
        assert statuses <= {200, 400, 404, 503} and 503 in statuses and 200 in statuses, statuses
        after = serve_load.wait_ready(url, 60)["llama_server"]
        assert after["restarts"] == 1 and after["pid"] != run.killed_pid
        assert "SIGKILL" in after["last_exit"]
        assert not Path(f"/proc/{run.killed_pid}").exists()  # reaped: no zombie
        assert serve_load.check(serve_load.drive(url, good, 3, None)) == []  # answers as before the kill
    finally:
        proc.terminate()
        code = proc.wait(30)
    log = (tmp_path / "serve.log").read_text()
    assert code in (0, -signal.SIGTERM) and f"llama-server (pid {after['pid']}) stopped" in log, (code, log[-2000:])
    for _ in range(50):
        if not Path(f"/proc/{after['pid']}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{after['pid']}").exists(), "llama-server left running"
    assert "ended: killed by SIGKILL" in log and "llama-server back" in log
