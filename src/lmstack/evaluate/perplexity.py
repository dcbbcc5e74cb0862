"""Sliding-window perplexity and bits per byte of a text under a model.

As in the Hugging Face perplexity guide: windows of `max_length` input tokens advance by `stride`; each window
scores only the tokens the previous window did not, with the rest of the window as context. A window predicts
the token after its last input too, so with `stride == max_length` no token goes unscored (the guide's loop
skips the first token of every window but the first). Bits per byte divides the total negative log-likelihood
by the UTF-8 bytes of the text the scored tokens stand for, so models with different tokenizers compare.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmstack.errors import LMStackError
from lmstack.models.decoder import DecoderLM
from lmstack.onednn import onednn_linears
from lmstack.tokenizer import Tokenizer


@dataclass
class PerplexityResult:
    perplexity: float
    bits_per_byte: float
    nll_per_token: float  # nats
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the scored text
    word_perplexity: float  # exp(total NLL / whitespace-separated words): comparable across tokenizers

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


@torch.no_grad()
def perplexity(
    model: DecoderLM, tokenizer: Tokenizer, text: str, *, max_length: int | None = None, stride: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of `text`: exp(mean NLL) over every token after the first, with up to `max_length` tokens
    of context (default: the model's context) advanced `stride` tokens at a time (default: max_length / 2)."""
    max_length = model.config.block_size if max_length is None else max_length
    stride = max(1, max_length // 2) if stride is None else stride
    if max_length < 1:
        raise LMStackError(f"max_length must be at least 1, got {max_length}")
    if not 1 <= stride <= max_length:
        raise LMStackError(f"stride must be between 1 and max_length ({max_length}), got {stride}")
    if max_length > model.config.context_length:
        raise LMStackError(f"max_length {max_length} exceeds the model's context ({model.config.context_length})")
    ids, scored_text, n_bytes = scored_span(tokenizer, text)
    if len(ids) < 2:
        raise LMStackError("the text has fewer than two tokens; nothing to score")
    if max(ids) >= model.config.vocab_size:
        raise LMStackError(f"the tokenizer gives token id {max(ids)}, outside the model's vocabulary of "
                           f"{model.config.vocab_size}: is it the model's own tokenizer?")
    device = model.embed.weight.device
    model.eval()
    ids_t = torch.tensor(ids, device=device)
    # A window feeds ids[begin:end] and predicts ids[begin + 1:end + 1]; `last` is the last input position.
    last = len(ids) - 1
    total_nll, scored, prev_end = 0.0, 0, 0
    starts = range(0, last, stride)
    for begin in tqdm(starts, disable=not progress, desc="perplexity", unit="window"):
        end = min(begin + max_length, last)
        with onednn_linears():  # float32 on the CPU: oneDNN's matmul (lmstack.onednn)
            logits = model(ids_t[None, begin:end])[0].float()
        targets = ids_t[begin + 1:end + 1].clone()
        fresh = end - max(prev_end, begin)  # tokens not scored by an earlier window
        targets[: len(targets) - fresh] = -100
        total_nll += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
        scored += fresh
        prev_end = end
        if end == last:
            break
    n_words = max(1, len(scored_text.split()))
    nll = total_nll / scored
    return PerplexityResult(perplexity=math.exp(nll), bits_per_byte=total_nll / math.log(2) / n_bytes,
                            nll_per_token=nll, tokens=scored, bytes=n_bytes,
                            word_perplexity=math.exp(min(total_nll / n_words, 700)))


def scored_span(tokenizer: Tokenizer, text: str) -> tuple[list[int], str, int]:
    """The ids of `text` (after a bos, where the tokenizer puts one before a text); the part of `text` that
    all tokens but the first stand for (the scored ones); and its UTF-8 bytes. Measured on `text` through the tokenizer's offsets, not on a decoding of the ids: that
    would count an unseen character as the bytes of `<unk>`, and the rest of a character the first token
    ends inside as a U+FFFD (3 bytes). A first token that shares the second's character is taken off by its own
    bytes (a byte-level token spells one byte per character; a byte-fallback `<0xNN>` is one byte; a bare
    SentencePiece prefix "▁" none)."""
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = encoding.ids
    if tokenizer.adds_bos and ids:
        # As the Hugging Face guide's `tokenizer(text)`: bos opens the first window and every token of the
        # text is scored, predicted from it (as the model sees a text in generation and finetuning).
        return [tokenizer.bos_token_id, *ids], text, len(text.encode("utf-8"))
    if len(ids) < 2:
        return ids, "", 0
    (first_start, first_end), (second_start, _) = encoding.offsets[:2]
    if second_start < first_end:  # the first token ends inside a character
        rest = text[first_start:]
        return ids, rest, len(rest.encode("utf-8")) - _token_bytes(tokenizer, ids[0])
    rest = text[first_end:]
    return ids, rest, len(rest.encode("utf-8"))


def _token_bytes(tokenizer: Tokenizer, token_id: int) -> int:
    """How many UTF-8 bytes a token stands for, where it may end inside a character: a byte-level BPE token
    is spelt one character per byte (GPT-2's byte alphabet), a byte-fallback token `<0xNN>` is one byte; any
    other token is taken to be one byte, except SentencePiece's bare "▁" put in front of the text, which stands
    for none of it."""
    from tokenizers import decoders

    token = tokenizer.id_to_token(token_id) or ""
    if isinstance(tokenizer.backend.decoder, decoders.ByteLevel) and not re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
        return max(1, len(token))
    if token == "\u2581":  # shares the next token's offsets: the prefix Metaspace or a Prepend normalizer adds
        return 0
    return 1
