"""GGUF files (llama.cpp's format): Llama, Qwen2, Phi-3 and GPT-2 weights dequantized, and the tokenizer rebuilt.

The `gguf` package parses the file and dequantizes every block format (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, ...).
What is lmstack's here: mapping llama.cpp's names and metadata onto `ModelConfig` and `DecoderLM`, undoing the
q/k row permutation llama.cpp's converter applies to Llama attention, and rebuilding the tokenizer (byte-level
BPE with its pre-tokenizer split rules, or SentencePiece-style BPE) from the vocabulary in the metadata.
"""

from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from lmstack.checkpoints.hf import Rule, convert_to_ours, expected_shapes, materialize, merged_eos
from lmstack.config import ModelConfig
from lmstack.errors import LMStackError
from lmstack.tokenizer import Tokenizer

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

# llama.cpp's `tokenizer.ggml.pre` names -> the regexes it applies one after another (llama-vocab.cpp).
PRE_TOKENIZER_SPLITS: dict[str, list[str]] = {
    **dict.fromkeys(["default", "gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais"], [_GPT2_SPLIT]),
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"], [_LLAMA3_SPLIT]),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], [_QWEN2_SPLIT]),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"],
                    [r"\p{N}", _GPT2_SPLIT]),
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, r"[0-9][0-9][0-9]"],
}
# llama.cpp's LLAMA3 pre-tokenizer type, which also ignores merges (whole-word vocabulary hits first) and
# adds bos unless the file says otherwise
LLAMA3_PRE_TOKENIZERS = ("llama-bpe", "llama3", "llama-v3", "falcon3")
UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 2, 3, 4, 5, 6  # llama.cpp token types (NORMAL is 1)
SUPPORTED_ARCHS = ("llama", "qwen2", "phi3", "gpt2")


@functools.cache
def _fast_reader_class() -> type:
    """gguf's GGUFReader reading through a plain array view of its memory map. The reader slices its
    `np.memmap` once per value, and a memmap slice costs ~20x a plain one: 98k vocabulary strings took 2.1 s
    to read, 0.7 s this way (SmolLM2's file). The views still share the mapped file, copying nothing."""
    from gguf import GGUFReader

    class FastReader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            array = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return array.view(array.dtype.newbyteorder(order))

    return FastReader


def _reader(path: str | os.PathLike) -> Any:
    from gguf import GGUFReader

    path = Path(path)
    if not path.exists():
        raise LMStackError(f"{path}: no such file")
    try:
        try:
            return _fast_reader_class()(str(path))
        except TypeError:  # a gguf release whose private _get differs: its own reader, slower
            return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / struct errors on a bad file
        raise LMStackError(f"{path}: not a readable GGUF file ({e})") from None


def _metadata(reader: Any) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


# ---------------------------------------------------------------------------------------------- model


def _float32(value: float) -> float:
    """A GGUF float32 as the number it was written from (1e-05, not 9.999999747378752e-06): the shortest
    decimal that rounds to the same float32."""
    return float(str(np.float32(value)))


def config_from_gguf(meta: dict[str, Any], tensors: dict[str, Any]) -> ModelConfig:
    """lmstack's config from a GGUF file's metadata and tensors (by name; only `rope_freqs.weight`, a
    vector, is read)."""
    tensor_names = set(tensors)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise LMStackError(f"GGUF architecture {arch!r} is not supported (supported: {list(SUPPORTED_ARCHS)})")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    for key in ("embedding_length", "attention.head_count", "block_count"):
        if get(key) is None:
            raise LMStackError(f"GGUF metadata lacks {arch}.{key}, which a {arch} model needs")
    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    special = dict(
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        # llama.cpp ends generation at eos and at the end-of-turn / end-of-message tokens as well
        eos_token_id=merged_eos(meta.get("tokenizer.ggml.eos_token_id"),
                                [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                                 if meta.get(k) is not None]),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    if arch == "gpt2":
        return ModelConfig(
            vocab_size=get("vocab_size") or len(tokens), block_size=get("context_length", 1024),
            n_layer=get("block_count"), n_embd=n_embd, n_head=n_head,
            intermediate_size=get("feed_forward_length") or 4 * n_embd, norm="layernorm",
            norm_eps=_float32(get("attention.layer_norm_epsilon", 1e-5)), positions="learned", mlp="gelu",
            gelu_approximate="tanh", bias="all", tie_embeddings=_tied_output(tensors, compare=True), family="gpt2",
            **special)
    head_dim = get("attention.key_length") or n_embd // n_head
    rope_scaling = None
    kind = get("rope.scaling.type")
    if kind in ("linear", "yarn"):
        rope_scaling = {"rope_type": kind, "factor": get("rope.scaling.factor")}
        if kind == "yarn":
            rope_scaling["original_max_position_embeddings"] = get("rope.scaling.original_context_length")
    elif kind not in (None, "none"):
        raise LMStackError(f"GGUF rope scaling {kind!r} is not supported")
    if ROPE_FREQS in tensors:
        if rope_scaling is not None:
            raise LMStackError(f"GGUF: both rope scaling {kind!r} and per-frequency factors ({ROPE_FREQS})")
        factors = torch.from_numpy(np.array(tensors[ROPE_FREQS].data, dtype=np.float64)).flatten()
        rotary_dim = get("rope.dimension_count") or head_dim
        rope_scaling = llama3_scaling_from_factors(factors, get("rope.freq_base", 10000.0), rotary_dim,
                                                   get("rope.scaling.original_context_length"))
    return ModelConfig(
        vocab_size=get("vocab_size") or len(tokens),
        block_size=get("context_length", 2048),
        n_layer=get("block_count"),
        n_embd=n_embd,
        n_head=n_head,
        n_kv_head=get("attention.head_count_kv") or n_head,
        head_dim=head_dim,
        norm="rmsnorm",
        norm_eps=_float32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        positions="rope",
        rope_theta=get("rope.freq_base", 10000.0),
        rope_scaling=rope_scaling,
        rotary_fraction=(get("rope.dimension_count") or head_dim) / head_dim,
        mlp="swiglu",
        intermediate_size=get("feed_forward_length"),
        bias="qkv" if "blk.0.attn_q.bias" in tensor_names else "none",
        # No sliding window: llama.cpp reads phi3.attention.sliding_window but turns Phi-3's window off.
        tie_embeddings=_tied_output(tensors),
        family=arch if arch in ("qwen2", "phi3") else "llama",
        **special,
    )


def _tied_output(tensors: dict[str, Any], compare: bool = False) -> bool:
    """Whether the output head is the token embedding: no output.weight, or, with `compare` (GPT-2, whose
    converter writes the tied head again), a copy of it; only then are the two matrices read."""
    out, embed = tensors.get("output.weight"), tensors.get("token_embd.weight")
    if out is None:
        return True
    return (compare and embed is not None and out.tensor_type == embed.tensor_type
            and np.array_equal(np.asarray(out.data), np.asarray(embed.data)))


def read_gguf_config(path: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a GGUF file, from its metadata (and RoPE factors): no weight is read."""
    reader = _reader(path)
    return config_from_gguf(_metadata(reader), {t.name: t for t in reader.tensors})


# llama.cpp keeps Llama 3's RoPE scaling as one divisor per rotary frequency (its converter computes them
# from the Hugging Face parameters); lmstack, like transformers, keeps the parameters.
ROPE_FREQS = "rope_freqs.weight"
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama3_divisors(scaling: dict[str, Any], theta: float, rotary_dim: int) -> torch.Tensor:
    """The per-frequency divisors llama.cpp's converter writes to `rope_freqs.weight` for Llama 3 scaling."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    freqs = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < old / high, 1.0, torch.where(wavelen > old / low, factor, blended))


def llama3_scaling_from_factors(factors: torch.Tensor, theta: float, rotary_dim: int,
                                original: int | None = None) -> dict[str, Any] | None:
    """The Hugging Face `rope_scaling` of a GGUF's `rope_freqs.weight`: Llama 3's, its factor the largest
    divisor, with Llama 3.x's band (1, 4, 8192) when that reproduces every divisor, else a band found from
    them. Only the band's edges matter: with x = 1 / wavelength, frequencies below x_low = low / original are
    divided by the factor, those above x_high = high / original kept, and between them the blend weight
    s = (x - x_low) / (x_high - x_low) is a line, fitted through the blended divisors (any edges in the gaps
    between frequencies do where fewer than two are blended). Divisors of other schemes are refused."""
    if factors.numel() != rotary_dim // 2:
        raise LMStackError(f"GGUF {ROPE_FREQS} has {factors.numel()} values, expected {rotary_dim // 2} "
                           "(one per rotary frequency)")
    if torch.allclose(factors, torch.ones_like(factors)):
        return None  # no frequency is rescaled
    factor, old = float(factors.max()), original or _LLAMA3_DEFAULTS["original_max_position_embeddings"]
    candidates = [{"rope_type": "llama3", "factor": factor, **_LLAMA3_DEFAULTS}]
    x = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim) / (2 * math.pi)
    medium = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    divided, kept = x[factors >= factor * (1 - 1e-6)], x[factors <= 1 + 1e-6]
    top = float(divided.max())  # the highest frequency divided by the whole factor
    ceiling = float(kept.min()) if kept.numel() else 2 * float(x.max())  # the lowest one left as it is
    edges = None
    if factor > 1 and int(medium.sum()) >= 2:
        s = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
        a, b = torch.linalg.lstsq(torch.stack([x[medium], torch.ones_like(s)], 1), s[:, None]).solution.flatten().tolist()
        if a > 0:
            edges = (-b / a, (1 - b) / a)
    elif factor > 1 and int(medium.sum()) == 1:  # a line through the one blended point, edges close to it
        x1 = float(x[medium])
        s1 = float((1 / factors[medium] - 1 / factor) / (1 - 1 / factor))
        t = min(x1 - top, (ceiling - x1) * s1 / (1 - s1)) / 2
        edges = (x1 - t, x1 + t * (1 - s1) / s1)
    elif factor > 1:  # nothing blended: both edges in the gap between the divided and the kept frequencies
        edges = (top + (ceiling - top) / 3, top + 2 * (ceiling - top) / 3)
    if edges is not None:  # to 6 digits: the same numbers on every run (and 32.0 rather than 32.0000019)
        low, high = (float(f"{edge * old:.6g}") for edge in edges)
        candidates.append({"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                           "high_freq_factor": high, "original_max_position_embeddings": old})
    for scaling in candidates:
        if 0 < scaling["low_freq_factor"] < scaling["high_freq_factor"] and torch.allclose(
                llama3_divisors(scaling, theta, rotary_dim), factors, rtol=1e-4, atol=0):
            return scaling
    raise LMStackError(f"GGUF {ROPE_FREQS}: its per-frequency RoPE divisors are not Llama 3's scaling, the only "
                       "kind lmstack reads from them")


def _gguf_rules(config: ModelConfig) -> list[Rule]:
    """Every GGUF tensor of `config` (llama.cpp's names) with the lmstack tensors it holds: Phi-3 and GPT-2
    fuse q/k/v into attn_qkv, Phi-3 gate/up into ffn_up (gate first), and GPT-2 has biases everywhere."""
    from lmstack.checkpoints.hf import family_of

    family = family_of(config)
    rules = [Rule("token_embd.weight", ("embed.weight",))]
    if family == "gpt2":
        rules.append(Rule("position_embd.weight", ("pos_embed.weight",)))
    for i in range(config.n_layer):
        b, o = f"blk.{i}.", f"layers.{i}."
        layers: dict[str, tuple[str, ...]] = {"attn_norm": ("attn_norm",), "ffn_norm": ("mlp_norm",)}
        if family in ("gpt2", "phi3"):
            layers["attn_qkv"] = ("attn.q", "attn.k", "attn.v")
        else:
            layers.update(attn_q=("attn.q",), attn_k=("attn.k",), attn_v=("attn.v",))
        layers["attn_output"] = ("attn.o",)
        if family not in ("gpt2", "phi3"):
            layers["ffn_gate"] = ("mlp.gate",)
        layers["ffn_up"] = ("mlp.gate", "mlp.up") if family == "phi3" else ("mlp.up",)
        layers["ffn_down"] = ("mlp.down",)
        rules += [Rule(f"{b}{g}.weight", tuple(f"{o}{x}.weight" for x in ours)) for g, ours in layers.items()]
        if family == "gpt2":
            rules += [Rule(f"{b}{g}.bias", tuple(f"{o}{x}.bias" for x in ours)) for g, ours in layers.items()]
        elif config.bias == "qkv":
            rules += [Rule(f"{b}attn_{x}.bias", (f"{o}attn.{x}.bias",)) for x in "qkv"]
    rules.append(Rule("output_norm.weight", ("norm.weight",)))
    if family == "gpt2":
        rules.append(Rule("output_norm.bias", ("norm.bias",)))
    if not config.tie_embeddings:
        rules.append(Rule("output.weight", ("lm_head.weight",)))
    return rules


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: it interleaves each head's two rotary halves, (x0, x_half, x1, ...),
    for its adjacent-pairs RoPE; Hugging Face checkpoints keep the halves apart."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k layout (the inverse of `unpermute_rope_rows`), for writing GGUF files."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_gguf_model(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Any:
    """A `DecoderLM` from a GGUF file, every tensor dequantized to float32 (or `dtype`)."""
    from gguf.quants import dequantize

    reader = _reader(path)
    meta = _metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    config = config_from_gguf(meta, tensors)  # it reads rope_freqs.weight into config.rope_scaling
    tensors.pop(ROPE_FREQS, None)
    if config.tie_embeddings:
        tensors.pop("output.weight", None)  # GPT-2's converter writes the tied head again
    permute = meta.get("general.architecture") == "llama"

    def get(name: str) -> torch.Tensor:
        t = tensors[name]
        array = dequantize(t.data, t.tensor_type)  # numpy, in ggml's [rows, cols] = reversed `t.shape`
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not array.flags.writeable:  # F32 tensors come straight from the read-only memory map
            array = array.copy()
        w = torch.from_numpy(array).reshape(
            [int(d) for d in reversed(t.shape)])
        # llama.cpp's converter permutes the rows of q and k, weights and biases alike
        if permute and name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_rope_rows(w, config.n_head)
        elif permute and name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_rope_rows(w, config.n_kv_head)
        return w

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device or "cpu", dtype=dtype or torch.float32)

    state = convert_to_ours(_gguf_rules(config), expected_shapes(config), tensors, get, str(path), convert)
    return materialize(config, state, device)


# ---------------------------------------------------------------------------------------------- tokenizer


def load_gguf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Rebuild the tokenizer stored in a GGUF file's metadata."""
    meta = _metadata(_reader(path))
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise LMStackError(f"{path}: the GGUF file carries no tokenizer vocabulary")
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if kind == "gpt2":
        backend = _byte_level_backend(meta, tokens, str(path))
    elif kind == "llama":
        backend = _sentencepiece_backend(meta, tokens, types)
    else:
        raise LMStackError(f"{path}: GGUF tokenizer model {kind!r} is not supported (gpt2, llama)")
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    # The unknown token is special too, as transformers' converters and llama.cpp make it: "<unk>" in text is it
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token("bos_token_id")
    # Without the key, llama.cpp adds bos for SentencePiece vocabularies and Llama 3-style BPE ones
    default_bos = kind == "llama" or meta.get("tokenizer.ggml.pre") in LLAMA3_PRE_TOKENIZERS
    if meta.get("tokenizer.ggml.add_bos_token", default_bos) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    return Tokenizer(
        backend, bos_token=bos, eos_token=token("eos_token_id"), pad_token=token("padding_token_id"),
        unk_token=token("unknown_token_id"), chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=meta.get(f"{meta.get('general.architecture')}.context_length"),
    )


def _byte_level_backend(meta: dict[str, Any], tokens: list[str], where: str) -> Backend:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise LMStackError(f"{where}: GGUF pre-tokenizer {pre!r} is not supported; supported: "
                           f"{sorted(PRE_TOKENIZER_SPLITS)}")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                 ignore_merges=pre in LLAMA3_PRE_TOKENIZERS))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(meta: dict[str, Any], tokens: list[str], types: list[int]) -> Backend:
    """SentencePiece BPE (Llama 1/2, Mistral, Phi-3): merges recovered from the piece scores, bytes as
    <0xNN> fallback tokens, spaces spelled as U+2581 with one prepended."""
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    # A merge a + b exists wherever the piece a+b does; pieces with higher scores merge first.
    merges = []
    for piece, i in vocab.items():
        if types[i] != 1 or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((scores[i], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    unk = tokens[meta["tokenizer.ggml.unknown_token_id"]] if "tokenizer.ggml.unknown_token_id" in meta else None
    backend = Backend(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk,
                                 fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Replace(" ", "\u2581")]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("\u2581"))
    backend.normalizer = normalizers.Sequence(steps)
    backend.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(" ", 1, 0)] if meta.get("tokenizer.ggml.add_space_prefix", True) else []),
    ])
    return backend


# ---------------------------------------------------------------------------------------------- export

GGUF_TYPES = ("f32", "f16", "q8_0")


def _canonical_split(regex: str) -> str:
    """Hugging Face files (Llama 3, Qwen2) spell the contractions case-insensitively, llama.cpp's tables with
    explicit classes: the same rule."""
    return regex.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)", "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])")


def _pre_tokenizer_name(backend: Backend) -> str:
    """The llama.cpp pre-tokenizer name whose split rules equal this byte-level tokenizer's."""
    import json

    from lmstack.tokenizer import GPT4_SPLIT

    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # SmolLM2's and StarCoder's spelling: single digits, then GPT-2's split
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("use_regex"):
        raise LMStackError("GGUF export needs a byte-level tokenizer whose split rules llama.cpp knows")
    splits = [_canonical_split(s.get("pattern", {}).get("Regex") or "") for s in steps[:-1]
              if s.get("type") == "Split"]
    if splits == [_canonical_split(GPT4_SPLIT)]:
        return "llama-bpe"
    for name, regexes in PRE_TOKENIZER_SPLITS.items():
        if splits == regexes:
            return name
    raise LMStackError(f"GGUF export: no llama.cpp pre-tokenizer has the split rules {splits}")


_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _spaces_as_metaspace(tree: dict[str, Any]) -> tuple[bool, bool]:
    """(spaces spelled U+2581, a U+2581 prepended) as a SentencePiece-style tokenizer.json does it: in the
    normalizer (Llama 2's Prepend + Replace) or the pre-tokenizer (Metaspace)."""
    parts = []
    for key in ("normalizer", "pre_tokenizer"):
        node = tree.get(key) or {}
        parts += node.get("normalizers") or node.get("pretokenizers") or [node]
    replaced = any(p.get("type") == "Replace" and p.get("content") == "\u2581" for p in parts)
    prepended = any(p.get("type") == "Prepend" and p.get("prepend") == "\u2581" for p in parts)
    for p in parts:
        if p.get("type") == "Metaspace":
            replaced = True
            prepended = prepended or p.get("prepend_scheme", "always") in ("always", "first")
    return replaced, prepended


def _tokenizer_metadata(writer: Any, tokenizer: Tokenizer, vocab_size: int) -> None:
    """The tokenizer as llama.cpp reads it: byte-level BPE ("gpt2": tokens, merges, the pre-tokenizer's name)
    or SentencePiece-style BPE with byte fallback ("llama": tokens, scores, types)."""
    import json

    backend = tokenizer.backend
    tree = json.loads(backend.to_str())
    model = tree["model"]
    if model.get("type") != "BPE":
        raise LMStackError(f"GGUF export supports BPE tokenizers (byte-level or SentencePiece-style), not "
                           f"{model.get('type')}")
    sentencepiece = bool(model.get("byte_fallback"))
    replaced, prepended = _spaces_as_metaspace(tree)
    if sentencepiece and not replaced:
        raise LMStackError("GGUF export: a byte-fallback BPE tokenizer that does not spell spaces as U+2581 is "
                           "not SentencePiece-style, which llama.cpp's llama tokenizer needs")
    added = backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        token = backend.id_to_token(i)
        if token is None:  # the model's vocabulary may be padded past the tokenizer's
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(CONTROL if added[i].special else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(UNKNOWN if sentencepiece and token == tokenizer.unk_token
                         else BYTE if sentencepiece and _BYTE_PIECE.fullmatch(token) else 1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if sentencepiece:
        # llama.cpp merges the adjacent pair whose joined piece scores highest: a piece scores minus the rank
        # of the first merge that makes it, so pieces merge in the merges' order (what load_gguf_tokenizer
        # reads back); a piece no merge makes scores lowest.
        rank: dict[str, int] = {}
        for k, merge in enumerate(merges):
            rank.setdefault(merge.replace(" ", "", 1), k)
        scores = [-float(rank[t]) if t in rank else (0.0 if len(t) == 1 or ty != 1 else -1e9)
                  for t, ty in zip(tokens, types)]
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(prepended)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(backend))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    unk = tokenizer.token_to_id(tokenizer.unk_token) if tokenizer.unk_token is not None else None
    if unk is not None:  # a byte-level vocabulary has no unknown bytes, but files name it (SmolLM2's: 0)
        writer.add_unk_token_id(unk)
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(tokenizer.adds_bos)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def gguf_arch(config: ModelConfig) -> str:
    """The llama.cpp architecture `config` is written as."""
    from lmstack.checkpoints.hf import family_of

    family = family_of(config)
    if family in ("gpt2", "phi3"):
        return family
    return "qwen2" if config.bias == "qkv" else "llama"


def write_model_metadata(writer: Any, config: ModelConfig) -> None:
    """The architecture's hyperparameters, as llama.cpp reads them."""
    import gguf

    arch = gguf_arch(config)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    if arch == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
        return
    writer.add_head_count_kv(config.n_kv_head)
    if config.head_dim != config.n_embd // config.n_head:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.rotary_dim)
    if config.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling["factor"])
    writer.add_layer_norm_rms_eps(config.norm_eps)
    if arch == "phi3":  # as llama.cpp's Phi-3 converter writes it
        writer.add_rope_scaling_orig_ctx_len(config.block_size)
    writer.add_vocab_size(config.vocab_size)


def _check_exportable(config: ModelConfig, tensor_type: str) -> None:
    """Raise naming what llama.cpp would compute differently from lmstack (or cannot hold)."""
    from lmstack.checkpoints.hf import config_to_hf, family_of

    if config.arch != "transformer":
        raise LMStackError(f"GGUF export: a recurrent LM (arch {config.arch!r}) has no llama.cpp architecture")
    family = family_of(config)
    if config.n_expert:
        raise LMStackError("GGUF export of a mixture of experts is not supported")
    if family not in ("llama", "mistral", "qwen2", "phi3", "gpt2"):
        raise LMStackError(f"GGUF export supports the llama, mistral, qwen2, phi3 and gpt2 families, not {family!r}")
    config_to_hf(config)  # the family's own constraints (GPT-2: learned positions, LayerNorm; partial rotary)
    if tensor_type not in GGUF_TYPES:
        raise LMStackError(f"GGUF tensor type {tensor_type!r} is not one of {list(GGUF_TYPES)}")
    if family == "gpt2":
        if config.gelu_approximate != "tanh":
            raise LMStackError("GGUF export: llama.cpp's gpt2 computes the tanh GELU (gelu_new), not the exact one")
        return
    if config.sliding_window is not None and config.sliding_window < config.block_size:
        # llama.cpp's phi3 reads the key but turns Phi-3's window off (full attention), its llama has none
        raise LMStackError(f"GGUF export: a sliding window ({config.sliding_window} of {config.block_size} "
                           f"positions) is not computed by llama.cpp's {gguf_arch(config)} architecture")
    if config.rope_type not in ("default", "linear", "llama3") or (family == "phi3" and config.rope_scaling):
        raise LMStackError(f"GGUF export: rope scaling {config.rope_type!r} is not supported "
                           f"({'none for phi3' if family == 'phi3' else 'default, linear, llama3'})")
    if config.bias not in ("none", "qkv") or config.mlp != "swiglu":
        raise LMStackError("GGUF export: needs a SwiGLU MLP and no biases beyond q/k/v")
    if config.rope_type == "llama3":
        divisors = llama3_divisors(config.rope_scaling, config.rope_theta, config.rotary_dim)
        if float(divisors.max()) < config.rope_scaling["factor"] * (1 - 1e-6):
            raise LMStackError(f"GGUF export: no rotary frequency of this model is divided by the whole llama3 factor "
                               f"{config.rope_scaling['factor']}, so llama.cpp's per-frequency divisors cannot carry "
                               "the scaling")


def save_gguf(model: Any, tokenizer: Tokenizer, path: str | os.PathLike, tensor_type: str = "f32") -> Path:
    """Write a Llama-, Mistral-, Qwen2-, Phi-3- or GPT-2-family `DecoderLM` and its BPE tokenizer (byte-level,
    or SentencePiece-style with byte fallback) as one GGUF file.

    `tensor_type` is f32, f16 or q8_0 for the 2-D weights; norms and biases stay f32, as llama.cpp keeps them.
    """
    import gguf

    config: ModelConfig = model.config
    _check_exportable(config, tensor_type)
    arch = gguf_arch(config)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(config.name or path.stem)
    write_model_metadata(writer, config)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[tensor_type]
    writer.add_file_type(file_type)
    _tokenizer_metadata(writer, tokenizer, config.vocab_size)

    state = model.state_dict()
    rules = _gguf_rules(config)
    if arch == "gpt2" and config.tie_embeddings:  # llama.cpp's gpt2 reads the head from output.weight: a copy
        rules.append(Rule("output.weight", ("embed.weight",)))

    def tensor(name: str) -> torch.Tensor:
        if name not in state:  # a bias-free GPT-2 (nanoGPT's bias=False): the format holds zeros, as HF's does
            return torch.zeros(state[name.removesuffix(".bias") + ".weight"].shape[0])
        return state[name].detach().float().cpu()

    for rule in rules:
        w = torch.cat([tensor(name) for name in rule.ours])
        if arch == "llama" and rule.hf.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
            w = permute_rope_rows(w, config.n_head if ".attn_q." in rule.hf else config.n_kv_head)
        array = w.numpy()
        if array.ndim == 1 or tensor_type == "f32":
            writer.add_tensor(rule.hf, array)
        elif tensor_type == "f16" or array.shape[-1] % 32:  # Q8_0 packs rows in blocks of 32: where they
            writer.add_tensor(rule.hf, array.astype(np.float16))  # don't fit, f16, as llama.cpp's converter
        else:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(rule.hf, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    if config.rope_type == "llama3":  # as llama.cpp's converter writes it: one divisor per frequency
        writer.add_tensor(ROPE_FREQS, llama3_divisors(config.rope_scaling, config.rope_theta,
                                                      config.rotary_dim).float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path
