"""pipeline.api: each field of an OpenAI request checked (a 4xx naming it), llama-server's sampling set from
OpenAI's fields, and a streamed answer whose joined deltas equal the whole answer (tests/test_serve.py does it
against the real server with the real client)."""

import json

import pytest

from pipeline import api

LIMITS = api.Limits(ctx=64, max_tokens=8, max_body=2000)


def chat(**over) -> dict:
    return {"model": "a", "messages": [{"role": "user", "content": "hi"}], **over}


def refused(body: dict, chat_: bool = True) -> api.ApiError:
    with pytest.raises(api.ApiError) as e:
        api.parse(body, chat_, LIMITS)
    return e.value


def test_content_parts_and_roles_are_read_as_text():
    ask = api.parse(chat(messages=[{"role": "developer", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "one"},
                                                                {"type": "text", "text": "two"}]}]), True, LIMITS)
    assert ask.inputs == [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "one\ntwo"}]]
    assert (ask.temperature, ask.n, ask.max_tokens, ask.stream) == (0.0, 1, None, False)  # greedy by default
    assert api.parse({"model": "a", "prompt": ["x", "y"]}, False, LIMITS).inputs == ["x", "y"]


@pytest.mark.parametrize(("body", "param", "text"), [
    (chat(model=None), "model", "required"),
    (chat(messages=[]), "messages", "non-empty list"),
    (chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].role", "tool messages"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content", "got image_url"),
    (chat(messages=[{"role": "system", "content": "x"}]), "messages", "no user message"),
    (chat(max_tokens=-5), "max_tokens", "outside"),
    (chat(max_completion_tokens=0), "max_completion_tokens", "outside"),
    (chat(max_tokens=2.5), "max_tokens", "not an integer"),
    (chat(temperature=2.5), "temperature", "outside"),
    (chat(temperature="hot"), "temperature", "not a number"),
    (chat(top_p=0), "top_p", "outside (0"),
    (chat(n=9), "n", "outside"),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
    (chat(stop=[""]), "stop", "non-empty strings"),
    (chat(stream="yes"), "stream", "true or false"),
    (chat(tools=[{"type": "function"}]), "tools", "tool calling"),
    (chat(response_format={"type": "json_object"}), "response_format", "structured output"),
    (chat(logprobs=True), "logprobs", "log-probabilities"),
    (chat(frobnicate=1), "frobnicate", "not a field"),
    (chat(stream_options={"x": 1}), "stream_options", "include_usage"),
])
def test_each_bad_field_is_a_400_naming_it(body, param, text):
    e = refused(body)
    assert e.status == 400 and e.param == param and text in str(e), (e.param, str(e))
    assert json.loads(e.response().body)["error"]["param"] == param


def test_completions_fields_and_what_is_ignored():
    assert refused({"model": "a", "prompt": [1, 2]}, False).param == "prompt"
    assert refused({"model": "a", "prompt": "x", "echo": True}, False).param == "echo"
    assert refused({"model": "a", "prompt": ["x"] * 17}, False).code == "out_of_range"
    assert refused({"model": "a", "prompt": "x", "messages": []}, False).param == "messages"
    ask = api.parse(chat(user="u1", metadata={"k": "v"}, logprobs=False, response_format={"type": "text"}), True,
                    LIMITS)
    assert ask.model == "a"


def test_body_size_and_json_are_checked_first():
    assert api.parse_body(b'{"a": 1}', LIMITS) == {"a": 1}
    with pytest.raises(api.ApiError) as e:
        api.parse_body(b"x" * 2001, LIMITS)
    assert e.value.status == 413
    with pytest.raises(api.ApiError, match="not JSON"):
        api.parse_body(b"{nope", LIMITS)
    with pytest.raises(api.ApiError, match="JSON object"):
        api.parse_body(b"[1]", LIMITS)


def test_the_answer_budget_is_the_context_left():
    ask = api.parse(chat(), True, LIMITS)
    assert api.budget(ask, 10, LIMITS) == 8  # the server's default
    assert api.budget(ask, 60, LIMITS) == 4  # the default, within the context left
    with pytest.raises(api.ApiError, match="the prompt is 64 tokens.*context is 64") as e:
        api.budget(ask, 64, LIMITS)
    assert e.value.param == "messages" and e.value.code == "context_length_exceeded"
    with pytest.raises(api.ApiError, match="max_tokens: 40 answer tokens and a 30-token prompt") as e:
        api.budget(api.parse(chat(max_tokens=40), True, LIMITS), 30, LIMITS)


def test_sampling_is_openais_temperature_and_top_p_seeded_per_choice():
    greedy = api.upstream(api.parse(chat(), True, LIMITS), [1, 2], 8, 0)
    assert greedy["temperature"] == 0 and greedy["top_k"] == 1 and "stop" not in greedy and "seed" not in greedy
    ask = api.parse(chat(temperature=1.5, top_p=0.9, seed=7, n=3, stop="\n"), True, LIMITS)
    bodies = [api.upstream(ask, [1, 2], 8, k) for k in range(3)]
    assert [b["seed"] for b in bodies] == [7, 8, 9] and bodies[0]["samplers"] == ["temperature", "top_p"]
    assert bodies[0]["top_k"] == 0 and bodies[0]["min_p"] == 0 and bodies[0]["stop"] == ["\n"]
    assert ask.sampling() == ["temperature", "top_p", "n"]
    assert api.upstream(api.parse(chat(temperature=1), True, LIMITS), [1], 8, 0)["seed"] == -1  # unseeded: random


def events(text: str) -> list:
    return [json.loads(x[6:]) if x != "data: [DONE]" else "DONE" for x in text.split("\n\n") if x]


def test_a_streamed_answer_joins_to_the_whole_answer():
    ask = api.parse(chat(stream=True, n=2, stream_options={"include_usage": True}), True, LIMITS)
    c = api.Chunks(ask)
    out = "".join([c.piece(0, " "), c.piece(0, " Hel"), c.piece(1, "B"), c.piece(0, "lo "), c.piece(0, " "),
                   c.piece(0, "you"), c.piece(0, " \n"), c.end(0, {"stop_type": "eos"}), c.end(1, {"stop_type": "limit"}),
                   c.usage(5, 9), c.done()])
    got = events(out)
    assert got[-1] == "DONE" and got[-2]["choices"] == [] and got[-2]["usage"]["total_tokens"] == 14
    text = {0: "", 1: ""}
    for e in got[:-2]:
        for ch in e["choices"]:
            text[ch["index"]] += ch["delta"].get("content", "")
    assert text == {0: "Hello  you", 1: "B"}  # " Hello  you \n".strip(), whitespace inside kept
    assert api.trimmed(" a\ufffdb \ufffd\ufffd\n") == "a\ufffdb"  # a character cut by the limit: left out
    first = [e["choices"][0]["delta"] for e in got[:-2]]
    assert first[0]["role"] == "assistant" and all("role" not in d for d in first[2:])
    reasons = {e["choices"][0]["index"]: e["choices"][0]["finish_reason"] for e in got[:-2]
               if e["choices"][0]["finish_reason"]}
    assert reasons == {0: "stop", 1: "length"}
    whole = api.answer(api.parse(chat(), True, LIMITS), [{"content": " Hello  you \n", "tokens_predicted": 4}], 5)
    assert whole["choices"][0]["message"]["content"] == text[0] and whole["usage"]["completion_tokens"] == 4
