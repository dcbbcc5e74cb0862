"""`TrainConfig`: every setting of a training run, read from a YAML recipe plus `--key value` overrides."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmstack.config import ModelConfig
from lmstack.errors import LMStackError, UsageError

TASKS = ("pretrain", "sft", "classify", "reward", "dpo", "ipo", "kto", "orpo", "simpo", "grpo")


@dataclass
class TrainConfig:
    """A training run of any task. Steps count optimizer updates; a step sees `batch_size * grad_accum *
    world_size` sequences (of `block_size` tokens when pretraining; at most that when finetuning)."""

    task: str = "pretrain"  # pretrain, sft, classify, reward, dpo, ipo, kto, orpo, simpo, grpo
    data: str = ""  # pretraining: a shard directory from `lmstack data prepare`; other tasks: a JSONL file
    val_data: str = ""  # finetuning: a JSONL validation file (default: hold out val_fraction of data)
    val_fraction: float = 0.05
    out_dir: str = "runs/run"
    model: str = "tiny-llama"  # a preset name, or a checkpoint (always, when finetuning) to start from
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields changed from the preset
    init_from: str = "scratch"  # "scratch" or "checkpoint" (load `model` as a checkpoint directory)
    seed: int = 1337
    # batch
    batch_size: int = 8  # sequences per micro-batch per process
    block_size: int = 256
    grad_accum: int = 1
    # optimizer and schedule
    max_steps: int = 1000
    learning_rate: float = 6e-4
    min_lr: float | None = None  # where the cosine decay ends (default: learning_rate / 10, as in nanoGPT)
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # cosine decay ends here (default: max_steps)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    # precision and speed
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32), fp32, bf16, fp16
    compile: bool = False
    activation_checkpointing: bool = False
    distributed: str = "ddp"  # under torchrun: ddp, or fsdp (FSDP2 fully_shard)
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 500
    keep_checkpoints: int = 2
    tensorboard: bool = False
    sample_prompts: list[str] = field(default_factory=lambda: ["\n"])
    sample_tokens: int = 0  # tokens to sample per prompt at each evaluation (0: none)
    sample_temperature: float = 0.8
    sample_top_k: int | None = 200
    progress: bool = True
    # finetuning
    packing: bool = False  # sft: pack examples into rows of block_size (no attention across them)
    labels: list[str] = field(default_factory=list)  # classify: the label set (default: sorted from the data)
    lora_r: int = 0  # > 0: train LoRA adapters of this rank instead of the whole model
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q", "v"])  # q, k, v, o, gate, up, down
    lora_rslora: bool = False  # rank-stabilised LoRA: scale by alpha / sqrt(r), not alpha / r (PEFT's use_rslora)
    lora_dora: bool = False  # DoRA: a trained magnitude per output row of each adapted layer (PEFT's use_dora)
    qlora: bool = False  # with lora_r: quantize the frozen base to 4-bit NF4
    # preference alignment and GRPO
    beta: float = 0.1  # DPO/IPO/KTO temperature, SimPO beta, ORPO lambda, GRPO KL coefficient
    label_smoothing: float = 0.0  # dpo: conservative DPO
    rpo_alpha: float = 0.0  # dpo: plus this times the chosen answers' per-token NLL (RPO)
    simpo_gamma: float = 0.5
    kto_desirable_weight: float = 1.0  # kto: weights of desirable / undesirable examples (for unbalanced data,
    kto_undesirable_weight: float = 1.0  # the paper keeps w_d * n_d / (w_u * n_u) in [1, 4/3])
    reference: str = ""  # the frozen reference checkpoint (default: `model`; under LoRA the adapter-free base)
    reward_function: str = ""  # grpo: 'file.py:function' or 'module:function', fn(prompt, completion, record)
    group_size: int = 8  # grpo: completions sampled per prompt
    max_new_tokens: int = 64  # grpo: completion length
    temperature: float = 1.0  # grpo: sampling temperature

    # Fields that may change when a run resumes; any other difference is refused.
    RESUMABLE_CHANGES = ("max_steps", "lr_decay_steps", "eval_interval", "eval_batches", "log_interval",
                         "checkpoint_interval", "keep_checkpoints", "tensorboard", "sample_prompts", "sample_tokens",
                         "sample_temperature", "sample_top_k", "progress", "compile", "device", "out_dir")

    def __post_init__(self) -> None:
        if self.min_lr is None:
            self.min_lr = max(self.learning_rate, 0) / 10  # a bad learning_rate is named below
        if self.task not in TASKS:
            raise LMStackError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise LMStackError(f"precision {self.precision!r} is not one of auto, fp32, bf16, fp16")
        if self.task == "grpo" and self.group_size < 2:
            raise LMStackError(f"group_size must be >= 2 for GRPO (advantages compare a group's completions), "
                               f"got {self.group_size}")
        if self.distributed not in ("ddp", "fsdp"):
            raise LMStackError(f"distributed {self.distributed!r} is not ddp or fsdp")
        if self.init_from not in ("scratch", "checkpoint"):
            raise LMStackError(f"init_from {self.init_from!r} is not scratch or checkpoint")
        ModelConfig.check_settings(self.model_overrides, where="model_overrides")
        self.model_overrides = _coerce_model_overrides(self.model_overrides)
        for name in ("batch_size", "block_size", "grad_accum", "max_steps", "eval_interval", "log_interval",
                     "checkpoint_interval", "eval_batches"):
            if getattr(self, name) < 1:
                raise LMStackError(f"{name} must be >= 1, got {getattr(self, name)}")
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Numbers out of range: each would crash mid-run with a traceback or train wrongly without a word."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise LMStackError(f"{f.name} must be a finite number, got {value}")
        at_least_zero = ("seed", "warmup_steps", "keep_checkpoints", "sample_tokens", "lora_r", "min_lr",
                         "weight_decay", "grad_clip", "sample_temperature", "label_smoothing", "rpo_alpha",
                         "temperature", "beta", "kto_desirable_weight", "kto_undesirable_weight")
        for name in at_least_zero:
            if getattr(self, name) < 0:
                raise LMStackError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_decay_steps is not None and self.lr_decay_steps < 1:
            raise LMStackError(f"lr_decay_steps must be >= 1 (or none: max_steps), got {self.lr_decay_steps}")
        if self.sample_top_k is not None and self.sample_top_k < 0:
            raise LMStackError(f"sample_top_k must be >= 0 (0 or none: no limit), got {self.sample_top_k}")
        if self.learning_rate <= 0:
            raise LMStackError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.min_lr > self.learning_rate:  # the "decay" would raise the rate past its peak
            raise LMStackError(f"min_lr {self.min_lr:g} is above learning_rate {self.learning_rate:g}: the cosine "
                               "decays from learning_rate to min_lr")
        if self.lr_decay_steps is not None and self.lr_decay_steps <= self.warmup_steps:
            raise LMStackError(f"lr_decay_steps {self.lr_decay_steps} must be after warmup_steps "
                               f"{self.warmup_steps}: the decay begins where the warmup ends")
        for name in ("beta1", "beta2", "val_fraction", "lora_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise LMStackError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.label_smoothing >= 0.5:
            raise LMStackError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.task in ("dpo", "ipo", "kto", "simpo") and self.beta <= 0:
            raise LMStackError(f"beta must be > 0 for {self.task} (it is the loss's temperature), got {self.beta}")
        if self.lora_r and self.lora_alpha <= 0:
            raise LMStackError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if self.task == "grpo" and self.max_new_tokens < 1:
            raise LMStackError(f"max_new_tokens must be >= 1 for GRPO, got {self.max_new_tokens}")
        if self.task == "grpo" and self.temperature <= 0:  # greedy completions of a prompt are all the same
            raise LMStackError(f"temperature must be > 0 for GRPO (a group's completions must differ), "
                               f"got {self.temperature}")
        if not self.lora_r:  # settings that only mean something for LoRA adapters
            given = [name for name, unset in (("qlora", False), ("lora_rslora", False), ("lora_dora", False),
                                              ("lora_dropout", 0.0)) if getattr(self, name) != unset]
            if given:
                raise LMStackError(f"{', '.join(given)} set without lora_r: they shape LoRA adapters, and "
                                   "lora_r 0 trains the whole model (give lora_r > 0)")
        elif self.task == "pretrain" and self.init_from == "scratch":
            raise LMStackError("lora_r on a model built from scratch would train adapters on a frozen random "
                               "base; LoRA adapts a checkpoint (init_from: checkpoint)")
        if self.task == "kto" and self.batch_size < 2:  # the KL reference pairs each prompt with another's answer
            raise LMStackError(f"batch_size must be >= 2 for KTO (its KL reference point uses the other records "
                               f"of the micro-batch), got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def saved_dict(self) -> dict[str, Any]:
        """`to_dict` with the files it names made absolute: a run's config.json resumes from any directory."""
        return with_resolved_paths(self.to_dict())

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The model's config: the preset with `model_overrides` (the data's vocabulary by default)."""
        changes = dict(self.model_overrides)
        if vocab_size is not None:
            changes.setdefault("vocab_size", vocab_size)
        changes.setdefault("block_size", self.block_size)
        return ModelConfig.from_name(self.model, **changes)


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _coerce_model_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Numbers and flags of `model_overrides` to their ModelConfig types: YAML reads `1e-06` (no dot, as
    Python writes small floats to config.json) as a string."""
    hints = typing.get_type_hints(ModelConfig)
    out = {}
    for key, value in overrides.items():
        kinds = [k for k in typing.get_args(hints[key]) or (hints[key],) if k is not type(None)]
        if value is not None and len(kinds) == 1 and kinds[0] in (int, float, bool):
            value = _coerce(f"model_overrides.{key}", value, hints[key])
        out[key] = value
    return out


FREE_TEXT_LISTS = ("sample_prompts",)  # list settings whose items are free text, not comma lists


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """Check (YAML) or convert (command-line string) `value` to the field's type."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (list, dict):  # given as YAML on the command line
        if isinstance(value, str):
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = value
            if origin is list and not isinstance(parsed, list):
                # A prompt is free text (`ROMEO:`, `Hello, world` are one prompt each); `--labels neg,pos`, as
                # `lmstack eval classify` takes them, as well as `--labels "[neg, pos]"`.
                parsed = [value] if name in FREE_TEXT_LISTS else [v.strip() for v in value.split(",")]
            value = parsed
        if value is None:  # a key left empty in YAML
            value = origin()
        if not isinstance(value, origin):
            raise LMStackError(f"{name}: expected a {'list' if origin is list else 'mapping'}, got {value!r}")
        if origin is list and args:  # each item to the item type: `labels: [0, 1]` gives the labels "0" and "1"
            return [_coerce(f"{name}[{i}]", item, args[0]) for i, item in enumerate(value)]
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise LMStackError(f"{name}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise LMStackError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise LMStackError(f"{name}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):  # YAML's `yes` / `false`: float() would take them as 1.0 / 0.0
            raise LMStackError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise LMStackError(f"{name}: expected a number, got {value!r}") from None
    if kind is str:
        if value is None or isinstance(value, (list, dict)):  # str() would give "None" or a Python repr
            raise LMStackError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return value


def build_config(values: dict[str, Any], where: str = "config") -> TrainConfig:
    """A `TrainConfig` from a mapping; unknown keys are named, with the valid ones listed."""
    _check_keys(values, where)
    fields = _field_types()
    return TrainConfig(**{k: _coerce(k, v, fields[k]) for k, v in values.items()})


def _check_keys(values: dict[str, Any], where: str) -> None:
    fields = _field_types()
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise LMStackError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(fields))}")


MODEL_FIELDS = "model."  # parse_overrides' key for --model.KEY fields (no TrainConfig field has a dot)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["--max_steps", "100", "--model.n_layer", "4"]` -> {"max_steps": "100", MODEL_FIELDS: {"n_layer": 4}}.

    `--model.KEY value` fields go under MODEL_FIELDS, for `load_config` to add to the recipe's model_overrides;
    a whole `--model_overrides MAPPING` is the "model_overrides" value, which replaces the recipe's (`{}` clears
    it)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(pairs):
        key = pairs[i]
        if not key.startswith("--"):
            raise UsageError(f"expected --key value, got {key!r}")
        key = key[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(pairs):
                raise UsageError(f"--{key} needs a value")
            value = pairs[i + 1]
            i += 2
        key = key.replace("-", "_")
        if key.startswith("model."):
            field_name = key.split(".", 1)[1]
            out.setdefault(MODEL_FIELDS, {})[field_name] = yaml.safe_load(value)
        elif key == "model_overrides":
            out["model_overrides"] = _coerce(key, value, dict[str, Any]) or {}
        else:
            out[key] = value
    return out


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML recipe and apply command-line overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise LMStackError(f"{p}: no such recipe")
        try:
            values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise LMStackError(f"{p}: not UTF-8 text (byte {e.start}), so not a YAML recipe") from None
        except yaml.YAMLError as e:  # its message spans lines (a caret diagram): keep the problem and place
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise LMStackError(f"{p}: not valid YAML ({where}{getattr(e, 'problem', None) or e})") from None
        if not isinstance(values, dict):
            raise LMStackError(f"{p}: a recipe is a mapping of keys to values")
    extra = parse_overrides(overrides or [])
    fields = extra.pop(MODEL_FIELDS, None)
    _check_keys(extra, where="command line")
    if fields is not None:
        base = extra["model_overrides"] if "model_overrides" in extra else values.get("model_overrides") or {}
        extra["model_overrides"] = {**base, **fields}
    return build_config({**values, **extra}, where=str(path or "command line"))


PATH_FIELDS = ("data", "val_data", "model", "reward_function")


def with_resolved_paths(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with each of PATH_FIELDS that names an existing file or directory (relative to the working
    directory) made absolute; a reward function's `file.py:function` has its file made absolute."""
    out = dict(values)
    for key in PATH_FIELDS:
        value = out.get(key)
        if not isinstance(value, str) or not value:
            continue
        path, sep, rest = value.rpartition(":") if key == "reward_function" else (value, "", "")
        if key == "reward_function" and not path.endswith(".py"):
            continue  # a module:function is found on the Python path, not in the working directory
        if Path(path).exists():
            out[key] = str(Path(path).resolve()) + sep + rest
    return out


def config_differences(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """Fields that differ between a saved run's config and `current`, other than the ones that may; files
    are compared by where they are, however they were named."""
    saved, now = with_resolved_paths(saved), current.saved_dict()
    # A field added after the run started is not in its saved config: it ran with the field's default.
    defaults = TrainConfig(data="-").to_dict()
    return [f"{k}: run has {saved.get(k, defaults[k])!r}, now {now[k]!r}" for k in now
            if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k, defaults[k]) != now[k]]
