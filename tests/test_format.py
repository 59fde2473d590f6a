"""Stage `format` and the classification task's rendering: the sentiment template's prompt, response and
choices, and the shots evaluation picks."""

from conftest import ROOT, make_params

from pipeline import tasks
from pipeline.core.prompting import Renderer
from pipeline.tasks.classification import pick_shots


def test_sentiment_template_renders_prompt_response_and_choices(tiny_base):
    p = make_params(**{"format.chat_template": False})
    r = Renderer.from_file(ROOT / "prompts" / "sentiment.jinja")
    rows = [tasks.get("classification").render(p, r, {"row": 7, "sentence": "Sales rose .", "label": "positive"},
                                               "x.jsonl row 7")]
    assert rows[0]["prompt"].endswith("Sentence: Sales rose .")
    assert "negative, neutral, positive" in rows[0]["prompt"]
    assert rows[0]["response"] == "positive" and rows[0]["choices"] == ["negative", "neutral", "positive"]


def test_pick_shots_shows_every_label_and_is_seeded():
    rows = [{"row": i, "label": lab} for i, lab in enumerate(["neutral"] * 50 + ["positive"] * 9 + ["negative"] * 3)]
    labels = ["negative", "neutral", "positive"]
    a = pick_shots(rows, "label", labels, 5, seed=1)
    assert len(a) == 5 and {r["label"] for r in a} == set(labels) and a[0]["labels"] == labels
    assert sorted(r["label"] for r in a) == sorted(["negative", "negative", "neutral", "neutral", "positive"])
    assert a == pick_shots(rows, "label", labels, 5, seed=1) and a != pick_shots(rows, "label", labels, 5, seed=2)
    assert len(pick_shots(rows[:2], "label", labels, 5, seed=1)) == 2  # fewer rows than shots: all of them
