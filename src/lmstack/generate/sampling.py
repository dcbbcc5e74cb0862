"""Sampling parameters and logits processors.

Each processor is a plain function from logits [B, V] (float32) to logits, applied in the order Hugging Face
applies them: logit bias, then penalties, then temperature, then the truncations (top-k, top-p, min-p,
typical-p). A removed token gets -inf. Definitions follow `transformers` (repetition penalty as in CTRL,
top-p keeping the token that crosses p) and OpenAI (frequency and presence penalties over generated tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from numbers import Integral, Real
from typing import Any

import torch

from lmstack.config import eos_ids
from lmstack.errors import LMStackError
from lmstack.models.decoder import DecoderLM

NEG_INF = float("-inf")
GREEDY_BELOW = 1e-5  # a temperature under this is greedy (as in vLLM): dividing by it overflows to NaN
FLOAT32_MAX = torch.finfo(torch.float32).max  # logits are float32: a larger setting would overflow to inf


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. `temperature=0` (or below 1e-5) means greedy."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0  # CTRL: divide positive logits (multiply negative) of seen tokens
    frequency_penalty: float = 0.0  # OpenAI: logit -= alpha * count in the generated tokens
    presence_penalty: float = 0.0  # OpenAI: logit -= gamma if generated at all
    no_repeat_ngram_size: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)  # besides the tokenizer's eos
    ignore_eos: bool = False
    n: int = 1  # samples per prompt
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k alternatives
    truncate_prompt: bool = False  # a prompt that fills the context keeps its end (room for the reply) instead of failing
    # Constraints (at most one): the output must match it (see lmstack.generate.constrained).
    choice: list[str] | None = None
    regex: str | None = None
    json_schema: dict[str, Any] | str | None = None
    grammar: str | None = None  # Lark syntax

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def bad(name: str, rule: str) -> LMStackError:
            return LMStackError(f"{name}={getattr(self, name)!r}: {rule}")

        def is_int(v: Any) -> bool:  # numpy's integers too, not bools
            return isinstance(v, Integral) and not isinstance(v, bool)

        def is_number(v: Any) -> bool:
            return isinstance(v, Real) and not isinstance(v, bool) and abs(v) <= FLOAT32_MAX

        for name in ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty", "frequency_penalty",
                     "presence_penalty"):
            if not is_number(getattr(self, name)):
                raise bad(name, "must be a finite number (within float32's range)")
            setattr(self, name, float(getattr(self, name)))  # numpy's scalars become Python's
        for name in ("max_new_tokens", "n", "no_repeat_ngram_size"):
            if not is_int(getattr(self, name)):
                raise bad(name, "must be an integer")
            setattr(self, name, int(getattr(self, name)))
        for name in ("top_k", "seed", "logprobs"):
            if getattr(self, name) is not None:
                if not is_int(getattr(self, name)):
                    raise bad(name, "must be an integer or None")
                setattr(self, name, int(getattr(self, name)))
        for name in ("ignore_eos", "truncate_prompt"):  # a string such as "false" would read as true
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not 0 < self.typical_p <= 1:
            raise bad("typical_p", "must be in (0, 1]")
        if self.top_k is not None and self.top_k < 0:
            raise bad("top_k", "must be >= 0 (0 or None: no limit)")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 means none)")
        if self.max_new_tokens < 0:
            raise bad("max_new_tokens", "must be >= 0")
        if self.n < 1:
            raise bad("n", "must be >= 1")
        if self.no_repeat_ngram_size < 0:
            raise bad("no_repeat_ngram_size", "must be >= 0")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of token ids (integers >= 0)")
        if not isinstance(self.logit_bias, dict) or not all(
                is_int(t) and t >= 0 and (is_number(b) or b == NEG_INF) for t, b in self.logit_bias.items()):
            raise bad("logit_bias", "must map token ids (integers >= 0) to finite numbers (or -inf, to ban one)")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise bad("choice", "must be a non-empty list of non-empty strings")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise bad(name, "must be a string")
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, str)):
            raise bad("json_schema", "must be a dict or a JSON string")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad("logprobs", "must be between 0 and 20")
        given = [k for k in ("choice", "regex", "json_schema", "grammar") if getattr(self, k) is not None]
        if len(given) > 1:
            raise LMStackError(f"give one constraint at a time, not {given}")

    @property
    def constraint(self) -> dict[str, Any] | None:
        for key in ("choice", "regex", "json_schema", "grammar"):
            if getattr(self, key) is not None:
                return {key: getattr(self, key)}
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def model_sampling_defaults(model: Any) -> dict[str, Any]:
    """The sampling settings of the generation_config.json a model was loaded with, as SamplingParams fields
    (`SamplingParams(**model_sampling_defaults(model), max_new_tokens=...)`): temperature, top_k, top_p, min_p,
    typical_p, repetition_penalty; `do_sample: false` is greedy (temperature 0), as in transformers, and a
    top_k of 0 is none. `lmstack generate` and `lmstack chat` start from them, as vLLM does."""
    config = getattr(model, "config", None)
    settings = dict(getattr(config, "extra", {}).get("generation_config", {}))
    if settings.pop("do_sample", None) is False:
        return {"temperature": 0.0}
    if settings.get("top_k") == 0:
        settings["top_k"] = None
    return {k: v for k, v in settings.items() if k in _MODEL_DEFAULT_FIELDS}


_MODEL_DEFAULT_FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty")


def sampling_params(params: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
    """`params` with `overrides` applied (a fresh SamplingParams from the overrides when `params` is None)."""
    if params is None:
        return SamplingParams(**overrides)
    return replace(params, **overrides) if overrides else params


# ---------------------------------------------------------------------------------------------- processors


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every token seen so far (prompt and output): positive logits / penalty, negative
    ones * penalty. `seen` is a bool mask [B, V]."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_frequency_presence(logits: torch.Tensor, counts: torch.Tensor, frequency: float,
                             presence: float) -> torch.Tensor:
    """OpenAI's penalties over generated tokens: counts [B, V] of each token so far."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def banned_ngram_tokens(tokens: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in `tokens`."""
    if n <= 0 or len(tokens) < n:
        return set()
    prefix = tuple(tokens[len(tokens) - n + 1:])
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix}


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if not k or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1, None]
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p, the crossing token included."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= 1 - p
    remove[..., -1] = False  # always keep the most likely token
    return logits.masked_fill(remove.scatter(-1, order, remove), NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than `min_p` times the most likely one."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, NEG_INF)


def apply_typical_p(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy, up to `mass`."""
    if mass >= 1.0:
        return logits
    logp = logits.log_softmax(dim=-1)
    entropy = -(logp.exp() * logp).nansum(dim=-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_shifted, order = torch.sort(shifted, descending=False, dim=-1)
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=-1, keepdim=True).clamp(max=logits.size(-1) - 1)
    remove = sorted_shifted > sorted_shifted.gather(-1, last)
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), NEG_INF)


def reply_room(max_new_tokens: int, context: int) -> int:
    """The tokens a truncated prompt leaves for the reply: `max_new_tokens`, but at most half the context."""
    return max(1, min(max_new_tokens, context // 2))


def positive_int(name: str, value: Any, what: str = "") -> int:
    """`value` as an int, if it is an integer >= 1 (numpy's too, bools not); else an error naming `name`."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise LMStackError(f"{name}={value!r}: {what}must be an integer >= 1")
    return int(value)


def fitted_prompt(ids: list[int], context: int, max_new_tokens: int, truncate: bool,
                  name: str = "prompt") -> list[int]:
    """`ids` if they leave room in the context for a new token; else, with `truncate`, their end, leaving
    room for `max_new_tokens` (at most half the context); else an error naming the prompt."""
    if len(ids) < context:
        return ids
    if not truncate:
        raise LMStackError(f"{name} has {len(ids)} tokens; the context holds {context}, with room for a new token "
                           f"at most {context - 1} (truncate_prompt=True, or --truncate-prompt, keeps its end)")
    return ids[-max(1, context - reply_room(max_new_tokens, context)):]


def prompt_token_ids(prompt: str | Sequence[int], tokenizer: Any, vocab_size: int, index: int = 0) -> list[int]:
    """A prompt's token ids: a string encoded, or a sequence of ids (ints, numpy or 0-d torch integers) checked
    to be integers in the vocabulary (`checked_prompt`)."""
    if isinstance(prompt, str):
        return checked_prompt(tokenizer.encode(prompt), tokenizer, vocab_size, index)
    ids = []
    for t in prompt:
        if isinstance(t, torch.Tensor) and t.dim() == 0 and not (t.is_floating_point() or t.dtype == torch.bool):
            t = int(t)
        if isinstance(t, bool) or not isinstance(t, Integral):  # int() would cut 1.5 to 1 without a word
            raise LMStackError(f"prompt {index}: token ids must be integers, got {t!r}")
        ids.append(int(t))
    return checked_prompt(ids, tokenizer, vocab_size, index)


def checked_prompt(ids: list[int], tokenizer: Any, vocab_size: int, index: int = 0) -> list[int]:
    """Prompt `index`'s token ids, each checked to be in the vocabulary; an empty prompt becomes the start
    token (bos, else eos, else 0), since a model needs a token to predict from."""
    if ids and not 0 <= min(ids) <= max(ids) < vocab_size:
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise LMStackError(f"prompt {index} holds token id {bad}, outside the model's vocabulary of {vocab_size}")
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [start if start is not None else 0]
    return ids


def check_stop_token_ids(stop_token_ids: list[int], vocab_size: int) -> None:
    """Stop ids outside the vocabulary could never be sampled: a mistake, named as `logit_bias` is."""
    bad = [t for t in stop_token_ids if t >= vocab_size]
    if bad:
        raise LMStackError(f"stop_token_ids: token id {bad[0]} is outside the vocabulary of {vocab_size}")


def stop_token_set(params: SamplingParams, tokenizer, config) -> set[int]:
    """The ids that end a sequence: `stop_token_ids`, and unless `ignore_eos` the tokenizer's eos and every
    eos id the model's config names (a list in Llama 3's, or from generation_config.json, as `transformers`
    stops at any of them)."""
    check_stop_token_ids(params.stop_token_ids, config.vocab_size)
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids.update(t for t in eos_ids(config.eos_token_id) if 0 <= t < config.vocab_size)
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
    return ids


def logit_bias_vector(logit_bias: dict[int, float], vocab_size: int,
                      device: torch.device | str = "cpu") -> torch.Tensor | None:
    """`logit_bias` as a dense [V] vector to add to logits (None when there is none). Built once per
    generation: a fresh host-to-device copy per step would make a GPU wait."""
    if not logit_bias:
        return None
    if max(logit_bias) >= vocab_size:
        raise LMStackError(f"logit_bias: token id {max(logit_bias)} is outside the vocabulary of {vocab_size}")
    bias = torch.zeros(vocab_size)
    bias[list(logit_bias)] = torch.tensor(list(logit_bias.values()), dtype=torch.float32)
    if bool(bias.isneginf().all()):
        raise LMStackError(f"logit_bias: every one of the {vocab_size} tokens is banned (-inf): nothing is left to "
                           "sample")
    return bias.to(device)


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    histories: list[list[int]] | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """All of `params`' processors on logits [B, V]; `seen`/`counts`/`histories` describe what came before,
    `bias` is `logit_bias_vector(params.logit_bias, ...)` if the caller keeps one. `logits` is not modified."""
    logits = logits.float()
    if bias is None:
        bias = logit_bias_vector(params.logit_bias, logits.size(-1), logits.device)
    if bias is not None:  # first, as transformers and vLLM add it: a penalty then scales the biased logit
        logits = logits + bias
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and counts is not None:
        logits = apply_frequency_presence(logits, counts, params.frequency_penalty, params.presence_penalty)
    if params.no_repeat_ngram_size and histories is not None:
        banned = [(row, token) for row, tokens in enumerate(histories)
                  for token in banned_ngram_tokens(tokens, params.no_repeat_ngram_size)]
        if banned:
            logits = logits.clone()
            logits[tuple(zip(*banned))] = NEG_INF
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    # Large settings (a bias of 1e38, a penalty of 1e-30, then a low temperature) can overflow a logit to
    # +inf, and softmax would give NaN everywhere: the largest float keeps that token the sure pick.
    logits = logits.clamp(max=FLOAT32_MAX)
    logits = apply_top_k(logits, params.top_k or 0)
    logits = apply_top_p(logits, params.top_p)
    logits = apply_min_p(logits, params.min_p)
    return apply_typical_p(logits, params.typical_p)


def sample_from(logits: torch.Tensor, greedy: bool,
                generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """argmax, or one draw per row from softmax(logits) (rows are already processed). A sequence of
    generators gives each row its own, so a row's draws do not depend on the rows beside it."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    if probs.device.type == "cuda" or isinstance(generator, Sequence):
        return exponential_race(probs, generator)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def exponential_race(probs: torch.Tensor,
                     generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """One draw per row of `probs`: argmax(p / E) with E ~ Exp(1) independent per token, i.e. the first of
    exponential clocks with rates p to ring, which is token i with probability p_i. On a GPU it runs without
    the host sync that torch.multinomial spends checking its input. With one generator per row, each row's
    clocks come from its own (as vLLM seeds each request)."""
    if isinstance(generator, Sequence):
        race = torch.stack([torch.empty_like(probs[0]).exponential_(1, generator=g) for g in generator])
    else:
        race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)


def sample_next_token(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token from logits [B, V] with temperature and top-k only (the training loop's samples)."""
    params = SamplingParams(temperature=temperature, top_k=top_k)
    return sample_from(process_logits(logits, params), params.greedy, generator)


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
    """Continue one prompt: prefill it into a fresh static KV cache (a recurrent LM: its hidden state), then
    decode one token per step."""
    device = model.embed.weight.device
    if getattr(model.config, "arch", "transformer") != "transformer":
        return _generate_recurrent(model, prompt_ids, max_new_tokens, temperature, top_k, stop_ids, generator)
    block = model.config.context_length
    prompt_ids = list(prompt_ids) or [0]
    prompt_ids = fitted_prompt(prompt_ids, block, max_new_tokens, truncate=True)
    total = min(len(prompt_ids) + max_new_tokens, block)
    was_training = model.training
    model.eval()
    model.setup_kv_cache(batch_size=1, max_seq_len=total, device=device)
    try:
        logits = model(torch.tensor([prompt_ids], device=device),
                       input_pos=torch.arange(len(prompt_ids), device=device), last_only=True)
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


def _generate_recurrent(model, prompt_ids, max_new_tokens, temperature, top_k, stop_ids, generator) -> list[int]:
    device = model.embed.weight.device
    was_training = model.training
    model.eval()
    try:
        logits, state = model(torch.tensor([prompt_ids or [0]], device=device), return_state=True)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(sample_next_token(logits[:, -1], temperature, top_k, generator))
            if stop_ids and token in stop_ids:
                break
            out.append(token)
            logits, state = model(torch.tensor([[token]], device=device), state=state, return_state=True)
        return out
    finally:
        model.train(was_training)
