import pytest
from conftest import ROOT, raw_params

from pipeline.core.params import ParamsError, load_params, parse_params


def test_repository_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.train.method == "lora"
    assert p.train.peft_kwargs["r"] == 16
    assert p.labels == ["negative", "neutral", "positive"]


def test_profile_params_load_and_name_their_template():
    """Every profile in docs/examples is a complete, valid params file whose template exists, and it
    differs from params.yaml only where its header says (data, prompt, epochs, checkpoints)."""
    import yaml

    for path in sorted((ROOT / "docs" / "examples").glob("params-*.yaml")):
        p = load_params(path)
        assert (ROOT / p.format.template).exists(), path
        if path.name == "params-fpb-fast.yaml":
            mine, default = yaml.safe_load(path.read_text()), yaml.safe_load((ROOT / "params.yaml").read_text())
            changed = {f"{k}.{j}" for k in mine if isinstance(mine[k], dict)
                       for j in mine[k] if mine[k][j] != default[k][j]}
            assert changed == {"data.train", "data.validation", "format.template", "format.chat_template",
                               "train.epochs", "train.checkpoint_every"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.lrr": 0.1}, "unknown key 'train.lrr'. Did you mean 'lr'?"),
        ({"tokenise": {}}, "unknown key 'tokenise'. Did you mean 'tokenize'?"),
        ({"train.method": "lorra"}, "'train.method' is 'lorra'; valid choices:"),
        ({"train.lora": {"rank": 8}}, "unknown key 'train.lora.rank' (LoraConfig has no such argument)"),
        ({"train.batch_size": "big"}, "'train.batch_size' must be an integer"),
        ({"train.precision": "int4"}, "'train.precision' is 'int4'; valid choices: fp32, bf16, fp16"),
        ({"task": "regression"}, "'task' is 'regression'"),
        ({"base.trust_remote_code": "yes"}, "'base.trust_remote_code' must be true or false"),
    ],
)
def test_bad_params_name_the_key(overrides, message):
    with pytest.raises(ParamsError) as e:
        parse_params(raw_params(**overrides))
    assert message in str(e.value)


def test_missing_required_key():
    raw = raw_params()
    del raw["data"]["train"]
    with pytest.raises(ParamsError, match="missing required key 'data.train'"):
        parse_params(raw)


def test_float_strings_and_other_methods_pass():
    p = parse_params(raw_params(**{"train.lr": "1e-4", "train.method": "ia3", "train.ia3": {"target_modules": ["k_proj"]}}))
    assert p.train.lr == 1e-4
    assert p.train.peft_kwargs == {"target_modules": ["k_proj"]}
