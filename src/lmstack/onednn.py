"""Float32 linear layers through oneDNN on the CPU, for training and inference.

PyTorch sends a float32 `nn.Linear` on the CPU to MKL. On x86 parts that are not Intel's, MKL runs a generic
code path: on the 2-core AMD EPYC this project is developed on, oneDNN (bundled with PyTorch as `mkldnn`)
multiplies 2.2-2.9x faster from 8 to 2048 rows and reads weights 1.2-3x faster in the matrix-vector products
of batch-1 decoding (`bench/matmul.py`). On Intel's own processors MKL is the faster (a 2-core Xeon: 0.5-0.9x
for oneDNN at 1 to 8 rows, a training step 10% slower), so by default oneDNN is used only where MKL would run
its generic code (`onednn_preferred`; `LMSTACK_ONEDNN=1` or `0` decides instead). Two ways in, neither of
which changes a model for good:

- `onednn_linears()`, for training and evaluation: inside the block every float32 CPU `F.linear` (which is
  what `nn.Linear` calls) runs forward and backward through oneDNN on the weights as they are.
- `PackedLinears(model)`, for the generation engine: oneDNN is faster still on weights reordered ("packed")
  into its blocked layout once. The packed copies live beside the model, are refreshed when a weight
  changes (an optimizer step, a loaded state dict) and are swapped in only for a forward pass. The cost is
  a second copy of the linear weights in memory. bf16 layers are packed too, on any CPU where oneDNN runs
  bf16: PyTorch's own bf16 product goes to oneDNN anyway and reorders the weight on every call (SmolLM2's
  bf16 decoding at batch 1 on a 2-core Xeon: 26.4 tok/s unpacked, 30.5 packed).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lmstack.errors import LMStackError


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.custom_op("lmstack::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight.T + bias` by oneDNN; `weight` is a plain [out, in] matrix or one packed by
    `torch.ops.mkldnn._reorder_linear_weight` (inference only). An opaque op, so `torch.compile` leaves it be."""
    return _linear(x, weight, bias)


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    grad_2d = grad.reshape(-1, grad.shape[-1])  # [M, out]
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:  # grad @ W = linear(grad, W.T); oneDNN takes the transposed view as it is
        grad_x = onednn_linear(grad, weight.t(), None)
    if ctx.needs_input_grad[1]:
        x_2d = x.reshape(-1, x.shape[-1])  # [M, in]
        # grad.T @ x, computed with the smaller of (out, in) as the rows of oneDNN's product: 2x faster for an
        # output head (out = vocabulary) than the other way round, and slower for a down projection.
        if weight.shape[0] <= weight.shape[1]:
            grad_w = onednn_linear(grad_2d.t(), x_2d.t(), None)
        else:
            grad_w = onednn_linear(x_2d.t(), grad_2d.t(), None).t().contiguous()
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_2d.sum(0)
    return grad_x, grad_w, grad_b


onednn_linear.register_autograd(_backward, setup_context=_setup_context)


@functools.cache
def onednn_available() -> bool:
    """Whether this PyTorch can run oneDNN's linear on the CPU, packed weights included."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:  # some builds list the ops but cannot run them (e.g. aarch64 without ACL)
        # Fixed values, not a random nn.Linear: the probe must not move the RNG (a resumed run restores it first).
        x, weight, bias = torch.ones(2, 4), torch.arange(12.0).view(3, 4), torch.ones(3)
        expected = F.linear(x, weight, bias)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        return (torch.allclose(_linear(x, weight, bias), expected, atol=1e-5)
                and torch.allclose(_linear(x, packed, bias), expected, atol=1e-5))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def cpu_vendor() -> str | None:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...) from /proc/cpuinfo; None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


@functools.cache
def onednn_preferred(dtype: torch.dtype = torch.float32) -> bool:
    """Whether CPU linear layers of `dtype` go through oneDNN by default. float32: where it is usable and the
    CPU is not Intel's (whose MKL kernels are at least as fast). bfloat16: wherever oneDNN runs bf16 (PyTorch
    sends bf16 products to it anyway, reordering the weight on every call, which a packed copy saves).
    `LMSTACK_ONEDNN=1` / `0` overrides both."""
    forced = os.environ.get("LMSTACK_ONEDNN", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return onednn_available()
    if forced in ("0", "false", "no", "off"):
        return False
    if forced:
        raise LMStackError(f"LMSTACK_ONEDNN={forced!r}: set it to 1 (use oneDNN) or 0 (PyTorch's default), or "
                           "leave it unset (oneDNN on CPUs that are not Intel's)")
    if dtype == torch.bfloat16:
        return onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return onednn_available() and cpu_vendor() != "GenuineIntel"


# ---------------------------------------------------------------------------------------------- training


class _OneDNNLinearMode(TorchFunctionMode):
    """Routes float32 CPU `F.linear` calls to `onednn_linear`; every other call passes through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.numel()
                    and type(weight) in (torch.Tensor, nn.Parameter) and weight.dim() == 2 and weight.shape[0]
                    and (bias is None or bias.dtype == torch.float32 and bias.shape == weight.shape[:1])
                    and not torch.is_autocast_enabled("cpu")):  # autocast would compute in bf16
                return onednn_linear(x, weight, bias)
        return func(*args, **kwargs)


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` for `torch.utils.checkpoint`: activation checkpointing recomputes a block during
    backward, outside the forward's `with onednn_linears():`; the recomputation must run as the forward did
    (the same saved tensors, the same numbers)."""
    active = any(isinstance(m, _OneDNNLinearMode) for m in torch.overrides._get_current_function_mode_stack())
    return contextlib.nullcontext(), (_OneDNNLinearMode() if active else contextlib.nullcontext())


def onednn_linears(enabled: bool | None = None) -> contextlib.AbstractContextManager:
    """A context in which float32 CPU linear layers run through oneDNN, gradients included.

    A no-op when not `enabled` (default: `onednn_preferred()`), where oneDNN is not usable, and under CPU
    autocast."""
    enabled = onednn_preferred() if enabled is None else enabled
    return _OneDNNLinearMode() if enabled and onednn_available() else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- inference


class PackedLinear(nn.Module):
    """An inference-only stand-in for a float32 or bf16 `nn.Linear`: the same product on oneDNN's packed
    weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.version = tensor_version(linear.weight)

    # Code that reads a linear layer's weight (shapes, DoRA's norms) finds the float32 one it stands for.
    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.packed.dtype:  # oneDNN multiplies one dtype; a mixed call keeps PyTorch's rules
            return self.linear(x)
        bias = None if self.linear.bias is None else self.linear.bias.detach()
        if torch.compiler.is_compiling():  # inductor only lowers packed weights it froze itself
            return onednn_linear(x, self.packed, bias)
        return _linear(x, self.packed, bias)  # the custom op's dispatch costs ~10 us a call in eager


def tensor_version(weight: torch.Tensor) -> tuple[int, int]:
    """What changes when a tensor does: its version counter and its storage (to tell when to repack)."""
    # In-place updates bump `_version`; assigning `.data` changes the storage. A tensor made under
    # inference_mode has no version counter, and cannot be changed in place outside it: its storage will do.
    if weight.is_inference():
        return -1, weight.data_ptr()
    return weight._version, weight.data_ptr()


def available_memory() -> int | None:
    """Bytes of memory available to new allocations now (Linux: MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# A float32 layer with fewer weights runs faster on MKL's kernels: oneDNN's call costs ~20 us whatever its size,
# where MKL multiplies a row by a 128 x 512 matrix in 10 us (the 2-core AMD EPYC of bench/matmul.py; oneDNN
# gains from about 150k weights at a few rows, 330k at one row).
PACK_MIN_WEIGHTS = 1 << 17


class PackedLinears:
    """oneDNN-packed copies of a model's float32 and bf16 CPU `nn.Linear` layers, used via
    `with packed.swapped_in():`.

    Layers of other types (LoRA's and quantized wrappers; a LoRA layer's inner base `nn.Linear` is packed),
    of other dtypes or devices, and by default float32 layers of fewer than `PACK_MIN_WEIGHTS` weights (a tiny
    model's, or a small key / value projection) keep their own forward. A weight is repacked when it changes in place or is
    reassigned; writes through `.data` are not seen (call `refresh` after them). The copies
    may take at most `max_bytes` (default: half the memory available now); a model whose float32 linear
    weights are larger runs them through oneDNN as they are (`onednn_linears`), a little slower and with no
    extra memory. Packs no layer of a dtype when not `enabled` (default: `onednn_preferred(dtype)`: float32
    layers on CPUs that are not Intel's, bf16 ones wherever oneDNN runs bf16; `enabled=True` packs them all,
    the small ones too) or where PyTorch has no usable oneDNN. The swap changes the model's module tree for
    the duration of a pass: not for a model that other threads run at the same time.
    """

    def __init__(self, model: nn.Module, enabled: bool | None = None, max_bytes: int | None = None) -> None:
        self.slots: list[tuple[nn.Module, str, nn.Linear]] = []
        self.packed: list[PackedLinear | None] = []
        self.unpacked = False  # too large to pack: onednn_linears() instead
        dtypes = {dtype for dtype in (torch.float32, torch.bfloat16)
                  if (onednn_preferred(dtype) if enabled is None else enabled)}
        smallest = PACK_MIN_WEIGHTS if enabled is None else 0  # asked for (enabled=True), every layer is packed
        if not (dtypes and onednn_available()):
            return
        for parent in model.modules():
            for name, child in parent.named_children():
                weight = child.weight if type(child) is nn.Linear else None
                if (weight is not None and weight.dtype in dtypes and weight.device.type == "cpu"
                        and (weight.dtype != torch.float32 or weight.numel() >= smallest)):
                    self.slots.append((parent, name, child))
        size = sum(linear.weight.numel() * linear.weight.element_size() for _, _, linear in self.slots)
        if max_bytes is None:
            available = available_memory()
            max_bytes = available // 2 if available is not None else size
        if size > max_bytes:
            self.slots, self.unpacked = [], torch.float32 in dtypes
        self.packed = [None] * len(self.slots)

    def refresh(self) -> None:
        """Repack the layers whose weights changed (`_version` or storage) since they were last packed."""
        for i, (_, _, linear) in enumerate(self.slots):
            current = self.packed[i]
            if current is None or current.version != tensor_version(linear.weight):
                self.packed[i] = PackedLinear(linear)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Run the model's packed linear layers through their packed copies inside the block."""
        if not self.slots:
            with onednn_linears(enabled=self.unpacked):
                yield
            return
        self.refresh()
        # Only where the layer packed is still in place: one replaced since (LoRA, quantization) stays.
        swapped = [(parent, name, linear, packed) for (parent, name, linear), packed in zip(self.slots, self.packed)
                   if parent._modules.get(name) is linear]
        for parent, name, _, packed in swapped:
            parent._modules[name] = packed
        try:
            yield
        finally:
            for parent, name, linear, _ in swapped:
                parent._modules[name] = linear
