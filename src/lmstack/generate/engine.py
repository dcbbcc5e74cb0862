"""The generation engine: batched, streaming decoding with a static KV cache kept between calls.

Prompts of different lengths are left-padded into one batch: every sequence writes cache slot t at step t, its
own RoPE positions start at 0 after its padding, and attention masks the padded slots. Each sequence stops on
its own (eos, stop ids, stop strings, or `max_new_tokens`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

import torch

from lmstack.errors import LMStackError
from lmstack.generate.sampling import (
    SamplingParams,
    fitted_prompt,
    logit_bias_vector,
    positive_int,
    process_logits,
    prompt_token_ids,
    sample_from,
    sampling_params,
    stop_token_set,
)
from lmstack.models.decoder import DecoderLM
from lmstack.models.layers import static_routing
from lmstack.onednn import PackedLinears
from lmstack.tokenizer import Tokenizer


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely alternatives


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos, stop id or stop string) or "length"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    score: float | None = None  # beam search: summed log-probability / length ** length_penalty
    stop_token_id: int | None = None  # the stop token that ended it (eos or one of stop_token_ids), not in token_ids


@dataclass
class _Row:
    """One sequence being generated."""

    prompt: list[int]
    seed: int | None = None  # its own generator's seed (the prompt's seed + which of its n completions it is)
    limit: int = 0  # tokens it may generate: max_new_tokens, or fewer where its prompt nears the context's end
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already streamed
    # Incremental decoding: tokens[prefix_offset:read_offset] decode to the end of `text`.
    prefix_offset: int = 0
    read_offset: int = 0
    cut_at_stop_string: bool = False
    finish_reason: str | None = None
    stop_token_id: int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Engine:
    """Generates with one model and tokenizer; the KV cache is allocated once and reused across calls.

    The engine puts the model in eval mode. On the CPU it runs linear layers through oneDNN-packed copies of
    their weights where oneDNN is the faster (`PackedLinears`: float32 ones on non-Intel x86 CPUs, faster than
    MKL's generic code there; bf16 ones wherever oneDNN runs bf16), at the cost of a second copy of those
    weights where memory allows; `pack_weights` True or False decides instead of
    `lmstack.onednn.onednn_preferred()`. On a GPU
    it queues each decode step before the host has read the previous step's tokens (`lookahead`, on by
    default there), so the device never waits for Python; `compile=True` adds a CUDA graph of the step."""

    def __init__(self, model: DecoderLM, tokenizer: Tokenizer, max_batch_size: int = 8,
                 max_seq_len: int | None = None, compile: bool = False, pack_weights: bool | None = None,
                 lookahead: bool | None = None) -> None:
        arch = getattr(model.config, "arch", "transformer")
        if arch != "transformer":  # the engine's batching lives in the Transformer's KV cache
            raise LMStackError(f"the generation engine runs Transformer models, not a recurrent LM (arch {arch!r}); "
                               "generate from one with lmstack.generate.generate_ids(model, prompt_ids, n)")
        max_batch_size = positive_int("max_batch_size", max_batch_size)
        max_seq_len = None if max_seq_len is None else positive_int("max_seq_len", max_seq_len)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self._busy = False  # a generation holds the cache: a second one at the same time would overwrite it
        context = model.config.context_length  # block_size, or more for dynamic NTK RoPE
        self.max_seq_len = min(max_seq_len or context, context)
        self.device = model.embed.weight.device
        self._cache_batch = self._cache_len = 0
        self.lookahead = self.device.type == "cuda" if lookahead is None else lookahead
        self._packed = PackedLinears(model, enabled=pack_weights if self.device.type == "cpu" else False)
        # The decode step always sees the same shapes (one token per sequence, the whole cache), so it
        # compiles once. On a GPU it is also captured in a CUDA graph, and compiled as gpt-fast does: with
        # coordinate-descent tuning, under which Inductor turns a one-row matmul into a fused reduction that
        # reads the weights at full bandwidth, int8 weights converted on the fly. (A module-level function,
        # not a bound method: an engine that referred to itself would outlive its last use, and with it the
        # packed weight copies, until the cyclic garbage collector ran.)
        self._compiled = None
        if compile:
            options = ({"triton.cudagraphs": True, "coordinate_descent_tuning": True}
                       if self.device.type == "cuda" else None)
            self._compiled = torch.compile(_next_token_logits, dynamic=False, options=options)

    def _forward(self, ids: torch.Tensor, decode_step: bool = False, **kwargs) -> torch.Tensor:
        """The model's next-token logits [B, V]; a `decode_step` of the sampling loop runs compiled if asked."""
        step = self._compiled if decode_step and self._compiled else _next_token_logits
        if step is self._compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten now
        with self._packed.swapped_in():
            return step(self.model, ids, **kwargs)

    # ------------------------------------------------------------------------------------------ public

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | None = None, *, seeds: Sequence[int] | None = None,
                 **overrides) -> list[Completion]:
        """Complete each prompt (`params.n` completions per prompt, in prompt order). Sample j of prompt i
        draws from its own generator, seeded `params.seed + j`, or `seeds[i] + j` where one seed per prompt
        is given (vLLM's per-request seeds)."""
        params = sampling_params(params, overrides)
        encoded = self._encode(prompts, params)
        if seeds is not None and len(seeds) != len(encoded):
            raise LMStackError(f"seeds: {len(seeds)} given for {len(encoded)} prompts (one per prompt)")
        if seeds is not None and not all(isinstance(s, Integral) and not isinstance(s, bool) for s in seeds):
            raise LMStackError(f"seeds={list(seeds)!r}: must be integers, one per prompt")
        firsts = [int(seed) for seed in seeds] if seeds is not None else [params.seed] * len(encoded)
        rows = [_Row(ids, seed=None if first is None else first + j)
                for ids, first in zip(encoded, firsts) for j in range(params.n)]
        for start in range(0, len(rows), self.max_batch_size):
            for _ in self._run(rows[start:start + self.max_batch_size], params):
                pass
        return [self._completion(r, params) for r in rows]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               **overrides) -> Iterator[str]:
        """Yield the completion of one prompt as text deltas. A delta never ends inside a UTF-8 character
        or inside a possible stop string."""
        params = sampling_params(params, overrides)
        if params.n != 1:
            raise LMStackError("stream() makes one completion; use generate() for n > 1")
        row = _Row(self._encode([_one_prompt(prompt)], params)[0], seed=params.seed)
        for _ in self._run([row], params, stream=True):
            delta = self._safe_delta(row, params)
            if delta:
                yield delta
        if row.text[row.emitted:]:
            yield row.text[row.emitted:]
            row.emitted = len(row.text)

    @torch.no_grad()
    def beam_search(self, prompt: str | Sequence[int], num_beams: int = 4, max_new_tokens: int = 64,
                    length_penalty: float = 1.0, num_return_sequences: int = 1,
                    ignore_eos: bool = False, stop_token_ids: Sequence[int] = (),
                    truncate_prompt: bool = False) -> list[Completion]:
        """Beam search as `transformers` runs it (early_stopping=False): keep the `num_beams` best partial
        sequences by summed log-probability; a sequence ending in eos is scored sum / length**length_penalty
        (eos counted) and kept among the `num_beams` best finished ones; stop when no running beam can beat the
        worst of those, or at `max_new_tokens`, where the running beams are scored the same way.
        `stop_token_ids` end a beam as eos does (as a list of eos ids does in `transformers`); `truncate_prompt`
        keeps the end of a prompt too long for the context, as in `generate`."""
        num_beams = positive_int("num_beams", num_beams)
        num_return_sequences = positive_int("num_return_sequences", num_return_sequences)
        if num_return_sequences > num_beams:
            raise LMStackError(f"num_return_sequences={num_return_sequences} must be between 1 and num_beams "
                               f"({num_beams})")
        if isinstance(length_penalty, bool) or not (isinstance(length_penalty, Real) and math.isfinite(length_penalty)):
            raise LMStackError(f"length_penalty={length_penalty!r}: must be a finite number")
        length_penalty = float(length_penalty)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, ignore_eos=ignore_eos,
                                stop_token_ids=list(stop_token_ids), truncate_prompt=truncate_prompt)
        ids = self._encode([_one_prompt(prompt)], params)[0]
        steps = min(max_new_tokens, self.max_seq_len - len(ids))
        eos = self._stop_ids(params)
        if steps <= 0:  # as generate(): empty completions, cut at their length
            return [Completion("", [], "length", len(ids)) for _ in range(num_return_sequences)]
        with self._exclusive():
            return self._beams(ids, num_beams, steps, eos, length_penalty, num_return_sequences)

    def _beams(self, ids: list[int], K: int, steps: int, eos: set[int], length_penalty: float,
               num_return_sequences: int) -> list[Completion]:
        L, dev = len(ids), self.device
        self._ensure_cache(K, L + steps)
        logits = self._forward(torch.tensor([ids], device=dev), input_pos=torch.arange(L, device=dev), kv_len=L)
        self.model.reorder_kv_cache(torch.zeros(K, dtype=torch.long, device=dev))  # every beam starts there
        running: list[tuple[list[int], float]] = [([], 0.0)]
        finished: list[tuple[float, list[int], float]] = []  # (penalised score, tokens, summed logprob)
        for step in range(steps):
            logp = logits.float().log_softmax(dim=-1)[: len(running)]
            totals = logp + torch.tensor([score for _, score in running], device=dev)[:, None]
            values, flat = torch.topk(totals.flatten(), min(2 * K, totals.numel()))
            last = step == steps - 1
            next_running: list[tuple[list[int], float]] = []
            origins: list[int] = []
            for rank, (value, index) in enumerate(zip(values.tolist(), flat.tolist())):
                beam, token = divmod(index, logp.size(-1))
                tokens = running[beam][0] + [token]
                if (token in eos or last) and rank < K:
                    finished.append((value / (step + 1) ** length_penalty, tokens, value))
                elif token not in eos and len(next_running) < K:
                    next_running.append((tokens, value))
                    origins.append(beam)
            finished = sorted(finished, key=lambda f: -f[0])[:K]
            if last or not next_running:
                break
            best_possible = next_running[0][1] / (step + 1) ** length_penalty
            if len(finished) == K and best_possible <= finished[-1][0]:
                break
            running = next_running
            self.model.reorder_kv_cache(torch.tensor(origins, device=dev))
            feed = torch.tensor([[t[-1]] for t, _ in running], device=dev)
            logits = self._forward(feed, input_pos=torch.tensor([L + step], device=dev), kv_len=L + step + 1)
        out = []
        for score, tokens, _ in finished[:num_return_sequences]:
            stop = tokens[-1] if tokens[-1] in eos else None  # only a beam's last token can be a stop token
            tokens = tokens[:-1] if stop is not None else tokens
            reason = "length" if stop is None else "stop"
            out.append(Completion(self.tokenizer.decode(tokens), tokens, reason, L, score=score,
                                  stop_token_id=stop))
        return out

    # ------------------------------------------------------------------------------------------ internals

    def _encode(self, prompts, params: SamplingParams) -> list[list[int]]:
        if hasattr(prompts, "tolist") and not isinstance(prompts, str):  # a tensor or array of token ids
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (len(prompts) and not any(_is_sequence(t) for t in prompts)):
            prompts = [prompts]  # one prompt, as text or token ids (`prompt_token_ids` names a non-integer)
        out = []
        V = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            ids = prompt_token_ids(p, self.tokenizer, V, i)
            out.append(fitted_prompt(ids, self.max_seq_len, params.max_new_tokens, params.truncate_prompt,
                                     f"prompt {i}"))
        return out

    def _ensure_cache(self, batch: int, length: int) -> None:
        """Allocate the cache on first use, and again only if a larger batch or a longer sequence comes, or
        something else that uses the model (another engine, `generate_ids`, speculative decoding) has replaced
        or freed it. Its length is a power of two (at least 256) that holds `length` tokens, up to
        `max_seq_len` (or `length`, when that is longer): a model with a long context does not reserve all of
        it for short generations, and a compiled decode step sees a new shape only when the length doubles."""
        cap = max(self.max_seq_len, length)  # past max_seq_len only for short prompts beside long ones
        want_batch = max(batch, self._cache_batch)
        want_len = max(self._cache_len, min(cap, max(256, 1 << (length - 1).bit_length())))
        cache = self.model.layers[0].attn.kv_cache
        if (cache is None or cache.k.shape[0] < want_batch or cache.k.shape[2] != want_len
                or cache.k.device != self.device or cache.k.dtype != self.model.embed.weight.dtype):
            try:
                self.model.setup_kv_cache(want_batch, want_len, device=self.device)
            except BaseException:
                # Out of memory part way leaves layers of two sizes: free them all, so that the next call
                # allocates afresh (and the memory is back for whatever the caller does next).
                self.model.clear_kv_cache()
                self._cache_batch = self._cache_len = 0
                raise
        self._cache_batch, self._cache_len = want_batch, want_len

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        return stop_token_set(params, self.tokenizer, self.model.config)

    @torch.no_grad()
    def _run(self, rows: list[_Row], params: SamplingParams, stream: bool = False) -> Iterator[None]:
        """Decode `rows` together; yields after every step (with each row's text up to date if `stream`)."""
        # A compiled step's mixtures of experts route with static shapes.
        with self._exclusive(), static_routing(self.model) if self._compiled else contextlib.nullcontext():
            yield from self._run_rows(rows, params, stream)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the engine (its KV cache) for one generation; a second one meanwhile is refused."""
        if self._busy:
            raise LMStackError("this Engine is in the middle of another generation (an unfinished stream()): "
                               "finish or close() that one first, or use a second Engine")
        self._busy = True
        try:
            yield
        finally:
            self._busy = False

    def _run_rows(self, rows: list[_Row], params: SamplingParams, stream: bool) -> Iterator[None]:
        B, L = len(rows), max(len(r.prompt) for r in rows)
        # Each row's own limit: a short prompt beside a long one may still run to max_new_tokens. Its slots
        # then pass max_seq_len (the cache grows to hold them), but its positions, slot - padding, do not.
        for r in rows:
            r.limit = min(params.max_new_tokens, self.max_seq_len - len(r.prompt))
        steps = max(r.limit for r in rows)
        if steps <= 0:
            for r in rows:
                r.finish_reason = "length"
            return
        self._ensure_cache(B, L + steps)
        S = self.model.layers[0].attn.kv_cache.k.shape[2]
        dev, V = self.device, self.model.config.vocab_size
        pads = torch.tensor([L - len(r.prompt) for r in rows], device=dev)
        ids = torch.tensor([[0] * (L - len(r.prompt)) + r.prompt for r in rows], device=dev)
        key_padding = torch.arange(S, device=dev)[None, :] >= pads[:, None]  # True for real tokens
        generator = None  # seeded: one generator per row, so a completion does not depend on its batch
        if rows[0].seed is not None:
            generator = [torch.Generator(device=dev).manual_seed(r.seed) for r in rows]
        stop_ids = self._stop_ids(params)
        need_seen = params.repetition_penalty != 1.0
        need_counts = bool(params.frequency_penalty or params.presence_penalty)
        seen = torch.zeros(B, V, dtype=torch.bool, device=dev) if need_seen else None
        if seen is not None:
            for i, r in enumerate(rows):
                seen[i, r.prompt] = True
        counts = torch.zeros(B, V, device=dev) if need_counts else None
        constraint = None
        if params.constraint is not None:
            from lmstack.generate.constrained import Constraint, constraint_grammar

            constraint = Constraint(*constraint_grammar(**params.constraint), self.tokenizer, V, B)
            constraint.start_masks([True] * B)  # overlaps with the prefill
        text_each_step = stream or bool(params.stop)
        try:
            yield from self._decode_loop(rows, params, ids, pads, key_padding, L, steps, generator, stop_ids,
                                         seen, counts, constraint, text_each_step)
        finally:
            if constraint is not None:
                constraint.close()
        for r in rows:
            if r.finish_reason is None:
                r.finish_reason = "length"
            if not r.cut_at_stop_string:  # the whole text at once (an incomplete last character included)
                r.text = self.tokenizer.decode(r.tokens)

    def _decode_loop(self, rows, params, ids, pads, key_padding, L, steps, generator, stop_ids, seen, counts,
                     constraint, text_each_step) -> Iterator[None]:
        B, dev = len(rows), self.device
        # Lookahead: queue step t + 1's forward pass before step t's tokens reach the host, so a GPU never
        # idles while Python handles them. Everything the next step needs stays on the device; a row that has
        # stopped is fed its own last token (rows never see each other, and its outputs are dropped). A grammar
        # and no-repeat-ngram need every token on the host before the next step, so they go in lockstep.
        lookahead = self.lookahead and constraint is None and not params.no_repeat_ngram_size
        batch_index = torch.arange(B, device=dev)
        bias = logit_bias_vector(params.logit_bias, self.model.config.vocab_size, dev)
        slots = torch.arange(L, device=dev)
        positions = (slots[None, :] - pads[:, None]).clamp(min=0)
        logits = self._forward(ids, input_pos=slots, position_ids=positions, key_padding=key_padding, kv_len=L)
        slot = slots[-1:]

        def next_step(chosen: torch.Tensor, step: int) -> torch.Tensor:
            nonlocal slot
            slot = slot + 1
            kv_len = None if self._compiled else L + step + 1  # the whole cache when compiled: static shapes
            # A row past its own limit (a short prompt's neighbour) is fed on, its outputs dropped: its position
            # is held below max_seq_len, so it indexes no position table out of range and, for dynamic NTK
            # RoPE (a base from the batch's longest position), changes no other row's frequencies.
            positions = (slot - pads).clamp(max=self.max_seq_len - 1)
            return self._forward(chosen[:, None], decode_step=True, input_pos=slot,
                                 position_ids=positions[:, None], key_padding=key_padding, kv_len=kv_len)

        for step in range(steps):
            histories = [r.prompt + r.tokens for r in rows] if params.no_repeat_ngram_size else None
            scores = logits
            if constraint is not None:  # before the truncations, so top-k / top-p choose among allowed tokens
                allowed = constraint.allowed(dev)
                if constraint.eos is not None:  # a matcher with nothing left to allow may still end
                    allowed[:, constraint.eos] |= ~allowed.any(dim=-1)  # no boolean indexing: no host sync
                scores = logits.float().masked_fill(~allowed, float("-inf"))
            processed = process_logits(scores, params, seen, counts, histories, bias)
            if constraint is not None:
                # The grammar is a hard requirement: where the processors (a no-repeat n-gram ban, a -inf
                # logit bias) removed every token it allows, that row samples from the grammar's mask alone.
                # Decided on the device, per row: no host sync.
                keep = torch.isfinite(processed).any(dim=-1, keepdim=True)
                processed = torch.where(keep, processed, scores)
            chosen = sample_from(processed, params.greedy, generator)
            outputs = [chosen]
            if params.logprobs is not None:
                logp = logits.float().log_softmax(dim=-1)
                outputs.append(logp.gather(-1, chosen[:, None])[:, 0])
                if params.logprobs:  # at most the whole vocabulary (a character model has few tokens)
                    top = torch.topk(logp, min(params.logprobs, logp.size(-1)), dim=-1)
                    outputs += [top.indices, top.values]
            if seen is not None:
                seen[batch_index, chosen] = True
            if counts is not None:
                counts[batch_index, chosen] += 1
            on_host, wait = _copy_to_host(outputs)
            last = step == steps - 1
            if lookahead and not last:
                logits = next_step(chosen, step)
            wait()
            self._take(rows, params, stop_ids, constraint, text_each_step, *(t.tolist() for t in on_host))
            yield
            if last or all(r.finish_reason is not None for r in rows):
                break
            if not lookahead:
                if constraint is not None:  # the next masks are computed while the model runs
                    constraint.start_masks([r.finish_reason is None for r in rows])
                logits = next_step(chosen, step)

    def _take(self, rows: list[_Row], params: SamplingParams, stop_ids: set[int], constraint, text: bool,
              tokens: list[int],
              logprobs: list[float] | None = None, top_ids: list[list[int]] | None = None,
              top_logprobs: list[list[float]] | None = None) -> None:
        """Add one step's tokens (on the host) to the rows still running, and see which of them stop. The text
        grows with each step only if `text` (streaming or stop strings); else it is decoded once at the end."""
        for i, r in enumerate(rows):
            if r.finish_reason is not None:
                continue
            token = tokens[i]
            if token in stop_ids or (constraint is not None and token == constraint.eos):
                r.finish_reason, r.stop_token_id = "stop", token
                continue
            r.tokens.append(token)
            if constraint is not None and not constraint.advance(i, token):
                r.finish_reason = "stop"  # the output is complete: the grammar allows nothing more
            if logprobs is not None:
                alternatives = list(zip(top_ids[i], top_logprobs[i])) if top_ids else []
                r.logprobs.append(TokenLogprob(token, logprobs[i], alternatives))
            if text:
                seen_chars = len(r.text)
                held = self._extend_text(r)
                # A stop string found now ends in the new text, the part held back included (it may hold
                # whole characters before its incomplete last one): look back no further than it could reach.
                start = max(0, seen_chars - max((len(s) for s in params.stop), default=1) + 1)
                tail = r.text[start:] + held.rstrip("\ufffd")  # not the whole text: this runs every step
                found = [at for s in params.stop if (at := tail.find(s)) >= 0]
                if found:
                    r.text = r.text[:start] + tail[:min(found)]
                    r.cut_at_stop_string, r.finish_reason = True, "stop"
            if r.finish_reason is None and len(r.tokens) >= r.limit:
                r.finish_reason = "length"

    def _extend_text(self, row: _Row) -> str:
        """Append what `row`'s newest tokens add to `row.text`, decoding only the last few tokens (vLLM's
        incremental detokenization): tokens[prefix_offset:] decode to the text of tokens[prefix_offset:
        read_offset], already in `text`, plus the new text, kept back while it ends in an incomplete UTF-8
        character (and then returned). Decoding from `prefix_offset` rather than `read_offset` keeps
        word-initial spaces right."""
        before = self.tokenizer.decode(row.tokens[row.prefix_offset:row.read_offset])
        after = self.tokenizer.decode(row.tokens[row.prefix_offset:])
        new = after[len(before):]
        if not new or new.endswith("\ufffd"):
            return new
        row.text += new
        row.prefix_offset, row.read_offset = row.read_offset, len(row.tokens)
        return ""

    def _safe_delta(self, row: _Row, params: SamplingParams) -> str:
        """New text that can be shown now: not a partial UTF-8 character, not a possible stop-string start."""
        end = len(row.text)
        if row.finish_reason is None:
            while end > row.emitted and row.text[end - 1] == "\ufffd":
                end -= 1  # a byte sequence still incomplete
            for s in params.stop:
                for k in range(min(len(s) - 1, end - row.emitted), 0, -1):
                    if row.text[end - k:end] == s[:k]:
                        end -= k
                        break
        delta = row.text[row.emitted:end]
        row.emitted = max(row.emitted, end)
        return delta

    def _completion(self, row: _Row, params: SamplingParams) -> Completion:
        tokens = tokens_spelling(self.tokenizer, row.tokens, row.text)
        return Completion(text=row.text, token_ids=tokens, finish_reason=row.finish_reason or "length",
                          prompt_tokens=len(row.prompt), stop_token_id=row.stop_token_id,
                          logprobs=row.logprobs[:len(tokens)] if params.logprobs is not None else None)


def _is_sequence(item: Any) -> bool:
    """Whether an item of `generate`'s prompts is a prompt of its own (text, or a sequence or array of ids)
    rather than one token id of a single prompt."""
    return isinstance(item, (str, Sequence)) or getattr(item, "ndim", 0) > 0


def _one_prompt(prompt: str | Sequence[int] | torch.Tensor) -> str | list[int]:
    """One prompt as text or a list of token ids; a tensor or array of ids may be [T] or [1, T]."""
    if isinstance(prompt, str):
        return prompt
    ids = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
    if ids and isinstance(ids[0], list):
        if len(ids) != 1:
            raise LMStackError(f"one prompt is expected here, got a batch of {len(ids)}")
        ids = ids[0]
    return ids


def tokens_spelling(tokenizer: Tokenizer, tokens: list[int], text: str) -> list[int]:
    """The shortest prefix of `tokens` whose decoding covers `text`: a completion cut at a stop string keeps
    the tokens that spell its text, not those generated after the stop string began."""
    if text == tokenizer.decode(tokens):
        return tokens
    # startswith, not a length: a partial UTF-8 character decodes to one U+FFFD, as long as the character
    return next((tokens[:k] for k in range(len(tokens) + 1) if tokenizer.decode(tokens[:k]).startswith(text)),
                tokens)


def _copy_to_host(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Callable[[], None]]:
    """Start copying `tensors` to the host; returns the copies and a function that waits until they are there.
    From a GPU the copy goes through pinned memory and the wait is on an event recorded after it, so work
    queued since (the next step) keeps running: no stream synchronization."""
    device = tensors[0].device
    if device.type != "cuda":
        return tensors, lambda: None
    copies = [t.to("cpu", non_blocking=True) for t in tensors]
    arrived = torch.cuda.Event()
    arrived.record(torch.cuda.current_stream(device))  # the copies' stream, also off the current device
    return copies, arrived.synchronize


def _next_token_logits(model: DecoderLM, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits [B, V] of the token after the last position of `ids` (keyword arguments go to the model)."""
    return model(ids, last_only=True, **kwargs)[:, -1]


def generate(model: DecoderLM, tokenizer: Tokenizer, prompts: str | Sequence[str] | Sequence[Sequence[int]],
             **sampling) -> list[Completion]:
    """One-call generation: `lmstack.generate(model, tok, ["Once upon"], max_new_tokens=20, temperature=0)`."""
    was_training = model.training  # a model sampled in the middle of training goes back to training mode
    try:
        # The cache is sized by the rows actually run, so a large cap costs nothing for one prompt.
        return Engine(model, tokenizer, max_batch_size=64).generate(prompts, **sampling)
    finally:
        model.train(was_training)
