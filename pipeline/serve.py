"""`peftflow serve`: many adapters over one base model in llama.cpp's own server, OpenAI-compatible.

Each gguf stage output folder (`models/gguf`, or another experiment's or workspace's) gives one adapter:
its GGUF LoRA adapter, the base GGUF it goes with, the training tokenizer and, inside the adapter file's
lineage, the prompt it was trained with. All must share one base: the base files' tensor hashes must be
equal, else one line names the adapter that differs (as `peftflow predict` refuses another base).

One `llama-server` (built from the locked sdist, watched and restarted by pipeline.backend) holds the base
weights once and every adapter, loaded unapplied (`--lora-init-without-apply`); in front of it, on 127.0.0.1, an
OpenAI-compatible layer (FastAPI, already in the lock for Prefect's server):
  - `GET /v1/models`: the adapters by name, each with its GGUF path and tensor hash (what `peftflow lineage
    http://...` checks); `GET /health`: 200 while llama-server serves, else 503 and its state;
  - `POST /v1/chat/completions`, `POST /v1/completions`, whole or streamed (server-sent events): `model` names
    the adapter; the user's text (the last user message, or each prompt) fills the adapter's own training
    template, which the training tokenizer turns into the training ids; llama-server gets those ids and `lora`
    set to that adapter alone (scale 1, the others 0); each adapter has slots of its own when there are enough
    (slot_plan), so that no slot's prompt cache is cleared by a change of adapter.
Requests are checked (pipeline.api) before llama-server sees them: a client's error is a 4xx in OpenAI's error
shape naming the field; while llama-server is down or restarting, a 503 with Retry-After. docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline import api, tasks
from pipeline.backend import Backend
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


def llama_server_cmd(model: Path, loras: list[Path], port: int, threads: int, slots: int, ctx: int,
                     cache_type: str = "f16") -> list[str]:
    """llama-server on 127.0.0.1:`port` with the model and every LoRA adapter given (unapplied: a request says
    which), `slots` slots of `ctx` tokens each, its KV cache of `cache_type`."""
    cmd = [str(llamacpp.tool("llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-np", str(slots), "-c", str(ctx * slots), "-ctk", cache_type, "-ctv", cache_type,
           "--no-webui", "--log-disable", "--cache-ram", "0"]
    if loras:
        cmd.append("--lora-init-without-apply")
    for lora in loras:
        cmd += ["--lora", str(lora)]
    return cmd


def slot_plan(n_adapters: int, slots: int) -> list[list[int]]:
    """The llama-server slots each adapter's requests go to: adapter k on slots k, k + n, ... (none pinned when
    there are fewer slots than adapters). llama-server clears a slot's prompt cache when the slot changes
    adapter; pinned, no slot does (bench.serving: 1.5x the requests/s with requests spread over 3 adapters)."""
    if slots < n_adapters:
        return [[] for _ in range(n_adapters)]
    return [list(range(k, slots, n_adapters)) for k in range(n_adapters)]


async def read_body(request: Request, limits: api.Limits) -> bytes:
    """The request body, refused (413) as soon as it is longer than the limit, before it is all read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body:
        raise api.ApiError(413, f"the request body is {declared} bytes; this server takes at most {limits.max_body}",
                           None, "request_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limits.max_body:
            raise api.ApiError(413, f"the request body is over {limits.max_body} bytes, this server's limit", None,
                               "request_too_large")
    return bytes(raw)


@dataclass
class Job:
    """One answer to make: llama-server's /completion body, the prompt's token count."""

    body: dict
    prompt_tokens: int


class Layer:
    """What the OpenAI-compatible routes do: check a request, send its answers' jobs to llama-server, shape them."""

    def __init__(self, adapters: list[Adapter], backend: Backend, limits: api.Limits, slots: int):
        self.adapters, self.backend, self.limits = adapters, backend, limits
        self.by_name = {a.name: (i, a) for i, a in enumerate(adapters)}
        self.plan, self.sent = slot_plan(len(adapters), slots), [0] * len(adapters)
        self.client = httpx.AsyncClient(base_url=backend.url, timeout=600)

    def jobs(self, ask: api.Ask) -> list[Job]:
        """The request's answers (prompt by prompt, n each), each on its adapter's next slot; 4xx when the
        adapter is unknown, refuses sampling, or a prompt does not fit."""
        if ask.model not in self.by_name:
            raise api.ApiError(404, f"no adapter named '{ask.model}' (served: {', '.join(self.by_name)})", "model",
                               "model_not_found")
        index, adapter = self.by_name[ask.model]
        labels = tasks.get(adapter.prompt.task).serving_labels(adapter.prompt)
        if labels and ask.sampling():
            raise api.ApiError(400, f"{', '.join(ask.sampling())}: adapter '{adapter.name}' answers with one of its "
                                    f"labels ({', '.join(labels)}), greedily, as the evaluate stage scored it: ask "
                                    "without sampling (temperature 0, top_p 1, n 1)", ask.sampling()[0],
                               "unsupported_for_adapter")
        try:
            prompts = [adapter.ids(None, m) if ask.chat else adapter.ids(m, None) for m in ask.inputs]
        except (ValueError, PipelineError) as e:
            raise api.ApiError(400, f"{'messages' if ask.chat else 'prompt'}: {e}",
                               "messages" if ask.chat else "prompt") from None
        lora = [{"id": i, "scale": 1.0 if i == index else 0.0} for i in range(len(self.adapters))]
        out = []
        for ids in prompts:
            limit = api.budget(ask, len(ids), self.limits)
            for k in range(ask.n):
                own = self.plan[index]
                slot = own[self.sent[index] % len(own)] if own else -1  # -1: any free slot
                self.sent[index] += 1
                out.append(Job({**api.upstream(ask, ids, limit, k), "lora": lora, "id_slot": slot}, len(ids)))
        return out

    async def one(self, job: Job) -> dict:
        """One whole answer from llama-server (ApiError 503 when it is down, 502 when it refuses)."""
        try:
            r = await self.client.post("/completion", json=job.body)
        except httpx.TransportError:
            raise self.backend.lost() from None
        if r.status_code == 200:
            return r.json()
        raise self.refused(r)

    def refused(self, r: httpx.Response) -> api.ApiError:
        """What a non-200 answer of llama-server becomes: a 503 while it is down or starting, else a 502."""
        if r.status_code == 503 or self.backend.check() != "ready":
            return self.backend.lost()
        return api.ApiError(502, f"llama-server: {r.text[:300]}", None, "upstream_error")

    async def pieces(self, i: int, job: Job, queue: asyncio.Queue) -> None:
        """One streamed answer from llama-server onto `queue`: (i, "piece", text)..., then (i, "end", last) or
        (i, "error", ApiError)."""
        try:
            async with self.client.stream("POST", "/completion", json=job.body) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise self.refused(r)
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = json.loads(line[6:])
                    await queue.put((i, "piece", data.get("content", "")))
                    if data.get("stop"):
                        await queue.put((i, "end", data))
                        return
            raise self.backend.lost()
        except httpx.TransportError:
            await queue.put((i, "error", self.backend.lost()))
        except api.ApiError as e:
            await queue.put((i, "error", e))

    async def stream(self, ask: api.Ask, jobs: list[Job]):
        """The server-sent events of a streamed request: its choices' pieces as they come, then usage and [DONE]
        (or an error event when llama-server is lost midway)."""
        chunks, queue = api.Chunks(ask), asyncio.Queue()
        running = [asyncio.create_task(self.pieces(i, j, queue)) for i, j in enumerate(jobs)]
        left, made = len(jobs), 0
        try:
            while left:
                i, kind, x = await queue.get()
                if kind == "error":
                    yield chunks.error(x)
                    return
                if kind == "end":
                    left, made = left - 1, made + int(x.get("tokens_predicted", 0))
                event = chunks.piece(i, x) if kind == "piece" else chunks.end(i, x)
                if event:
                    yield event
            yield chunks.usage(sum(j.prompt_tokens for j in jobs[::ask.n]), made)
            yield chunks.done()
        finally:
            for t in running:
                t.cancel()

    async def complete(self, request: Request, chat: bool):
        try:
            ask = api.parse(api.parse_body(await read_body(request, self.limits), self.limits), chat, self.limits)
            jobs = self.jobs(ask)
            self.backend.ready()
            if ask.stream:
                return StreamingResponse(self.stream(ask, jobs), media_type="text/event-stream")
            results = await asyncio.gather(*(self.one(j) for j in jobs))
        except api.ApiError as e:
            return e.response()
        return JSONResponse(api.answer(ask, results, sum(j.prompt_tokens for j in jobs[::ask.n])))


def app(adapters: list[Adapter], backend: Backend, limits: api.Limits, slots: int = 0) -> FastAPI:
    """The OpenAI-compatible layer in front of llama-server (`slots`: llama-server's, for slot_plan); it watches
    llama-server while it runs."""
    layer = Layer(adapters, backend, limits, slots)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        watcher = asyncio.create_task(backend.watch())
        yield
        watcher.cancel()
        await layer.client.aclose()
        backend.stop()  # here, in the graceful shutdown: uvicorn re-raises SIGTERM/SIGINT after it

    routes = FastAPI(title="peftflow serve", lifespan=lifespan)

    @routes.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return api.ApiError(e.status_code, str(e.detail), None, "not_found" if e.status_code == 404 else
                            "invalid_request").response()

    @routes.get("/health")
    async def health():
        state = backend.health()
        ok = state["state"] == "ready"
        return JSONResponse({"status": "ok" if ok else "unavailable", "llama_server": state}, 200 if ok else 503,
                            headers=None if ok else {"Retry-After": "2"})

    @routes.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": a.name, "object": "model", "owned_by": "peftflow", "created": 0, "task": a.prompt.task,
             "gguf": str(a.gguf.resolve()), "base": str(a.base.resolve()), "base_tensors_sha256": a.base_sha256}
            for a in adapters]}

    @routes.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await layer.complete(request, chat=True)

    @routes.post("/v1/completions")
    async def completions(request: Request):
        return await layer.complete(request, chat=False)

    return routes


def serve(adapters: list[Adapter], port: int, threads: int, slots: int, ctx: int, max_tokens: int,
          cache_type: str = "f16", log: Path | None = None) -> None:
    """Start llama-server (watched, restarted) and the OpenAI layer on 127.0.0.1:`port`; runs until SIGINT or
    SIGTERM, which stop both."""
    inner = free_port()
    log = log or Path(tempfile.gettempdir()) / f"peftflow-serve-{port}-llama-server.log"
    log.write_text("")
    backend = Backend(llama_server_cmd(adapters[0].base, [a.gguf for a in adapters], inner, threads, slots, ctx,
                                       cache_type), inner, log)
    backend.start()
    try:
        uvicorn.run(app(adapters, backend, api.Limits(ctx=ctx, max_tokens=max_tokens), slots), host="127.0.0.1",
                    port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        backend.stop()
