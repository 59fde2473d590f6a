"""The baselines the train stage is measured against (bench/variants.py names them): what users would otherwise run.

Each `train_<letter>(args, work)` trains on the data `bench.stage_run.prepare` left in `work` (the same model,
rows, LoRA, learning rate, warm-up, schedule and number of steps as the stage's run) and returns the trained
model and {seconds, tokens (non-pad, as the collator handed them over), final_train_loss}. The Hugging Face
libraries are imported inside the functions on purpose: a worker process loads only the trainer it runs (TRL
alone takes seconds and tens of MB).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from bench.stage_process import LORA, LR, SCHEDULE, WARMUP
from pipeline.core.encoding import IGNORE
from pipeline.core.io import read_jsonl
from pipeline.core.loading import load_tokenizer


def load_lora_model(base: Path, attn: str | None = None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attn} if attn else {}
    model = AutoModelForCausalLM.from_pretrained(str(base), use_safetensors=True, **kw)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))


class Counting:
    """A data collator wrapper that counts the non-pad tokens it hands to the trainer."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, 0

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch.get("attention_mask")  # padding-free batches have none: every token is real
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch


def train_args(args, out: Path, bf16: bool, **extra) -> dict:
    return dict(output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                learning_rate=LR, warmup_steps=int(WARMUP * args.steps), lr_scheduler_type=SCHEDULE,
                weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                seed=args.seed, data_seed=args.seed, bf16=bf16, use_cpu=not torch.cuda.is_available(),
                dataloader_num_workers=0, disable_tqdm=True, **extra)


def run_trainer(trainer, counter) -> dict:
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "tokens": counter.tokens, "final_train_loss": losses[-1]}


def train_a(args, work: Path) -> tuple:
    """The tutorial recipe: every row padded to 512, loss on all tokens, fp32."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = load_tokenizer(args.base)
    rows = read_jsonl(work / "formatted" / "train.jsonl")
    texts = [r["prompt"] + r["response"] + tok.eos_token for r in rows]
    ds = Dataset.from_dict(dict(tok(texts, padding="max_length", max_length=512, truncation=True)))
    model = load_lora_model(args.base)
    counter = Counting(DataCollatorForLanguageModeling(tok, mlm=False))
    trainer = Trainer(model=model, args=TrainingArguments(**train_args(args, work / "a", bf16=False)),
                      train_dataset=ds, data_collator=counter)
    return model, run_trainer(trainer, counter)


def train_b(args, work: Path, name: str = "b") -> tuple:
    """The well-set Trainer: the stage's tokenized rows, dynamic padding, group_by_length, bf16."""
    from datasets import load_from_disk
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok = load_tokenizer(args.base)
    ds = load_from_disk(str(work / "tokenized" / "train")).select_columns(["input_ids", "labels", "length"])
    ds = ds.map(lambda r: {"attention_mask": [1] * len(r["input_ids"])})
    model = load_lora_model(args.base)
    counter = Counting(DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE))
    trainer = Trainer(model=model, args=TrainingArguments(**train_args(args, work / name, bf16=True,
                                                                       train_sampling_strategy="group_by_length")),
                      train_dataset=ds, data_collator=counter)
    return model, run_trainer(trainer, counter)


def train_c(args, work: Path, name: str = "c", **sft) -> tuple:
    """TRL's SFTTrainer with its defaults for prompt/completion rows (and `sft`'s SFTConfig keys)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(args.base)
    rows = read_jsonl(work / "formatted" / "train.jsonl")
    ds = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "completion": [r["response"] for r in rows]})
    model = load_lora_model(args.base)
    config = train_args(args, work / name, bf16=True) | sft
    trainer = SFTTrainer(model=model, args=SFTConfig(**config), train_dataset=ds, processing_class=tok)
    counter = Counting(trainer.data_collator)
    trainer.data_collator = counter
    return model, run_trainer(trainer, counter)


def train_e(args, work: Path) -> tuple:
    return train_c(args, work, "e", padding_free=True, max_length=None)  # rows are at most 256 tokens


def train_f(args, work: Path) -> tuple:
    tokens = json.loads((work / "tokenized" / "tokenize.json").read_text())["train"]
    width = round(args.batch_size * tokens["tokens"] / tokens["kept"])
    return train_c(args, work, "f", packing=True, packing_strategy="bfd", max_length=width,
                   per_device_train_batch_size=1)


def train_g(args, work: Path) -> tuple:
    return train_b(args, work, "g")  # b on mimalloc: the process differs (bench/variants.py), not the run


def train_x(args, work: Path) -> tuple:
    return train_c(args, work, "x")  # c on mimalloc


TRAINERS = {"a": train_a, "b": train_b, "c": train_c, "e": train_e, "f": train_f, "g": train_g, "x": train_x}
