"""Recurrent language models: Elman RNN, LSTM and GRU, for the same data, loop and checkpoints as `DecoderLM`.

embedding -> `n_layer` recurrent layers of width `n_embd` (dropout between them) -> output layer. The Elman
layer is written out (h_t = tanh(W x_t + U h_{t-1} + b)), so it reads as the textbook does; LSTM and GRU use
PyTorch's fused layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig
from lmstack.models.loss import linear_cross_entropy

State = list[torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None]


class ElmanLayer(nn.Module):
    """h_t = tanh(W x_t + U h_{t-1} + b)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.W = nn.Linear(dim, dim, bias=False)
        self.U = nn.Linear(dim, dim, bias=False)
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        h = x.new_zeros(B, C) if h is None else h
        inputs = self.W(x) + self.b  # the input half of every step at once
        outputs = []
        for t in range(T):
            h = torch.tanh(inputs[:, t] + self.U(h))
            outputs.append(h)
        return torch.stack(outputs, dim=1), h


class RNNLM(nn.Module):
    """A recurrent language model; `config.arch` is "rnn", "lstm" or "gru"."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        C = config.n_embd
        self.embed = nn.Embedding(config.vocab_size, C)
        if config.arch == "rnn":
            self.layers = nn.ModuleList(ElmanLayer(C) for _ in range(config.n_layer))
        else:
            kind = nn.LSTM if config.arch == "lstm" else nn.GRU
            self.layers = nn.ModuleList(kind(C, C, batch_first=True) for _ in range(config.n_layer))
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=config.lm_head_bias)
        self.activation_checkpointing = False  # accepted for the training loop's sake; nothing to checkpoint
        self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LSTM, nn.GRU)):  # PyTorch's uniform(+-1/sqrt(h)) default
            for p in module.parameters():
                nn.init.uniform_(p, -1 / math.sqrt(self.config.n_embd), 1 / math.sqrt(self.config.n_embd))

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Nothing to rebuild (the same interface as `DecoderLM`)."""

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                state: State | None = None, return_state: bool = False, return_logits: bool = True):
        """Logits [B, T, V] (and the loss with targets); `state` carries the recurrence across calls.
        `return_logits=False` returns `(None, loss)` by `linear_cross_entropy`, as `DecoderLM` does."""
        x = self.drop(self.embed(input_ids))
        state = state or [None] * len(self.layers)
        new_state: State = []
        for layer, s in zip(self.layers, state):
            x, s = layer(x, s)
            new_state.append(s)
            x = self.drop(x)
        if targets is not None and not return_logits and type(self.lm_head) is nn.Linear:
            out = (None, linear_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, self.lm_head.bias,
                                              targets.reshape(-1)))
        else:
            out = logits = self.lm_head(x)
            if targets is not None:
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                       ignore_index=-100)
                out = (logits, loss)
        if return_state:
            return out, new_state
        return out

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n
