"""Token sampling and a simple cached decode loop (greedy, temperature, top-k)."""

from __future__ import annotations

import torch

from lmstack.models.decoder import DecoderLM


def sample_next_token(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from logits [B, V]: argmax at temperature 0, else a draw from softmax(logits / T)
    restricted to the `top_k` most likely tokens."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model: DecoderLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    stop_ids: set[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue one prompt: prefill it into a fresh static KV cache, then decode one token per step."""
    device = model.embed.weight.device
    total = min(len(prompt_ids) + max_new_tokens, model.config.block_size)
    prompt_ids = prompt_ids[-total:] if prompt_ids else [0]
    was_training = model.training
    model.eval()
    model.setup_kv_cache(batch_size=1, max_seq_len=total, device=device)
    try:
        logits = model(torch.tensor([prompt_ids], device=device),
                       input_pos=torch.arange(len(prompt_ids), device=device))
        out: list[int] = []
        for pos in range(len(prompt_ids), total):
            token = int(sample_next_token(logits[:, -1], temperature, top_k, generator))
            if stop_ids and token in stop_ids:
                break
            out.append(token)
            if pos == total - 1:
                break
            logits = model(torch.tensor([[token]], device=device), input_pos=torch.tensor([pos], device=device))
        return out
    finally:
        model.clear_kv_cache()
        model.train(was_training)
