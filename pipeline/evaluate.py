"""Stage `evaluate`: score the adapter and the base model the same way on validation data.

Classification: each label's rendered response (with EOS) is scored as a continuation of the
prompt in one forward pass per batch, and the most likely label is the prediction (no free
generation, so no unparseable answers). Reports accuracy, macro-F1, per-class precision /
recall / F1 and a confusion matrix, for the base model (adapter disabled, no second copy of the
weights) and the adapter, and the gain between them. With `evaluate.shots: k` the base model is
also scored k-shot (`base_<k>shot`): k solved training rows, every label shown, before each prompt.
Instruction: eval loss and perplexity on the response tokens, and greedy sample generations
from both models side by side.
Preference: on held-out pairs, how often base, SFT adapter and DPO adapter prefer the chosen
answer, and DPO's reward accuracy and margin (against the base) for both adapters.

Inputs: base model folder, adapter folder, formatted and tokenized validation data, validated
training rows (few-shot examples).
Outputs: `<out>/metrics.json`, `<out>/predictions.json` (actual/predicted, a DVC confusion
plot), `<out>/confusion.png`, and for instruction data `<out>/samples.jsonl`.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch
import typer

from pipeline.format import Renderer, format_rows, pick_shots
from pipeline.io import atomic_dir, atomic_write_json, read_jsonl, write_jsonl
from pipeline.modeling import (
    IGNORE,
    batches,
    device,
    is_prompt_learning,
    left_pad,
    load_adapter,
    load_tokenizer,
    response_width,
    token_logprobs,
)
from pipeline.params import Params, load_params
from pipeline.stage import PipelineError, entry
from pipeline.tokenize import encode_many, encode_prompt


def shared_prefix(model, prompts: list[list[int]], dev: torch.device, min_tokens: int = 8):
    """(length, KV cache) of the tokens every prompt starts with (system prompt, instructions), run
    once for all rows; (0, None) when they share fewer than `min_tokens`."""
    first, common = prompts[0], min(len(p) for p in prompts) - 1  # every row keeps a token of its own
    for p in prompts[1:]:
        common = next((k for k in range(common) if p[k] != first[k]), common)
    if common < min_tokens:
        return 0, None
    out = model(input_ids=torch.tensor([first[:common]], device=dev), use_cache=True, logits_to_keep=1)
    return common, out.past_key_values


@torch.no_grad()
def choice_scores(model, tok, rows: list[dict], batch_size: int) -> np.ndarray:
    """Summed log-probability of every choice (with EOS) after its prompt: (rows, choices).

    The tokens all prompts share (system prompt, instructions) run once; each row's own part of
    the prompt runs once from that cache, and its choices continue from the row's cache: a row
    costs its own tokens plus a few choice tokens (measured against free generation in bench/).
    Prompt-learning adapters bring their own cache: they score prompt + choice in full.
    """
    if is_prompt_learning(model):
        return full_scores(model, tok, rows, batch_size)
    dev = next(model.parameters()).device
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows]
    n = len(rows[0]["choices"])
    scores = np.full((len(rows), n), -np.inf)
    common, shared = shared_prefix(model, prompts, dev)
    for idx in batches(sorted(range(len(rows)), key=lambda i: len(prompts[i])), batch_size):
        batch = left_pad([{"input_ids": prompts[i][common:]} for i in idx], 0, dev)
        prompt_mask = batch["attention_mask"]
        cache = None
        if common:
            cache = copy.deepcopy(shared)
            cache.batch_repeat_interleave(len(idx))
            prompt_mask = torch.cat([torch.ones_like(prompt_mask[:, :1]).expand(-1, common), prompt_mask], -1)
        out = model(input_ids=batch["input_ids"], attention_mask=prompt_mask,
                    position_ids=batch["position_ids"] + common, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).repeat_interleave(n, 0)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        # each choice's tokens (+ EOS), right-padded: position k predicts token k + 1
        choices = [tok(rows[i]["choices"], add_special_tokens=False)["input_ids"] for i in idx]
        targets = [c + [tok.eos_token_id] for cs in choices for c in cs]
        width = max(len(t) for t in targets) - 1
        feed = torch.zeros((len(targets), width), dtype=torch.long)
        want = torch.full((len(targets), width), IGNORE, dtype=torch.long)
        for k, t in enumerate(targets):
            feed[k, : len(t) - 1] = torch.tensor(t[:-1], dtype=torch.long)
            want[k, : len(t) - 1] = torch.tensor(t[1:], dtype=torch.long)
        feed, want = feed.to(dev), want.to(dev)
        prompt_mask = prompt_mask.repeat_interleave(n, 0)
        start = prompt_mask.sum(-1, keepdim=True)
        total = first.gather(-1, torch.tensor([t[0] for t in targets], device=dev)[:, None]).squeeze(-1)
        if width:
            logits = model(input_ids=feed, attention_mask=torch.cat([prompt_mask, torch.ones_like(feed)], -1),
                           position_ids=start + torch.arange(width, device=dev), past_key_values=cache,
                           use_cache=False).logits.float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, want.clamp(min=0)[..., None]).squeeze(-1)
            total = total + (logp * (want != IGNORE)).sum(-1)
        scores[np.repeat(idx, n), np.tile(np.arange(n), len(idx))] = total.cpu().numpy()
    return scores


@torch.no_grad()
def full_scores(model, tok, rows: list[dict], batch_size: int) -> np.ndarray:
    """`choice_scores` with every prompt + choice as its own row (no shared cache)."""
    dev = next(model.parameters()).device
    pairs = [(i, j, r["prompt"], c) for i, r in enumerate(rows) for j, c in enumerate(r["choices"])]
    encoded = encode_many(tok, [p for *_, p, _ in pairs], [c for *_, c in pairs], 10**9, "response")
    items = sorted(((i, j, e) for (i, j, _, _), e in zip(pairs, encoded, strict=True)),
                   key=lambda x: len(x[2]["input_ids"]))
    scores = np.full((len(rows), len(rows[0]["choices"])), -np.inf)
    pl = is_prompt_learning(model)
    for chunk in batches(items, batch_size):
        enc = [e for _, _, e in chunk]
        logp, _ = token_logprobs(model, left_pad(enc, 0, dev), response_width(enc), pl)
        for (i, j, _), s in zip(chunk, logp.sum(-1).tolist(), strict=True):
            scores[i, j] = s
    return scores


def classification_metrics(actual: list[str], predicted: list[str], labels: list[str]) -> dict:
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    prec, rec, f1, support = precision_recall_fscore_support(actual, predicted, labels=labels, zero_division=0)
    return {
        "accuracy": round(float(accuracy_score(actual, predicted)), 4),
        "macro_f1": round(float(f1_score(actual, predicted, labels=labels, average="macro", zero_division=0)), 4),
        "per_class": {lab: {"precision": round(float(prec[k]), 4), "recall": round(float(rec[k]), 4),
                            "f1": round(float(f1[k]), 4), "support": int(support[k])}
                      for k, lab in enumerate(labels)},
        "confusion": confusion_matrix(actual, predicted, labels=labels).tolist(),
    }


def plot_confusion(results: dict[str, dict], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8))
    for ax, (name, m) in zip(np.atleast_1d(axes), results.items(), strict=False):
        cm = np.array(m["confusion"])
        ax.imshow(cm, cmap="Blues")
        for (a, b), v in np.ndenumerate(cm):
            ax.text(b, a, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(f"{name}: acc {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fewshot_rows(p: Params, tok, formatted: Path, validated: Path) -> list[dict]:
    """The validation rows re-rendered with `evaluate.shots` solved training examples before each
    prompt (same template, chat template and system prompt as training; see format.pick_shots)."""
    fmt = json.loads((formatted / "format.json").read_text())
    renderer = Renderer(fmt["template_text"], fmt["template"], tokenizer=tok, chat_template=fmt["chat_template"],
                        system_prompt=fmt["system_prompt"])
    shots = pick_shots(read_jsonl(validated / "train.jsonl"), p.validate.label_field, list(p.labels),
                       p.evaluate.shots, p.seed)
    src = validated / "validation.jsonl"
    return format_rows(p, renderer, read_jsonl(src), src, shots)


def evaluate_classification(p: Params, model, tok, rows: list[dict], tmp: Path, fewshot: list[dict] = ()) -> dict:
    labels = list(p.labels)
    actual = [r["label"] for r in rows]
    results, preds = {}, {}
    with model.disable_adapter():
        preds["base"] = [labels[k] for k in choice_scores(model, tok, rows, p.evaluate.batch_size).argmax(1)]
        if fewshot:  # the shots are the same for every row: they join the shared prefix, run once
            assert [r["row"] for r in fewshot] == [r["row"] for r in rows]
            name = f"base_{p.evaluate.shots}shot"
            preds[name] = [labels[k] for k in choice_scores(model, tok, fewshot, p.evaluate.batch_size).argmax(1)]
    preds["adapter"] = [labels[k] for k in choice_scores(model, tok, rows, p.evaluate.batch_size).argmax(1)]
    for name in preds:
        results[name] = classification_metrics(actual, preds[name], labels)
    atomic_write_json(tmp / "predictions.json", [
        {"row": r["row"], "actual": a, "predicted": b, "base_predicted": c}
        for r, a, b, c in zip(rows, actual, preds["adapter"], preds["base"], strict=False)
    ])
    plot_confusion(results, labels, tmp / "confusion.png")
    results["gain"] = {k: round(results["adapter"][k] - results["base"][k], 4) for k in ("accuracy", "macro_f1")}
    results["adapter"]["stopped_ratio"] = write_samples(p, model, tok, rows, tmp)
    results["rows"] = len(rows)
    return results


@torch.no_grad()
def eval_loss(model, rows: list[dict], batch_size: int) -> float:
    dev = next(model.parameters()).device
    pl = is_prompt_learning(model)
    total, count = 0.0, 0
    for chunk in batches(sorted(rows, key=lambda r: len(r["input_ids"])), batch_size):
        logp, mask = token_logprobs(model, left_pad(chunk, 0, dev), response_width(chunk), pl)
        total -= float(logp.sum())
        count += int(mask.sum())
    return total / max(count, 1)


@torch.no_grad()
def generate(model, tok, prompt: str, max_new_tokens: int) -> tuple[str, bool]:
    """Greedy completion of one prompt; returns (text, stopped at EOS)."""
    dev = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(tok, prompt)], device=dev)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    stopped = tok.eos_token_id in new
    if stopped:
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True), stopped


def write_samples(p: Params, model, tok, rows: list[dict], tmp: Path) -> float:
    """Greedy generations of base and adapter for the first rows; returns the adapter's EOS-stop ratio."""
    samples = []
    for r in rows[: p.evaluate.samples]:
        with model.disable_adapter():
            base_text, base_stop = generate(model, tok, r["prompt"], p.evaluate.max_new_tokens)
        text, stop = generate(model, tok, r["prompt"], p.evaluate.max_new_tokens)
        samples.append({"row": r["row"], "prompt": r["prompt"], "reference": r["response"],
                        "base": base_text, "adapter": text, "base_stopped": base_stop, "adapter_stopped": stop})
    write_jsonl(tmp / "samples.jsonl", samples)
    return round(sum(s["adapter_stopped"] for s in samples) / max(len(samples), 1), 3)


def evaluate_instruction(p: Params, model, tok, rows: list[dict], tokenized: list[dict], tmp: Path) -> dict:
    results = {}
    with model.disable_adapter():
        results["base"] = {"eval_loss": eval_loss(model, tokenized, p.evaluate.batch_size)}
    results["adapter"] = {"eval_loss": eval_loss(model, tokenized, p.evaluate.batch_size)}
    for m in results.values():
        m["perplexity"] = round(math.exp(min(m["eval_loss"], 50)), 3)
        m["eval_loss"] = round(m["eval_loss"], 4)
    results["adapter"]["stopped_ratio"] = write_samples(p, model, tok, rows, tmp)
    results["gain"] = {"eval_loss": round(results["base"]["eval_loss"] - results["adapter"]["eval_loss"], 4)}
    results["rows"] = len(tokenized)
    return results


def evaluate_preference(p: Params, model, tok, rows: list[dict], pairs: list[dict], adapter_dir: Path,
                        tmp: Path) -> dict:
    """Held-out pairs: how often each model prefers the chosen answer (base, SFT adapter, DPO adapter),
    and DPO's implicit reward against the base (reward accuracy and margin) for both adapters."""
    from pipeline.preference import pair_logprobs, preference_accuracy, reward_metrics, sides, token_count

    bs, beta = p.evaluate.batch_size, p.train.dpo.beta
    tokens = token_count(sides(pairs)[0])

    def loss(scores) -> float:  # mean NLL per chosen-answer token, as eval_loss computes it
        return round(float(-scores[0].sum() / tokens), 4)

    with model.disable_adapter():
        base = pair_logprobs(model, pairs, bs)
    results = {"base": {"preference_accuracy": preference_accuracy(base), "eval_loss": loss(base)}}
    scored = {"adapter": pair_logprobs(model, pairs, bs)}
    if (adapter_dir / "sft").exists():  # the SFT adapter DPO started from, on the same base weights
        model.load_adapter(str(adapter_dir / "sft"), adapter_name="sft", is_trainable=False)
        model.set_adapter("sft")
        scored["sft"] = pair_logprobs(model, pairs, bs)
        model.set_adapter("default")
    for name, s in scored.items():
        results[name] = {"eval_loss": loss(s), "preference_accuracy": preference_accuracy(s),
                         **reward_metrics(s, base, beta)}
    if "sft" in results:
        results["gain"] = {k: round(results["adapter"][k] - results["sft"][k], 4)
                           for k in ("reward_accuracy", "reward_margin", "preference_accuracy")}
    results["adapter"]["stopped_ratio"] = write_samples(p, model, tok, rows, tmp)
    results["rows"] = len(pairs)
    return results


def run(p: Params, base_dir: Path, adapter_dir: Path, formatted: Path, tokenized: Path, out: Path,
        validated: Path | None = None) -> dict:
    from datasets import load_from_disk

    torch.manual_seed(p.seed)
    tok = load_tokenizer(base_dir)
    model = load_adapter(base_dir, adapter_dir, device())
    rows = read_jsonl(formatted / "validation.jsonl")
    with atomic_dir(out) as tmp:
        if p.task == "classification":
            fewshot = []
            if p.evaluate.shots:
                if validated is None:
                    raise PipelineError("evaluate: evaluate.shots needs the validated data folder (--validated)")
                fewshot = fewshot_rows(p, tok, formatted, validated)
            results = evaluate_classification(p, model, tok, rows, tmp, fewshot)
        elif p.task == "preference":
            pairs = list(load_from_disk(str(tokenized / "validation")))
            results = evaluate_preference(p, model, tok, rows, pairs, Path(adapter_dir), tmp)
        else:
            data = [{"input_ids": r["input_ids"], "labels": r["labels"]}
                    for r in load_from_disk(str(tokenized / "validation"))]
            results = evaluate_instruction(p, model, tok, rows, data, tmp)
        atomic_write_json(tmp / "metrics.json", results)
    return results


def main(
    base: Path = typer.Option(...),
    adapter: Path = typer.Option(...),
    formatted: Path = typer.Option(...),
    tokenized: Path = typer.Option(...),
    out: Path = typer.Option(...),
    validated: Path = typer.Option(None, help="validated data folder (few-shot examples, evaluate.shots)"),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    r = run(load_params(params), base, adapter, formatted, tokenized, out, validated)
    keys = [k for k in ("accuracy", "macro_f1", "eval_loss", "perplexity", "preference_accuracy") if k in r["adapter"]]
    for k in ("reward_accuracy", "reward_margin"):
        if k in r["adapter"]:
            typer.echo(f"evaluate: {k}: sft {r.get('sft', {}).get(k)} -> dpo adapter {r['adapter'][k]}")
    for k in keys:
        typer.echo(f"evaluate: {k}: base {r['base'][k]} -> adapter {r['adapter'][k]}")
        for name in (n for n in r if n.startswith("base_") and k in r[n]):
            typer.echo(f"evaluate: {k}: {name} {r[name][k]}")
    typer.echo(f"evaluate: metrics in {out / 'metrics.json'}")


if __name__ == "__main__":
    entry(main)
