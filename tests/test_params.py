import pytest
from conftest import ROOT, raw_params

from pipeline import methods, tasks
from pipeline.contract import parse
from pipeline.core.params import ParamsError, load_params, parse_params


def check_all(raw: dict):
    """params checked as every stage checks them, and as the train stage checks its method."""
    p = parse(raw)
    methods.check(p.train, tasks.get(p.task).dpo)
    return p


def test_repository_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.train.method == "lora"
    assert p.train.lora["r"] == 16
    assert p.labels == ["negative", "neutral", "positive"]


FPB_FAST = {"data.train", "data.validation", "data.license", "format.template", "format.chat_template", "train.epochs",
            "train.checkpoint_every", "evaluate.samples", "evaluate.shots"}
# what each profile changes in params.yaml, as its header says
PROFILES = {"params-fpb-fast.yaml": FPB_FAST,  # fpb-3min: 2 epochs, as params.yaml
            "params-fpb-3min.yaml": FPB_FAST - {"train.epochs"} | {"train.lr", "train.lr_scheduler", "train.lora"}}


def test_profile_params_load_and_name_their_template():
    """Every profile in docs/examples is a complete, valid params file whose template exists, and it
    differs from params.yaml only where its header says (data, prompt, epochs, checkpoints, evaluation as the
    sweep that found it ran)."""
    import yaml

    paths = sorted((ROOT / "docs" / "examples").glob("params-*.yaml"))
    assert {p.name for p in paths} == set(PROFILES)
    for path in paths:
        p = load_params(path)
        assert (ROOT / p.format.template).exists(), path
        mine, default = yaml.safe_load(path.read_text()), yaml.safe_load((ROOT / "params.yaml").read_text())
        changed = {f"{k}.{j}" for k in mine if isinstance(mine[k], dict) for j in mine[k] if mine[k][j] != default[k][j]}
        assert changed == PROFILES[path.name], path


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
        check_all(raw_params(**overrides))
    assert message in str(e.value)


def test_missing_required_key():
    raw = raw_params()
    del raw["data"]["train"]
    with pytest.raises(ParamsError, match="missing required key 'data.train'"):
        parse_params(raw)


def test_float_strings_and_other_methods_pass():
    p = check_all(raw_params(**{"train.lr": "1e-4", "train.method": "ia3", "train.ia3": {"target_modules": ["k_proj"]}}))
    assert p.train.lr == 1e-4
    assert p.train.ia3 == {"target_modules": ["k_proj"]}


BNB_PROBE = """
import sys
from pipeline.core.stage import peek, without_bitsandbytes
print(without_bitsandbytes(peek(sys.argv[1], "train.quantization"), peek(sys.argv[1], "train.optimizer")))
import peft, transformers.utils
print(transformers.utils.is_bitsandbytes_available(), sys.modules.get('bitsandbytes') is not None)
"""


@pytest.mark.parametrize("over, skipped", [({}, True), ({"train.optimizer": "adamw_8bit"}, False),
                                           ({"train.quantization": {"load_in_4bit": True}}, False)])
def test_stage_programs_skip_bitsandbytes_unless_params_need_it(tmp_path, over, skipped):
    """A stage program (pipeline.core.stage.entry) whose params quantize nothing and use AdamW runs without
    bitsandbytes: PEFT and transformers then take it for not installed. 8-bit optimizers or a quantized base
    keep it. (In a subprocess: the choice holds for a whole process.)"""
    import subprocess
    import sys

    import yaml

    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw_params(**over)))
    r = subprocess.run([sys.executable, "-c", BNB_PROBE, str(f)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    did, line = r.stdout.split("\n")[:2]
    assert did == str(skipped)
    assert line == ("False False" if skipped else "True True")


def test_a_quantized_adapter_in_a_program_without_bitsandbytes_is_one_clear_error(tmp_path, tiny_base):
    """The edge of that choice: an adapter trained quantized, loaded by a stage whose params.yaml no longer
    quantizes (`dvc repro --single-item`), is refused with a line saying what to run."""
    import subprocess
    import sys

    probe = ("import sys; sys.modules['bitsandbytes'] = None\n"
             "from pipeline.core.loading import load_base_model\nfrom pipeline.core.stage import PipelineError\n"
             "try:\n    load_base_model(sys.argv[1], __import__('torch').device('cpu'), {'load_in_4bit': True})\n"
             "except PipelineError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", probe, str(tiny_base)], cwd=ROOT, capture_output=True, text=True)
    assert "started without bitsandbytes" in r.stdout and "dvc repro" in r.stdout, r.stdout + r.stderr[-2000:]
