"""Causal self-attention: rotary positions, grouped-query heads, sliding windows and a static KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig

# ---------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(config: ModelConfig, seq_len: int | torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary embedding and the factor that scales cos/sin (YaRN only).

    Follows the scaling schemes as Hugging Face defines them: linear (position interpolation), dynamic NTK
    (the base grows once `seq_len` passes `block_size`; a tensor `seq_len` keeps the computation on its
    device, with no host sync), Llama 3 (per-band wavelength rescaling) and YaRN (blend of interpolation and
    extrapolation plus an attention temperature).
    """
    dim, base = config.rotary_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind, rs = config.rope_type, config.rope_scaling or {}
    if kind == "linear":
        return inv_freq / rs["factor"], 1.0
    if kind == "dynamic":
        # As transformers' _compute_dynamic_ntk_parameters: relative to max_position_embeddings (block_size),
        # ignoring any original_max_position_embeddings in rope_scaling.
        trained = config.block_size
        seq_len = torch.as_tensor(trained if seq_len is None else seq_len, dtype=torch.float64).clamp(min=trained)
        base = base * ((rs["factor"] * seq_len / trained) - (rs["factor"] - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=seq_len.device).float() / dim
        return (1.0 / (base ** exponents.double())).float(), 1.0
    if kind == "llama3":
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are interpolated, short ones kept, the band between blended.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(config, dim, base, rs)
    return inv_freq, 1.0


def _yarn_inv_freq(config: ModelConfig, dim: int, base: float, rs: dict) -> tuple[torch.Tensor, float]:
    trained = rs.get("original_max_position_embeddings") or config.block_size
    factor = rs.get("factor") or config.block_size / trained

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attention_factor = mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over `trained`
        return dim * math.log(trained / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.get("beta_fast") or 32), correction_dim(rs.get("beta_slow") or 1)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp  # 1 where the dimension keeps its original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for `positions` ([B, T] or [T]), shaped [..., T, rotary_dim], in float32 then `dtype`."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)  # split-halves pairing, as Hugging Face checkpoints expect
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `rotary_dim` channels of each head of x [B, H, T, D]; the rest pass through."""
    if cos.dim() == 3:  # per-sequence positions [B, T, D]: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


# ---------------------------------------------------------------------------------------------- masks


def attention_mask(
    query_pos: torch.Tensor,
    n_keys: int,
    sliding_window: int | None = None,
    key_padding: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask (True = attend) of queries at slots `query_pos` [T] over key slots 0..n_keys-1.

    Causal, optionally limited to the last `sliding_window` keys (the query itself included), optionally
    hiding padded key slots (`key_padding` [B, n_keys], True for real tokens), and optionally confined to
    the query's own document in a packed row (`document_ids` [B, T], no cache). Shape [T, S] or [B, 1, T, S].
    """
    keys = torch.arange(n_keys, device=query_pos.device)
    mask = keys[None, :] <= query_pos[:, None]
    if sliding_window is not None:
        mask = mask & (query_pos[:, None] - keys[None, :] < sliding_window)
    if document_ids is not None:
        mask = mask[None, None] & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    if key_padding is not None:
        mask = (mask if mask.dim() == 4 else mask[None, None]) & key_padding[:, None, None, :].bool()
        # A padding query sees nothing; let it see everything rather than produce NaNs (its output is unused).
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


# ---------------------------------------------------------------------------------------------- attention


class KVCache(nn.Module):
    """Preallocated keys and values for every slot up to `max_seq_len`, written in place at `input_pos`."""

    def __init__(
        self, batch_size: int, max_seq_len: int, n_kv_head: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # A batch smaller than the cache uses its first rows.
        k_cache, v_cache = self.k[: k.shape[0]], self.v[: v.shape[0]]
        k_cache.index_copy_(2, input_pos, k.to(k_cache.dtype))
        v_cache.index_copy_(2, input_pos, v.to(v_cache.dtype))
        return k_cache, v_cache


class Attention(nn.Module):
    """Multi-head attention with `n_kv_head` key/value heads shared by groups of query heads (GQA/MQA)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_bias = config.bias in ("all", "qkv")
        self.q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=qkv_bias)
        self.k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.o = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias == "all")
        self.dropout = config.dropout
        # A module slot from the start, so allocating the cache later does not change what a compiled
        # training forward guards on (that would recompile it after sampling at eval time).
        self.kv_cache: KVCache | None
        self.register_module("kv_cache", None)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            if mask is not None and mask.shape[-1] < k.shape[2]:  # only the slots in use
                k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
        y = grouped_query_attention(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                            dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA of q [B, H, T, D] over k, v [B, KV, S, D] (H a multiple of KV), causal when `mask` is None.

    Without a mask, SDPA shares each key/value head across its group of queries itself (`enable_gqa`). With
    one, the group is folded into the query length instead ([B, KV, g * T, D], the mask repeated g times):
    on CUDA, SDPA runs `enable_gqa` only in its flash kernel, which takes no mask, and a masked call would
    fall back to the math kernel (K/V copied for every head, computed in float32). The fold copies no K/V;
    on the CPU it is as fast or faster too (2x at 32 rows, or in bf16), bar a few us at one float32 row."""
    B, H, T, D = q.shape
    KV = k.shape[1]
    if mask is None or H == KV:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p,
                                              enable_gqa=H != KV)
    g, S = H // KV, k.shape[2]
    batch = mask.shape[:-2]  # () for a [T, S] mask, (B or 1, 1) for [B, 1, T, S]
    folded = mask[..., None, :, :].expand(*batch, g, T, S).reshape(*batch, g * T, S)
    y = F.scaled_dot_product_attention(q.reshape(B, KV, g * T, D), k, v, attn_mask=folded, dropout_p=dropout_p)
    return y.view(B, H, T, D)
