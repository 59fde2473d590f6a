import pytest
from conftest import ROOT, make_params

from pipeline.format import Renderer, TemplateError, format_rows
from pipeline.modeling import load_tokenizer


def test_sentiment_template_renders_prompt_response_and_choices(tiny_base):
    p = make_params(**{"format.chat_template": False})
    r = Renderer.from_file(ROOT / "prompts" / "sentiment.jinja")
    rows = format_rows(p, r, [{"row": 7, "sentence": "Sales rose .", "label": "positive"}], ROOT / "x.jsonl")
    assert rows[0]["prompt"].endswith("Sentence: Sales rose .")
    assert "negative, neutral, positive" in rows[0]["prompt"]
    assert rows[0]["response"] == "positive" and rows[0]["choices"] == ["negative", "neutral", "positive"]


def test_chat_template_wraps_prompt(tiny_base):
    tok = load_tokenizer(tiny_base)
    r = Renderer("{% block prompt %}Q: {{ q }}{% endblock %}{% block response %}{{ a }}{% endblock %}", "t",
                 tokenizer=tok, chat_template=True, system_prompt="Be brief.")
    assert r.prompt({"q": "hi"}) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ: hi<|im_end|>\n"
                                     "<|im_start|>assistant\n")


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
