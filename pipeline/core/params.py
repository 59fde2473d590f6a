"""Load `params.yaml` into typed, frozen sections (pydantic v2 models).

Job: the one source of configuration. `params.yaml` holds every value, defaults included: the
models below hold types and choices only, no default of their own, so a key missing from the file
is an error, as is an unknown or mistyped key (`extra="forbid"`), a wrong type or a bad choice.
Each is one `ParamsError` line naming the key, with a "did you mean" hint for unknown keys.
PEFT method sections (`train.lora`, `train.ia3`, ...) use the PEFT config class's own argument
names and are checked against that class's fields; `train.quantization` against
BitsAndBytesConfig's arguments.

Input: a params.yaml path. Output: a `Params` object.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from pipeline.core.stage import PipelineError


class ParamsError(PipelineError, ValueError):
    """A params.yaml problem; the message names the key."""


def _number(v: Any) -> Any:
    """'1e-4' is a string to YAML 1.1: read it as the number it is."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


Number = Annotated[float, BeforeValidator(_number)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Base(Section):
    model: str  # pkg://<python package> | local directory | hub id
    gguf_file: str | None
    revision: str | None
    dtype: Literal["float32", "bfloat16", "float16"]
    trust_remote_code: bool
    allow_pickle: bool  # let the base stage read a pickle (.bin) checkpoint; it always writes safetensors


class Data(Section):
    train: str
    validation: str


class Validate(Section):
    text_field: str
    label_field: str
    min_chars: int
    max_chars: int
    max_reject_ratio: Number


class Format(Section):
    template: str
    chat_template: bool
    system_prompt: str | None


class Tokenize(Section):
    max_length: int
    truncation: Literal["response", "prompt", "drop"]
    loss_on: Literal["all", "last"]  # task chat: every assistant turn, or the last one only


class Dpo(Section):
    """Preference tuning (task `preference`): DPO steps after the SFT steps, on the same adapter; the
    reference model is the base (adapter disabled), so no second copy of the weights is loaded."""

    beta: Number
    steps: int
    lr: Number
    batch_size: int
    nll_weight: Number  # + this x the chosen answers' per-token NLL (keeps their likelihood up; 0: plain DPO)


class ActivationCheckpointing(Section):
    """transformers' `activation_checkpointing_enable` arguments: recompute each decoder layer's activations
    in the backward pass instead of keeping them (every `every_n_layers`-th layer; `offload`: keep the
    layer inputs in host memory, for GPUs)."""

    every_n_layers: int = 1
    offload: bool = False


class Train(Section):
    method: str
    epochs: Number
    max_steps: int | None
    batch_size: int
    grad_accum: int
    lr: Number
    weight_decay: Number
    warmup_ratio: Number
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"]
    precision: Literal["fp32", "bf16", "fp16"]
    grad_clip: Number | None
    group_by_length: bool
    shared_prefix: bool  # a batch's common token prefix runs once (pipeline/core/batching.py)
    packing: bool  # rows packed into few sequences, attention confined to each row
    activation_checkpointing: ActivationCheckpointing | None  # null: keep activations (fastest)
    max_batch_tokens: int | None  # a micro-batch above this many padded tokens runs in several passes (memory)
    allocator: Literal["mimalloc", "system"]  # the train program's malloc (core/training.py: preload_allocator)
    lean: bool  # frozen weights in the autocast dtype, 1-byte dropout masks, attention core and MLP gate recomputed
    # auto: eager attention on CPU (measured faster than sdpa for training at these lengths); on GPU varlen
    # (torch's flash varlen kernel, pipeline/core/varlen.py) when packing, else sdpa
    attn_implementation: Literal["auto", "eager", "sdpa", "varlen", "flash_attention_2"]
    checkpoint_every: int
    log_every: int
    quantization: dict | None  # BitsAndBytesConfig arguments (QLoRA), e.g. load_in_4bit: true
    loraplus_lr_ratio: Number | None  # LoRA+: the B matrices learn at lr * this ratio
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]
    num_processes: int  # > 1: the stage runs itself under `accelerate launch` (DDP; gloo on CPU)
    accelerate_config: str | None  # an accelerate config file (FSDP, DeepSpeed ZeRO, multi-node)
    dpo: Dpo  # used by task `preference` only
    # method name -> its section's arguments ({"lora": {"r": 16, ...}}): filled from the sections named
    # after methods (train.lora, train.ia3, train.bitfit, ...), not a key of params.yaml itself
    methods: dict = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _method_sections(cls, raw: Any) -> Any:
        from pipeline import methods  # the registry: PEFT's methods by name, and this project's own

        if not isinstance(raw, dict):
            return raw
        raw, sections = dict(raw), {}
        known = peft_methods()
        for key in [k for k in raw if k not in cls.model_fields]:
            own = methods.METHODS.get(key)
            if own is not None and own.section is not None:
                sections[key] = _section(own.section, raw.pop(key), f"train.{key}").model_dump()
            elif key in known:
                sections[key] = _check_method_section(known[key], raw.pop(key), f"train.{key}")
        method = methods.get(raw.get("method"))  # an unknown name is an error listing the valid ones
        if not method.peft and raw.get("quantization"):
            raise ParamsError(f"params.yaml: 'train.method' is {method.name!r}, which trains the base model's own "
                              "weights: 'train.quantization' must be null (a quantized base trains through an adapter)")
        if method.section is not None and method.name not in sections:
            raise ParamsError(f"params.yaml: 'train.method' is {method.name!r}: add its section 'train.{method.name}'.")
        if raw.get("quantization"):
            _check_quantization(raw["quantization"], "train.quantization")
        return {**raw, "methods": sections}

    @property
    def peft_kwargs(self) -> dict:
        return dict(self.methods.get(self.method, {}))


class Evaluate(Section):
    batch_size: int
    max_new_tokens: int
    samples: int
    shots: int  # classification: also score the base model with this many solved training examples in the prompt


class Export(Section):
    atol: Number
    check_rows: int


class Gguf(Section):
    outtype: Literal["f32", "f16", "bf16", "q8_0"]
    tokenizer_pre: str | None  # llama.cpp's pre-tokenizer name; null: the base's source GGUF's
    check_rows: int  # validation rows whose logits must match after transformers reads the file back
    llama_cpp_rows: int  # validation rows answered by llama.cpp and PyTorch and compared (needs .[gguf])
    min_agreement: Number
    max_new_tokens: int


class Params(Section):
    seed: int
    deterministic: bool
    task: str  # a task registered in pipeline/tasks/__init__.py
    labels: list[str]
    base: Base
    data: Data
    validate_: Validate = Field(alias="validate")  # `validate` is a pydantic method name
    format: Format
    tokenize: Tokenize
    train: Train
    evaluate: Evaluate
    export: Export
    gguf: Gguf

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    @property
    def validate(self) -> Validate:  # type: ignore[override]
        return self.validate_


def peft_methods() -> dict[str, type]:
    """PEFT method name (lower case, as used in params) -> its config class."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(k.value).lower(): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def _hint(key: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    guess = f" Did you mean '{close[0]}'?" if close else ""
    return f"{guess} Valid keys: {', '.join(valid)}."


def _keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items() if name != "methods"]


def _field(model: type[BaseModel], key: str) -> tuple[type[BaseModel] | None, Any]:
    """The model a nested key leads to and the annotation of `key` in `model`."""
    for name, f in model.model_fields.items():
        if key in (name, f.alias):
            ann = f.annotation
            nested = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)),
                          None)
            return nested, ann
    return None, None


def _choices(ann: Any) -> list[str]:
    for a in (ann, *typing.get_args(ann)):
        if typing.get_origin(a) is Literal:
            return [str(c) for c in typing.get_args(a)]
    return []


KINDS = {"bool": "true or false", "int": "an integer", "float": "a number", "string": "a string",
         "dict": "a mapping", "model": "a mapping", "list": "a list"}


def _message(model: type[BaseModel], err: dict, prefix: str = "") -> str:
    """One pydantic error as this project's one line naming the key."""
    if err["type"] == "value_error" and isinstance(err.get("ctx", {}).get("error"), ParamsError):
        return str(err["ctx"]["error"])
    loc = [str(x) for x in err["loc"] if not isinstance(x, int)]
    owner, ann = model, None
    for k in loc[:-1]:
        owner = _field(owner, k)[0] or owner
    if loc:
        ann = _field(owner, loc[-1])[1]
    where = prefix + ".".join(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"params.yaml: unknown key '{where}'." + _hint(loc[-1], _keys(owner))
    if kind == "missing":
        return f"params.yaml: missing required key '{where}'."
    if kind == "literal_error":
        return f"params.yaml: '{where}' is {err['input']!r}; valid choices: {', '.join(_choices(ann))}."
    base = kind.split("_")[0]
    if base in KINDS and kind.endswith(("_type", "_parsing", "_from_float")):
        return f"params.yaml: '{where}' must be {KINDS[base]}, got {err['input']!r}."
    return f"params.yaml: '{where}': {err['msg']}."


def _first(e: ValidationError) -> dict:
    """The error to report: an unknown key before anything else (a typo is also a missing key)."""
    return sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")[0]


def _section(model: type[Section], raw: Any, where: str) -> Section:
    try:
        return model.model_validate(raw if raw is not None else {})
    except ValidationError as e:
        raise ParamsError(_message(model, _first(e), f"{where}.")) from None


def _check_method_section(config_cls: type, section: Any, where: str) -> dict:
    import dataclasses

    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ParamsError(f"params.yaml: '{where}' must be a mapping of {config_cls.__name__} arguments.")
    valid = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for key in section:
        if key not in valid:
            raise ParamsError(f"params.yaml: unknown key '{where}.{key}' ({config_cls.__name__} has no such "
                              "argument)." + _hint(key, valid))
    return dict(section)


def _check_quantization(section: Any, where: str) -> None:
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


def peek(path: str | Path, key: str) -> Any:
    """One value of a params file by its dotted key ("train.allocator"), read without checking the file:
    None when the file, the key or valid YAML is missing. For what a program decides before the imports
    that checking costs (load_params imports PEFT); load_params still checks everything after."""
    try:
        node = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def parse_params(raw: dict) -> Params:
    """Check a params mapping (as read from params.yaml)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: must be a mapping, got {raw!r}.")
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_message(Params, _first(e))) from None
    from pipeline.tasks import get as get_task  # the registered tasks (as PEFT registers its methods)

    problem = get_task(params.task).check_params(params)
    if problem:
        raise ParamsError(problem)
    return params


def section_dict(obj: BaseModel) -> dict:
    """A params section as a plain dict, in params.yaml's own shape (for records and metrics)."""
    d = obj.model_dump(by_alias=True)
    d.update(d.pop("methods", {}))
    return d


def params_dict(p: Params) -> dict:
    """All params as a plain dict in params.yaml's shape."""
    d = p.model_dump(by_alias=True)
    d["train"] = section_dict(p.train)
    return d
