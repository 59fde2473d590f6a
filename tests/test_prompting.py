"""pipeline/core/prompting.py: the Renderer wraps a prompt in the tokenizer's chat template, puts shots
first (chat turns or paragraphs), renders the Alpaca template, and names template and row in its errors."""

import signal

import pytest
from conftest import ROOT

from pipeline.core.loading import load_tokenizer
from pipeline.core.prompting import Renderer
from pipeline.core.stage import TemplateError


def test_chat_template_wraps_prompt(tiny_base):
    tok = load_tokenizer(tiny_base)
    r = Renderer("{% block prompt %}Q: {{ q }}{% endblock %}{% block response %}{{ a }}{% endblock %}", "t",
                 tokenizer=tok, chat_template=True, system_prompt="Be brief.")
    assert r.prompt({"q": "hi"}) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ: hi<|im_end|>\n"
                                     "<|im_start|>assistant\n")


def test_shots_come_first_as_chat_turns_or_paragraphs(tiny_base):
    text = "{% block prompt %}Q: {{ q }}{% endblock %}{% block response %}{{ a }}{% endblock %}"
    shots = [{"q": "1+1", "a": "2"}, {"q": "2+2", "a": "4"}]
    chat = Renderer(text, "t", tokenizer=load_tokenizer(tiny_base), chat_template=True, system_prompt="S.")
    assert chat.prompt({"q": "3+3"}, shots=shots) == (
        "<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nQ: 1+1<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>user\nQ: 2+2<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nQ: 3+3<|im_end|>\n<|im_start|>assistant\n")
    assert Renderer(text, "t").prompt({"q": "3+3"}, shots=shots) == "Q: 1+1\n2\n\nQ: 2+2\n4\n\nQ: 3+3"
    with pytest.raises(TemplateError, match="shot 1: 'a' is undefined"):
        Renderer(text, "t").prompt({"q": "3"}, "x.jsonl row 4", shots=[shots[0], {"q": "5"}])


def test_alpaca_template_with_and_without_input():
    r = Renderer.from_file(ROOT / "prompts" / "alpaca.jinja")
    assert r.prompt({"instruction": "Add.", "input": "1 + 2", "output": "3"}) == "Add.\n\nInput:\n1 + 2"
    assert r.prompt({"instruction": "Say hi.", "input": "", "output": "hi"}) == "Say hi."


@pytest.mark.parametrize("text, message", [
    ("{% block prompt %}{{ sentense }}{% endblock %}{% block response %}x{% endblock %}", "'sentense' is undefined"),
    ("{% block prompt %}{{ ''.__class__.__mro__ }}{% endblock %}{% block response %}x{% endblock %}", "sandbox"),
    ("{% block prompt %}x{% endblock %}", "must define {% block response %}"),
    ("{% block prompt %}{{ x {% endblock %}", "line 1"),
])
def test_template_errors_name_template_and_row(text, message):
    with pytest.raises(TemplateError) as e:
        r = Renderer(text, "prompts/bad.jinja")
        r.prompt({"sentence": "s", "row": 3}, where="data.jsonl row 3")
    assert message in str(e.value) and "prompts/bad.jinja" in str(e.value)


def test_a_template_that_runs_or_grows_without_end_fails_naming_it_and_the_row():
    import time

    loops = "{% for i in range(100000) %}{% for j in range(100000) %}BODY{% endfor %}{% endfor %}"
    quiet = Renderer("{% block prompt %}" + loops.replace("BODY", "") + "{% endblock %}{% block response %}x"
                     "{% endblock %}", "prompts/slow.jinja")
    t0 = time.monotonic()
    with pytest.raises(TemplateError, match=r"prompts/slow.jinja: row 3: the prompt block took over 2 s"):
        quiet.prompt({"text": "a"}, "row 3")
    assert time.monotonic() - t0 < 10
    big = Renderer("{% block prompt %}" + loops.replace("BODY", "{{ text }}") + "{% endblock %}{% block response %}"
                   "x{% endblock %}", "prompts/big.jinja")
    with pytest.raises(TemplateError, match=r"prompts/big.jinja: row 4: the prompt block renders over 1,000,000"):
        big.prompt({"text": "abc"}, "row 4")
    assert Renderer("{% block prompt %}{{ text }}{% endblock %}{% block response %}x{% endblock %}",
                    "ok").prompt({"text": "fine"}) == "fine"
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # the timer is off again: nothing fires later
