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
# efficient. At least MIN_ROWS rows, since every chunk also reads and writes the whole weight gradient, and a
# multiple of 128 (whole tiles of a GPU's matrix product). On a GPU that weight-gradient traffic sets the size:
# Llama 3's 128k x 2048 head adds a 0.5 GB product into a 1 GB float32 sum per chunk, so 2**28 logits (2,048
# rows, 1 GB in float32) make 4 chunks of 8,192 tokens where 2**26 made 16 (~30 GB less memory traffic a step).
CHUNK_ELEMENTS = {"cpu": 2**22}
DEFAULT_CHUNK_ELEMENTS = 2**28
MIN_ROWS = 512


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """`F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=-100)` (the mean over
    targets that are not -100) without holding all the logits: `hidden` [N, C], `weight` [V, C], `targets`
    [N]. In fp16 (a model or autocast) and when compiling it is the plain loss."""
    rows, wants_grad = _plan(hidden, weight, bias, chunk_rows)
    if rows is None:
        return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=-100)
    if not wants_grad:
        n = (targets != -100).sum()
        total = sum(F.cross_entropy(F.linear(h, weight, bias).float(), t, ignore_index=-100, reduction="sum")
                    for h, t in zip(hidden.split(rows), targets.split(rows)))
        return total / n
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, temperature: float = 1.0,
                          chunk_rows: int | None = None) -> torch.Tensor:
    """`log_softmax(F.linear(hidden, weight, bias).float() / temperature)` at each target [N] (0 where the
    target is -100), what preference training scores sequences by, without holding all the logits. Its
    upstream gradient is per token, so backward recomputes each chunk's logits (one more product than the
    plain way). Without a gradient (a reference model) the chunks are scored and freed one by one. fp16 and
    compiled runs get the plain computation."""
    rows, wants_grad = _plan(hidden, weight, bias, chunk_rows)
    if rows is None:
        rows = hidden.shape[0] or 1  # the plain computation: one chunk
    elif wants_grad:
        return _LinearTokenLogprobs.apply(hidden, weight, bias, targets, float(temperature), rows)
    picked = []
    for h, t in zip(hidden.split(rows), targets.split(rows)):
        z = F.linear(h, weight, bias).float()
        log_p = (z / temperature if temperature != 1.0 else z).log_softmax(dim=-1)
        picked.append(log_p.gather(-1, t.clamp(min=0)[:, None]).squeeze(-1) * (t != -100))
    return torch.cat(picked)


def _plan(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
          chunk_rows: int | None) -> tuple[int | None, bool]:
    """(rows per chunk, or None where the plain computation runs: fp16, non-bf16 autocast, compiling; whether
    a gradient is wanted)."""
    device = hidden.device.type
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if (hidden.dtype == torch.float16 or torch.compiler.is_compiling()
            or torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != torch.bfloat16):
        return None, wants_grad
    budget = CHUNK_ELEMENTS.get(device, DEFAULT_CHUNK_ELEMENTS)
    return chunk_rows or max(MIN_ROWS, budget // weight.shape[0] // 128 * 128), wants_grad


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The products' dtype: autocast's bf16 (the only autocast these functions take), else the hidden states'."""
    return torch.bfloat16 if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype


def _add_chunk_grads(grad_logits: torch.Tensor, scale: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
                     start: int, grads: tuple) -> None:
    """Add one chunk's share to (grad_h, grad_w, grad_b) (None where not wanted), given the gradient of the
    chunk's logits as `grad_logits * scale`: the [rows, V] float32 part and a [rows, 1] factor applied to the
    small [rows, C] sides of the products instead. The weight gradient sums in float32: inside the product
    (addmm_) in float32, a bf16 product added otherwise."""
    grad_h, grad_w, grad_b = grads
    if grad_b is not None:
        grad_b += scale.squeeze(1) @ grad_logits
    g = grad_logits.to(w.dtype)
    if grad_h is not None:
        grad_h[start:start + len(h)] = F.linear(g, w.t()) * scale
    if grad_w is not None:
        h_scaled = (h * scale).to(w.dtype)
        if w.dtype == torch.float32:
            grad_w.addmm_(g.t(), h_scaled)
        else:
            grad_w += torch.mm(g.t(), h_scaled)


def _grad_buffers(hidden, weight, wanted) -> tuple:
    want_h, want_w, want_b = wanted
    return (torch.empty_like(hidden) if want_h else None,
            torch.zeros_like(weight, dtype=torch.float32) if want_w else None,
            hidden.new_zeros(weight.shape[0], dtype=torch.float32) if want_b else None)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, the gradients it will return; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows):
        dtype = _compute_dtype(hidden)
        w = weight.to(dtype)  # cast once, not per chunk
        b = bias.to(dtype) if bias is not None else None
        valid = targets != -100
        n = valid.sum()
        n_or_1 = n.clamp(min=1)  # no target at all: zero gradients, as the plain loss's
        grads = _grad_buffers(hidden, weight, ctx.needs_input_grad[:3])
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows]
            # d loss / d logits is (softmax - one_hot) / n on valid rows and 0 on ignored ones
            scale = (valid[start:start + rows] / n_or_1).unsqueeze(1)
            t = targets[start:start + rows].clamp(min=0).unsqueeze(1)  # ignored rows pick class 0, weight 0
            logits = F.linear(h.to(dtype), w, b).float()
            log_probs = torch.log_softmax(logits, dim=-1, out=logits)  # in place: one [rows, V] buffer a chunk
            total -= (log_probs.gather(1, t) * scale).sum()
            probs = log_probs.exp_()
            probs.scatter_add_(1, t, torch.full_like(t, -1, dtype=probs.dtype))
            _add_chunk_grads(probs, scale, h, w, start, grads)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.wanted = [g is not None for g in grads]
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


class _LinearTokenLogprobs(torch.autograd.Function):
    """Forward keeps each row's log-normaliser; backward recomputes the chunks' logits from it."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, rows):
        dtype = _compute_dtype(hidden)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        picked = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = torch.empty_like(picked)
        for start in range(0, hidden.shape[0], rows):
            t = targets[start:start + rows].clamp(min=0).unsqueeze(1)
            z = F.linear(hidden[start:start + rows].to(dtype), w, b).float().div_(temperature)
            z_t = z.gather(1, t).squeeze(1)
            log_p_t = torch.log_softmax(z, dim=-1, out=z).gather(1, t).squeeze(1)
            picked[start:start + rows], lse[start:start + rows] = log_p_t, z_t - log_p_t
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.rows, ctx.dtype = temperature, rows, dtype
        return picked * (targets != -100)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        b = bias.to(ctx.dtype) if bias is not None else None
        # d log p_t / d logits = (one_hot - softmax) / temperature, times the token's upstream gradient
        factor = (grad_out * (targets != -100) / ctx.temperature).float()
        grads = _grad_buffers(hidden, weight, ctx.needs_input_grad[:3])
        for start in range(0, hidden.shape[0], ctx.rows):
            h = hidden[start:start + ctx.rows]
            t = targets[start:start + ctx.rows].clamp(min=0).unsqueeze(1)
            z = F.linear(h.to(ctx.dtype), w, b).float().div_(ctx.temperature)
            grad_logits = z.sub_(lse[start:start + ctx.rows, None]).exp_().neg_()  # -softmax, in place
            grad_logits.scatter_add_(1, t, torch.ones_like(t, dtype=grad_logits.dtype))
            _add_chunk_grads(grad_logits, factor[start:start + ctx.rows, None], h, w, start, grads)
        grad_h, grad_w, grad_b = grads
        return (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(weight.dtype) if grad_b is not None else None, None, None, None)
