"""Task chat: conversation rows (messages, ShareGPT), the assistant-turn loss mask and its audit,
templates that cannot be masked, and serving the next turn with training's tokens."""

import json

import pytest
from conftest import EXAMPLE, REAL_PRECISION, make_params, prepare

from pipeline import tasks
from pipeline.core.encoding import IGNORE, encode_prompt, labelled_runs, mask_audit
from pipeline.core.loading import load_tokenizer
from pipeline.core.prompting import Renderer
from pipeline.core.stage import PipelineError, TemplateError
from pipeline.stages import format as fmt
from pipeline.stages import tokenize, train, validate
from pipeline.tasks import chat as chat_task

CHAT = tasks.get("chat")
CONVO = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Add up the numbers.\n\n2 + 3"}, {"role": "assistant", "content": "5"},
         {"role": "user", "content": "And if you subtract 1 from that?"}, {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def chat_prepared(tiny_base, tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("chat"), tiny_base, task="chat", rows=None)


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_sharegpt_rows_become_the_same_messages():
    p = make_params(task="chat")
    share = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                "value": m["content"]} for m in CONVO]}
    assert CHAT.normalize(p, share) == CHAT.normalize(p, {"messages": CONVO}) == {"messages": CONVO}


def test_bad_conversations_are_quarantined_naming_the_turn(tmp_path):
    p = make_params(**{"task": "chat", "validate.max_reject_ratio": 0.9})
    good = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes."}]}
            for i in range(8)]
    train_rows = good + [
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "bot", "content": "Hello."}]},       # row 9
        {"messages": [{"role": "user", "content": "Hi?"}]},                                              # row 10
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "system", "content": "x"},
                      {"role": "assistant", "content": "Hello."}]},                                      # row 11
        {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "Hello."}]},      # row 12
        {"conversations": [{"from": "alien", "value": "Hi?"}]},                                          # row 13
        {"text": "Hi?"},                                                                                 # row 14
        {"conversations": [{"from": "human", "value": "Question 0?"}, {"from": "gpt", "value": "No."}]},  # row 15
    ]
    val = [{"messages": [{"role": "user", "content": f"Other {i}?"}, {"role": "assistant", "content": "No."}]}
           for i in range(3)]
    validate.run(p, write(tmp_path / "t.jsonl", train_rows), write(tmp_path / "v.jsonl", val), tmp_path / "v",
                 tmp_path / "m.json")
    q = {r["row"]: (r["field"], r["reason"]) for r in
         map(json.loads, (tmp_path / "v" / "quarantine.jsonl").read_text().splitlines())}
    assert q == {
        9: ("messages", "turn 2: unknown role 'bot' (valid: system, user, assistant, tool)"),
        10: ("messages", "the last turn is 'user'; a training conversation ends with the assistant's turn"),
        11: ("messages", "turn 2: a system turn must come first"),
        12: ("messages", "turn 1: content: expected text, got int"),
        13: ("conversations", "turn 1: unknown speaker 'alien' (valid: system, human, user, gpt, assistant, "
                              "function_call, tool, observation, function_response)"),
        14: ("messages", "missing field (a chat row has `messages` or ShareGPT `conversations`)"),
        15: ("messages", "duplicate of row 1"),
    }


def test_the_loss_is_on_every_assistant_turn_and_its_end_token(chat_prepared, tiny_base):
    """On the example chat data: the labelled tokens are exactly each assistant turn's content and
    <|im_end|> (decoded here independently of the audit), multi-turn rows included."""
    from datasets import load_from_disk

    tok = load_tokenizer(tiny_base)
    rows = {r["row"]: r for r in map(json.loads, (chat_prepared["validated"] / "train.jsonl").read_text().splitlines())}
    data = list(load_from_disk(str(chat_prepared["tokenized"] / "train")))
    assert len(data) == 120 and sum(sum(m["role"] == "assistant" for m in rows[d["row"]]["messages"]) > 1
                                    for d in data) > 60
    for d in data:
        got = [tok.decode(d["input_ids"][a:b]) for a, b in labelled_runs(d["labels"])]
        assert got == [m["content"] + "<|im_end|>" for m in rows[d["row"]]["messages"] if m["role"] == "assistant"]
    report = json.loads((chat_prepared["tokenized"] / "tokenize.json").read_text())
    assert report["train"]["mask_audit"] == {"checked": 120, "failed": 0}


def test_loss_on_last_masks_the_earlier_turns(tiny_base, tmp_path):
    from datasets import load_from_disk

    out = prepare(tmp_path, tiny_base, task="chat", rows=40, **{"tokenize.loss_on": "last"})
    tok = load_tokenizer(tiny_base)
    rows = {r["row"]: r for r in map(json.loads, (out["validated"] / "train.jsonl").read_text().splitlines())}
    for d in load_from_disk(str(out["tokenized"] / "train")):
        runs = labelled_runs(d["labels"])
        assert len(runs) == 1
        assert tok.decode(d["input_ids"][runs[0][0]:runs[0][1]]) == rows[d["row"]]["messages"][-1]["content"] + "<|im_end|>"


def test_a_wrong_mask_fails_the_audit_naming_the_row(chat_prepared, tiny_base, tmp_path, monkeypatch):
    tok = load_tokenizer(tiny_base)
    text, spans = chat_task.assistant_spans(tok, CONVO, "row")
    right = chat_task.encode_chat(tok, text, chat_task.loss_spans(spans, "all"), 256, "response")
    assert right["expected"] == ["5<|im_end|>", "4<|im_end|>"]
    assert mask_audit(tok, right["input_ids"], right["labels"], right["expected"], False) is None
    first = labelled_runs(right["labels"])[1][0]
    one_more = [*right["labels"][: first - 1], right["input_ids"][first - 1], *right["labels"][first:]]
    assert "the loss covers" in mask_audit(tok, right["input_ids"], one_more, right["expected"], False)
    assert mask_audit(tok, right["input_ids"], right["labels"][:first] + [IGNORE] * (len(one_more) - first),
                      right["expected"], False)  # a lost turn fails too

    real = chat_task.encode_chat

    def off_by_one(*a, **k):  # the classic bug: the "\n" before the answer is trained too
        e = real(*a, **k)
        first = next(i for i, lab in enumerate(e["labels"]) if lab != IGNORE)
        e["labels"][first - 1] = e["input_ids"][first - 1]
        return e

    monkeypatch.setattr(chat_task, "encode_chat", off_by_one)
    with pytest.raises(PipelineError, match=r"the loss mask is wrong in 120 of 120 rows of .*train.jsonl; first: row 1:"):
        tokenize.run(chat_prepared["params"], chat_prepared["formatted"], tiny_base, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_the_audit_also_checks_the_other_tasks(prepared, tiny_base, tmp_path, monkeypatch):
    from pipeline.core import encoding

    real = encoding.join

    def label_the_prompt_end(p_ids, r_ids, *a):
        e = real(p_ids, r_ids, *a)
        if e:
            e["labels"][len(p_ids) - 1] = e["input_ids"][len(p_ids) - 1]
        return e

    monkeypatch.setattr(encoding, "join", label_the_prompt_end)
    with pytest.raises(PipelineError, match=r"the loss mask is wrong in 64 of 64 rows"):
        tokenize.run(prepared["params"], prepared["formatted"], tiny_base, tmp_path / "t")


def test_a_template_that_rewrites_earlier_turns_is_refused_unless_loss_on_last(tiny_base, tmp_path):
    """Like templates that drop an earlier turn's reasoning: the turn's tokens change once a later turn
    follows, so only the last turn can be masked."""
    tok = load_tokenizer(tiny_base)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}"
        "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    r = Renderer((EXAMPLE.parent.parent / "prompts" / "chat.jinja").read_text(), "chat.jinja", tokenizer=tok,
                 chat_template=True)
    row = {"row": 1, "messages": [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "Five."},
                                  {"role": "user", "content": "Minus one?"}, {"role": "assistant", "content": "Four."}]}
    item = CHAT.render(make_params(task="chat"), r, row, "t.jsonl row 1")  # format finds what it can
    with pytest.raises(TemplateError, match=r"t.jsonl row 1: .* renders assistant turn 2 differently .* set "
                                            r"tokenize.loss_on: last"):
        chat_task.loss_spans(item["spans"], "all")  # tokenize, with loss_on: all, cannot go on
    assert [item["text"][a:b] for a, b in chat_task.loss_spans(item["spans"], "last")] == ["Four.<|im_end|>"]

    def spans_of(row: dict) -> list[list[int]]:
        return chat_task.loss_spans(CHAT.render(make_params(task="chat"), r, row, "t.jsonl row 1")["spans"], "all")

    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TemplateError, match=r"has no generation prompt that ends where assistant turn 2 begins"):
        spans_of(row)
    tok.chat_template += "{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(TemplateError, match=r"ends an assistant turn with nothing"):
        spans_of(row)
    with pytest.raises(TemplateError, match=r"tool_calls but the chat template .* does not render them"):
        CHAT.render(make_params(task="chat"), r, {"row": 2, "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "w"}}]},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}, "t.jsonl row 2")


def test_chat_needs_the_chat_template():
    from pipeline.core.params import ParamsError

    with pytest.raises(ParamsError, match="task chat needs 'format.chat_template: true'"):
        make_params(**{"task": "chat", "format.chat_template": False})


def test_serving_the_next_turn_uses_the_training_tokens(chat_prepared, tiny_base, tmp_path):
    """For every validation conversation: the prompt `predict` builds from the conversation without its
    last answer equals the training ids up to that answer; and predict answers a conversation."""
    from datasets import load_from_disk

    from pipeline.predict import Predictor

    p = chat_prepared["params"]
    out = tmp_path / "adapter"
    train.run(p.model_copy(update={"train": p.train.model_copy(update={"epochs": 1})}), chat_prepared["tokenized"],
              chat_prepared["formatted"] / "format.json", tiny_base, out, tmp_path / "live", tmp_path / "ckpt")
    pred = Predictor(tiny_base, {"a": out}, max_new_tokens=4, batch_size=16)
    tok = load_tokenizer(tiny_base)
    tokenized = {r["row"]: r for r in load_from_disk(str(chat_prepared["tokenized"] / "validation"))}
    raw = [json.loads(x) for x in (chat_prepared["validated"] / "validation.jsonl").read_text().splitlines()]
    assert len(raw) == len(tokenized) == 40
    for row in raw:
        served = encode_prompt(tok, CHAT.prompt(pred.prompts["a"], pred.renderers["a"],
                                                {"messages": row["messages"][:-1]}, "row"))
        t = tokenized[row["row"]]
        last = labelled_runs(t["labels"])[-1][0]
        assert served == t["input_ids"][:last]
    answers = pred.predict([{"messages": raw[0]["messages"][:-1]}, {"messages": [{"role": "user", "content": "Hi"}]}], "a")
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    with pytest.raises(TemplateError, match="ends with an assistant turn"):
        pred.predict([{"messages": raw[0]["messages"]}], "a")


def test_format_writes_the_text_and_spans_it_will_train_on(chat_prepared):
    rows = [json.loads(x) for x in (chat_prepared["formatted"] / "train.jsonl").read_text().splitlines()]
    for r in rows:
        assert [r["text"][a:b] for a, b in chat_task.loss_spans(r["spans"], "all")] == [
            m["content"] + "<|im_end|>" for m in r["messages"] if m["role"] == "assistant"]
        assert r["text"].startswith(r["prompt"]) and r["response"] == r["messages"][-1]["content"]


def alpaca_as_messages(row: dict) -> dict:
    """An Alpaca row as a one-exchange conversation, with the user turn prompts/alpaca.jinja renders."""
    ask = row["instruction"].strip() + (f"\n\nInput:\n{row['input'].strip()}" if row["input"].strip() else "")
    return {"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": row["output"]}]}


@pytest.mark.slow
def test_smollm2_chat_matches_instruction_on_alpaca_and_every_mask_passes(real_base, tmp_path):
    """The real SmolLM2 template: the mask audit passes on every row of every task's data (the whole Alpaca
    sample and Financial PhraseBank, the example sets); Alpaca as `messages` trains and evaluates like the
    instruction task on the same rows and steps (eval loss within 2%)."""
    from conftest import ROOT, SHARED

    from pipeline.stages import evaluate, export, gguf

    b = real_base
    alpaca = {s: [json.loads(x) for x in (SHARED / "alpaca_small" / f"{s}.jsonl").read_text().splitlines()]
              for s in ("train", "validation")}
    for s, rows in alpaca.items():
        write(tmp_path / f"alpaca_chat_{s}.jsonl", [alpaca_as_messages(r) for r in rows])
    sources = {"classification": (SHARED / "financial_phrasebank", "{}.jsonl", "sentiment.jinja"),
               "instruction": (SHARED / "alpaca_small", "{}.jsonl", "alpaca.jinja"),
               "preference": (EXAMPLE, "preference_{}.jsonl", "preference.jinja"),
               "chat": (tmp_path, "alpaca_chat_{}.jsonl", "chat.jinja"), "chat_example": (EXAMPLE, "chat_{}.jsonl", "chat.jinja")}
    for name, (folder, pattern, template) in sources.items():
        task = name.split("_")[0]
        p = make_params(task=task, **{"validate.max_reject_ratio": 0.2, "validate.max_chars": 8000,
                                      "tokenize.max_length": 1024})
        w = tmp_path / name
        validate.run(p, folder / pattern.format("train"), folder / pattern.format("validation"), w / "v", w / "v.json")
        fmt.run(p, w / "v", ROOT / "prompts" / template, b, w / "f")
        report = tokenize.run(p, w / "f", b, w / "t")  # raises on any row whose mask is wrong
        assert report["train"]["mask_audit"]["checked"] == report["train"]["kept"] > 100, name

    # the same 32 Alpaca rows and 8 steps of 4 as instruction and as chat, evaluated on the same 16 (up to 256
    # tokens each: a forward pass of the real model on CPU is what this test's time goes to)
    losses = {}
    for task, template in (("instruction", "alpaca.jinja"), ("chat", "chat.jinja")):
        p = make_params(task=task, **{"train.batch_size": 4, "train.max_steps": 8, "train.lr": 1e-3,
                                      "train.precision": REAL_PRECISION, "evaluate.samples": 1, "tokenize.max_length": 256,
                                      "train.lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}})
        w = tmp_path / f"same_{task}"
        src = {s: write(w.parent / f"{task}_{s}.jsonl", rows[: 32 if s == "train" else 16])
               for s, rows in (("train", [json.loads(x) for x in (tmp_path / "instruction" / "v" / "train.jsonl")
                                         .read_text().splitlines()]),
                               ("validation", [json.loads(x) for x in (tmp_path / "instruction" / "v" /
                                                                        "validation.jsonl").read_text().splitlines()]))}
        if task == "chat":
            for s in src:
                rows = [json.loads(x) for x in src[s].read_text().splitlines()]
                write(src[s], [alpaca_as_messages(r) for r in rows])
        validate.run(p, src["train"], src["validation"], w / "v", w / "v.json")
        fmt.run(p, w / "v", ROOT / "prompts" / template, b, w / "f")
        tokenize.run(p, w / "f", b, w / "t")
        train.run(p, w / "t", w / "f" / "format.json", b, w / "a", w / "live", w / "c")
        r = evaluate.run(p, b, w / "a", w / "f", w / "t", w / "ev", w / "v")
        assert r["adapter"]["eval_loss"] < r["base"]["eval_loss"]
        losses[task] = r["adapter"]["eval_loss"]
    # the GGUF carries the chat template: llama.cpp's side formats the 16 validation conversations to the training ids
    export.run(p, b, w / "a", w / "t", w / "x")
    # params' gate (0.9) on greedy free-text answers to 16 rows: an answer that parts from PyTorch's at a near tie
    # counts (on an AMX CPU 2 of 16 merged-f16 answers did, logits within 0.05: 2026-12-06); the rest must agree
    g = gguf.run(make_params(task="chat", **{"gguf.rows": 16, "gguf.quantize": []}),
                 w / "x", w / "a", b, w / "f", w / "v", w / "g")
    assert g["token_rows"] == 16  # every prompt and conversation: llama.cpp's ids are the training ids (else an error)
    for c in g["llama_cpp"].values():
        assert c["agreement_within_ties"] >= 0.9 and c["answer_agreement"] + c["near_ties"] / 16 == pytest.approx(
            c["agreement_within_ties"], abs=1e-3), c
    print("eval loss", losses, "gguf", g["llama_cpp"])
    assert abs(losses["chat"] - losses["instruction"]) <= 0.02 * losses["instruction"], losses


def test_the_gguf_carries_the_chat_template_and_llama_cpp_formats_like_training(chat_prepared, tiny_base, tmp_path):
    import shutil

    from pipeline.stages import export, gguf

    p = chat_prepared["params"]
    train.run(p, chat_prepared["tokenized"], chat_prepared["formatted"] / "format.json", tiny_base, tmp_path / "a",
              tmp_path / "live", tmp_path / "c")
    export.run(p, tiny_base, tmp_path / "a", chat_prepared["tokenized"], tmp_path / "x")
    gp = make_params(task="chat", **{"gguf.tokenizer_pre": "gpt-2", "gguf.outtype": "f32", "gguf.rows": 4,
                                     "gguf.quantize": [], "gguf.max_new_tokens": 4, "gguf.min_agreement": 0.0})
    g = gguf.run(gp, tmp_path / "x", tmp_path / "a", tiny_base, chat_prepared["formatted"], chat_prepared["validated"],
                 tmp_path / "g")
    # every conversation, through the file's chat template, gave the training ids
    assert g["token_rows"] == len((chat_prepared["formatted"] / "validation.jsonl").read_text().splitlines()) == 40
    # a conversation whose training prompt is not what the template makes of its turns is named
    wrong = tmp_path / "wrong"
    shutil.copytree(chat_prepared["formatted"], wrong)
    rows = [json.loads(x) for x in (wrong / "validation.jsonl").read_text().splitlines()]
    rows[2]["messages"][0]["content"] += " (changed)"
    write(wrong / "validation.jsonl", rows)
    with pytest.raises(gguf.GgufError, match=rf"validation row {rows[2]['row']}: the chat template .* other tokens"):
        gguf.run(gp, tmp_path / "x", tmp_path / "a", tiny_base, wrong, chat_prepared["validated"], tmp_path / "g2")


def test_a_conversation_that_opens_with_the_assistant(tiny_base, tmp_path):
    """An assistant turn with nothing before it: validate accepts the row, format records why that turn has no
    span, and tokenize with loss_on: all stops with one line naming the file, the row and what to set, while
    loss_on: last trains on the final turn."""
    opening = {"messages": [{"role": "assistant", "content": "Hello, how can I help?"},
                            {"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]}
    rows = [json.loads(x) for x in (EXAMPLE / "chat_train.jsonl").read_text().splitlines()[:10]]
    val = [json.loads(x) for x in (EXAMPLE / "chat_validation.jsonl").read_text().splitlines()[:4]]
    over = {"task": "chat", "format.template": str(EXAMPLE.parent.parent / "prompts" / "chat.jinja"),
            "validate.max_reject_ratio": 0.0}
    for loss_on in ("all", "last"):
        p = make_params(**over, **{"tokenize.loss_on": loss_on})
        w = tmp_path / loss_on
        w.mkdir()
        validate.run(p, write(w / "t.jsonl", rows + [opening]), write(w / "v.jsonl", val), w / "v", w / "m.json")
        fmt.run(p, w / "v", EXAMPLE.parent.parent / "prompts" / "chat.jinja", tiny_base, w / "f")
        if loss_on == "all":
            with pytest.raises(TemplateError) as e:
                tokenize.run(p, w / "f", tiny_base, w / "t")
            assert "\n" not in str(e.value) and f"{w / 'v' / 'train.jsonl'} row 11" in str(e.value)
            assert "assistant turn 1 opens the conversation" in str(e.value) and "tokenize.loss_on: last" in str(e.value)
            assert not (w / "t").exists()
        else:
            report = tokenize.run(p, w / "f", tiny_base, w / "t")
            assert report["train"]["kept"] == 11 and report["train"]["mask_audit"]["failed"] == 0


def test_a_chat_template_that_refuses_a_conversation_is_one_line(tiny_base):
    """A chat template that raises (e.g. one requiring user and assistant to alternate) names the row."""
    tok = load_tokenizer(tiny_base)
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
                         "{% endif %}{{ m['content'] }}{% endfor %}")
    r = Renderer("{% block prompt %}{{ content }}{% endblock %}{% block response %}{{ content }}{% endblock %}",
                 "chat.jinja", tokenizer=tok, chat_template=True)
    row = {"row": 4, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                  {"role": "assistant", "content": "c"}]}
    with pytest.raises(TemplateError, match=r"t.jsonl row 4: the chat template of .* refuses the conversation: "
                                            r"Conversation roles must alternate"):
        CHAT.render(make_params(task="chat"), r, row, "t.jsonl row 4")
