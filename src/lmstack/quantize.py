"""Weight-only quantization: int8 per output channel, group-wise int4, and NF4 (QLoRA's 4-bit NormalFloat).

int8: w ~ scale[o] * q[o, i], q in [-127, 127], computed on the CPU with PyTorch's int8 weight-pack matmul,
which reads a quarter of float32's bytes, and elsewhere as gpt-fast does (int8 weights converted inside the
matmul, which torch.compile fuses). int4: w ~ low[o, g] + scale[o, g] * q[o, i], q in
[0, 15] packed two per byte, with a minimum and a step per group of `group_size` inputs (asymmetric, like
llama.cpp's Q4_1); dequantized on the fly (half the memory of int8 again). NF4 (Dettmers et al. 2023, stored
as bitsandbytes does): the flattened weight in blocks of 64, each block divided by its absmax into [-1, 1] and
each value replaced by the nearest of 16 levels placed at quantiles of a normal distribution; 4-bit codes
plus a float32 absmax per block is 4.5 bits per weight. NF4 is the frozen base under QLoRA's adapters
(`lmstack.train.lora.prepare_qlora`). Embeddings and norms stay in floating point. A quantized checkpoint is a
Hugging Face-style directory whose config.json carries `quantization_config`; `lmstack.load_model` reads it
back quantized.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import LMStackError
from lmstack.onednn import tensor_version

METHOD = "lmstack-weight-only"


class QuantizedLinear(nn.Module):
    """A frozen linear layer with int8 or int4 weights and floating-point scales."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 128,
                 bias: bool = False, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise LMStackError(f"bits={bits}: lmstack quantizes to 8 or 4 bits")
        _check_group_size(group_size)
        if bits == 4 and in_features % group_size:
            raise LMStackError(f"group_size {group_size} does not divide the layer's {in_features} inputs")
        if bits == 4 and in_features % 2:  # two codes per byte along the inputs
            raise LMStackError(f"int4 packs two weights per byte: the layer's {in_features} inputs must be even")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(out_features, dtype=dtype))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(out_features, in_features // group_size, dtype=dtype))
            self.register_buffer("low", torch.zeros(out_features, in_features // group_size, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self._cpu_int4 = None  # (versions of the codes and scales, kernel-packed weight, scales and zeros)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 128,
                    dtype: torch.dtype = torch.bfloat16) -> QuantizedLinear:
        with torch.device(linear.weight.device):  # on the layer's device: a GPU model stays on the GPU
            q = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None, dtype)
        w = linear.weight.detach().float()
        with torch.no_grad():
            # Codes are rounded against the scale (and offset) as stored in `dtype`, not the float32 ones:
            # each weight is then within half a step of what the stored numbers dequantize to.
            if bits == 8:
                scale = (w.abs().amax(dim=1).clamp_min(1e-8) / 127).to(dtype)
                q.qweight.copy_(torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8))
                q.scale.copy_(scale)
            else:
                groups = w.view(w.shape[0], -1, group_size)
                low, high = groups.amin(dim=-1).to(dtype), groups.amax(dim=-1)
                scale = ((high - low.float()) / 15).clamp_min(1e-8).to(dtype)
                codes = torch.round((groups - low.float()[..., None]) / scale.float()[..., None]).clamp(0, 15)
                codes = codes.to(torch.uint8).view(w.shape)
                q.qweight.copy_(codes[:, 0::2] | (codes[:, 1::2] << 4))
                q.scale.copy_(scale)
                q.low.copy_(low)
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
        if self._cpu_int8_kernel(x):
            y = _on_rows(x, lambda rows: torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scale))
        elif self.bits == 8:
            # gpt-fast's form: under torch.compile the int8-to-float conversion fuses into the matmul's
            # reads, so a decode step reads one byte per weight (eager, it materializes the float weight).
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scale
        elif self._cpu_int4_kernel(x):
            weight, scales_and_zeros = self._cpu_int4_packed()
            y = _on_rows(x, lambda rows: torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows, weight, self.group_size, scales_and_zeros))
        else:
            return F.linear(x, self.dequantized(), self.bias).to(dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype)

    def _cpu_int8_kernel(self, x: torch.Tensor) -> bool:
        """Whether PyTorch's CPU int8 kernel takes this product. Not for inputs whose width is not a multiple of
        16 (in bf16 on AVX-512 builds it returns garbage or crashes there), not past 16 rows (its time grows
        with the rows, about 13 us a row on SmolLM2's MLP, where converting the codes and one matmul take
        about 200 us: prefill and batched decoding take the general form), and not where a gradient is
        wanted (it has no backward)."""
        return (self.bits == 8 and x.device.type == "cpu" and self.in_features % 16 == 0
                and x.numel() <= 16 * self.in_features and not _needs_grad(x))

    def _cpu_int4_kernel(self, x: torch.Tensor) -> bool:
        """Whether PyTorch's CPU int4 kernel takes this product: eager, 16-bit activations (its float32 path is
        slower than dequantizing), the shapes it accepts, at most 64 rows, and no gradient wanted through it
        (it has no backward; LoRA on other layers may want one). It reads the packed codes as
        they are instead of materializing the 16-bit weight each call: 15-60x faster at one row (decoding),
        on a par at 64, and slower beyond (its time grows with the rows: a long prefill dequantizes)."""
        return (self.bits == 4 and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
                and x.numel() <= 64 * self.in_features and self.out_features % 16 == 0
                and self.group_size in (32, 64, 128, 256) and not torch.compiler.is_compiling()
                and not _needs_grad(x))

    def _apply(self, fn, recurse: bool = True):
        self._cpu_int4 = None  # moved or cast: the packed copy is of the old codes
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._cpu_int4 = None  # new codes (under inference mode, a write in place changes no version counter)
        super()._load_from_state_dict(*args, **kwargs)

    def _cpu_int4_packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes in the CPU int4 kernel's layout and its [groups, out, 2] scales and zeros: packed on first
        use and again whenever the codes or scales change (a layout of the kernel's, never saved)."""
        key = tuple(tensor_version(t) for t in (self.qweight, self.scale, self.low))
        if self._cpu_int4 is None or self._cpu_int4[0] != key:
            codes = torch.stack((self.qweight & 0xF, self.qweight >> 4), dim=-1).view(self.out_features, -1)
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
            # The kernel computes (code - 8) * scale + zero; zero = low + 8 * scale makes that code * scale + low.
            zeros = self.low.float() + 8 * self.scale.float()
            scales_and_zeros = torch.stack((self.scale.float(), zeros), dim=-1).transpose(0, 1).contiguous()
            self._cpu_int4 = key, weight, scales_and_zeros.to(self.scale.dtype)
        return self._cpu_int4[1], self._cpu_int4[2]


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _on_rows(x: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`product` of a kernel that takes a 2-D input of contiguous rows (a transposed or sliced input is not),
    applied to `x` of any leading shape."""
    shape = x.shape
    y = product(x.reshape(-1, shape[-1]).contiguous())
    return y.view(*shape[:-1], y.shape[-1])


# The 16 NormalFloat-4 levels exactly as bitsandbytes defines them (create_normal_map(0.9677083)): 8 normal
# quantiles for the positive half, 7 for the negative half and an exact zero, scaled so the largest is 1.
NF4_CODES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
    1.0,
)


def _check_group_size(group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise LMStackError(f"group_size={group_size!r}: must be an integer >= 1")


def _nf4_check(block_size: int) -> None:
    if block_size < 2 or block_size % 2:
        raise LMStackError(f"NF4 block_size {block_size}: must be an even number >= 2 (64 in QLoRA)")


def nf4_quantize(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes of `w`: (packed uint8 [ceil(numel / 2)], absmax float32 [ceil(numel / block_size)]).

    The weight is flattened (row-major) into blocks of `block_size`; each block is divided by its absolute
    maximum and every value becomes the index of the nearest NF4 level (a tie goes to the lower level, as in
    bitsandbytes). Two codes share a byte, the first in the high nibble (bitsandbytes' and torchao's layout).
    A last partial block or an odd element count is padded with zeros."""
    _nf4_check(block_size)
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % block_size)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    if not torch.isfinite(absmax).all():
        raise LMStackError("cannot NF4-quantize a weight with inf or NaN values")
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # all-zero blocks stay 0
    table = torch.tensor(NF4_CODES, device=flat.device)
    # Nearest level = how many midpoints between adjacent levels lie strictly below the value.
    codes = torch.bucketize(scaled.view(-1)[:n], (table[1:] + table[:-1]) / 2, out_int32=True).to(torch.uint8)
    codes = F.pad(codes, (0, n % 2))
    return (codes[0::2] << 4) | codes[1::2], absmax


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...] | torch.Size,
                   dtype: torch.dtype = torch.float32, block_size: int = 64) -> torch.Tensor:
    """The weight that `nf4_quantize`'s (packed, absmax) stand for: level * block absmax, as `dtype`."""
    _nf4_check(block_size)
    n = math.prod(shape)
    n_blocks = -(-n // block_size)
    if packed.numel() != -(-n // 2) or absmax.numel() != n_blocks:
        raise LMStackError(f"NF4 data for shape {list(shape)} with block_size {block_size} needs "
                           f"{-(-n // 2)} packed bytes and {n_blocks} absmax values, "
                           f"got {packed.numel()} and {absmax.numel()}")
    table = torch.tensor(NF4_CODES, device=packed.device)
    # Every byte's two levels in one lookup: pairs[b] = (level[b >> 4], level[b & 15]).
    byte = torch.arange(256, device=packed.device)
    pairs = torch.stack((table[byte >> 4], table[byte & 15]), dim=-1)
    levels = pairs.index_select(0, packed.reshape(-1).int()).view(-1)
    if levels.numel() != n_blocks * block_size:  # a partial last block (pad copies, so only when needed)
        levels = F.pad(levels, (0, n_blocks * block_size - levels.numel()))
    return (levels.view(n_blocks, block_size) * absmax.float()[:, None]).view(-1)[:n].view(shape).to(dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight (QLoRA's base): buffers only, nothing to train.

    `qweight` holds the packed 4-bit codes of the flattened [out, in] weight and `absmax` one float32 scale
    per `block_size` weights. The forward pass dequantizes to the compute `dtype` and runs a dense matmul.
    `.weight` dequantizes on access, so code that reads a linear layer's weight shape or dtype keeps
    working."""

    def __init__(self, in_features: int, out_features: int, block_size: int = 64, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        _nf4_check(block_size)
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        self.dtype = dtype  # the compute dtype: activations and the dequantized weight
        n = in_features * out_features
        self.register_buffer("qweight", torch.zeros(-(-n // 2), dtype=torch.uint8))
        self.register_buffer("absmax", torch.zeros(-(-n // block_size), dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64,
                    dtype: torch.dtype = torch.bfloat16) -> NF4Linear:
        """Quantize an nn.Linear's weight to NF4 (its bias stays in floating point, as `dtype`)."""
        with torch.device("meta"):  # the empty buffers are replaced just below: allocate nothing
            q = cls(linear.in_features, linear.out_features, block_size, linear.bias is not None, dtype)
        q.qweight, q.absmax = nf4_quantize(linear.weight, block_size)  # on the linear's device
        if linear.bias is not None:
            q.bias = linear.bias.detach().to(dtype).clone()
        return q

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [out, in] floating-point weight these codes stand for (compute dtype unless given)."""
        return nf4_dequantize(self.qweight, self.absmax, (self.out_features, self.in_features),
                              dtype or self.dtype, self.block_size)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a new tensor on every access; it is not stored)."""
        return self.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.dtype), self.dequantized(), self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_size={self.block_size}, dtype={self.dtype}")


def quantize_model(model: nn.Module, bits: int | str = 8, group_size: int | None = None,
                   dtype: torch.dtype = torch.bfloat16, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a quantized layer; names in `skip` stay as they are.

    `bits` 8 or 4 gives a QuantizedLinear (`group_size`: inputs per int4 scale, default 128); "nf4" gives an
    NF4Linear (`group_size`: weights per absmax block, default 64). `dtype` is the compute dtype. The output
    head stays in floating point when it is tied to the embedding."""
    if bits not in (8, 4, "nf4"):
        raise LMStackError(f"bits={bits!r}: lmstack quantizes to 8, 4 or 'nf4'")
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)
               and name not in skip and not (tied and name == "lm_head")]
    widths = {m.in_features for _, m in targets}
    if bits == 4:
        odd = next(((n, m.in_features) for n, m in targets if m.in_features % 2), None)
        if odd:  # two codes per byte: no group size helps
            raise LMStackError(f"int4 packs two weights per byte: layer {odd[0]} has {odd[1]} inputs, an odd "
                               "number (skip it, or use --bits 8)")
    fits = [g for g in (256, 128, 64, 32, 16, 8, 4, 2) if all(w % g == 0 for w in widths)]
    if group_size is None and bits == 4:  # the largest group, 128 at most, that every layer's inputs divide into
        group_size = next((g for g in fits if g <= 128), 128)
    elif group_size is None:
        group_size = 64 if bits == "nf4" else 128
    _check_group_size(group_size)
    if bits == "nf4":
        _nf4_check(group_size)
    if bits == 4:
        wrong = next(((n, m.in_features) for n, m in targets if m.in_features % group_size), None)
        if wrong:
            raise LMStackError(f"group_size {group_size} does not divide the {wrong[1]} inputs of layer {wrong[0]}"
                               + (f"; group sizes that fit every layer: {fits}" if fits else ""))
    # Every layer quantized before any is swapped in: one that cannot be (its inputs not a multiple of the
    # group size) leaves the model as it was, not half quantized.
    quantized = [NF4Linear.from_linear(linear, group_size, dtype) if bits == "nf4"
                 else QuantizedLinear.from_linear(linear, bits, group_size, dtype) for _, linear in targets]
    for (name, _), layer in zip(targets, quantized):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    from lmstack.models.layers import MoE  # (the models import this module)

    for m in model.modules():  # a mixture's stacked float experts would keep their memory
        if isinstance(m, MoE):
            m.forget_stacked()
    # int8 has one scale per output channel: no group size to record (an int8 layer ignores its own)
    model.quantization = {"quant_method": METHOD, "bits": bits, "group_size": None if bits == 8 else group_size,
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
    if not (path / "config.json").exists():
        return False
    from lmstack.checkpoints.hf import read_hf_config

    return (read_hf_config(path).get("quantization_config") or {}).get("quant_method") == METHOD


def load_quantized(path: str | os.PathLike, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Load a checkpoint written by `save_quantized`, quantized as it was saved; `dtype` converts the weights
    left in floating point (the quantized layers keep the compute dtype they were quantized for)."""
    from lmstack.checkpoints import load_native
    from lmstack.checkpoints.hf import read_hf_config
    from lmstack.models.decoder import DecoderLM

    qc = read_hf_config(path).get("quantization_config")

    def build(config):
        model = DecoderLM(config)
        try:
            quantize_model_structure(model, qc)
        except (KeyError, AttributeError, TypeError) as e:  # a hand-edited or foreign quantization_config
            raise LMStackError(f"{Path(path) / 'config.json'}: quantization_config does not describe this "
                               f"model ({type(e).__name__}: {e})") from None
        return model

    # Copied out of the memory map: the int8 kernel needs aligned, writable storage.
    model = load_native(path, device=device, build=build, copy=True)
    if dtype is not None:
        for module in model.modules():
            if not isinstance(module, (QuantizedLinear, NF4Linear)):
                for p in module.parameters(recurse=False):
                    p.data = p.data.to(dtype)
    model.quantization = qc
    return model


def quantize_model_structure(model: nn.Module, qc: dict) -> None:
    """Swap in empty QuantizedLinear / NF4Linear modules where `qc["modules"]` says (meta device: no
    memory)."""
    dtype = getattr(torch, qc.get("dtype", "bfloat16"))
    for name in qc["modules"]:
        linear = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device("meta"):
            if qc["bits"] == "nf4":
                q = NF4Linear(linear.in_features, linear.out_features, qc["group_size"],
                              linear.bias is not None, dtype)
            else:
                q = QuantizedLinear(linear.in_features, linear.out_features, qc["bits"], qc["group_size"] or 128,
                                    linear.bias is not None, dtype)
        setattr(parent, child, q)
