"""`peftflow serve`: many adapters over one base model in llama.cpp's own server, OpenAI-compatible.

Each gguf stage output folder (`models/gguf`, or another experiment's or workspace's) gives one adapter:
its GGUF LoRA adapter, the base GGUF it goes with, the training tokenizer and, inside the adapter file's
lineage, the prompt it was trained with. All must share one base: the base files' tensor hashes must be
equal, else one line names the adapter that differs (as `peftflow predict` refuses another base).

One `llama-server` (built from the locked sdist) holds the base weights once and every adapter, loaded
unapplied (`--lora-init-without-apply`); in front of it, on 127.0.0.1, a small OpenAI-compatible layer
(FastAPI, already in the lock for Prefect's server):
  - `GET /v1/models`: the adapters by name, each with its GGUF path and tensor hash (what `peftflow lineage
    http://...` checks);
  - `POST /v1/chat/completions`, `POST /v1/completions`: `model` names the adapter; the user's text (the last
    user message, or the prompt) fills the adapter's own training template, which the training tokenizer
    turns into the training ids; llama-server gets those ids and `lora` set to that adapter alone (scale 1,
    the others 0), and answers greedily (temperature 0) up to `max_tokens`; each adapter has slots of its own
    when there are enough (slot_plan), so that no slot's prompt cache is cleared by a change of adapter.
An unknown adapter name is a 404 and a malformed request a 400, in OpenAI's error shape; the server stays up.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pipeline import tasks
from pipeline.core import llamacpp
from pipeline.core.encoding import encode_prompt
from pipeline.core.loading import load_tokenizer
from pipeline.core.prompting import Prompt
from pipeline.core.stage import PipelineError


@dataclass
class Adapter:
    name: str
    gguf: Path  # the GGUF LoRA adapter
    base: Path  # the base GGUF it was converted against
    base_sha256: str  # that base's tensor hash
    prompt: Prompt
    tokenizer: object

    def ids(self, text: str | None, messages: list[dict] | None) -> list[int]:
        """The training ids of the prompt for one request (the text, or a conversation)."""
        task = tasks.get(self.prompt.task)
        if self.prompt.task == "chat":
            row = {"messages": messages if messages is not None else [{"role": "user", "content": text}]}
        else:
            if text is None:
                users = [m for m in messages or [] if m.get("role") == "user"]
                if not users:
                    raise ValueError("messages: no user message to answer")
                text = users[-1]["content"]
            row = task.row_from_text(str(text), self.prompt)
        return encode_prompt(self.tokenizer, task.prompt(self.prompt, self.prompt.renderer(self.tokenizer), row,
                                                         f"adapter '{self.name}'"))


def load_adapter(name: str, folder: Path) -> Adapter:
    """One gguf stage folder as a served adapter (or a clear error saying why it cannot be)."""
    info_file = folder / "gguf.json"
    if not info_file.is_file():
        raise PipelineError(f"serve: {folder}: not a gguf stage output (no gguf.json); give folders like models/gguf")
    info = json.loads(info_file.read_text())
    files = info.get("files", {})
    adapter = next((n for n, f in files.items() if f["role"] == "adapter"), None)
    if adapter is None:
        why = info.get("adapter_refused") or info.get("reason") or "no adapter file"
        raise PipelineError(f"serve: {folder}: no GGUF LoRA adapter to serve ({why}); serve its merged model-*.gguf "
                            "with llama-server -m, or Ollama")
    record, stamped, now = llamacpp.read_stamp(folder / adapter)
    if stamped != now:
        raise PipelineError(f"serve: {folder / adapter}: its tensors changed since the gguf stage wrote it "
                            f"(sha256 {now[:12]}, recorded {str(stamped)[:12]})")
    base = folder / files[adapter]["base"]
    _, base_sha, _ = llamacpp.read_stamp(base)
    return Adapter(name, folder / adapter, base, str(base_sha), Prompt.from_record(record["export"]),
                   load_tokenizer(folder / "tokenizer"))


def load_adapters(specs: list[tuple[str | None, Path]]) -> list[Adapter]:
    """The adapters (a name, or None: named by its task), checked to have distinct names and one base model."""
    adapters = [load_adapter(n or "", Path(f)) for n, f in specs]
    for a in adapters:
        a.name = a.name or a.prompt.task
    names = [a.name for a in adapters]
    if len(set(names)) < len(names):
        raise PipelineError(f"serve: two adapters are named alike ({', '.join(names)}); give them as NAME=FOLDER")
    first = adapters[0]
    for a in adapters[1:]:
        if a.base_sha256 != first.base_sha256:
            raise PipelineError(f"serve: adapter '{a.name}' was trained on another base model than '{first.name}' "
                                f"(base tensors sha256 {a.base_sha256[:12]} vs {first.base_sha256[:12]}); one server "
                                "serves adapters of one base")
    return adapters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """In the child before exec (Linux): end llama-server when the process that started it ends, however it ends."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_llama_server(model: Path, loras: list[Path], port: int, threads: int, slots: int, ctx: int,
                       cache_type: str = "f16") -> subprocess.Popen:
    """llama-server on 127.0.0.1:`port` with the model and every LoRA adapter given (unapplied: a request says
    which), its KV cache of `cache_type`; returns when it is ready."""
    import urllib.request

    cmd = [str(llamacpp.tool("llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-np", str(slots), "-c", str(ctx * slots), "-ctk", cache_type, "-ctv", cache_type,
           "--no-webui", "--log-disable"]
    if loras:
        cmd.append("--lora-init-without-apply")
    for lora in loras:
        cmd += ["--lora", str(lora)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=die_with_parent)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PipelineError(f"serve: llama-server exited ({proc.returncode}): "
                                f"{' | '.join(proc.stderr.read().strip().splitlines()[-3:])}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise PipelineError("serve: llama-server did not become ready in 120 s")


def slot_plan(n_adapters: int, slots: int) -> list[list[int]]:
    """The llama-server slots each adapter's requests go to: adapter k on slots k, k + n, ... (none pinned when
    there are fewer slots than adapters). llama-server clears a slot's prompt cache when the slot changes
    adapter; pinned, no slot does (bench.serving: 1.5x the requests/s with requests spread over 3 adapters)."""
    if slots < n_adapters:
        return [[] for _ in range(n_adapters)]
    return [list(range(k, slots, n_adapters)) for k in range(n_adapters)]


def app(adapters: list[Adapter], upstream: str, max_tokens: int, slots: int = 0):
    """The OpenAI-compatible layer in front of llama-server (`slots`: llama-server's, for slot_plan)."""
    by_name = {a.name: (i, a) for i, a in enumerate(adapters)}
    plan, sent = slot_plan(len(adapters), slots), [0] * len(adapters)
    api = FastAPI(title="peftflow serve")
    client = httpx.AsyncClient(base_url=upstream, timeout=600)

    def error(status: int, message: str, code: str) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": a.name, "object": "model", "owned_by": "peftflow", "created": 0, "task": a.prompt.task,
             "gguf": str(a.gguf.resolve()), "base": str(a.base.resolve()), "base_tensors_sha256": a.base_sha256}
            for a in adapters]}

    async def complete(request: Request, chat: bool):
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the request body is not JSON", "invalid_json")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return error(400, "'model' (the adapter's name) is required", "missing_model")
        if body["model"] not in by_name:
            return error(404, f"no adapter named '{body['model']}' (served: {', '.join(by_name)})", "model_not_found")
        index, adapter = by_name[body["model"]]
        try:
            ids = request_ids(adapter, body, chat)
            limit = int(body.get("max_tokens") or body.get("max_completion_tokens") or max_tokens)
        except (ValueError, TypeError, KeyError, PipelineError) as e:
            return error(400, f"{type(e).__name__}: {e}", "invalid_request")
        lora = [{"id": i, "scale": 1.0 if i == index else 0.0} for i in range(len(adapters))]
        own = plan[index]
        slot = own[sent[index] % len(own)] if own else -1  # -1: any free slot
        sent[index] += 1
        r = await client.post("/completion", json={"prompt": ids, "n_predict": limit, "temperature": 0.0,
                                                   "top_k": 1, "lora": lora, "cache_prompt": True, "id_slot": slot})
        if r.status_code != 200:
            return error(502, f"llama-server: {r.text[:300]}", "upstream_error")
        return openai_response(r.json(), adapter.name, chat, len(ids))

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @api.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return api


def request_ids(adapter: Adapter, body: dict, chat: bool) -> list[int]:
    """The training ids for an OpenAI request body (chat: `messages`; completions: `prompt`, one string)."""
    if chat:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise ValueError("messages: a non-empty list of {role, content} objects with text content")
        return adapter.ids(None, [{"role": m.get("role"), "content": m["content"]} for m in messages])
    prompt = body["prompt"]
    if not isinstance(prompt, str):
        raise ValueError("prompt: one string (the text the adapter's template is filled with)")
    return adapter.ids(prompt, None)


def openai_response(r: dict, model: str, chat: bool, prompt_tokens: int) -> dict:
    """llama-server's /completion answer in OpenAI's shape."""
    text, n = r.get("content", "").strip(), int(r.get("tokens_predicted", 0))
    finish = "length" if r.get("stop_type") == "limit" else "stop"
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        return {"id": f"chatcmpl-{os.urandom(6).hex()}", "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": [choice], "usage": usage}
    return {"id": f"cmpl-{os.urandom(6).hex()}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": usage}


def serve(adapters: list[Adapter], port: int, threads: int, slots: int, ctx: int, max_tokens: int,
          cache_type: str = "f16") -> None:
    """Start llama-server and the OpenAI layer on 127.0.0.1:`port`; runs until stopped."""
    import uvicorn

    inner = free_port()
    proc = start_llama_server(adapters[0].base, [a.gguf for a in adapters], inner, threads, slots, ctx, cache_type)
    try:
        uvicorn.run(app(adapters, f"http://127.0.0.1:{inner}", max_tokens, slots), host="127.0.0.1", port=port,
                    log_level="warning")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
