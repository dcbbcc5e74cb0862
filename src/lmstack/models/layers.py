"""Norms, feed-forward blocks and the sparse mixture of experts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig
from lmstack.quantize import QuantizedLinear


class RMSNorm(nn.Module):
    """Root-mean-square norm (no mean subtraction, no bias). Computed in float32, as Llama does."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias != "none")


class MLP(nn.Module):
    """Position-wise feed-forward: `down(act(up(x)))`, or gated `down(act(gate(x)) * up(x))` for SwiGLU/GeGLU."""

    def __init__(self, config: ModelConfig, bias: bool | None = None) -> None:
        super().__init__()
        bias = config.bias == "all" if bias is None else bias
        self.gated = config.mlp in ("swiglu", "geglu")
        self.act = config.mlp
        self.gelu_approximate = config.gelu_approximate
        if self.gated:
            self.gate = nn.Linear(config.n_embd, config.intermediate_size, bias=bias)
        self.up = nn.Linear(config.n_embd, config.intermediate_size, bias=bias)
        self.down = nn.Linear(config.intermediate_size, config.n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.hidden(self.gate(x) if self.gated else None, self.up(x)))

    def hidden(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        """The activation between the projections, from the gate's output (None when ungated) and up's."""
        if self.act == "swiglu":
            return F.silu(gate) * up
        if self.act == "geglu":
            return F.gelu(gate, approximate=self.gelu_approximate) * up
        return F.gelu(up, approximate=self.gelu_approximate)


class MoE(nn.Module):
    """Sparse mixture of experts with top-k routing (Mixtral).

    Each token goes to its `k` highest-scoring experts; their outputs are mixed with the router's softmax
    weights (renormalised over the chosen k when `moe_renormalize`). Returns the output and the router
    logits, from which the model computes the load-balancing loss.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.n_expert_per_token
        self.renormalize = config.moe_renormalize
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList(MLP(config, bias=False) for _ in range(config.n_expert))
        self.static = False  # compiled inference mixes with static shapes: see `static_routing`
        self.stacked: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None  # see stack_experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, C]
        router_logits = self.router(x)  # [N, E]
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        if self.static and not self.training and torch.compiler.is_compiling():
            return self._mix_static(x, chosen, weights).reshape(shape), router_logits
        out = torch.zeros_like(x)
        # Loop over experts, not tokens: each expert runs once on the tokens routed to it.
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(chosen == e)
            if token_idx.numel() == 0:
                continue
            y = expert(x[token_idx]) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y)
        return out.reshape(shape), router_logits

    def _mix_static(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same mixture with no data-dependent shapes, for compiled decoding: the loop above picks each
        expert's tokens with `torch.where`, which waits on the host and splits a compiled decode step into
        pieces (no CUDA graph). Here every expert runs on every token, weighted zero where it was not chosen:
        each expert's weights are read once per step, as the loop reads them once a batch routes to all (the
        arithmetic is n_expert / top_k times the loop's, which a memory-bound decode step does not notice but
        a long prefill would: hence decoding only).
        A step that routes to fewer experts than there are (batch 1) gathers just the chosen experts' weights
        instead, when `stack_experts` has stacked them."""
        if self.stacked is not None and chosen.numel() < len(self.experts):
            return self._mix_gathered(x, chosen, weights)
        dense = x.new_zeros(x.shape[0], len(self.experts)).scatter(1, chosen, weights)  # [N, E]
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            w = dense[:, e, None]
            # where, not a product alone: an expert not chosen may overflow (fp16), and inf * 0 is NaN
            out = out + torch.where(w != 0, expert(x) * w, 0)
        return out

    def _mix_gathered(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each token through its k chosen experts, their weights gathered from the stacked tensors (gpt-fast's
        Mixtral form): a decode step reads k experts per token, not all of them."""
        def project(name: str, h: torch.Tensor) -> torch.Tensor:  # h [N, k, in] -> [N, k, out]
            w, scale = self.stacked[name]
            dtype = w.dtype if scale is None else scale.dtype  # int8 codes are converted as they are read
            y = torch.einsum("nki,nkoi->nko", h.to(dtype), w[chosen].to(dtype))
            return (y if scale is None else y * scale[chosen]).to(h.dtype)

        xk = x[:, None].expand(-1, self.top_k, -1)  # [N, k, C]
        mlp = self.experts[0]
        h = mlp.hidden(project("gate", xk) if mlp.gated else None, project("up", xk))
        return torch.einsum("nkc,nk->nc", project("down", h), weights)

    def stack_experts(self) -> None:
        """Hold each projection's expert weights in one [E, out, in] tensor, the experts' own weights becoming
        views of it (no second copy), for compiled decoding to gather from. For float and int8 experts;
        others (int4, NF4, LoRA-wrapped) keep to reading every expert. `stacked_current` tells whether a
        later change to the model (moved, cast, quantized) has replaced the views."""
        self.stacked = None
        plan = {}
        for name in ("gate", "up", "down") if self.experts[0].gated else ("up", "down"):
            layers = [getattr(e, name) for e in self.experts]
            if all(type(m) is nn.Linear and m.bias is None for m in layers):
                plan[name] = layers, ("weight",)
            elif all(type(m) is QuantizedLinear and m.bits == 8 and m.bias is None for m in layers):
                plan[name] = layers, ("qweight", "scale")
            else:
                return
        stacked = {}
        # Out of inference mode (a generation may run in it): the weights must stay trainable tensors.
        with torch.inference_mode(False), torch.no_grad():
            for name, (layers, attrs) in plan.items():
                tensors = []
                for attr in attrs:
                    full = torch.stack([getattr(m, attr).detach() for m in layers])
                    for m, view in zip(layers, full):
                        old = getattr(m, attr)
                        if isinstance(old, nn.Parameter):
                            old.data = view  # the same Parameter: an optimizer or a DDP wrapper still holds it
                        else:
                            setattr(m, attr, view)
                    tensors.append(full)
                stacked[name] = (tensors[0], tensors[1] if len(tensors) > 1 else None)
        self.stacked = stacked

    def forget_stacked(self) -> None:
        """Drop the stacked tensors (the experts keep their weights): the model is changing under them."""
        self.stacked = None

    def stacked_current(self) -> bool:
        """Whether every expert's weights (and int8 scales) are still views of `stacked`: a layer replaced
        (quantized) or a weight reassigned holds other memory. False when never stacked."""
        if self.stacked is None:
            return False
        for name, (weights, scales) in self.stacked.items():
            attrs = ("weight",) if scales is None else ("qweight", "scale")
            for e, expert in enumerate(self.experts):
                layer = getattr(expert, name)
                for attr, full in zip(attrs, (weights, scales)):
                    t = getattr(layer, attr, None)
                    if not isinstance(t, torch.Tensor) or t.data_ptr() != full[e].data_ptr():
                        return False
        return True

    def _apply(self, fn, recurse: bool = True):
        # Moved or cast (.to, .half, .cuda): the stacked tensors would hold the old weights' memory.
        self.forget_stacked()
        return super()._apply(fn, recurse)


@contextmanager
def static_routing(model: nn.Module) -> Iterator[None]:
    """Inside the block, every mixture of experts in `model` mixes with static shapes when compiled (one graph;
    a CUDA graph on a GPU), from stacked expert weights where it can (stacked again where a change to the model
    has replaced them). The compiled decode step runs in it; eager passes, and compiled training or
    evaluation outside it, keep the routing loop."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    before = [m.static for m in moes]
    for m in moes:
        if not m.stacked_current():
            m.stack_experts()
        m.static = True
    try:
        yield
    finally:
        for m, static in zip(moes, before):
            m.static = static


def load_balancing_loss(router_logits: list[torch.Tensor], n_expert: int, top_k: int,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer auxiliary loss, pooled over all MoE layers as Mixtral computes it.

    `n_expert * sum_e f_e * P_e`, where f_e is the fraction of routing slots sent to expert e (per top-k
    slot) and P_e the mean router probability of e. Perfectly uniform routing gives `top_k`, its minimum.
    `token_mask` ([B, T] or [N], True for real tokens) leaves padding out, as `transformers` does with the
    attention mask.
    """
    logits = torch.cat(router_logits, dim=0)  # [layers * N, E]
    probs = F.softmax(logits, dim=-1, dtype=torch.float)
    _, chosen = torch.topk(probs, top_k, dim=-1)
    expert_mask = F.one_hot(chosen, n_expert).float()  # [M, k, E]
    if token_mask is None:
        weight = torch.full((logits.shape[0],), 1.0 / logits.shape[0], device=logits.device)
    else:
        weight = token_mask.reshape(-1).float().repeat(len(router_logits))
        weight = weight / weight.sum().clamp(min=1.0)
    tokens_per_expert = torch.einsum("m,mke->ke", weight, expert_mask)  # [k, E]
    prob_per_expert = weight @ probs  # [E]
    return n_expert * (tokens_per_expert * prob_per_expert).sum()
