"""Float32 linear layers through oneDNN on the CPU, for inference.

PyTorch sends a float32 `nn.Linear` on the CPU to MKL. On x86 parts that are not Intel's, MKL runs a generic
code path: on the 2-core AMD EPYC this project is developed on, oneDNN (bundled with PyTorch as `mkldnn`)
multiplies 2.2-2.5x faster at every batch size and reads weights ~1.5x faster in the matrix-vector products
of batch-1 decoding (bench/decode.py). oneDNN wants each weight reordered ("packed") into its blocked layout
once; `PackedLinears` keeps those copies next to the model, refreshes any whose weight has changed since
(an optimizer step, a loaded state dict), and swaps them in only for the duration of a forward pass, so the
model itself is never left altered. The cost is a second copy of the float32 linear weights in memory.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class PackedLinear(nn.Module):
    """An inference-only stand-in for a float32 `nn.Linear`: the same product through oneDNN's packed weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.version = _version_of(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.linear.bias is None else self.linear.bias.detach()
        if torch.compiler.is_compiling():  # an opaque op: inductor only lowers packed weights it froze itself
            return packed_linear(x, self.packed, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


@torch.library.custom_op("lmstack::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ W.T + bias` with W packed by oneDNN (`torch.ops.mkldnn._reorder_linear_weight`)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def _version_of(weight: torch.Tensor) -> tuple[int, int]:
    # In-place updates bump `_version`; assigning `.data` changes the storage.
    return weight._version, weight.data_ptr()


@functools.cache
def onednn_available() -> bool:
    """Whether this PyTorch can run oneDNN's packed linear on the CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:  # some builds list the ops but cannot run them (e.g. aarch64 without ACL)
        probe = nn.Linear(4, 3)
        with torch.no_grad():
            return torch.allclose(PackedLinear(probe)(torch.ones(2, 4)), probe(torch.ones(2, 4)), atol=1e-5)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class PackedLinears:
    """oneDNN-packed copies of a model's float32 CPU `nn.Linear` layers, used via `with packed.swapped_in():`.

    Layers of other types (LoRA, quantized) and of other dtypes or devices keep their own forward. Does
    nothing when not `enabled` or where PyTorch has no usable oneDNN.
    """

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self.model = model
        self.slots: list[tuple[nn.Module, str, nn.Linear]] = []
        if not (enabled and onednn_available()):
            return
        for parent in model.modules():
            for name, child in parent.named_children():
                if type(child) is nn.Linear and child.weight.dtype == torch.float32 \
                        and child.weight.device.type == "cpu":
                    self.slots.append((parent, name, child))
        self.packed: list[PackedLinear | None] = [None] * len(self.slots)

    def refresh(self) -> None:
        """Repack the layers whose weights changed since they were last packed."""
        for i, (_, _, linear) in enumerate(self.slots):
            current = self.packed[i]
            if current is None or current.version != _version_of(linear.weight):
                self.packed[i] = PackedLinear(linear)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Run the model's float32 linear layers through their packed copies inside the block."""
        if not self.slots:
            yield
            return
        self.refresh()
        for (parent, name, _), packed in zip(self.slots, self.packed):
            parent._modules[name] = packed
        try:
            yield
        finally:
            for parent, name, linear in self.slots:
                parent._modules[name] = linear
