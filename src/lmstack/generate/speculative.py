"""Speculative decoding: a cheap drafter proposes k tokens, the target model checks them in one forward pass.

Each drafted token d is kept with probability min(1, p(d) / q(d)), p being the target's and q the drafter's
(processed) distribution; at the first rejection a token is drawn from the residual max(0, p - q), renormalised,
and the round ends; if all k are kept, one more token comes from p. The output is distributed exactly as
sampling from the target alone (Leviathan et al., 2023; Chen et al., 2023), and greedy output is identical to
the target's greedy output. Drafters: a smaller model sharing the tokenizer, or prompt lookup (the tokens that
followed the last occurrence of the current n-gram in the prompt and output so far; q is one-hot).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.errors import LMStackError
from lmstack.generate.engine import Completion, tokens_spelling
from lmstack.generate.sampling import (
    SamplingParams,
    fitted_prompt,
    positive_int,
    process_logits,
    prompt_token_ids,
    sampling_params,
    stop_token_set,
)
from lmstack.models.decoder import DecoderLM
from lmstack.onednn import PackedLinears
from lmstack.tokenizer import Tokenizer


@dataclass
class SpeculativeStats:
    proposed: int = 0
    accepted: int = 0
    target_passes: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, token: int, greedy: bool,
                       generator: torch.Generator | None = None) -> tuple[bool, int]:
    """Check one drafted `token` against target probabilities `p` and draft probabilities `q` ([V] each).

    Returns (accepted, token to emit): the drafted token, or on rejection a draw from the residual."""
    if greedy:
        best = int(p.argmax())
        return best == token, best
    ratio = p[token] / q[token].clamp_min(1e-20)
    if torch.rand((), generator=generator, device=p.device) < ratio:
        return True, token
    residual = (p - q).clamp_min(0)
    if residual.sum() <= 0:  # p == q up to rounding: any draw from p is right
        residual = p
    return False, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))


def prompt_lookup(tokens: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest trailing n-gram."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                follow = tokens[start + n:start + n + k]
                if follow:
                    return follow
    return []


def _probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    return process_logits(logits, params).softmax(dim=-1)


@torch.no_grad()
def speculative_generate(
    target: DecoderLM, tokenizer: Tokenizer, prompt: str | list[int], draft: DecoderLM | str = "prompt_lookup",
    k: int = 4, params: SamplingParams | None = None, **overrides,
) -> tuple[Completion, SpeculativeStats]:
    """Generate one completion with speculative decoding; `draft` is a model or "prompt_lookup"."""
    params = sampling_params(params, overrides)
    if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty \
            or params.no_repeat_ngram_size or params.constraint or params.n != 1 or params.logprobs is not None:
        raise LMStackError("speculative decoding supports temperature, top-k, top-p, min-p, typical-p, stop "
                           "conditions and logit bias, with n=1 and no logprobs")
    k = positive_int("k", k, "the tokens drafted per target pass ")
    lookup = isinstance(draft, str)
    if lookup and draft != "prompt_lookup":
        raise LMStackError(f"draft {draft!r}: a DecoderLM or 'prompt_lookup'")
    device, block = target.embed.weight.device, target.config.context_length
    if not lookup and draft.config.vocab_size != target.config.vocab_size:
        raise LMStackError(f"the draft's vocabulary ({draft.config.vocab_size}) differs from the target's "
                           f"({target.config.vocab_size})")
    if not lookup and draft.embed.weight.device != device:
        raise LMStackError(f"draft is on {draft.embed.weight.device} but the target is on {device}: load both "
                           "on the same device")
    stop_ids = stop_token_set(params, tokenizer, target.config)
    ids = prompt_token_ids(prompt, tokenizer, target.config.vocab_size)
    ids = fitted_prompt(ids, block, params.max_new_tokens, params.truncate_prompt)  # the engine's rule
    if params.max_new_tokens == 0:  # as the engine: nothing to generate
        return Completion("", [], "length", len(ids)), SpeculativeStats()
    # Proposals never run past max_new_tokens or the context (`room` below), so this many slots suffice.
    total = min(len(ids) + params.max_new_tokens, block)
    if not lookup and draft.config.context_length < total:  # the draft holds the same tokens as the target
        raise LMStackError(f"draft: its context of {draft.config.context_length} is smaller than the {total} "
                           f"tokens this call needs (prompt and max_new_tokens); lower max_new_tokens "
                           "or use a draft with a longer context")
    g = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    models = [target] if lookup else [target, draft]
    for m in models:
        m.eval().setup_kv_cache(1, total, device=device)
    packed = {id(m): PackedLinears(m, enabled=None if device.type == "cpu" else False) for m in models}
    stats = SpeculativeStats()
    tokens = list(ids)
    try:
        # Prefill: the target holds every token but the last; so does the draft.
        def run(model: DecoderLM, new: list[int], start: int, last_only: bool = False) -> torch.Tensor:
            x = torch.tensor([new], device=device)
            with packed[id(model)].swapped_in():
                return model(x, input_pos=torch.arange(start, start + len(new), device=device),
                             kv_len=start + len(new), last_only=last_only)[0]

        if len(tokens) > 1:  # (no output head over the prompt: only its cache entries are wanted)
            for m in models:
                run(m, tokens[:-1], 0, last_only=True)
        draft_len = len(tokens) - 1
        generated: list[int] = []
        finish, stop_token_id = None, None
        while finish is None:
            cur = len(tokens)
            room = min(k, params.max_new_tokens - len(generated) - 1, total - cur - 1)
            proposals, q_rows = [], []
            if room > 0:
                if lookup:
                    proposals = prompt_lookup(tokens, room)
                else:
                    logits = run(draft, tokens[draft_len:], draft_len, last_only=True)[-1]
                    draft_len = cur
                    for i in range(room):
                        q = _probs(logits[None], params)[0]
                        d = int(q.argmax()) if params.greedy else int(torch.multinomial(q, 1, generator=g))
                        proposals.append(d)
                        q_rows.append(q)
                        if i < room - 1:
                            logits = run(draft, [d], draft_len, last_only=True)[-1]
                            draft_len += 1
            # One target pass scores the last token and every proposal.
            logits = run(target, [tokens[-1], *proposals], cur - 1)
            stats.target_passes += 1
            stats.proposed += len(proposals)
            new: list[int] = []
            for i, d in enumerate(proposals):
                p = _probs(logits[i][None], params)[0]
                q = q_rows[i] if q_rows else torch.nn.functional.one_hot(torch.tensor(d), p.numel()).to(p)
                ok, token = accept_or_resample(p, q, d, params.greedy, g)
                new.append(token)
                if not ok:
                    break
                stats.accepted += 1
            else:  # every proposal kept: the target's next distribution gives one more token for free
                p = _probs(logits[len(proposals)][None], params)[0]
                new.append(int(p.argmax()) if params.greedy else int(torch.multinomial(p, 1, generator=g)))
            for token in new:
                if token in stop_ids:
                    finish, stop_token_id = "stop", token
                    break
                tokens.append(token)
                generated.append(token)
                if params.stop and any(s in tokenizer.decode(generated) for s in params.stop):
                    finish = "stop"
                    break
                if len(generated) >= params.max_new_tokens or len(tokens) >= total:  # the context is full
                    finish = "length"
                    break
            draft_len = min(draft_len, len(tokens) - 1)  # draft entries past a rejection are rewritten
    finally:
        for m in models:
            m.clear_kv_cache()
    text = tokenizer.decode(generated)
    cuts = [text.find(s) for s in params.stop if s in text]
    if cuts:
        text = text[:min(cuts)]
    # As the engine: a text cut at a stop string keeps only the tokens that spell it.
    return Completion(text, tokens_spelling(tokenizer, generated, text), finish, len(ids),
                      stop_token_id=stop_token_id), stats
