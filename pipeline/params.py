"""Load `params.yaml` into typed, frozen sections.

Job: the one source of configuration. Every key is checked: an unknown or mistyped key, a
wrong type or a bad choice is a `ParamsError` that names the key (with a "did you mean" hint).
PEFT method sections (`train.lora`, `train.ia3`, ...) use the PEFT config class's own argument
names and are checked against that class's fields.

Input: a params.yaml path. Output: a `Params` object.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.stage import PipelineError


class ParamsError(PipelineError, ValueError):
    """A params.yaml problem; the message names the key."""


FULL = "full"  # `train.method: full`: every weight of the base model is trained (no PEFT adapter)


@dataclass(frozen=True)
class BitFit:
    """`train.method: bitfit`: train only the bias terms (and, with `norms`, the normalization weights)."""

    norms: bool = False


# Methods of this project's own, beside PEFT's: name -> the dataclass of its params section (None: no section)
OWN_METHODS: dict[str, type | None] = {FULL: None, "bitfit": BitFit}


@dataclass(frozen=True)
class Base:
    model: str  # pkg://<python package> | local directory | hub id
    gguf_file: str | None = None
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # let the base stage read a pickle (.bin) checkpoint; it always writes safetensors


@dataclass(frozen=True)
class Data:
    train: str
    validation: str


@dataclass(frozen=True)
class Validate:
    text_field: str = "sentence"
    label_field: str = "label"
    min_chars: int = 1
    max_chars: int = 4000
    max_reject_ratio: float = 0.05


@dataclass(frozen=True)
class Format:
    template: str
    chat_template: bool = True
    system_prompt: str | None = None


@dataclass(frozen=True)
class Tokenize:
    max_length: int = 256
    truncation: Literal["response", "prompt", "drop"] = "response"


@dataclass(frozen=True)
class Dpo:
    """Preference tuning (task `preference`): DPO steps after the SFT steps, on the same adapter; the
    reference model is the base (adapter disabled), so no second copy of the weights is loaded."""

    beta: float = 0.1
    steps: int = 40
    lr: float = 1e-4
    batch_size: int = 8
    nll_weight: float = 1.0  # + this x the chosen answers' per-token NLL (keeps their likelihood up; 0: plain DPO)


@dataclass(frozen=True)
class Train:
    method: str = "lora"
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    grad_clip: float | None = 1.0
    group_by_length: bool = True
    # auto: eager attention on CPU (measured faster than sdpa for training at these lengths), sdpa on GPU
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    checkpoint_every: int = 50
    log_every: int = 5
    quantization: dict | None = None  # BitsAndBytesConfig arguments (QLoRA), e.g. load_in_4bit: true
    loraplus_lr_ratio: float | None = None  # LoRA+: the B matrices learn at lr * this ratio
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    num_processes: int = 1  # > 1: the stage runs itself under `accelerate launch` (DDP; gloo on CPU)
    accelerate_config: str | None = None  # an accelerate config file (FSDP, DeepSpeed ZeRO, multi-node)
    dpo: Dpo = field(default_factory=Dpo)  # used by task `preference` only
    # PEFT config kwargs per method name, e.g. {"lora": {"r": 16, ...}}; filled from the
    # sections named after PEFT methods.
    methods: dict = field(default_factory=dict)

    @property
    def peft_kwargs(self) -> dict:
        return dict(self.methods.get(self.method, {}))


@dataclass(frozen=True)
class Evaluate:
    batch_size: int = 32
    max_new_tokens: int = 64
    samples: int = 8
    shots: int = 0  # classification: also score the base model with this many solved training examples in the prompt


@dataclass(frozen=True)
class Export:
    atol: float = 1e-3
    check_rows: int = 8


@dataclass(frozen=True)
class Gguf:
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16"
    tokenizer_pre: str | None = None  # llama.cpp's pre-tokenizer name; null: the base's source GGUF's
    check_rows: int = 4  # validation rows whose logits must match after transformers reads the file back
    llama_cpp_rows: int = 0  # validation rows answered by llama.cpp and PyTorch and compared (needs .[gguf])
    min_agreement: float = 0.9
    max_new_tokens: int = 16


@dataclass(frozen=True)
class Params:
    seed: int
    deterministic: bool
    task: Literal["classification", "instruction", "preference"]
    base: Base
    data: Data
    validate: Validate
    format: Format
    tokenize: Tokenize
    train: Train
    evaluate: Evaluate
    export: Export
    labels: list = field(default_factory=list)
    gguf: Gguf = field(default_factory=Gguf)


def peft_methods() -> dict[str, type]:
    """PEFT method name (lower case, as used in params) -> its config class."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(k.value).lower(): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def _hint(key: str, valid: typing.Iterable[str]) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    guess = f" Did you mean '{close[0]}'?" if close else ""
    return f"{guess} Valid keys: {', '.join(valid)}."


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except ParamsError as e:
                errors.append(str(e))
        raise ParamsError(errors[0] if errors else f"params.yaml: '{where}' has a bad value")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ParamsError(
                f"params.yaml: '{where}' is {value!r}; valid choices: {', '.join(map(str, choices))}."
            )
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"params.yaml: '{where}' must be true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"params.yaml: '{where}' must be an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):  # '1e-4' is a string to YAML 1.1
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"params.yaml: '{where}' must be a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"params.yaml: '{where}' must be a string, got {value!r}.")
        return value
    if tp in (list, dict) or origin in (list, dict):
        base_tp = origin or tp
        if not isinstance(value, base_tp):
            raise ParamsError(f"params.yaml: '{where}' must be a {base_tp.__name__}, got {value!r}.")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: '{where}' must be a mapping, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "methods"]
    raw = dict(raw)
    kwargs: dict[str, Any] = {}
    if cls is Train:
        known_methods = peft_methods()
        kwargs["methods"] = {}
        for key in [k for k in raw if k not in names]:
            if OWN_METHODS.get(key):
                section = _build(OWN_METHODS[key], raw.pop(key) or {}, f"{where}.{key}")
                kwargs["methods"][key] = dataclasses.asdict(section)
            elif key in known_methods:
                kwargs["methods"][key] = _check_method_section(
                    key, known_methods[key], raw.pop(key), f"{where}.{key}"
                )
        if raw.get("method", "lora") not in known_methods and raw.get("method") not in OWN_METHODS:
            raise ParamsError(
                f"params.yaml: '{where}.method' is {raw.get('method')!r}; valid choices: "
                f"{', '.join(sorted([*known_methods, *OWN_METHODS]))}."
            )
        if raw.get("method") in OWN_METHODS and raw.get("quantization"):
            raise ParamsError(f"params.yaml: '{where}.method' is {raw['method']!r}, which trains the base model's "
                              f"own weights: '{where}.quantization' must be null (a quantized base trains through "
                              "an adapter)")
        if OWN_METHODS.get(raw.get("method")) and raw["method"] not in kwargs["methods"]:
            kwargs["methods"][raw["method"]] = dataclasses.asdict(OWN_METHODS[raw["method"]]())
    if cls is Train and raw.get("quantization"):
        _check_quantization(raw["quantization"], f"{where}.quantization")
    for key in raw:
        if key not in names:
            prefix = f"{where}." if where else ""
            raise ParamsError(f"params.yaml: unknown key '{prefix}{key}'." + _hint(key, names))
    for f in dataclasses.fields(cls):
        if f.name == "methods":
            continue
        key = f"{where}.{f.name}" if where else f.name
        if f.name in raw:
            kwargs[f.name] = _check_type(raw[f.name], hints[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(f"params.yaml: missing required key '{key}'.")
    return cls(**kwargs)


def _check_method_section(name: str, config_cls: type, section: Any, where: str) -> dict:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ParamsError(f"params.yaml: '{where}' must be a mapping of {config_cls.__name__} arguments.")
    valid = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for key in section:
        if key not in valid:
            raise ParamsError(
                f"params.yaml: unknown key '{where}.{key}' ({config_cls.__name__} has no such argument)."
                + _hint(key, valid)
            )
    return dict(section)


def _check_quantization(section: Any, where: str) -> None:
    import inspect

    from transformers import BitsAndBytesConfig

    if not isinstance(section, dict):
        raise ParamsError(f"params.yaml: '{where}' must be a mapping of BitsAndBytesConfig arguments.")
    valid = {k for k in inspect.signature(BitsAndBytesConfig.__init__).parameters if k not in ("self", "kwargs")}
    for key in section:
        if key not in valid:
            raise ParamsError(f"params.yaml: unknown key '{where}.{key}' (BitsAndBytesConfig has no such argument)."
                              + _hint(key, valid))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and check the whole params file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found.") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    return parse_params(raw)


def parse_params(raw: dict) -> Params:
    """Check a params mapping (as read from params.yaml)."""
    params = _build(Params, raw, "")
    if params.task == "preference" and params.train.method in OWN_METHODS:
        raise ParamsError(f"params.yaml: task 'preference' trains with DPO against the base model (the adapter "
                          f"disabled): 'train.method' must be a PEFT method, not {params.train.method!r}.")
    if params.task == "classification" and len(params.labels) < 2:
        raise ParamsError("params.yaml: 'labels' must list at least two labels for task classification.")
    return params


def params_dict(p: Params) -> dict:
    """All params as a plain dict in params.yaml's shape."""
    d = dataclasses.asdict(p)
    d["train"] = section_dict(p.train)
    return d


def section_dict(obj: Any) -> dict:
    """A params section as a plain dict, in params.yaml's own shape (for records and metrics)."""
    d = dataclasses.asdict(obj)
    d.update(d.pop("methods", {}))
    return d
