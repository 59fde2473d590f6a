"""Preference pairs (task `preference`): schema, templates, tokenized pairs, SFT then DPO on the
tiny model with the base as reference, and the reward metrics of evaluate."""

import json

import numpy as np
from conftest import prepare, prompt_of

from pipeline.core.scoring import pair_logprobs
from pipeline.methods.adapters import load_adapter
from pipeline.stages import evaluate, train, validate
from pipeline.tasks.preference import reward_metrics


def test_reward_metrics_known_values():
    a = np.array
    assert reward_metrics((a([3.0, 0.0]), a([1.0, 1.0])), (a([2.0, 0.0]), a([2.0, 0.0])), 0.5) == \
        {"reward_accuracy": 0.5, "reward_margin": 0.25}


def test_bad_pairs_are_quarantined_with_file_row_and_field(tmp_path):
    from conftest import make_params

    p = make_params(**{"task": "preference", "validate.max_reject_ratio": 1.0})
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"prompt": "Add 2 and 2.", "chosen": "4", "rejected": "5"}\n'
                 '{"prompt": "Add 3 and 3.", "chosen": "6", "rejected": "6"}\n'
                 '{"prompt": "Add 4 and 4.", "chosen": "8"}\n')
    v = tmp_path / "val.jsonl"
    v.write_text('{"prompt": "Add 5 and 5.", "chosen": "10", "rejected": "I would rather not say."}\n')
    validate.run(p, f, v, tmp_path / "out", tmp_path / "m.json")
    q = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert {(r["row"], r["field"]) for r in q} == {(2, "rejected"), (3, "rejected")}
    assert any("same as chosen" in r["reason"] for r in q) and any("missing" in r["reason"] for r in q)


def test_sft_then_dpo_raises_the_reward_of_chosen_answers(tiny_base, tmp_path):
    prep = prepare(tmp_path, tiny_base, task="preference", rows=None)
    p = prep["params"]
    pair = json.loads((prep["formatted"] / "train.jsonl").read_text().splitlines()[0])
    assert {"prompt", "response", "rejected"} <= set(pair) and pair["response"] != pair["rejected"]
    from datasets import load_from_disk

    tokenized = load_from_disk(str(prep["tokenized"] / "train"))
    assert {"rejected_input_ids", "rejected_labels"} <= set(tokenized.column_names)

    dpo = p.train.dpo.model_copy(update={"beta": 0.5, "steps": 24, "lr": 2e-2, "batch_size": 8})
    p = p.model_copy(update={"train": p.train.model_copy(update={"epochs": 1.0, "dpo": dpo})})
    metrics = train.run(p, prep["tokenized"], prompt_of(prep["tokenized"]), tiny_base, tmp_path / "a", tmp_path / "live", tmp_path / "c")
    assert (tmp_path / "a" / "sft" / "adapter_model.safetensors").exists() and metrics["dpo_seconds"] > 0
    curve = [float(x.split("\t")[1]) for x in
             (tmp_path / "live" / "plots" / "metrics" / "dpo" / "loss.tsv").read_text().splitlines()[1:]]
    assert len(curve) == 24 and sum(curve[-6:]) / 6 < sum(curve[:6]) / 6

    # on the training pairs the DPO adapter's implicit reward ranks chosen over rejected more often than SFT's
    model = load_adapter(tiny_base, tmp_path / "a")
    pairs = list(tokenized)
    with model.disable_adapter():
        base = pair_logprobs(model, pairs, 16)
    dpo_rewards = reward_metrics(pair_logprobs(model, pairs, 16), base, 0.5)
    model.load_adapter(str(tmp_path / "a" / "sft"), adapter_name="sft")
    model.set_adapter("sft")
    sft_rewards = reward_metrics(pair_logprobs(model, pairs, 16), base, 0.5)
    assert dpo_rewards["reward_accuracy"] > sft_rewards["reward_accuracy"], (dpo_rewards, sft_rewards)
    assert dpo_rewards["reward_margin"] > sft_rewards["reward_margin"]

    r = evaluate.run(p, tiny_base, tmp_path / "a", prep["formatted"], prep["tokenized"], tmp_path / "ev",
                     prep["validated"])
    assert r["rows"] == 40 and set(r) >= {"base", "sft", "adapter", "gain"}
    # the stage's reward metrics are those of each adapter against the base on the held-out pairs
    held_out = list(load_from_disk(str(prep["tokenized"] / "validation")))
    with model.disable_adapter():
        held_base = pair_logprobs(model, held_out, 16)
    for adapter, name in (("sft", "sft"), ("default", "adapter")):
        model.set_adapter(adapter)
        want = reward_metrics(pair_logprobs(model, held_out, 16), held_base, 0.5)
        assert abs(r[name]["reward_accuracy"] - want["reward_accuracy"]) <= 1 / 40 + 1e-9, (name, r[name], want)
        assert abs(r[name]["reward_margin"] - want["reward_margin"]) < 1e-3, (name, r[name], want)
    assert r["gain"]["reward_accuracy"] == round(r["adapter"]["reward_accuracy"] - r["sft"]["reward_accuracy"], 4)
