"""The decoder-only Transformer: GPT-2, Llama, Mistral, Qwen2, Mixtral and Phi-3 from one `ModelConfig`.

Read top to bottom: a block is pre-norm attention plus a pre-norm MLP (or mixture of experts), each added to
the residual stream; the model is embeddings, a stack of blocks, a final norm and the output head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmstack.config import ModelConfig
from lmstack.models.attention import Attention, KVCache, attention_mask, rope_cos_sin, rope_inv_freq
from lmstack.models.layers import MLP, MoE, load_balancing_loss, make_norm
from lmstack.models.loss import linear_cross_entropy
from lmstack.onednn import checkpoint_contexts


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = MoE(config) if config.n_expert else MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        input_pos: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, mask, input_pos))
        h = self.mlp(self.mlp_norm(x))
        router_logits = None
        if isinstance(h, tuple):
            h, router_logits = h
        return x + self.dropout(h), router_logits


class DecoderLM(nn.Module):
    """A decoder-only language model.

    `model(input_ids)` returns logits [B, T, V]; `model(input_ids, targets)` returns `(logits, loss)`, the loss
    being cross-entropy over targets != -100 plus, for mixtures of experts in training mode, the
    load-balancing term (validation loss and perplexity stay cross-entropy).

    For generation with a preallocated cache, call `setup_kv_cache(...)` and pass `input_pos` (the cache
    slots of the tokens, [T]); `position_ids` ([B, T]) and `key_padding` ([B, S], True for real tokens) let
    each sequence of a left-padded batch have its own positions. `last_only` computes the logits of the
    last position only ([B, 1, V]), which is all a decoding step needs; `kv_len` limits attention to the
    cache slots in use. `document_ids` ([B, T]) marks the examples packed into each row: attention stays
    within an example (pass `position_ids` that restart with each one too). `return_hidden` returns the
    final-norm hidden states [B, T, C] instead of logits (for classification and reward heads).
    `token_mask` ([B, T], True for real tokens; default `key_padding`) keeps padding out of the router loss.
    With targets, `return_logits=False` returns `(None, loss)`, which training uses: in eager float32 the loss
    goes through the output head a chunk at a time, never holding all the logits (`linear_cross_entropy`).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":
            self.pos_embed = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        self.tie_weights()
        self.activation_checkpointing = False  # recompute each block in backward instead of storing it
        self.register_buffer("rope_inv_freq", torch.empty(0), persistent=False)
        self.rope_scale = 1.0
        self.init_buffers()
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream does not grow
        # with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def tie_weights(self) -> None:
        """Share the output head with the token embedding when the config says so (again after loading)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-learned buffers; call it after materialising a model built on the meta device."""
        device = torch.device(device or self.embed.weight.device)
        if self.config.positions != "rope":  # an empty placeholder, but on the model's device (not left on meta)
            self.rope_inv_freq = torch.empty(0, device=device)
            return
        inv_freq, self.rope_scale = rope_inv_freq(self.config)
        self.rope_inv_freq = inv_freq.to(device) if device.type != "meta" else torch.empty_like(inv_freq, device="meta")

    def _apply(self, fn, recurse: bool = True):
        # Casting the model (`.to(torch.bfloat16)`) would round the RoPE frequencies too, turning angles at
        # long positions by up to a third of a radian: recompute them in float32 instead.
        super()._apply(fn, recurse)
        if self.rope_inv_freq.is_floating_point() and self.rope_inv_freq.dtype != torch.float32:
            self.init_buffers()
        return self

    # ----------------------------------------------------------------------------------------- KV cache

    def setup_kv_cache(
        self, batch_size: int, max_seq_len: int | None = None,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> None:
        """Allocate a static KV cache in every attention layer."""
        max_seq_len = max_seq_len or self.config.block_size
        dtype = dtype or self.embed.weight.dtype
        device = device or self.embed.weight.device
        for block in self.layers:
            block.attn.kv_cache = KVCache(
                batch_size, max_seq_len, self.config.n_kv_head, self.config.head_dim, dtype, device
            )

    def reorder_kv_cache(self, rows: torch.Tensor) -> None:
        """Make cache row i a copy of row `rows[i]` (beam search continuing from its best beams)."""
        for block in self.layers:
            cache = block.attn.kv_cache
            n = len(rows)
            cache.k[:n] = cache.k.index_select(0, rows)
            cache.v[:n] = cache.v.index_select(0, rows)

    def clear_kv_cache(self) -> None:
        for block in self.layers:
            block.attn.kv_cache = None

    # ----------------------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        input_pos: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        key_padding: torch.Tensor | None = None,
        last_only: bool = False,
        kv_len: int | None = None,
        document_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
        token_mask: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor | None, torch.Tensor]:
        cfg = self.config
        B, T = input_ids.shape
        cache = self.layers[0].attn.kv_cache if input_pos is not None else None
        if position_ids is None:
            position_ids = input_pos if input_pos is not None else torch.arange(T, device=input_ids.device)
        # With a cache, attend over its first `kv_len` slots (all of it by default: static shapes for CUDA graphs).
        n_keys = (kv_len or cache.k.shape[2]) if cache is not None else T
        if cfg.context_length < T and cache is None:
            raise ValueError(f"a sequence of {T} tokens exceeds the context length ({cfg.context_length})")

        # Without a cache, padding or a window, SDPA's built-in causal mask is the fast path.
        mask = None
        if (cache is not None or cfg.sliding_window is not None or key_padding is not None
                or document_ids is not None):
            slots = input_pos if input_pos is not None else torch.arange(T, device=input_ids.device)
            padding = key_padding[:, :n_keys] if key_padding is not None else None
            mask = attention_mask(slots, n_keys, cfg.sliding_window, padding, document_ids)

        x = self.embed(input_ids)
        rope = None
        if cfg.positions == "learned":
            x = x + self.pos_embed(position_ids)
        else:
            if cfg.rope_type == "dynamic":  # the base grows with the longest position seen (on the device)
                inv_freq, _ = rope_inv_freq(cfg, seq_len=position_ids.max() + 1)
            else:
                inv_freq = self.rope_inv_freq
            rope = rope_cos_sin(position_ids, inv_freq, self.rope_scale, x.dtype)
        x = self.drop(x)

        router_logits = []
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                # Under torch.compile the recomputation is traced from the forward graph: no contexts needed.
                contexts = {} if torch.compiler.is_compiling() else {"context_fn": checkpoint_contexts}
                x, logits = checkpoint(block, x, rope, mask, input_pos, use_reentrant=False, **contexts)
            else:
                x, logits = block(x, rope, mask, input_pos)
            if logits is not None:
                router_logits.append(logits)
        if last_only:  # generation needs only the next-token distribution: skip the head on the prompt
            x = x[:, -1:]
        x = self.norm(x)
        if return_hidden:
            return x
        if targets is None:
            return self.lm_head(x)

        if return_logits or type(self.lm_head) is not nn.Linear:  # a quantized head keeps its own product
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        else:
            logits = None
            loss = linear_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, self.lm_head.bias,
                                        targets.reshape(-1))
        if router_logits and cfg.moe_aux_loss_coef and self.training:  # an objective term, not a score
            if token_mask is None and key_padding is not None and cache is None:
                token_mask = key_padding[:, :T]
            aux = load_balancing_loss(router_logits, cfg.n_expert, cfg.n_expert_per_token, token_mask)
            loss = loss + cfg.moe_aux_loss_coef * aux
        return logits, loss

    # ----------------------------------------------------------------------------------------- sizes

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); `non_embedding` leaves out token and position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
            if self.config.positions == "learned":
                n -= self.pos_embed.weight.numel()
        return n


def flops_per_token(config: ModelConfig, n_params: int, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6 N for the weights plus 12 L H D T for attention.

    The PaLM appendix B estimate that nanoGPT uses for MFU; `n_params` counts the weights of matrix products
    (`active_params`: no embedding lookups, the output head always, and for a mixture of experts only the
    active experts).
    """
    seq_len = seq_len or config.block_size
    if config.arch != "transformer":  # a recurrence costs its weights only
        return 6 * n_params
    return 6 * n_params + 12 * config.n_layer * config.n_head * config.head_dim * seq_len


def active_params(model: nn.Module) -> int:
    """Parameters a token multiplies with (the N of `flops_per_token`): all but the embedding lookups, the
    output head included also when it is tied to the token embedding (as nanoGPT counts); for MoE only
    `n_expert_per_token` of the experts."""
    cfg = model.config
    n = model.num_params(non_embedding=True)
    if cfg.tie_embeddings:  # the shared table is also the output head's weight
        n += model.embed.weight.numel()
    if cfg.n_expert and cfg.arch == "transformer":
        per_expert = sum(p.numel() for p in model.layers[0].mlp.experts[0].parameters())
        n -= cfg.n_layer * per_expert * (cfg.n_expert - cfg.n_expert_per_token)
    return n
