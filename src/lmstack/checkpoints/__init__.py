"""Reading and writing models: Hugging Face directories (the native format) and GGUF files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lmstack.checkpoints.hf import load_hf_model, save_hf_model
from lmstack.errors import LMStackError
from lmstack.models.decoder import DecoderLM
from lmstack.tokenizer import Tokenizer


def load_model(
    path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> DecoderLM:
    """Load a model from a Hugging Face checkpoint directory or a `.gguf` file, in eval mode.

    `dtype` None keeps the stored precision (GGUF: float32); weights are memory-mapped and read once.
    """
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    if Path(path).suffix == ".gguf":
        from lmstack.checkpoints.gguf import load_gguf_model

        return load_gguf_model(path, dtype=dtype, device=device)
    from lmstack.quantize import is_quantized_checkpoint, load_quantized

    if is_quantized_checkpoint(Path(path)):
        return load_quantized(path, device=device)
    return load_hf_model(path, dtype=dtype, device=device)


def save_model(
    model: DecoderLM, path: str | os.PathLike, tokenizer: Tokenizer | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Save `model` (and `tokenizer`) as a Hugging Face directory that `transformers` loads."""
    return save_hf_model(model, path, tokenizer=tokenizer, max_shard_size=max_shard_size)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a checkpoint directory, a tokenizer.json, GPT-2's files, or a `.gguf` file."""
    return Tokenizer.load(path)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise LMStackError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


__all__: list[Any] = ["load_model", "save_model", "load_tokenizer", "parse_dtype"]
