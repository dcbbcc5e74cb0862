"""Cross-entropy through the output head, a chunk of positions at a time.

The plain loss, `cross_entropy(lm_head(h), targets)`, materialises the logits [N, V] in float32, then their
log-softmax, and in backward a gradient of the same size again: at a 128k vocabulary and 8k tokens, 4 GB
each. Here each chunk of rows goes from hidden states to loss and to its share of the gradients of the hidden
states and the head's weights at once, inside forward, and its logits are freed before the next chunk
(the idea of Liger-Kernel's fused linear cross-entropy). Backward then only scales the stored gradients. On
a CPU it also saves time: the plain loss's log-softmax, its backward and the zero-filled gradient it scatters
into were 8-10% of the training step of BENCHMARKS.md's small Llama.

It is used in eager float32 and bf16 (a bf16 model, or bf16 autocast: products in bf16, the loss, its
softmax and the weight gradient's sum in float32, as autocast computes the plain loss). In fp16, whose
unscaled chunk gradients could underflow before the loss scale reaches them, and under torch.compile, which
fuses the plain loss itself (and would recompile for every new number of chunks), the loss is the plain one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logits per chunk (elements): small enough to stay near a CPU's cache, large enough that a GPU's products stay
# efficient. At least MIN_ROWS rows, since every chunk also reads and writes the whole weight gradient.
CHUNK_ELEMENTS = {"cpu": 2**22}
DEFAULT_CHUNK_ELEMENTS = 2**26
MIN_ROWS = 512


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """`F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=-100)` (the mean over
    targets that are not -100) without holding all the logits: `hidden` [N, C], `weight` [V, C], `targets`
    [N]. In fp16 (a model or autocast) and when compiling it is the plain loss."""
    device = hidden.device.type
    if (hidden.dtype == torch.float16 or torch.compiler.is_compiling() or torch.is_autocast_enabled(device)
            and torch.get_autocast_dtype(device) != torch.bfloat16):
        return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=-100)
    rows = chunk_rows or max(MIN_ROWS, CHUNK_ELEMENTS.get(device, DEFAULT_CHUNK_ELEMENTS) // weight.shape[0])
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not wants_grad:
        n = (targets != -100).sum()
        total = sum(F.cross_entropy(F.linear(h, weight, bias).float(), t, ignore_index=-100, reduction="sum")
                    for h, t in zip(hidden.split(rows), targets.split(rows)))
        return total / n
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, the gradients it will return; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows):
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        # The products' dtype: autocast's bf16, else the hidden states'. Cast once, not per chunk.
        dtype = torch.bfloat16 if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        valid = targets != -100
        n = valid.sum()
        n_or_1 = n.clamp(min=1)  # no target at all: zero gradients, as the plain loss's
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        grad_b = hidden.new_zeros(weight.shape[0], dtype=torch.float32) if want_b else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows]
            # d loss / d logits is (softmax - one_hot) / n on valid rows and 0 on ignored ones: the mask and 1/n
            # scale the small [rows, C] factors of the products, not the [rows, V] logits.
            scale = (valid[start:start + rows] / n_or_1).unsqueeze(1)
            t = targets[start:start + rows].clamp(min=0).unsqueeze(1)  # ignored rows pick class 0, weight 0
            logits = F.linear(h.to(dtype), w, b).float()
            log_probs = torch.log_softmax(logits, dim=-1, out=logits)  # in place: one [rows, V] buffer a chunk
            total -= (log_probs.gather(1, t) * scale).sum()
            probs = log_probs.exp_()
            probs.scatter_add_(1, t, torch.full_like(t, -1, dtype=probs.dtype))
            if want_b:
                grad_b += scale.squeeze(1) @ probs
            probs = probs.to(dtype)
            if want_h:
                grad_h[start:start + rows] = F.linear(probs, w.t()) * scale
            if want_w:  # summed in float32: in the product itself (addmm_), or a bf16 product added
                h_scaled = (h * scale).to(dtype)
                if dtype == torch.float32:
                    grad_w.addmm_(probs.t(), h_scaled)
                else:
                    grad_w += torch.mm(probs.t(), h_scaled)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.wanted = (want_h, want_w, want_b)
        ctx.weight_dtype = weight.dtype
        return total / n.clamp(max=1)  # the plain mean's NaN when no target counts (0 / 0), else total

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradients are constants here: no second order
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        grad_h, grad_w, grad_b = (next(saved) if wanted else None for wanted in ctx.wanted)

        def scaled(grad):
            return None if grad is None else (grad * grad_loss).to(ctx.weight_dtype)
        return (grad_h * grad_loss if grad_h is not None else None,
                scaled(grad_w), scaled(grad_b), None, None)
