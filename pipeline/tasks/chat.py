"""Task `chat`: conversations, multi-turn, rendered by the base model's own chat template.

Rows: OpenAI-style `messages` (turns with `role` system / user / assistant / tool and `content`;
`tool_calls`, `name`, `tool_call_id` are carried through to the chat template) or ShareGPT-style
`conversations` (`from` system / human / gpt / tool / function_call / observation, `value`), mapped
to `messages`. The last turn is the assistant's. The template file (`prompts/chat.jinja`) renders
each turn's content (block `prompt`: user turns, block `response`: assistant turns; default: as is).

The loss is on every assistant turn's content and its end-of-turn token (`tokenize.loss_on: all`)
or on the last one only (`last`). Where those tokens are is found from the chat template itself:
the conversation up to assistant turn k rendered with the generation prompt must be a prefix of the
conversation rendered through turn k, and the rest must start with the turn's content; the span
is that content plus the template's end-of-turn text. The format stage finds the span of every
assistant turn, or why it has none (a template that renders earlier turns differently once a later
one follows, a conversation that opens with the assistant); the tokenize stage takes the spans
`tokenize.loss_on` asks for, fails naming the row when one of them has none, and proves the mask
(core/encoding.py:mask_audit): the labelled tokens decode to exactly those spans. Evaluated by eval
loss and perplexity on assistant tokens, base and adapter, with sample answers to the last user
turn; served by answering the next assistant turn of a conversation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jinja2

from pipeline.core.encoding import IGNORE
from pipeline.core.stage import TemplateError
from pipeline.tasks.base import EvalInputs, RowError, Task, loss_report

if TYPE_CHECKING:
    from pipeline.core.prompting import Renderer

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "function_call": "assistant", "tool": "tool", "observation": "tool", "function_response": "tool"}
CARRIED = ("tool_calls", "name", "tool_call_id")  # passed to the chat template as they are


def to_messages(data: dict) -> list:
    """`messages`, or ShareGPT `conversations` mapped to them; RowError when neither is usable."""
    if "messages" in data:
        return data["messages"]
    if "conversations" not in data:
        raise RowError("messages", "missing field (a chat row has `messages` or ShareGPT `conversations`)")
    turns = data["conversations"]
    if not isinstance(turns, list):
        raise RowError("conversations", f"expected a list of turns, got {type(turns).__name__}")
    out = []
    for k, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise RowError("conversations", f"turn {k + 1}: expected an object with `from` and `value`")
        if t["from"] not in SHAREGPT:
            raise RowError("conversations", f"turn {k + 1}: unknown speaker {t['from']!r} "
                                            f"(valid: {', '.join(SHAREGPT)})")
        out.append({"role": SHAREGPT[t["from"]], "content": t["value"]})
    return out


def check_turns(messages, max_chars: int | None, answered: bool = True) -> list[dict]:
    """The turns, checked: roles, text contents (at most `max_chars` each; None: no limit), a system turn
    only first, at least one user turn, and (`answered`) the last turn the assistant's. Returns clean
    copies; RowError names the turn."""
    if not isinstance(messages, list) or not messages:
        raise RowError("messages", "expected a non-empty list of turns")
    out = []
    for k, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or "role" not in m:
            raise RowError("messages", f"turn {k}: expected an object with `role` and `content`")
        role, content = m["role"], m.get("content")
        if role not in ROLES:
            raise RowError("messages", f"turn {k}: unknown role {role!r} (valid: {', '.join(ROLES)})")
        if content is None and m.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise RowError("messages", f"turn {k}: content: expected text, got {type(content).__name__}")
        if role == "system" and k > 1:
            raise RowError("messages", f"turn {k}: a system turn must come first")
        if role == "assistant" and not content.strip() and not m.get("tool_calls"):
            raise RowError("messages", f"turn {k}: empty assistant turn")
        if max_chars is not None and len(content) > max_chars:
            raise RowError("messages", f"turn {k}: over-long text (more than validate.max_chars={max_chars} "
                                       "characters)")
        out.append({"role": role, "content": content, **{c: m[c] for c in CARRIED if m.get(c) is not None}})
    if not any(m["role"] == "user" for m in out):
        raise RowError("messages", "no user turn")
    if answered and out[-1]["role"] != "assistant":
        raise RowError("messages", f"the last turn is {out[-1]['role']!r}; a training conversation ends "
                                   "with the assistant's turn")
    return out


def render_turns(r: Renderer, messages: list[dict], where: str) -> list[dict]:
    """The turns with user and assistant contents rendered by the template's blocks (`content`, `role`,
    `turn` in scope), and `format.system_prompt` first when the conversation has no system turn."""
    out = []
    for k, m in enumerate(messages, start=1):
        block = {"user": "prompt", "assistant": "response"}.get(m["role"])
        if block and m["content"]:
            m = {**m, "content": r.block(block, {"content": m["content"], "role": m["role"], "turn": k},
                                          f"{where} turn {k}")}
        out.append(m)
    if r.system and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": r.system})
    return out


def chat_text(tok, messages: list[dict], generation_prompt: bool, where: str = "a conversation") -> str:
    """The conversation as the tokenizer's chat template renders it (a template's refusal, one line)."""
    if not messages:
        raise TemplateError(f"{where}: nothing before the turn to render")
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:
        reason = " ".join(str(e).split())
        raise TemplateError(f"{where}: the chat template of {tok.name_or_path} refuses the conversation: "
                            f"{reason}") from None


def turn_span(tok, messages: list[dict], k: int, text: str, where: str) -> list[int]:
    """The character span the loss is on for assistant turn `k` (0-based) of the rendered `text`: the
    turn's content and the template's end-of-turn text after it. TemplateError says why there is none."""
    model = tok.name_or_path
    if k == 0 or all(m["role"] == "system" for m in messages[:k]):
        raise TemplateError(f"{where}: assistant turn {k + 1} opens the conversation, with no turn of the user "
                            "before it, so where its answer starts cannot be found; set tokenize.loss_on: last "
                            "or start the conversation with the user")
    before, through = chat_text(tok, messages[:k], True, where), chat_text(tok, messages[: k + 1], False, where)
    if not through.startswith(before) or not text.startswith(through):
        raise TemplateError(
            f"{where}: the chat template of {model} renders assistant turn {k + 1} differently once later "
            "turns follow, so its tokens cannot be marked for the loss; set tokenize.loss_on: last (the "
            "loss on the final turn only) or give a base model whose template keeps earlier turns")
    rest = through[len(before):]
    content = messages[k]["content"]
    if before == chat_text(tok, messages[:k], False, where):
        raise TemplateError(f"{where}: the chat template of {model} has no generation prompt that ends where "
                            f"assistant turn {k + 1} begins (add_generation_prompt), so the answer cannot be "
                            "told from the text before it; use a base model with a chat template made for chat")
    if not rest.startswith(content):
        raise TemplateError(f"{where}: the chat template of {model} changes the content of assistant turn "
                            f"{k + 1} (e.g. trims it), so its tokens cannot be marked for the loss; set "
                            "tokenize.loss_on: last or clean the data")
    end = rest[len(content):].rstrip()
    if not end:
        raise TemplateError(f"{where}: the chat template of {model} ends an assistant turn with nothing, so "
                            "the model would not learn to stop; use a base model with an end-of-turn token")
    return [len(before), len(before) + len(content) + len(end)]


def assistant_spans(tok, messages: list[dict], where: str) -> tuple[str, list[dict]]:
    """The whole conversation as the chat template renders it, and for every assistant turn the character
    span the loss would be on (`span`), or why there is none (`problem`)."""
    text = chat_text(tok, messages, False, where)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            try:
                spans.append({"turn": k + 1, "span": turn_span(tok, messages, k, text, where)})
            except TemplateError as e:
                spans.append({"turn": k + 1, "problem": str(e)})
    return text, spans


def loss_spans(spans: list[dict], loss_on: str) -> list[list[int]]:
    """The spans `tokenize.loss_on` puts the loss on: every assistant turn's, or the last one's; a turn
    whose span could not be found stops the stage with its reason."""
    chosen = spans if loss_on == "all" else spans[-1:]
    missing = [s for s in chosen if "span" not in s]
    if missing:
        raise TemplateError(missing[0]["problem"])
    return [s["span"] for s in chosen]


class Chat(Task):
    name = "chat"
    reads = {
        "validate": ("validate.max_chars",),
        "tokenize": ("tokenize.loss_on", "tokenize.max_length", "tokenize.truncation"),
        "evaluate": ("evaluate.max_new_tokens", "evaluate.samples"),
    }

    def check_params(self, p) -> str | None:
        if not p.format.chat_template:
            return "params.yaml: task chat needs 'format.chat_template: true' (turns go through the model's template)."
        return None

    def normalize(self, p, data: dict) -> dict:
        return {"messages": check_turns(to_messages(data), p.validate.max_chars)}

    def fields(self, p) -> tuple[str, ...]:
        return ("messages",)

    def columns(self, p, text) -> dict:
        import pandera.pandas as pa

        return {"messages": pa.Column(object)}  # checked turn by turn in normalize

    def key(self, p, row: dict) -> tuple:
        return tuple((m["role"], m["content"].strip().lower()) for m in row["messages"] if m["role"] != "assistant")

    def key_field(self, p) -> str:
        return "messages"

    def counts(self, p, rows: list[dict]) -> dict:
        answers = [sum(m["role"] == "assistant" for m in r["messages"]) for r in rows]
        return {"turns": sum(len(r["messages"]) for r in rows), "assistant_turns": sum(answers),
                "multi_turn_rows": sum(a > 1 for a in answers)}

    def render(self, p, r, row: dict, where: str) -> dict:
        if any(m.get("tool_calls") for m in row["messages"]) and "tool_calls" not in (r.tokenizer.chat_template or ""):
            raise TemplateError(f"{where}: a turn has tool_calls but the chat template of {r.tokenizer.name_or_path} "
                                "does not render them (they would be lost); drop them or use a base model "
                                "whose template has tool calls")
        messages = render_turns(r, row["messages"], where)
        text, spans = assistant_spans(r.tokenizer, messages, where)
        return {"row": row.get("row"), "messages": messages, "text": text, "spans": spans,
                "prompt": chat_text(r.tokenizer, messages[:-1], True, where), "response": messages[-1]["content"]}

    def prompt(self, prompt, r, row: dict, where: str) -> str:
        """The next assistant turn's prompt: the conversation so far (ending with a user or tool turn)."""
        try:
            turns = check_turns(to_messages(row), None, answered=False)
        except RowError as e:
            raise TemplateError(f"{where}: {e}") from None
        if turns[-1]["role"] == "assistant":
            raise TemplateError(f"{where}: the conversation ends with an assistant turn; nothing to answer")
        return chat_text(r.tokenizer, render_turns(r, turns, where), True, where)

    def encode(self, p, tok, rows: list[dict]) -> list[dict | None]:
        return [encode_chat(tok, r["text"], loss_spans(r["spans"], p.tokenize.loss_on), p.tokenize.max_length,
                            p.tokenize.truncation) for r in rows]

    def evaluate(self, p, x: EvalInputs) -> dict:
        return loss_report(p, x)

    def prompt_field(self, prompt) -> str:
        return "content"

    def row_from_text(self, line: str, prompt) -> dict:
        return {"messages": [{"role": "user", "content": line}]}


def encode_chat(tok, text: str, spans: list[list[int]], max_length: int, truncation: str) -> dict | None:
    """The rendered conversation tokenized whole (as serving tokenizes a prompt), each token labelled when
    its characters lie inside a loss span; cut by `tokenize.truncation` (None: dropped, or nothing left
    to learn). `expected` is the spans' text, for the mask audit."""
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [t if e > s and any(a <= s and e <= b for a, b in spans) else IGNORE
              for t, (s, e) in zip(ids, offsets, strict=True)]
    truncated = len(ids) > max_length
    if truncated:
        if truncation == "drop":
            return None
        cut = slice(0, max_length) if truncation == "response" else slice(len(ids) - max_length, len(ids))
        ids, labels = ids[cut], labels[cut]
    if all(lab == IGNORE for lab in labels):
        return None
    return {"input_ids": ids, "labels": labels, "length": len(ids), "truncated": truncated,
            "expected": [text[a:b] for a, b in spans]}

