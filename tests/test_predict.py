"""Serving: the adapter's own template, several adapters on one base, base output, parity with training."""

import json
import shutil

from conftest import make_params, prompt_of
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.encoding import encode, encode_prompt
from pipeline.core.loading import load_tokenizer
from pipeline.predict import Predictor
from pipeline.stages import train


def test_serving_renders_the_same_tokens_as_training(trained, tiny_base):
    """For every validation row: the prompt ids `predict` builds from the raw row, with the
    template stored in the adapter, equal the prompt part of the ids the model was trained on."""
    from datasets import load_from_disk

    p = Predictor(tiny_base, {"a": trained["adapter"]}, max_new_tokens=8, batch_size=16)
    tok = load_tokenizer(tiny_base)
    tokenized = {r["row"]: r for r in load_from_disk(str(trained["tokenized"] / "validation"))}
    raw = [json.loads(x) for x in (trained["formatted"].parent / "validated" / "validation.jsonl").read_text().splitlines()]
    assert len(raw) == len(tokenized) == 32
    for row in raw:
        served = encode_prompt(tok, p.renderers["a"].prompt({**row, "labels": trained["params"].labels}))
        t = tokenized[row["row"]]
        n_prompt = sum(x == -100 for x in t["labels"])
        assert served == t["input_ids"][:n_prompt]


def test_two_adapters_one_base_switch_without_reload(trained, prepared, tiny_base, tmp_path, monkeypatch):
    # a second adapter trained to answer "positive" to everything
    flipped = tmp_path / "tok"
    shutil.copytree(prepared["tokenized"], flipped)
    from datasets import Dataset, load_from_disk

    tok = load_tokenizer(tiny_base)
    rows = []
    for r in load_from_disk(str(prepared["tokenized"] / "train")):
        n = sum(t == -100 for t in r["labels"])
        e = encode(tok, tok.decode(r["input_ids"][:n]), "positive", 10_000, "response")
        rows.append({**e, "row": r["row"]})
    shutil.rmtree(flipped / "train")
    Dataset.from_list(rows).save_to_disk(str(flipped / "train"))
    p2 = make_params(**{"train.epochs": 3})
    train.run(p2, flipped, prompt_of(prepared["tokenized"]), tiny_base, tmp_path / "pos", tmp_path / "live", tmp_path / "ckpt")

    import peft

    rows = [{"sentence": "Kestrel Steel will cut 40 jobs at its Oulu plant ."},
            {"sentence": "Nordvik Paper is headquartered in Oulu ."}]
    alone = Predictor(tiny_base, {"task": trained["adapter"]}, max_new_tokens=8, batch_size=16)  # the adapter loaded alone: its own answers
    alone_task, alone_base = alone.predict(rows, "task"), alone.predict(rows, None)
    p = Predictor(tiny_base, {"task": trained["adapter"], "positive": tmp_path / "pos"}, max_new_tokens=8, batch_size=16)
    loads = []
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda *a, **k: loads.append(a))
    always = p.predict(rows, "positive")
    task = p.predict(rows, "task")
    base = p.predict(rows, None)
    assert always == ["positive", "positive"]
    # each name answers as that adapter (or the base) loaded alone: switching mixes nothing up
    assert (task, base) == (alone_task, alone_base)
    assert p.predict(rows, "positive") == always  # switching back is deterministic
    assert loads == []  # switching loaded nothing
    assert len([n for n, _ in p.model.named_modules() if n.endswith("q_proj.lora_A.positive")]) == 2


def answers(output: str) -> list[dict]:
    """The JSON lines predict wrote (stderr's progress lines are mixed into the runner's output)."""
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(line[line.index('{"row"'):])[0] for line in output.splitlines() if '{"row"' in line]


def test_cli_predict_from_stdin(trained, tiny_base):
    r = CliRunner().invoke(app, ["predict", "--base", str(tiny_base), "--adapter", f"a={trained['adapter']}",
                                 "--with-base"], input="Sales rose sharply .\n{\"sentence\": \"Profit fell .\"}\n")
    assert r.exit_code == 0, r.output
    lines = answers(r.output)
    assert [x["row"] for x in lines] == [1, 2]
    assert all(x["a"] in ("negative", "neutral", "positive") and "base" in x for x in lines)
    assert [x["input"]["sentence"] for x in lines] == ["Sales rose sharply .", "Profit fell ."]  # the input kept


def test_cli_predict_keeps_the_input_or_the_id_field_named(trained, tiny_base, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "r7", "sentence": "Sales rose ."}\n{"id": "r9", "sentence": "Costs fell ."}\n')
    r = CliRunner().invoke(app, ["predict", "--base", str(tiny_base), "--adapter", f"a={trained['adapter']}",
                                 "--input", str(rows), "--id", "id"])
    assert r.exit_code == 0, r.output
    lines = answers(r.output)
    assert [(x["row"], x["id"], sorted(x)) for x in lines] == [(1, "r7", ["a", "id", "row"]), (2, "r9", ["a", "id", "row"])]
    rows.write_text('{"id": "r7", "sentence": "Sales rose ."}\n{"sentence": "Costs fell ."}\n')
    r = CliRunner().invoke(app, ["predict", "--base", str(tiny_base), "--adapter", f"a={trained['adapter']}",
                                 "--input", str(rows), "--id", "id"])
    assert r.exit_code == 2 and f"{rows} row 2 field 'id': missing" in r.output and '{"row"' not in r.output


def test_cli_predict_bad_adapter_is_one_line(tiny_base, tmp_path):
    r = CliRunner().invoke(app, ["predict", "--base", str(tiny_base), "--adapter", str(tmp_path)], input="x\n")
    assert r.exit_code == 2 and "not an adapter folder" in r.output


def test_adapter_for_another_base_is_refused_unless_forced(trained, tiny_base, tmp_path):
    import pytest

    from pipeline.core.stage import PipelineError

    other = tmp_path / "other"
    shutil.copytree(trained["adapter"], other)
    record = json.loads((other / "peftflow.json").read_text())
    record["base"]["weights_sha256"] = "0" * 64
    (other / "peftflow.json").write_text(json.dumps(record))
    with pytest.raises(PipelineError, match="only fits the base model version it was trained on"):
        Predictor(tiny_base, {"a": trained["adapter"], "b": other}, max_new_tokens=8, batch_size=16)
    forced = Predictor(tiny_base, {"b": other}, max_new_tokens=8, batch_size=16, allow_other_base=True)
    assert forced.adapters == ["b"]
    r = CliRunner().invoke(app, ["predict", "--adapter", str(other), "--base", str(tiny_base)], input="Sales rose .\n")
    assert r.exit_code == 2 and "only fits the base model version" in r.output
    r = CliRunner().invoke(app, ["predict", "--adapter", str(other), "--base", str(tiny_base), "--allow-other-base"],
                           input="Sales rose .\n")
    assert r.exit_code == 0, r.output


def test_an_adapter_whose_weights_do_not_fit_its_config_is_one_short_line(trained, tiny_base, tmp_path):
    other = tmp_path / "misfit"
    shutil.copytree(trained["adapter"], other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))  # the weights are rank 8
    for adapters in ([str(other)], [f"a={trained['adapter']}", f"b={other}"]):  # first adapter, or a later one
        r = CliRunner().invoke(app, ["predict", "--base", str(tiny_base), *sum((["--adapter", a] for a in adapters),
                                                                               [])], input="Sales rose .\n")
        errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
        assert r.exit_code == 2 and len(errors) == 1 and len(errors[0]) < 400, r.output[-2000:]
        assert f"{other}: cannot load the adapter: its weights do not fit adapter_config.json" in errors[0]
        assert "likely the rank: the file holds rank-8 weights, adapter_config.json says r=4" in errors[0]
