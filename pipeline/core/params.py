"""Load `params.yaml` into typed, frozen sections (pydantic v2 models), and give each stage its view.

Job: the one source of configuration. `params.yaml` holds every value, defaults included: the
models below hold types and choices only, no default of their own, so a key missing from the file
is an error, as is an unknown or mistyped key (`extra="forbid"`), a wrong type or a bad choice.
Each is one `ParamsError` line naming the key, with a "did you mean" hint for unknown keys.
The method sections (`train.lora`, `train.ia3`, `train.bitfit`, ...) are mappings here; the method
registry (pipeline/methods) checks them against the method's own arguments.

A stage reads its params through `view(params, stage, keys)`: the keys it declares (its own, its
task's, its method's; the same lists `dvc.yaml` gives DVC). Reading any other key raises
`UndeclaredParam` naming the stage and the key, so a stage's output can depend on no key that DVC
does not watch for it. `View.dump()` is what the stage read, in params.yaml's shape (its records).

Input: a params.yaml path. Output: a `Params` object, and per stage a `View` of it.
"""

from __future__ import annotations

import difflib
import inspect
import re
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from pipeline.core.stage import PipelineError


class ParamsError(PipelineError, ValueError):
    """A params.yaml problem; the message names the key."""


class UndeclaredParam(PipelineError, KeyError):
    """A stage read a params key it does not declare (so DVC would not rerun it when the key changes)."""

    def __str__(self) -> str:
        return str(self.args[0])


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
    license: str | None  # the data's license, carried into every record and the model card


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

    every_n_layers: int
    offload: bool


class Train(Section):
    # the sections named after methods (train.lora, train.ia3, train.bitfit, ...) are extra keys,
    # mappings checked by the method registry against the method's own arguments
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

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
    allocator: Literal["mimalloc", "system"]  # the train program's malloc (core/allocator.py: preload_allocator)
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

    @model_validator(mode="after")
    def _sections_are_mappings(self) -> Train:
        for key, value in (self.model_extra or {}).items():
            if not isinstance(value, dict):  # a scalar is no method section: a mistyped key
                raise ParamsError(f"params.yaml: unknown key 'train.{key}'." + _hint(key, _keys(Train)))
        if self.quantization:
            check_arguments(_bnb_config(), self.quantization, "train.quantization")
        return self


class Evaluate(Section):
    batch_size: int
    max_new_tokens: int
    samples: int
    shots: int  # classification: also score the base model with this many solved training examples in the prompt


class Export(Section):
    atol: Number
    check_rows: int


class Gguf(Section):
    outtype: Literal["f32", "f16", "bf16", "q8_0"]  # convert_hf_to_gguf.py's --outtype
    quantize: list[Literal["q8_0", "q6_K", "q5_K_M", "q4_K_M", "q4_0"]]  # llama-quantize types written beside it
    adapter: bool  # also the base and a GGUF LoRA adapter (where llama.cpp can apply the method)
    tokenizer_pre: str | None  # llama.cpp's pre-tokenizer name; null: the base's source GGUF's
    rows: int  # validation rows each file answers in llama.cpp (0: all)
    min_agreement: Number
    max_new_tokens: int


class Serve(Section):
    """What serving (`peftflow predict`) uses unless told otherwise; no stage reads it."""

    max_new_tokens: int  # the limit of a free-text answer
    batch_size: int  # rows scored or generated at a time


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
    serve: Serve

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    @property
    def validate(self) -> Validate:  # type: ignore[override]
        return self.validate_


# ---- the view a stage reads through ------------------------------------------------------------------

def _child(node: BaseModel, name: str) -> Any:
    """The value of key `name` of a params model (a field by its params.yaml name, or a method section)."""
    for field, info in type(node).model_fields.items():
        if name in (field, info.alias):
            return getattr(node, field)
    extra = node.model_extra or {}
    if name in extra:
        return extra[name]
    raise AttributeError(name)


class View:
    """The params a stage may read: attribute access like `Params`, limited to `allowed` dotted keys (a key
    gives its whole subtree). A section partly allowed is a View itself; anything else is an error."""

    __slots__ = ("_node", "_key", "_allowed", "_stage")

    def __init__(self, node: BaseModel, key: str, allowed: frozenset[str], stage: str) -> None:
        self._node, self._key, self._allowed, self._stage = node, key, allowed, stage

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        key = f"{self._key}.{name}" if self._key else name
        try:
            value = _child(self._node, name)
        except AttributeError:
            raise AttributeError(f"params has no key '{key}'") from None
        if any(key == a or key.startswith(a + ".") for a in self._allowed):
            return value
        if isinstance(value, BaseModel) and any(a.startswith(key + ".") for a in self._allowed):
            return View(value, key, self._allowed, self._stage)
        raise UndeclaredParam(f"stage {self._stage} read params key '{key}', which it does not declare (so `dvc "
                              f"repro` would not rerun it when the key changes): add '{key}' to the stage's, its "
                              "task's or its method's READS, then `peftflow contract --write`")

    @property
    def stage(self) -> str:
        return self._stage

    def dump(self) -> dict:
        """The keys this view may read, with their values, in params.yaml's shape."""
        return _keep(dump(self._node), self._key, self._allowed)


def _keep(d: dict, prefix: str, allowed: frozenset[str]) -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if any(key == a or key.startswith(a + ".") for a in allowed):
            out[k] = v
        elif isinstance(v, dict) and any(a.startswith(key + ".") for a in allowed):
            out[k] = _keep(v, key, allowed)
    return out


def lookup(tree: Any, dotted: str) -> Any:
    """The value at a dotted key of a params mapping or model (None where there is none)."""
    for part in dotted.split("."):
        if isinstance(tree, BaseModel):
            try:
                tree = _child(tree, part)
            except AttributeError:
                return None
        else:
            tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def interpolate(key: str, params: Params | dict) -> str:
    """A declared key with its `${a.b}` parts replaced by those params values, as DVC fills dvc.yaml."""
    return re.sub(r"\$\{\s*([\w.]+)\s*\}", lambda m: str(lookup(params, m.group(1))), key)


def view(params: Params | View, stage: str, keys: Iterable[str]) -> View:
    """`params` as `stage` may read it: only `keys` (DVC's params syntax: a section or a dotted key, `${...}`
    filled from the params themselves). A View of the same stage is returned as it is."""
    if isinstance(params, View):
        if params.stage != stage:
            raise TypeError(f"a view of stage {params.stage} handed to stage {stage}")
        return params
    return View(params, "", frozenset(interpolate(k, params) for k in keys), stage)


def dump(obj: BaseModel | View) -> dict:
    """A params model or view as a plain dict in params.yaml's shape (for records and metrics)."""
    return obj.dump() if isinstance(obj, View) else obj.model_dump(by_alias=True)


# ---- errors as one line naming the key ----------------------------------------------------------------

def _hint(key: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    guess = f" Did you mean '{close[0]}'?" if close else ""
    return f"{guess} Valid keys: {', '.join(valid)}."


def _keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


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


def section(model: type[Section], raw: Any, where: str) -> Section:
    """A params section checked against its model (`where`: its dotted key, for the error line)."""
    try:
        return model.model_validate(raw if raw is not None else {})
    except ValidationError as e:
        raise ParamsError(_message(model, _first(e), f"{where}.")) from None


def check_arguments(target: Any, section: Any, where: str) -> dict:
    """A params mapping of a library class's own arguments (a PEFT config dataclass, BitsAndBytesConfig):
    every key must be one of them; returns it as a dict."""
    name = getattr(target, "__name__", str(target))
    if not isinstance(section, dict):
        raise ParamsError(f"params.yaml: '{where}' must be a mapping of {name} arguments.")
    valid = {k for k, a in inspect.signature(target).parameters.items()
             if a.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
    for key in section:
        if key not in valid:
            raise ParamsError(f"params.yaml: unknown key '{where}.{key}' ({name} has no such argument)."
                              + _hint(key, valid))
    return dict(section)


def _bnb_config() -> type:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig


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
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: must be a mapping, got {raw!r}.")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_message(Params, _first(e))) from None
