"""Constrained decoding: choice lists, regular expressions, JSON Schema and Lark grammars, via llguidance.

llguidance (a maintained grammar engine) compiles the constraint against lmstack's tokenizer and, at each
step, computes which token ids may come next as a bitmask. The engine masks the logits with it before
sampling and feeds the chosen token back. The next mask is computed in a worker thread while the model runs
its forward pass (llguidance releases the GIL), so masking does not stall the decode loop.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import torch

from lmstack.errors import LMStackError


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise LMStackError("constrained decoding needs llguidance (pip install llguidance)") from None
    return llguidance


def constraint_grammar(choice: list[str] | None = None, regex: str | None = None,
                       json_schema: dict | str | None = None, grammar: str | None = None) -> tuple[str, str]:
    """(parameter name, llguidance grammar) for the one constraint given."""
    given = {k: v for k, v in dict(choice=choice, regex=regex, json_schema=json_schema, grammar=grammar).items()
             if v is not None}
    if len(given) > 1:
        raise LMStackError(f"give one constraint at a time, not {sorted(given)}")
    name, value = next(iter(given.items()))
    LLMatcher = _llguidance().LLMatcher
    if name == "choice":
        if not value or not all(isinstance(c, str) and c for c in value):
            raise LMStackError("choice must be a non-empty list of non-empty strings")
        return name, LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in value))
    if name == "regex":
        return name, LLMatcher.grammar_from_regex(value)
    if name == "json_schema":
        try:
            schema = json.loads(value) if isinstance(value, str) else value
            return name, LLMatcher.grammar_from_json_schema(schema)
        except (ValueError, TypeError) as e:
            raise LMStackError(f"json_schema is not a JSON object: {e}") from None
    return name, LLMatcher.grammar_from_lark(value)


@lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer_json: str, n_vocab: int, eos: int | None) -> Any:
    ll = _llguidance()
    try:
        return ll.LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=eos)
    except ValueError:  # a decoder llguidance cannot read (a character tokenizer's Fuse): give it the bytes
        return ll.LLTokenizer(ll.TokenizerWrapper(_TokenTable(tokenizer_json, n_vocab, eos)), n_vocab=n_vocab,
                              eos_token=eos)


class _TokenTable:
    """What llguidance's TokenizerWrapper asks of a tokenizer: each id's bytes, the special ids and an
    encoder. For tokenizers whose decoder llguidance does not read from tokenizer.json: a token's bytes are
    then its decoding on its own, exact where tokens are whole characters (a character-level vocabulary)."""

    def __init__(self, tokenizer_json: str, n_vocab: int, eos: int | None) -> None:
        from tokenizers import Tokenizer as Backend

        self._backend = Backend.from_str(tokenizer_json)
        self.eos_token_id, self.bos_token_id = eos, None
        special = {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}
        self.special_token_ids = sorted(special | ({eos} if eos is not None else set()))
        self.tokens = [self._backend.decode([i], skip_special_tokens=False).encode("utf-8")
                       if self._backend.id_to_token(i) is not None else b"" for i in range(n_vocab)]

    def __call__(self, text: str) -> list[int]:  # a str only: TokenizerWrapper probes with bytes first
        return self._backend.encode(text, add_special_tokens=False).ids


class Constraint:
    """One matcher per sequence of a batch, and the bitmask they fill."""

    def __init__(self, name: str, grammar: str, tokenizer: Any, vocab_size: int, rows: int) -> None:
        ll = _llguidance()
        eos = tokenizer.eos_token_id
        self.tokenizer = _ll_tokenizer(tokenizer.backend.to_str(), vocab_size, eos)
        # The token the grammar ends with: the tokenizer's eos, or, without one, the special token llguidance
        # picks in its place (None where it picks none inside the vocabulary). It ends a row and is not text.
        end = self.tokenizer.eos_token
        self.eos: int | None = end if 0 <= end < vocab_size else None
        error = ll.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error and not error.startswith("WARNING"):
            # The indented lines are a caret diagram of the place; the others say what is wrong.
            said = " ".join(line.strip() for line in error.strip().splitlines() if line and not line[0].isspace())
            raise LMStackError(f"{name}: the grammar engine rejects it: {said}")
        self.matchers = [ll.LLMatcher(self.tokenizer, grammar, log_level=0) for _ in range(rows)]
        self.vocab_size = vocab_size
        self.bitmask = torch.zeros(rows, (vocab_size + 31) // 32, dtype=torch.int32)
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: Future | None = None

    def start_masks(self, active: list[bool]) -> None:
        """Begin computing the next masks in the background (call before the forward pass)."""
        self._pending = self._pool.submit(self._fill, list(active))

    def _fill(self, active: list[bool]) -> None:
        from llguidance.torch import fill_next_token_bitmask

        for i, matcher in enumerate(self.matchers):
            if active[i]:
                fill_next_token_bitmask(matcher, self.bitmask, i)

    def allowed(self, device: torch.device) -> torch.Tensor:
        """The bool mask [rows, vocab] of tokens the grammar allows next (waits for `start_masks`)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        bits = torch.arange(32, dtype=torch.int32)
        mask = ((self.bitmask[:, :, None] >> bits) & 1).reshape(self.bitmask.shape[0], -1)
        return mask[:, : self.vocab_size].bool().to(device)

    def advance(self, row: int, token: int) -> bool:
        """Feed the sampled token; False when the grammar is complete and only eos may follow."""
        matcher = self.matchers[row]
        if not matcher.consume_token(token):  # it allowed nothing better: the vocabulary cannot spell the grammar
            first = matcher.get_error().strip().splitlines()[0]
            raise LMStackError(f"the grammar engine refused token {token} ({first}): can the tokenizer spell what "
                               "the constraint requires?")
        return not matcher.is_stopped()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
