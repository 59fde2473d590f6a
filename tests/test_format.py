import pytest
from conftest import ROOT, make_params

from pipeline import tasks
from pipeline.core.loading import load_tokenizer
from pipeline.core.prompting import Renderer
from pipeline.core.stage import TemplateError
from pipeline.tasks.classification import pick_shots


def test_sentiment_template_renders_prompt_response_and_choices(tiny_base):
    p = make_params(**{"format.chat_template": False})
    r = Renderer.from_file(ROOT / "prompts" / "sentiment.jinja")
    rows = [tasks.get("classification").render(p, r, {"row": 7, "sentence": "Sales rose .", "label": "positive"},
                                               "x.jsonl row 7")]
    assert rows[0]["prompt"].endswith("Sentence: Sales rose .")
    assert "negative, neutral, positive" in rows[0]["prompt"]
    assert rows[0]["response"] == "positive" and rows[0]["choices"] == ["negative", "neutral", "positive"]


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


def test_pick_shots_shows_every_label_and_is_seeded():
    rows = [{"row": i, "label": lab} for i, lab in enumerate(["neutral"] * 50 + ["positive"] * 9 + ["negative"] * 3)]
    labels = ["negative", "neutral", "positive"]
    a = pick_shots(rows, "label", labels, 5, seed=1)
    assert len(a) == 5 and {r["label"] for r in a} == set(labels) and a[0]["labels"] == labels
    assert sorted(r["label"] for r in a) == sorted(["negative", "negative", "neutral", "neutral", "positive"])
    assert a == pick_shots(rows, "label", labels, 5, seed=1) and a != pick_shots(rows, "label", labels, 5, seed=2)
    assert len(pick_shots(rows[:2], "label", labels, 5, seed=1)) == 2  # fewer rows than shots: all of them


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
