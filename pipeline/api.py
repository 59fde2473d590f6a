"""OpenAI's request and answer shapes for `peftflow serve`, checked here so that llama-server sees only good requests.

In: a request body (the JSON of `POST /v1/chat/completions` or `POST /v1/completions`) and the server's `Limits`.
Out: an `Ask` (every field checked, defaults filled), or an `ApiError` carrying what OpenAI's error object carries
(HTTP status, `param` naming the field, message, code); and llama-server's answers in OpenAI's shapes: whole
(`chat.completion`, `text_completion`) or as the chunks of a server-sent-event stream.

Fields honoured: `model` (the adapter), `messages` (text content, a string or a list of text parts) or `prompt` (a
string or a list of strings), `max_tokens` / `max_completion_tokens`, `temperature` (default 0: greedy, the answer
the evaluate stage scored, not OpenAI's 1), `top_p`, `n`, `seed`, `stop`, `presence_penalty`, `frequency_penalty`,
`stream`, `stream_options.include_usage`. Accepted and ignored: `user`, `metadata`, `store`, `service_tier`,
`parallel_tool_calls`. Refused with a 400 that says why: tools and functions, `response_format` other than text,
`logprobs`, `logit_bias`, `echo`, `suffix`, `best_of`, audio; an unknown field. docs/serving.md lists them.
Nothing here talks to a server: pipeline.serve does.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# field -> why it is refused (when given with anything but its "off" value)
REFUSED = {
    "tools": "tool calling is not served (the adapters answer text)",
    "tool_choice": "tool calling is not served (the adapters answer text)",
    "functions": "function calling is not served (the adapters answer text)",
    "function_call": "function calling is not served (the adapters answer text)",
    "response_format": "structured output is not served (only {\"type\": \"text\"})",
    "logprobs": "log-probabilities are not returned",
    "top_logprobs": "log-probabilities are not returned",
    "logit_bias": "logit_bias is not applied",
    "echo": "echo is not served (the prompt is the adapter's template filled in, not your text)",
    "suffix": "suffix (insertion) is not served",
    "best_of": "best_of is not served (ask for n answers)",
    "audio": "audio is not served",
    "modalities": "only text is served",
    "prediction": "predicted outputs are not served",
    "reasoning_effort": "these adapters do not reason in steps",
}
OFF = (None, False, 0, [], {}, {"type": "text"}, ["text"])
SAMPLING = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
CHAT = {"model", "messages", "max_tokens", "max_completion_tokens", "n", "stop", "stream", "stream_options", *SAMPLING}
COMPLETIONS = {"model", "prompt", "max_tokens", "n", "stop", "stream", "stream_options", *SAMPLING}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A request the server will not answer, in OpenAI's error shape (`param`: the field at fault)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request",
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.retry_after = status, param, code, retry_after

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return JSONResponse(error_body(str(self), kind, self.param, self.code), self.status, headers=headers)


def error_body(message: str, kind: str, param: str | None, code: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (set by `peftflow serve`'s options)."""

    ctx: int = 2048  # prompt + answer tokens of one slot
    max_tokens: int = 64  # the answer limit when a request gives none
    max_body: int = 1 << 20  # bytes of request JSON
    max_n: int = 8  # answers per request
    max_prompts: int = 16  # prompts in one completions request
    max_stop: int = 4  # stop sequences (OpenAI's limit)


@dataclass(frozen=True)
class Ask:
    """One checked request: `inputs` holds one conversation (chat) or the prompt strings (completions)."""

    model: str
    chat: bool
    inputs: list = field(default_factory=list)
    max_tokens: int | None = None  # None: the server's default, within the context left
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    include_usage: bool = False

    @property
    def samples(self) -> bool:
        return self.temperature > 0

    def sampling(self) -> list[str]:
        """The sampling fields this request sets away from greedy, one answer."""
        return [k for k, v in (("temperature", self.temperature > 0), ("top_p", self.top_p < 1), ("n", self.n > 1))
                if v]


def parse_body(raw: bytes, limits: Limits) -> dict:
    """The request's JSON object (413 when larger than the limit, 400 when not a JSON object)."""
    if len(raw) > limits.max_body:
        raise ApiError(413, f"the request body is {len(raw)} bytes; this server takes at most {limits.max_body}",
                       None, "request_too_large")
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"the request body is not JSON ({e})", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    return body


def parse(body: dict, chat: bool, limits: Limits) -> Ask:
    """An `Ask` from a request body, every field checked (ApiError 400 naming the first one at fault)."""
    known = CHAT if chat else COMPLETIONS
    for key, value in body.items():
        if key in REFUSED and value not in OFF:
            raise ApiError(400, f"{key}: {REFUSED[key]}", key, "unsupported_parameter")
        if key not in known and key not in IGNORED and key not in REFUSED:
            raise ApiError(400, f"{key}: not a field of this endpoint", key, "unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: required, the name of an adapter (GET /v1/models lists them)", "model",
                       "missing_model")
    inputs = [messages(body.get("messages"))] if chat else prompts(body.get("prompt"), limits)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
        raise ApiError(400, "stream_options: an object with include_usage only", "stream_options")
    top = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return Ask(model, chat, inputs,
               max_tokens=number(body, top, int, 1, limits.ctx - 1, None),
               n=number(body, "n", int, 1, limits.max_n, 1),
               temperature=number(body, "temperature", float, 0.0, 2.0, 0.0),
               top_p=number(body, "top_p", float, 0.0, 1.0, 1.0, low_open=True),
               seed=number(body, "seed", int, -(2**63), 2**63 - 1, None),
               stop=stops(body.get("stop"), limits),
               presence_penalty=number(body, "presence_penalty", float, -2.0, 2.0, 0.0),
               frequency_penalty=number(body, "frequency_penalty", float, -2.0, 2.0, 0.0),
               stream=flag(body, "stream"),
               include_usage=bool(stream_options.get("include_usage")))


def number(body: dict, key: str, kind: type, low, high, default, low_open: bool = False):
    """body[key] as an int or float in [low, high] (or (low, high] with low_open), or the default when absent."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not float(value).is_integer()):
        raise ApiError(400, f"{key}: {value!r} is not {'an integer' if kind is int else 'a number'}", key)
    if value < low or value > high or (low_open and value == low):
        lo = "(" if low_open else "["
        raise ApiError(400, f"{key}: {value} is outside {lo}{low}, {high}]", key, "out_of_range")
    return kind(value)


def flag(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{key}: {value!r} is not true or false", key)
    return bool(value)


def stops(value, limits: Limits) -> list[str]:
    items = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise ApiError(400, "stop: a string or a list of non-empty strings", "stop")
    if len(items) > limits.max_stop:
        raise ApiError(400, f"stop: {len(items)} sequences; at most {limits.max_stop}", "stop", "out_of_range")
    return items


def messages(value) -> list[dict]:
    """The conversation as [{role, content: str}] (text parts joined by newlines); system and developer alike."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages: a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            why = "tool messages are not served" if role in ("tool", "function") else \
                f"role must be one of {', '.join(ROLES)}"
            raise ApiError(400, f"{where}.role: {why}", f"{where}.role")
        out.append({"role": ROLES[m["role"]], "content": content(m.get("content"), where)})
    if not any(m["role"] == "user" for m in out):
        raise ApiError(400, "messages: no user message to answer", "messages")
    return out


def content(value, where: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts joined by newlines."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"{where}.content: a string or a non-empty list of text parts", f"{where}.content")
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ApiError(400, f"{where}.content[{j}]: a {{\"type\": \"text\", \"text\": ...}} part (got {kind}: "
                                "these adapters read text only)", f"{where}.content")
        texts.append(part["text"])
    return "\n".join(texts)


def prompts(value, limits: Limits) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(p, str) for p in items):
        raise ApiError(400, "prompt: a string or a list of strings (token ids are not taken: the adapter's template "
                            "is filled with your text)", "prompt")
    if len(items) > limits.max_prompts:
        raise ApiError(400, f"prompt: {len(items)} prompts; at most {limits.max_prompts} per request", "prompt",
                       "out_of_range")
    return items


def budget(ask: Ask, prompt_tokens: int, limits: Limits) -> int:
    """The answer limit for a prompt of `prompt_tokens` (400 when prompt and answer do not fit one slot)."""
    param = "messages" if ask.chat else "prompt"
    room = limits.ctx - prompt_tokens
    if room < 1:
        raise ApiError(400, f"{param}: the prompt is {prompt_tokens} tokens in the adapter's template; the context "
                            f"is {limits.ctx}", param, "context_length_exceeded")
    if ask.max_tokens is None:
        return min(limits.max_tokens, room)
    if ask.max_tokens > room:
        top = "max_tokens"
        raise ApiError(400, f"{top}: {ask.max_tokens} answer tokens and a {prompt_tokens}-token prompt exceed the "
                            f"context of {limits.ctx} (at most {room} here)", top, "context_length_exceeded")
    return ask.max_tokens


def upstream(ask: Ask, ids: list[int], limit: int, choice: int) -> dict:
    """llama-server's /completion request for one answer: greedy, or OpenAI's sampling (temperature then
    top_p, none of llama.cpp's other samplers); choice k of a seeded request samples with seed + k."""
    body = {"prompt": ids, "n_predict": limit, "cache_prompt": True} | ({"stream": True} if ask.stream else {})
    body |= {"stop": ask.stop} if ask.stop else {}
    body |= {k: v for k, v in (("presence_penalty", ask.presence_penalty), ("frequency_penalty",
                                                                             ask.frequency_penalty)) if v}
    if not ask.samples:
        return {**body, "temperature": 0.0, "top_k": 1}
    seed = -1 if ask.seed is None else (ask.seed + choice) % 2**32
    return {**body, "temperature": ask.temperature, "top_p": ask.top_p, "top_k": 0, "min_p": 0.0,
            "samplers": ["temperature", "top_p"], "seed": seed}


# an answer's end left out: whitespace, and the U+FFFD of a multi-byte character cut by the answer limit (which
# llama-server's stream leaves out and its whole answer keeps): the same text streamed or not
TRAILING = re.compile(r"[\s\ufffd]+$")


def trimmed(text: str) -> str:
    return TRAILING.sub("", text.lstrip())


def finish(r: dict) -> str:
    return "length" if r.get("stop_type") == "limit" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def answer(ask: Ask, results: list[dict], prompt_tokens: int) -> dict:
    """llama-server's /completion answers (one per choice, prompt by prompt) as one OpenAI object."""
    made = sum(int(r.get("tokens_predicted", 0)) for r in results)
    head = {"id": f"{'chatcmpl' if ask.chat else 'cmpl'}-{os.urandom(6).hex()}", "created": int(time.time()),
            "model": ask.model}
    if ask.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": trimmed(r.get("content", ""))},
                    "finish_reason": finish(r), "logprobs": None} for i, r in enumerate(results)]
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage(prompt_tokens, made)}
    choices = [{"index": i, "text": trimmed(r.get("content", "")), "finish_reason": finish(r), "logprobs": None}
               for i, r in enumerate(results)]
    return {**head, "object": "text_completion", "choices": choices, "usage": usage(prompt_tokens, made)}


class Chunks:
    """The server-sent events of one streamed answer: `piece(i, text)` and `end(i, result)` per choice, `usage`
    and `done` once. Each choice's start and end are trimmed as the whole answer is (`trimmed`): trailing
    characters are held back until more text follows, so the joined deltas equal the whole answer's content."""

    def __init__(self, ask: Ask):
        self.ask = ask
        self.id = f"{'chatcmpl' if ask.chat else 'cmpl'}-{os.urandom(6).hex()}"
        self.created = int(time.time())
        self.opened: set[int] = set()  # choices whose role was sent (chat)
        self.begun: set[int] = set()  # choices with text past leading whitespace
        self.held: dict[int, str] = {}  # each choice's trailing whitespace, sent only if text follows

    def event(self, choices: list[dict], **extra) -> str:
        kind = "chat.completion.chunk" if self.ask.chat else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.ask.model, "choices": choices,
                **({"usage": None} if self.ask.include_usage else {}), **extra}
        return f"data: {json.dumps(body)}\n\n"

    def choice(self, i: int, text: str | None, reason: str | None) -> dict:
        if not self.ask.chat:
            return {"index": i, "text": text or "", "finish_reason": reason, "logprobs": None}
        delta = {} if text is None else {"content": text}
        if i not in self.opened:
            self.opened.add(i)
            delta = {"role": "assistant", **delta}
        return {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}

    def piece(self, i: int, text: str) -> str:
        if i not in self.begun:
            text = text.lstrip()
            if not text:
                return ""
            self.begun.add(i)
        whole = self.held.get(i, "") + text
        body = TRAILING.sub("", whole)
        self.held[i] = whole[len(body):]
        return self.event([self.choice(i, body, None)]) if body else ""

    def end(self, i: int, result: dict) -> str:
        return self.event([self.choice(i, None, finish(result))])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        if not self.ask.include_usage:
            return ""
        return self.event([], usage=usage(prompt_tokens, completion_tokens))

    @staticmethod
    def error(e: ApiError) -> str:
        return f"data: {json.dumps(error_body(str(e), 'server_error', e.param, e.code))}\n\n"

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"
