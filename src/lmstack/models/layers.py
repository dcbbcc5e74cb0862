"""Norms, feed-forward blocks and the sparse mixture of experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig


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
        if self.act == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        if self.act == "geglu":
            return self.down(F.gelu(self.gate(x), approximate=self.gelu_approximate) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate=self.gelu_approximate))


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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, C]
        router_logits = self.router(x)  # [N, E]
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        # Loop over experts, not tokens: each expert runs once on the tokens routed to it.
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(chosen == e)
            if token_idx.numel() == 0:
                continue
            y = expert(x[token_idx]) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y)
        return out.reshape(shape), router_logits


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
