import json

import pytest
import torch
from conftest import fit, make_params, prompt_of
from safetensors.torch import load_file

from pipeline.core.modeling import left_pad
from pipeline.core.stage import Interrupted
from pipeline.methods.adapters import load_adapter
from pipeline.recipes import sft
from pipeline.stages import train


def test_loss_goes_down_and_adapter_is_saved(trained):
    losses = [float(x.split("\t")[1]) for x in
              (trained["live"] / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()[1:]]
    assert len(losses) == trained["metrics"]["steps"] == 16  # 64 rows / 8 per batch * 2 epochs
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    files = {p.name for p in trained["adapter"].iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "peftflow.json"} <= files
    assert "format.json" not in files  # the prompt travels inside the record
    record = json.loads((trained["adapter"] / "peftflow.json").read_text())
    assert record["params"]["train"]["lora"]["r"] == 8 and record["base"]["weights_sha256"]
    assert record["prompt"]["task"] == "classification" and record["prompt"]["facts"]["labels"] == trained["params"].labels
    # the record holds what the train stage reads, nothing else: no other stage's params
    assert set(record["params"]) == {"seed", "deterministic", "task", "train"}
    assert "bitfit" not in record["params"]["train"] and "dpo" not in record["params"]["train"]
    # r=8 on q_proj (64 -> 64) and v_proj (64 -> 32), 2 layers: A (r x in) + B (out x r)
    assert trained["metrics"]["trainable_params"] == 2 * ((8 * 64 + 64 * 8) + (8 * 64 + 32 * 8))


def test_reloaded_adapter_gives_identical_logits(trained, tiny_base):
    import torch
    from datasets import load_from_disk

    from pipeline.core.modeling import device

    rows = [{"input_ids": r["input_ids"]} for r in load_from_disk(str(trained["tokenized"] / "validation"))][:4]
    a = load_adapter(tiny_base, trained["adapter"])
    b = load_adapter(tiny_base, trained["adapter"])
    batch = left_pad(rows, 0, device())
    with torch.no_grad():
        la = a(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lb = b(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with a.disable_adapter():
            base = a(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(la, lb)
    assert not torch.allclose(la, base)


def test_same_seed_same_adapter(trained, prepared, tiny_base, tmp_path):
    train.run(prepared["params"], prepared["tokenized"], prompt_of(prepared["tokenized"]), tiny_base, tmp_path / "a", tmp_path / "live", tmp_path / "c")
    w1 = load_file(str(trained["adapter"] / "adapter_model.safetensors"))
    w2 = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys() and all((w1[k] == w2[k]).all() for k in w1)


@pytest.mark.parametrize("layout", [{"train.shared_prefix": False, "train.packing": True},
                                    {"train.shared_prefix": False, "train.packing": True,
                                     "train.attn_implementation": "varlen"},
                                    {"train.shared_prefix": False, "train.activation_checkpointing": {"every_n_layers": 1, "offload": False}}])
def test_every_layout_trains_the_same_adapter(trained, prepared, tiny_base, tmp_path, layout):
    """The default (shared prefix), packing (mask or varlen) and activation checkpointing: the same steps, the
    same adapter to float32 rounding (the tiny params have no dropout)."""
    assert prepared["params"].train.shared_prefix  # `trained` ran the default layout
    p = make_params(**layout)
    m = train.run(p, prepared["tokenized"], prompt_of(prepared["tokenized"]), tiny_base, tmp_path / "a", tmp_path / "live", tmp_path / "c")
    assert abs(m["final_loss"] - trained["metrics"]["final_loss"]) < 1e-3
    w1 = load_file(str(trained["adapter"] / "adapter_model.safetensors"))
    w2 = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert all((w1[k] - w2[k]).abs().max() <= 1e-3 * w1[k].abs().max() for k in w1)


def test_lean_trains_the_same_adapter_bit_for_bit(prepared, tiny_base, tmp_path):
    """`train.lean` (bf16 frozen weights, recomputed attention and MLP gate) changes memory, not the result:
    without dropout, the adapters trained with and without it are the same bytes."""
    out = {}
    for on in (True, False):
        p = make_params(**{"train.precision": "bf16", "train.lean": on, "train.max_steps": 4})
        train.run(p, prepared["tokenized"], prompt_of(prepared["tokenized"]), tiny_base, tmp_path / str(on), tmp_path / f"live{on}", tmp_path / "c")
        out[on] = load_file(str(tmp_path / str(on) / "adapter_model.safetensors"))
    assert out[True].keys() == out[False].keys()
    assert all(torch.equal(out[True][k], out[False][k]) for k in out[True])


def test_packing_refuses_prompt_learning(prepared, tiny_base, tmp_path):
    from pipeline.core.stage import PipelineError

    p = make_params(**{"train.method": "prompt_tuning", "train.prompt_tuning": {"num_virtual_tokens": 4},
                       "train.packing": True})
    with pytest.raises(PipelineError, match="train.packing"):
        train.run(p, prepared["tokenized"], prompt_of(prepared["tokenized"]), tiny_base, tmp_path / "a", tmp_path / "live", tmp_path / "c")


def test_interrupted_run_resumes_from_checkpoint(prepared, tiny_base, tmp_path, monkeypatch):
    """Stopped after its step-4 checkpoint, the run resumes there and ends with the same adapter folder, byte
    for byte, as an uninterrupted run: weights, and the record's metrics (the running loss average too)."""
    p = make_params(**{"train.checkpoint_every": 4})
    ckpt = tmp_path / "ckpt"
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def crashing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("killed")
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crashing_step)
    with pytest.raises(Interrupted, match=r"train: interrupted in step 7 of 16; a rerun \(dvc repro\) resumes from "
                                          r"the checkpoint of step 4 in .*ckpt"):
        train.run(p, prepared["tokenized"], prompt_of(prepared["tokenized"]), tiny_base, tmp_path / "a", tmp_path / "live", ckpt)
    assert json.loads((ckpt / "checkpoint.json").read_text())["step"] == 4
    assert not (tmp_path / "a").exists()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    m = train.run(p, prepared["tokenized"], prompt_of(prepared["tokenized"]), tiny_base, tmp_path / "a", tmp_path / "live", ckpt)
    assert m["resumed_from_step"] == 4 and m["steps"] == 16
    assert not ckpt.exists()
    # the resumed run ends where an uninterrupted run ends
    train.run(p, prepared["tokenized"], prompt_of(prepared["tokenized"]), tiny_base, tmp_path / "b", tmp_path / "live2", tmp_path / "ckpt2")
    w1 = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    w2 = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    for name in ("adapter_model.safetensors", "peftflow.json", "adapter_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "live" / "metrics.json").read_text() == (tmp_path / "live2" / "metrics.json").read_text()


def test_checkpoint_from_other_params_is_refused(prepared, tiny_base, tmp_path):
    from pipeline.recipes.sft import ResumeError

    p = make_params(**{"train.checkpoint_every": 4, "train.max_steps": 4})
    ckpt = tmp_path / "ckpt"
    _, _, recipe = fit(p, prepared["tokenized"], tiny_base, tmp_path / "live0", tmp_path / "ckpt0")
    recipe.ckpt, recipe.fingerprint = ckpt, "another-fingerprint"
    recipe.save_checkpoint(4)
    with pytest.raises(ResumeError, match="made with other params or data; delete"):
        train.run(p, prepared["tokenized"], prompt_of(prepared["tokenized"]), tiny_base, tmp_path / "a", tmp_path / "live", ckpt)


def test_unknown_peft_argument_is_caught_before_training():
    from pipeline.core.params import ParamsError

    with pytest.raises(ParamsError, match="train.lora.alpha"):
        make_params(**{"train.lora": {"r": 4, "alpha": 8}})


def launch_train(trained: dict, tiny_base, tmp_path, **overrides):
    """The train stage as DVC runs it (`python -m pipeline.stages.train ...`) with these params overrides."""
    import subprocess
    import sys

    import yaml
    from conftest import ROOT, TINY_TRAIN, raw_params

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw_params(**{**TINY_TRAIN, **overrides})))
    return subprocess.run([sys.executable, "-m", "pipeline.stages.train", "--data", str(trained["tokenized"]),
                           "--prompt", str(trained["formatted"] / "format.json"), "--base",
                           str(tiny_base), "--out", str(tmp_path / "adapter"), "--live", str(tmp_path / "live"),
                           "--checkpoints", str(tmp_path / "ckpt"), "--params", str(params)],
                          cwd=ROOT, capture_output=True, text=True)


def assert_same_run(trained: dict, tmp_path, processes: int, distributed: str) -> None:
    """Same steps, a loss curve within 2% of the one-process run, adapter weights within 1e-2."""

    def curve(live):
        return [float(x.split("\t")[1]) for x in
                (live / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()[1:]]

    one, two = curve(trained["live"]), curve(tmp_path / "live")
    assert len(one) == len(two) == 16
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 0.02 * max(one), (one, two)
    out = tmp_path / "adapter"
    m = {**json.loads((out / "peftflow.json").read_text())["metrics"],
         **json.loads((tmp_path / "live" / "run.json").read_text()),
         **json.loads((tmp_path / "live" / "resources.json").read_text())}
    assert (m["processes"], m["distributed"], m["steps"]) == (processes, distributed, trained["metrics"]["steps"])
    assert m["tokens_per_second"] > 0
    a, b = load_file(str(trained["adapter"] / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-2
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.slow
def test_two_processes_under_accelerate_take_the_same_steps_and_save_once(trained, tiny_base, tmp_path):
    """`train.num_processes: 2`: the stage relaunches itself under `accelerate launch` (DDP over gloo on
    this CPU); each process takes half of every batch, the curve follows the one-process run (same
    data order, same steps), and only the main process writes the adapter."""
    r = launch_train(trained, tiny_base, tmp_path, **{"train.num_processes": 2})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "accelerate.commands.launch" in r.stdout and r.stdout.count(f"-> {tmp_path / 'adapter'}") == 1
    assert_same_run(trained, tmp_path, 2, "MULTI_CPU")


@pytest.mark.slow
def test_an_fsdp_config_on_cpu_runs_as_ddp_and_says_so(trained, tiny_base, tmp_path):
    """docs/scaling.md's FSDP config given as `train.accelerate_config`: accelerate cannot shard on a CPU
    and runs the processes as plain multi-CPU DDP; the stage says so, records it, and trains the same."""
    config = tmp_path / "fsdp.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\n"
                      "num_processes: 2\nmixed_precision: 'no'\nfsdp_config:\n  fsdp_version: 2\n"
                      "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n  fsdp_state_dict_type: FULL_STATE_DICT\n")
    r = launch_train(trained, tiny_base, tmp_path, **{"train.num_processes": 2, "train.accelerate_config": str(config)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "asks for FSDP but accelerate runs it as MULTI_CPU" in r.stderr
    assert_same_run(trained, tmp_path, 2, "MULTI_CPU")


@pytest.mark.slow
def test_the_stage_runs_under_mimalloc_and_trains_the_same_tensors(trained, tiny_base, tmp_path):
    """`train.allocator: mimalloc` (the default): the stage program re-executes itself with mimalloc preloaded,
    and run.json names the allocator that ran; the adapter's tensors are the same bits as under the system
    allocator (an allocator moves tensors, never their values)."""
    weights = {}
    for name in ("mimalloc", "system"):
        (tmp_path / name).mkdir()
        r = launch_train(trained, tiny_base, tmp_path / name, **{"train.allocator": name})
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert json.loads((tmp_path / name / "live" / "run.json").read_text())["allocator"] == name
        weights[name] = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert weights["mimalloc"].keys() == weights["system"].keys()
    assert all(torch.equal(weights["mimalloc"][k], weights["system"][k]) for k in weights["system"])


def test_the_train_program_imports_peft_once_and_leaves_bitsandbytes_out(tmp_path):
    """Run as a program, the stage settles its allocator (re-executing itself) and leaves bitsandbytes out
    before its heavy imports: PEFT and transformers are imported once, in the process that trains, and no
    part of bitsandbytes with params that quantize nothing."""
    import re
    import subprocess
    import sys

    import yaml
    from conftest import raw_params

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params(**{"train.allocator": "mimalloc"})))
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.stages.train", "--help"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--checkpoints" in r.stdout, r.stderr[-2000:]
    assert len(re.findall(r"\|\s+peft$", r.stderr, re.M)) == 1
    assert len(re.findall(r"\|\s+pipeline\.core\.allocator$", r.stderr, re.M)) == 2  # before and after the exec
    assert not re.findall(r"\|\s+bitsandbytes\.", r.stderr, re.M)


def test_run_facts_keep_what_ran_in_git_and_what_it_took_out_of_it(tmp_path, monkeypatch):
    """run.json (committed) holds what ran, the same on every reproduction on one hardware class; what a run took
    goes to resources.json (git-ignored); in a DVC experiment, whose commit keeps only git-tracked files, run.json
    holds both, so sweeps compare what each point took."""
    facts = {"seconds": 53.1, "tokens": 38724, "tokens_per_second": 728.7, "peak_rss_mb": 1762, "device": "cpu",
             "resumed_from_step": 0, "hardware": {"cpu_isa": "avx512_bf16"}}
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    sft.write_facts(tmp_path / "a", facts)
    ran, took = (json.loads((tmp_path / "a" / f).read_text()) for f in ("run.json", "resources.json"))
    assert ran == {"tokens": 38724, "device": "cpu", "resumed_from_step": 0, "hardware": {"cpu_isa": "avx512_bf16"}}
    assert took == {"seconds": 53.1, "tokens_per_second": 728.7, "peak_rss_mb": 1762} and set(took) <= set(sft.TOOK)
    monkeypatch.setenv("DVC_EXP_NAME", "lr-3e-4")
    sft.write_facts(tmp_path / "b", facts)
    assert json.loads((tmp_path / "b" / "run.json").read_text()) == facts
