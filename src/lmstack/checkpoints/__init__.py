"""Reading and writing models: Hugging Face directories (the native format) and GGUF files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmstack.checkpoints.hf import (
    apply_generation_config,
    atomic_write,
    generation_config_of,
    load_hf_model,
    read_hf_config,
    save_hf_model,
    write_json,
)
from lmstack.errors import LMStackError
from lmstack.models.decoder import DecoderLM
from lmstack.paths import is_gguf, is_training_run, training_run_error
from lmstack.tokenizer import Tokenizer


def load_model(
    path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> DecoderLM:
    """Load a model from a Hugging Face checkpoint directory or a `.gguf` file, in eval mode.

    `dtype` None keeps the stored precision (GGUF: float32); weights are memory-mapped and read once. For
    a quantized checkpoint `dtype` applies to the weights left in floating point (embeddings, norms).
    """
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    if device is not None:
        device = parse_device(device)
    if is_gguf(path):
        from lmstack.checkpoints.gguf import load_gguf_model

        return load_gguf_model(path, dtype=dtype, device=device)
    from lmstack.quantize import is_quantized_checkpoint, load_quantized

    if is_quantized_checkpoint(Path(path)):
        return load_quantized(path, device=device, dtype=dtype)
    if is_training_run(Path(path)) and not any(Path(path).glob("*.safetensors")):
        raise training_run_error(Path(path))
    if (Path(path) / "adapter_config.json").exists() and not (Path(path) / "config.json").exists():
        return load_adapter_model(path, dtype=dtype, device=device)
    if (Path(path) / "config.json").exists():
        hf = read_hf_config(path)
        if hf.get("model_type") == NATIVE:
            return load_native(path, dtype=dtype, device=device)
        if any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or []):
            from lmstack.models.classifier import load_classifier

            return load_classifier(path, dtype=dtype, device=device).eval()
    return load_hf_model(path, dtype=dtype, device=device)


def load_adapter_model(path: str | os.PathLike, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> DecoderLM:
    """A PEFT LoRA adapter directory applied to its base model (`base_model_name_or_path`), merged (with
    its classification head, if it was trained as one)."""
    from lmstack.train.lora import adapter_config, is_classifier_adapter, load_peft, merge_and_unload

    cfg = adapter_config(path)
    base = cfg.get("base_model_name_or_path")
    if not base or not Path(base).exists():
        raise LMStackError(f"{path}: the adapter's base model {base!r} is not on this machine; load the base "
                           "model and apply the adapter with lmstack.train.lora.load_peft")
    model = load_model(base, dtype=dtype, device=device)
    stored = model.embed.weight.dtype  # what `dtype=None` keeps: the base's own precision
    merge_and_unload(load_peft(model.float(), path))  # merged in float32, then back
    from lmstack.models.classifier import attach_head

    if is_classifier_adapter(cfg):  # a classifier or reward model trained with LoRA
        model = attach_head(model, path).eval()
    return model.to(dtype or stored)


NATIVE = "lmstack"  # config.json model_type of architectures transformers has no class for (RNN LMs)


def save_native(model: torch.nn.Module, path: str | os.PathLike, tokenizer: Tokenizer | None = None,
                extra_config: dict[str, Any] | None = None) -> Path:
    """config.json (lmstack's ModelConfig, plus `extra_config`) + model.safetensors under lmstack's own
    parameter names."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    atomic_write(path / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    # The special-token ids the config lacks come from the tokenizer, as save_hf_model's config takes them.
    ids = {k: getattr(model.config, k) if getattr(model.config, k) is not None else getattr(tokenizer, k, None)
           for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    write_json(path / "config.json", {"model_type": NATIVE, "architectures": [type(model).__name__],
                                      "lmstack_config": {**model.config.to_dict(), **ids}, **(extra_config or {})})
    write_json(path / "generation_config.json", generation_config_of(model.config, ids))
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def load_native(path: str | os.PathLike, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None, build: Callable | None = None,
                copy: bool = False) -> torch.nn.Module:
    """Read `save_native`'s layout into the model `build(config)` makes (default: `build_model`), checking
    every tensor's name and shape; `copy` takes tensors out of the memory map (for kernels that need it)."""
    from lmstack.checkpoints.hf import TensorSource, materialize_module
    from lmstack.config import ModelConfig
    from lmstack.models import build_model

    build = build or build_model
    path = Path(path)
    stored = read_hf_config(path).get("lmstack_config")
    if not isinstance(stored, dict):
        raise LMStackError(f"{path}/config.json: model_type {NATIVE!r} needs an 'lmstack_config' object")
    config = ModelConfig.from_dict(stored)
    apply_generation_config(config, path)  # the file, if edited, over what the config carried
    source = TensorSource([path / "model.safetensors"])
    with torch.device("meta"):
        expected = {k: v.shape for k, v in build(config).state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    unexpected = sorted(set(source.keys()) - set(expected))
    if unexpected:  # weights the config has no place for: the config does not describe this file
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise LMStackError(f"{path}/model.safetensors: unexpected tensor {unexpected[0]!r}{more} for the "
                           "model config.json describes")
    state = {}
    for key, shape in expected.items():
        if key not in source.where:
            raise LMStackError(f"{path}/model.safetensors: missing tensor {key!r}")
        t = source.get(key)
        if t.shape != shape:
            raise LMStackError(f"{path}/model.safetensors: tensor {key!r} has shape {list(t.shape)}, "
                               f"expected {list(shape)}")
        state[key] = t.to(device=device or "cpu", dtype=dtype or t.dtype, copy=copy)
    return materialize_module(build, config, state, device)


def save_model(
    model: DecoderLM, path: str | os.PathLike, tokenizer: Tokenizer | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Save `model` (and `tokenizer`) as a Hugging Face directory that `transformers` loads (a classifier as a
    ...ForSequenceClassification; recurrent LMs, which transformers has no class for, and quantized models,
    in lmstack's own layout). A model with LoRA adapters is refused: save them with `save_peft`, or fold
    them in with `merge_and_unload` first."""
    from lmstack.train.lora import lora_layers

    if lora_layers(model):
        raise LMStackError("the model has LoRA adapters: save them as a PEFT adapter with "
                           "lmstack.train.lora.save_peft, or fold them in with merge_and_unload before save_model")
    if getattr(model, "quantization", None):
        from lmstack.quantize import save_quantized

        return save_quantized(model, path, tokenizer)
    from lmstack.models.classifier import SequenceClassifier, save_classifier

    if isinstance(model, SequenceClassifier):
        return save_classifier(model, path, tokenizer=tokenizer, max_shard_size=max_shard_size)
    if model.config.arch != "transformer":
        return save_native(model, path, tokenizer)
    return save_hf_model(model, path, tokenizer=tokenizer, max_shard_size=max_shard_size)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a checkpoint directory, a tokenizer.json, GPT-2's files, or a `.gguf` file. A
    PEFT adapter directory without tokenizer files (as peft writes them) has its base model's."""
    folder = Path(path)
    if ((folder / "adapter_config.json").is_file()
            and not any((folder / name).exists() for name in ("tokenizer.json", "encoder.json"))):
        from lmstack.train.lora import adapter_config

        base = adapter_config(folder).get("base_model_name_or_path")
        if base and Path(base).exists():
            return Tokenizer.load(base)
    return Tokenizer.load(path)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise LMStackError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


def parse_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device, or an error that says why it cannot be used here."""
    try:
        device = torch.device(device)
    except RuntimeError:
        raise LMStackError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LMStackError(f"device {str(device)!r}: this PyTorch has no CUDA, or no GPU is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LMStackError(f"device {str(device)!r}: only {torch.cuda.device_count()} GPU(s) visible")
    return device


__all__: list[Any] = ["load_model", "save_model", "load_tokenizer", "parse_device", "parse_dtype"]
