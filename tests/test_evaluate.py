"""Stage `evaluate` (pipeline/stages/evaluate.py) and the classification and instruction tasks' evaluation:
metrics, plots, the prompting baselines and their rules, few-shot prompts, eval loss and samples."""

import json

import numpy as np
from conftest import prepare, prompt_of

from pipeline import tasks
from pipeline.core import scoring
from pipeline.core.loading import load_tokenizer
from pipeline.core.prompting import Prompt
from pipeline.methods.adapters import load_adapter
from pipeline.stages import evaluate, train
from pipeline.tasks.classification import RULES, classification_metrics, parse_label, rule_predictions


def test_classification_metrics_and_plots(trained, tiny_base, tmp_path):
    r = evaluate.run(trained["params"], tiny_base, trained["adapter"], trained["formatted"], trained["tokenized"],
                     tmp_path / "ev", trained["validated"])
    assert set(r) == {"base", f"base_{trained['params'].evaluate.shots}shot", "adapter", "gain", "rows", "rules",
                      "prompting_baseline", "majority", "gain_over_prompting"}
    for name in ("base", "base_5shot", "adapter"):
        assert set(r[name]["per_class"]) == {"negative", "neutral", "positive"}
        assert np.sum(r[name]["confusion"]) == r["rows"] == 32
        assert r[name]["accuracy"] == round(np.trace(r[name]["confusion"]) / 32, 4)
    assert r["gain"]["accuracy"] == round(r["adapter"]["accuracy"] - r["base"]["accuracy"], 4)
    # the trained adapter gives the true labels more probability than the random base does
    tok, model = load_tokenizer(tiny_base), load_adapter(tiny_base, trained["adapter"])
    rows = [json.loads(x) for x in (trained["formatted"] / "validation.jsonl").read_text().splitlines()]
    truth = [trained["params"].labels.index(x["label"]) for x in rows]
    adapter = scoring.choice_logprobs(model, tok, rows, 16).total[np.arange(len(rows)), truth].mean()
    with model.disable_adapter():
        base = scoring.choice_logprobs(model, tok, rows, 16).total[np.arange(len(rows)), truth].mean()
    assert adapter > base + 1.0
    preds = json.loads((tmp_path / "ev" / "predictions.json").read_text())
    assert len(preds) == 32
    for key, name in (("predicted", "adapter"), ("base_predicted", "base")):  # the plot's data is the metrics' data
        assert round(np.mean([x["actual"] == x[key] for x in preds]), 4) == r[name]["accuracy"]
    assert (tmp_path / "ev" / "confusion.png").stat().st_size > 1000
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == json.loads(json.dumps(r))
    # the model stops: the trained adapter ends every sampled answer at EOS; the random base runs on
    samples = [json.loads(x) for x in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert r["adapter"]["stopped_ratio"] == 1.0 and all(s["adapter_stopped"] for s in samples)
    assert not any(s["base_stopped"] for s in samples)


def test_every_rule_scored_and_the_prompting_baseline_is_the_best_of_them(trained, tiny_base, tmp_path):
    r = evaluate.run(trained["params"], tiny_base, trained["adapter"], trained["formatted"], trained["tokenized"],
                     tmp_path / "ev", trained["validated"])
    assert set(r["rules"]) == {"base", "base_5shot", "adapter"}
    for name, rules in r["rules"].items():
        assert set(rules) == set(RULES)
        assert rules["loglik"] == {k: r[name][k] for k in ("accuracy", "macro_f1", "top_class_share", "one_class")}
        for m in rules.values():
            assert m["one_class"] == (m["top_class_share"] > 0.9)
    best = max(m["accuracy"] for name, rules in r["rules"].items() if name != "adapter" for m in rules.values())
    model, rule = r["prompting_baseline"]["name"].split("/")
    assert model != "adapter" and r["prompting_baseline"]["accuracy"] == best == r["rules"][model][rule]["accuracy"]
    assert r["gain_over_prompting"]["accuracy"] == round(r["adapter"]["accuracy"] - best, 4)
    # the majority class of the training rows, answered for every validation row
    train_labels = [json.loads(x)["label"] for x in (trained["validated"] / "train.jsonl").read_text().splitlines()]
    actual = [json.loads(x)["label"] for x in (trained["formatted"] / "validation.jsonl").read_text().splitlines()]
    majority = max(trained["params"].labels, key=train_labels.count)
    assert r["majority"]["label"] == majority and r["majority"]["one_class"]
    assert r["majority"]["accuracy"] == round(actual.count(majority) / len(actual), 4)
    # the trained adapter answers a label when it generates freely, and that answer is mostly right
    assert r["rules"]["adapter"]["generate"]["parsed"] >= 0.9
    assert r["rules"]["adapter"]["generate"]["accuracy"] >= r["majority"]["accuracy"]


def test_rules_read_the_same_scores_differently():
    from pipeline.core.scoring import ChoiceScores

    # row 0: "a" has the largest total but is two tokens long; "b" has the best first token
    total = np.array([[-2.0, -2.5, -9.0], [-1.0, -3.0, -3.5]])
    first = np.array([[-1.5, -0.5, -4.0], [-0.5, -1.0, -2.0]])
    tokens = np.array([[4, 1, 1], [1, 1, 1]])
    # with no content the prompt alone favours "a" strongly: calibration divides that out
    content_free = ChoiceScores(np.log(np.array([[0.9, 0.05, 0.05]] * 3)), np.zeros((3, 3)), np.ones((3, 3), int))
    picks = rule_predictions(ChoiceScores(total, first, tokens), content_free)
    assert picks["loglik"].tolist() == [0, 0]
    assert picks["loglik_norm"].tolist() == [0, 0] and (total / tokens)[0].argmax() == 0
    assert picks["first_token"].tolist() == [1, 0]
    assert picks["calibrated"].tolist() == [1, 1]


def test_parse_label_takes_the_label_named_first_as_a_whole_word():
    labels = ["negative", "neutral", "positive"]
    assert parse_label("The sentiment is Positive.", labels, labels) == 2
    assert parse_label("neutral, or perhaps negative", labels, labels) == 1
    assert parse_label("It is negatively worded", labels, labels) is None
    assert parse_label("", labels, labels) is None
    assert parse_label("Answer: bad", ["Answer: good", "Answer: bad", "Answer: meh"], labels) == 1


def test_classification_metrics_known_values():
    m = classification_metrics(["a", "a", "b", "c"], ["a", "b", "b", "c"], ["a", "b", "c"])
    assert m["accuracy"] == 0.75 and m["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2}


def test_instruction_eval_loss_and_samples(tiny_base, tmp_path):
    prep = prepare(tmp_path, tiny_base, task="instruction", rows=32)
    train.run(prep["params"], prep["tokenized"], prompt_of(prep["tokenized"]), tiny_base, tmp_path / "a", tmp_path / "live", tmp_path / "c")
    r = evaluate.run(prep["params"], tiny_base, tmp_path / "a", prep["formatted"], prep["tokenized"], tmp_path / "ev",
                     prep["validated"])
    assert r["adapter"]["eval_loss"] < r["base"]["eval_loss"]
    assert r["adapter"]["perplexity"] == round(np.exp(r["adapter"]["eval_loss"]), 3) or abs(
        r["adapter"]["perplexity"] - np.exp(r["adapter"]["eval_loss"])) / r["adapter"]["perplexity"] < 1e-3
    samples = [json.loads(x) for x in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"base", "adapter", "reference"} <= set(samples[0])


def eval_inputs(prepared, tiny_base) -> tasks.EvalInputs:
    """What the evaluate stage hands a task, without a model (for the parts that render prompts)."""
    prompt = Prompt.load(prepared["formatted"])
    return tasks.EvalInputs(None, prompt, prompt.renderer(load_tokenizer(tiny_base)), [], prepared["tokenized"],
                            prepared["validated"], None, {}, None)


def test_fewshot_prompts_hold_solved_examples_of_every_label(prepared, tiny_base):
    p = prepared["params"]
    x = eval_inputs(prepared, tiny_base)
    rows = tasks.get("classification").fewshot_rows(x, tasks.get("classification").shots(p, x))
    plain = [json.loads(x) for x in (prepared["formatted"] / "validation.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == [r["row"] for r in plain] and rows[0]["choices"] == plain[0]["choices"]
    first = rows[0]["prompt"]
    # the row's own prompt closes the few-shot prompt; before it, 5 answered turns with every label
    assert first.endswith(plain[0]["prompt"].split("<|im_start|>user")[-1])
    answers = [t.split("<|im_end|>")[0].strip() for t in first.split("<|im_start|>assistant\n")[1:-1]]
    assert len(answers) == 5 and set(answers) == set(p.labels)
    # the same shots before every row: all but the row's own text is a shared prefix
    assert rows[1]["prompt"].split("Sentence:")[:-1] == first.split("Sentence:")[:-1]
