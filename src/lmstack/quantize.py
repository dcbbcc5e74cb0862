"""Weight-only quantization for inference: int8 per output channel, and group-wise int4.

int8: w ~ scale[o] * q[o, i], q in [-127, 127], computed with PyTorch's int8 weight-pack matmul (the kernel
gpt-fast uses), which reads a quarter of float32's bytes. int4: w ~ low[o, g] + scale[o, g] * q[o, i], q in
[0, 15] packed two per byte, with a minimum and a step per group of `group_size` inputs (asymmetric, like
llama.cpp's Q4_1); dequantized on the fly (half the memory of int8 again). Embeddings and norms stay in floating point. A quantized checkpoint is a Hugging Face-style
directory whose config.json carries `quantization_config`; `lmstack.load_model` reads it back quantized.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import LMStackError

METHOD = "lmstack-weight-only"


class QuantizedLinear(nn.Module):
    """A frozen linear layer with int8 or int4 weights and floating-point scales."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 128,
                 bias: bool = False, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise LMStackError(f"bits={bits}: lmstack quantizes to 8 or 4 bits")
        if bits == 4 and in_features % group_size:
            raise LMStackError(f"group_size {group_size} does not divide the layer's {in_features} inputs")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(out_features, dtype=dtype))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(out_features, in_features // group_size, dtype=dtype))
            self.register_buffer("low", torch.zeros(out_features, in_features // group_size, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 128,
                    dtype: torch.dtype = torch.bfloat16) -> QuantizedLinear:
        q = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None, dtype)
        w = linear.weight.detach().float()
        with torch.no_grad():
            if bits == 8:
                scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127
                q.qweight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
                q.scale.copy_(scale.to(dtype))
            else:
                groups = w.view(w.shape[0], -1, group_size)
                low, high = groups.amin(dim=-1), groups.amax(dim=-1)
                scale = ((high - low) / 15).clamp_min(1e-8)
                codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
                codes = codes.to(torch.uint8).view(w.shape)
                q.qweight.copy_(codes[:, 0::2] | (codes[:, 1::2] << 4))
                q.scale.copy_(scale.to(dtype))
                q.low.copy_(low.to(dtype))
            if linear.bias is not None:
                q.bias.copy_(linear.bias.detach().to(dtype))
        return q

    def dequantized(self) -> torch.Tensor:
        """The floating-point weight these codes stand for."""
        if self.bits == 8:
            return self.qweight.to(self.scale.dtype) * self.scale[:, None]
        low, high = self.qweight & 0xF, self.qweight >> 4
        codes = torch.stack((low, high), dim=-1).view(self.out_features, -1).to(self.scale.dtype)
        groups = codes.view(self.out_features, -1, self.group_size) * self.scale[..., None] + self.low[..., None]
        return groups.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(self.scale.dtype)
        if self.bits == 8 and x.device.type in ("cpu", "cuda"):
            shape = x.shape
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.qweight, self.scale)
            y = y.view(*shape[:-1], self.out_features)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x, self.dequantized(), self.bias)
        return y.to(dtype)


def quantize_model(model: nn.Module, bits: int = 8, group_size: int = 128,
                   dtype: torch.dtype = torch.bfloat16, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a QuantizedLinear; names in `skip` stay as they are.

    The output head stays in floating point when it is tied to the embedding."""
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)
               and name not in skip and not (tied and name == "lm_head")]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLinear.from_linear(linear, bits, group_size, dtype))
    model.quantization = {"quant_method": METHOD, "bits": bits, "group_size": group_size,
                          "dtype": str(dtype).removeprefix("torch."),
                          "modules": [name for name, _ in targets]}
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (shared tensors once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def save_quantized(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> Path:
    """A checkpoint directory: config.json (with quantization_config), model.safetensors, tokenizer."""
    from lmstack.checkpoints import save_native

    if not getattr(model, "quantization", None):
        raise LMStackError("the model is not quantized (use quantize_model first)")
    return save_native(model, path, tokenizer, extra_config={"quantization_config": model.quantization})


def is_quantized_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    if not config.exists():
        return False
    return json.loads(config.read_text()).get("quantization_config", {}).get("quant_method") == METHOD


def load_quantized(path: str | os.PathLike, device: torch.device | str | None = None) -> nn.Module:
    """Load a checkpoint written by `save_quantized`, quantized as it was saved."""
    from lmstack.checkpoints import load_native
    from lmstack.models.decoder import DecoderLM

    qc = json.loads((Path(path) / "config.json").read_text())["quantization_config"]

    def build(config):
        model = DecoderLM(config)
        quantize_model_structure(model, qc)
        return model

    # Copied out of the memory map: the int8 kernel needs aligned, writable storage.
    model = load_native(path, device=device, build=build, copy=True)
    model.quantization = qc
    return model


def quantize_model_structure(model: nn.Module, qc: dict) -> None:
    """Swap in empty QuantizedLinear modules where `qc["modules"]` says (meta device: no memory)."""
    dtype = getattr(torch, qc.get("dtype", "bfloat16"))
    for name in qc["modules"]:
        linear = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device("meta"):
            q = QuantizedLinear(linear.in_features, linear.out_features, qc["bits"], qc["group_size"],
                                linear.bias is not None, dtype)
        setattr(parent, child, q)
