"""Hugging Face checkpoint directories: config.json and safetensors weights, read and written.

This is the one place where Hugging Face's names live. A checkpoint of a supported family maps to
`ModelConfig` and to lmstack's parameter names through the tables below; fused layouts (Phi-3's qkv_proj and
gate_up_proj, GPT-2's c_attn) are split on load and fused again on save, and GPT-2's Conv1D weights are
transposed.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmstack.atomic import atomic_write
from lmstack.config import ModelConfig, eos_ids
from lmstack.errors import LMStackError
from lmstack.models.decoder import DecoderLM

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "mixtral", "phi3")
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
# The families whose transformers class applies partial_rotary_factor (the others rotate every dimension).
PARTIAL_ROTARY_FAMILIES = ("phi3",)
# Tensors some checkpoints carry that are not weights (old rotary caches, GPT-2's causal-mask buffers).
IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")

# transformers' defaults for the keys a config.json may leave out, where a family's differ from Llama's
# (tests/parity/test_against_hf.py checks them against transformers' config classes).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048),
    "mistral": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=131072, sliding_window=4096,
                    num_key_value_heads=8),
    "qwen2": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768, sliding_window=4096,
                  num_key_value_heads=32, max_window_layers=28),
    "mixtral": dict(rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=131072, num_key_value_heads=8,
                    router_aux_loss_coef=0.001),
    "phi3": dict(rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096),
}


def _default(c: dict[str, Any], family: str, key: str) -> Any:
    """`c[key]`, or transformers' default for `family` when the config leaves it out."""
    return c[key] if key in c else FAMILY_DEFAULTS[family].get(key)


# ---------------------------------------------------------------------------------------------- config


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a directory (or the file itself), with errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise LMStackError(f"{path}: no such file or directory")
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise LMStackError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        hint = ": pass the checkpoint directory that holds it" if file.suffix == ".safetensors" else ""
        raise LMStackError(f"{file}: not a config.json (binary, not UTF-8 text){hint}") from None
    except json.JSONDecodeError as e:
        raise LMStackError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LMStackError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


# generation_config.json's sampling settings, which a loaded model carries (`ModelConfig.extra`) to its saves
# and `lmstack generate` takes as its defaults, as transformers' generate and vLLM do.
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty")


def apply_generation_config(config: ModelConfig, path: Path) -> None:
    """What a directory's generation_config.json, where it has one, adds to a loaded model's config: its eos
    ids (Llama 3, Qwen2.5 and Phi-3 list several there: `transformers` stops at any of them) and its sampling
    settings, into `config.extra` over what the config carried (a null is a setting left unset, as
    transformers and vLLM read it)."""
    file = path / "generation_config.json"
    if not path.is_dir() or not file.exists():
        return
    try:
        generation = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LMStackError(f"{file}: not a JSON object ({e})") from None
    if not isinstance(generation, dict):
        raise LMStackError(f"{file}: not a JSON object")
    eos = generation.get("eos_token_id")
    ids = eos_ids(eos)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise LMStackError(f"{file}: eos_token_id must be a token id or a list of them, got {eos!r}")
    config.eos_token_id = merged_eos(config.eos_token_id, ids)
    settings = {k: v for k, v in generation.items() if k in SAMPLING_KEYS and v is not None}
    config.extra.pop("generation_config", None)
    if settings:
        config.extra["generation_config"] = settings


def merged_eos(eos: int | list[int] | None, more: list[int]) -> int | list[int] | None:
    """`eos` with the ids of `more` it lacks: one id stays an int, several become a list."""
    ids = eos_ids(eos)
    ids += [i for i in more if i not in ids]
    return None if not ids else ids[0] if len(ids) == 1 else ids


def _rope_fields(c: dict[str, Any], family: str, where: str) -> dict[str, Any]:
    """rope_theta, rope_scaling and the rotary fraction, from either the v4 (`rope_theta` + `rope_scaling`)
    or the v5 (`rope_parameters`) spelling, as transformers' class for `family` applies them."""
    params = dict(c.get("rope_parameters") or {})
    scaling = dict(c.get("rope_scaling") or {}) or {k: v for k, v in params.items()
                                                    if k not in ("rope_theta", "partial_rotary_factor")}
    theta = params.get("rope_theta", c.get("rope_theta", FAMILY_DEFAULTS[family]["rope_theta"]))
    fraction = float(params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)))
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    kind = scaling.get("rope_type", "default")
    if kind in ("llama3", "yarn"):
        # As transformers: a top-level original_max_position_embeddings (Phi-3 writes one) wins over the one
        # inside rope_scaling, and without either it is max_position_embeddings.
        if c.get("original_max_position_embeddings") is not None:
            scaling["original_max_position_embeddings"] = c["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", _default(c, family, "max_position_embeddings"))
    if kind == "default":
        scaling = None
    elif kind not in ("linear", "dynamic", "llama3", "yarn"):
        raise LMStackError(f"{where}: rope scaling type {kind!r} is not supported "
                           "(supported: linear, dynamic, llama3, yarn)")
    elif family == "phi3":
        # transformers' Phi-3 reads 'yarn' (and 'su') as longrope, which lmstack lacks, and refuses the others.
        raise LMStackError(f"{where}: phi3 with rope scaling type {kind!r} is not supported (transformers' "
                           "Phi-3 accepts only default RoPE or longrope, and lmstack does not implement longrope)")
    if fraction != 1.0 and family not in PARTIAL_ROTARY_FAMILIES:
        if scaling is not None:
            # Here transformers' scaled RoPE is partial but its attention is not: the model cannot run there.
            raise LMStackError(f"{where}: partial_rotary_factor={fraction} with {kind!r} rope scaling is not "
                               f"supported for {family!r} (transformers fails on it; only phi3 has a partial rotary)")
        fraction = 1.0  # transformers' default RoPE for this family rotates every dimension and ignores the key
    return dict(rope_theta=float(theta), rope_scaling=scaling, rotary_fraction=fraction)


# transformers' ACT2FN names of the GELUs that lmstack computes, with F.gelu's `approximate` for each.
# gelu_fast and gelu_accurate are the same tanh formula written differently; gelu_10 (clipped) and quick_gelu
# (a sigmoid) are other functions and are refused.
GELU_APPROXIMATE = {
    "gelu": "none", "gelu_python": "none",
    "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_python_tanh": "tanh", "gelu_fast": "tanh",
    "gelu_accurate": "tanh",
}


def _gated_mlp(act: str, where: str) -> dict[str, str]:
    """`mlp` and `gelu_approximate` for a gated MLP's hidden_act."""
    if act in ("silu", "swish"):
        return dict(mlp="swiglu", gelu_approximate="tanh")
    if act in GELU_APPROXIMATE:
        return dict(mlp="geglu", gelu_approximate=GELU_APPROXIMATE[act])
    raise LMStackError(f"{where}: hidden_act {act!r} is not supported "
                       f"(supported: silu, swish, {', '.join(GELU_APPROXIMATE)})")


def config_from_hf(hf: dict[str, Any] | str | os.PathLike, where: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face config (dict or path) into a `ModelConfig`; errors name the file (`where`, for
    a dict) and key."""
    if isinstance(hf, dict):
        c = hf
    else:
        c, path = read_hf_config(hf), Path(hf)
        where = str(path / "config.json" if path.is_dir() else path)
    try:
        return _config_from_hf(c, where)
    except KeyError as e:
        raise LMStackError(f"{where}: no {e.args[0]!r}, which a {c.get('model_type')!r} config needs") from None
    except LMStackError as e:
        if not str(e).startswith("ModelConfig."):
            raise
        # A value ModelConfig refuses, named as config.json names it (n_kv_head is num_key_value_heads)
        message = str(e).removeprefix("ModelConfig.")
        if c.get("model_type") != "gpt2":
            message = re.sub(r"\b(" + "|".join(HF_KEYS) + r")\b", lambda m: HF_KEYS[m[1]], message)
        raise LMStackError(f"{where}: {message}") from None


# config.json's names of the ModelConfig fields whose checks a Hugging Face config can fail (GPT-2: the same)
HF_KEYS = {"n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads", "n_embd": "hidden_size",
           "n_layer": "num_hidden_layers", "block_size": "max_position_embeddings", "vocab_size": "vocab_size",
           "intermediate_size": "intermediate_size", "head_dim": "head_dim", "sliding_window": "sliding_window"}


def _config_from_hf(c: dict[str, Any], where: str) -> ModelConfig:
    family = c.get("model_type")
    if family is None:
        raise LMStackError(f"{where}: no model_type (architectures: {c.get('architectures')}); supported: "
                           f"{list(FAMILIES)}")
    if family not in FAMILIES:
        raise LMStackError(f"{where}: model_type {family!r} is not supported; supported: {list(FAMILIES)}")
    tokens = dict(bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"),
                  pad_token_id=c.get("pad_token_id"))
    if family == "gpt2":
        act = c.get("activation_function", "gelu_new")
        if act not in GELU_APPROXIMATE:
            raise LMStackError(f"{where}: activation_function {act!r} is not supported for gpt2 "
                               f"(supported: {', '.join(GELU_APPROXIMATE)})")
        if c.get("scale_attn_by_inverse_layer_idx") or c.get("scale_attn_weights") is False:
            key = "scale_attn_by_inverse_layer_idx" if c.get("scale_attn_by_inverse_layer_idx") else "scale_attn_weights"
            raise LMStackError(f"{where}: {key}={c[key]!r}: GPT-2's attention scaling variants are not supported")
        return ModelConfig(
            vocab_size=c["vocab_size"], block_size=c.get("n_positions", 1024), n_layer=c["n_layer"],
            n_embd=c["n_embd"], n_head=c["n_head"], intermediate_size=c.get("n_inner") or 4 * c["n_embd"],
            norm="layernorm", norm_eps=c.get("layer_norm_epsilon", 1e-5), positions="learned", mlp="gelu",
            gelu_approximate=GELU_APPROXIMATE[act], bias="all",
            tie_embeddings=c.get("tie_word_embeddings", True), dropout=c.get("resid_pdrop", 0.0),
            init_std=c.get("initializer_range", 0.02), family="gpt2", **tokens,
        )

    n_head = c["num_attention_heads"]
    fields = dict(
        vocab_size=c["vocab_size"], block_size=_default(c, family, "max_position_embeddings"),
        n_layer=c["num_hidden_layers"], n_embd=c["hidden_size"], n_head=n_head,
        n_kv_head=_default(c, family, "num_key_value_heads") or n_head,  # null: as many as the heads
        head_dim=c.get("head_dim") or c["hidden_size"] // n_head,
        norm="rmsnorm", norm_eps=_default(c, family, "rms_norm_eps"), positions="rope",
        **_rope_fields(c, family, where),
        **_gated_mlp(c.get("hidden_act", "silu"), where),
        intermediate_size=c["intermediate_size"], bias="none",
        tie_embeddings=c.get("tie_word_embeddings", False), dropout=c.get("attention_dropout", 0.0),
        init_std=c.get("initializer_range", 0.02), family=family, **tokens,
    )
    if family == "llama":
        attn_bias, mlp_bias = c.get("attention_bias", False), c.get("mlp_bias", False)
        if attn_bias != mlp_bias:
            raise LMStackError(f"{where}: attention_bias and mlp_bias differ; lmstack supports both or neither")
        fields["bias"] = "all" if attn_bias else "none"
    if family in ("mistral", "mixtral", "phi3"):
        fields["sliding_window"] = _default(c, family, "sliding_window")
    if family == "qwen2":
        fields["bias"] = "qkv"
        fields["sliding_window"] = _qwen2_window(c, where)
    if family == "mixtral":
        # transformers adds the router's load-balancing loss only with output_router_logits (off by default);
        # the coefficient travels in `extra` for the save, whether or not it is in use
        coef = _default(c, family, "router_aux_loss_coef")
        fields.update(n_expert=c["num_local_experts"], n_expert_per_token=c["num_experts_per_tok"],
                      moe_aux_loss_coef=coef if c.get("output_router_logits") else 0.0,
                      extra={"router_aux_loss_coef": coef})
    return ModelConfig(**fields)


def _qwen2_window(c: dict[str, Any], where: str) -> int | None:
    n = c["num_hidden_layers"]
    window = _default(c, "qwen2", "sliding_window")
    if c.get("layer_types"):
        kinds = set(c["layer_types"])
    elif c.get("use_sliding_window") and window:
        start = _default(c, "qwen2", "max_window_layers")
        kinds = {"sliding_attention" if i >= start else "full_attention" for i in range(n)}
    else:
        kinds = {"full_attention"}
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return window
    how = "layer_types" if c.get("layer_types") else f"use_sliding_window with max_window_layers={c.get('max_window_layers')}"
    raise LMStackError(f"{where}: {how}: qwen2 with sliding windows on only some layers is not supported")


def family_of(config: ModelConfig) -> str:
    """The Hugging Face family a config is written as: its `family` field, or the closest match."""
    if config.family:
        if config.family not in FAMILIES:
            raise LMStackError(f"ModelConfig.family {config.family!r} is not one of {list(FAMILIES)}")
        return config.family
    if config.positions == "learned":
        return "gpt2"
    if config.n_expert:
        return "mixtral"
    if config.bias == "qkv":
        return "qwen2"
    return "mistral" if config.sliding_window else "llama"


def _require(config: ModelConfig, family: str, **expected: Any) -> None:
    wrong = [f"{k}={getattr(config, k)!r} (needs {v!r})" for k, v in expected.items() if getattr(config, k) != v]
    if wrong:
        raise LMStackError(f"cannot write this config as Hugging Face {family!r}: " + ", ".join(wrong))


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The config.json of `config`'s family, readable by `transformers.AutoConfig`."""
    fam = family_of(config)
    out: dict[str, Any] = {"architectures": [ARCHITECTURES[fam]], "model_type": fam}
    if fam == "gpt2":
        # GPT-2 checkpoints always hold linear biases: a bias-free model (nanoGPT's bias=False) writes zeros.
        _require(config, fam, positions="learned", norm="layernorm", mlp="gelu",
                 bias=config.bias if config.bias in ("all", "none") else "all",
                 n_kv_head=config.n_head, head_dim=config.n_embd // config.n_head, lm_head_bias=False,
                 sliding_window=None, n_expert=0)
        out.update(
            vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
            n_layer=config.n_layer, n_head=config.n_head, n_inner=config.intermediate_size,
            activation_function="gelu_new" if config.gelu_approximate == "tanh" else "gelu",
            layer_norm_epsilon=config.norm_eps, resid_pdrop=config.dropout, embd_pdrop=config.dropout,
            attn_pdrop=config.dropout, initializer_range=config.init_std,
            tie_word_embeddings=config.tie_embeddings,
        )
    else:
        bias = {"qwen2": "qkv", "llama": config.bias if config.bias != "qkv" else "none"}.get(fam, "none")
        _require(config, fam, positions="rope", norm="rmsnorm", bias=bias, lm_head_bias=False)
        if config.mlp == "gelu":
            raise LMStackError(f"cannot write this config as Hugging Face {fam!r}: mlp='gelu' (needs a gated MLP)")
        if fam != "mixtral" and config.n_expert:
            raise LMStackError(f"cannot write this config as Hugging Face {fam!r}: n_expert={config.n_expert}")
        if fam == "llama" and config.sliding_window is not None:
            raise LMStackError("cannot write this config as Hugging Face 'llama': it has no sliding window")
        if config.rotary_fraction != 1.0 and fam not in PARTIAL_ROTARY_FAMILIES:
            raise LMStackError(f"cannot write this config as Hugging Face {fam!r}: rotary_fraction="
                               f"{config.rotary_fraction} (transformers' {ARCHITECTURES[fam]} ignores "
                               "partial_rotary_factor and rotates every dimension; only 'phi3' has a partial rotary)")
        if fam == "phi3" and config.rope_type != "default":
            raise LMStackError(f"cannot write this config as Hugging Face 'phi3': rope_scaling type "
                               f"{config.rope_type!r} (transformers' Phi-3 accepts only default RoPE or longrope, "
                               "which lmstack does not implement)")
        if fam == "mixtral":
            # Mixtral always renormalises the top-k router weights.
            _require(config, fam, moe_renormalize=True)
        rope_scaling = dict(config.rope_scaling) if config.rope_scaling else None
        if config.rope_type == "yarn" and not rope_scaling.get("factor"):  # transformers needs it written out
            trained = rope_scaling.get("original_max_position_embeddings") or config.block_size
            rope_scaling["factor"] = config.block_size / trained
        out.update(
            vocab_size=config.vocab_size, max_position_embeddings=config.block_size,
            hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
            num_key_value_heads=config.n_kv_head, head_dim=config.head_dim,
            hidden_act="silu" if config.mlp == "swiglu" else
            "gelu_pytorch_tanh" if config.gelu_approximate == "tanh" else "gelu",
            rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, rope_scaling=rope_scaling,
            tie_word_embeddings=config.tie_embeddings, attention_dropout=config.dropout,
            initializer_range=config.init_std,
        )
        if config.rotary_fraction != 1.0:
            out["partial_rotary_factor"] = config.rotary_fraction
        if fam == "llama":
            out.update(attention_bias=config.bias == "all", mlp_bias=config.bias == "all")
        if fam in ("mistral", "mixtral", "phi3"):
            out["sliding_window"] = config.sliding_window
        if fam == "qwen2":
            window = config.sliding_window
            out.update(use_sliding_window=window is not None, sliding_window=window,
                       max_window_layers=0 if window is not None else config.n_layer)
        if fam == "mixtral":
            out.update(num_local_experts=config.n_expert, num_experts_per_tok=config.n_expert_per_token,
                       router_aux_loss_coef=config.moe_aux_loss_coef or config.extra.get("router_aux_loss_coef", 0.0),
                       output_router_logits=bool(config.moe_aux_loss_coef))
    out.update(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
               pad_token_id=config.pad_token_id)
    return out


# ---------------------------------------------------------------------------------------------- weight names


@dataclass(frozen=True)
class Rule:
    """One Hugging Face tensor <-> one or more lmstack tensors concatenated along dim 0.

    `transpose` marks GPT-2's Conv1D weights, stored [in, out] rather than nn.Linear's [out, in].
    """

    hf: str
    ours: tuple[str, ...]
    transpose: bool = False


def weight_rules(config: ModelConfig, gpt2_prefix: str = "transformer.", lm_head: bool = True) -> list[Rule]:
    """Every tensor of `config`'s Hugging Face family, with where it lives in `DecoderLM`.

    `lm_head=False` leaves out the output head (a sequence classifier's body has none).
    """
    fam = family_of(config)
    rules: list[Rule] = []

    def add(hf: str, *ours: str, transpose: bool = False) -> None:
        rules.append(Rule(hf, ours, transpose))

    if fam == "gpt2":
        p = gpt2_prefix
        add(f"{p}wte.weight", "embed.weight")
        add(f"{p}wpe.weight", "pos_embed.weight")
        for i in range(config.n_layer):
            h, o = f"{p}h.{i}.", f"layers.{i}."
            for ln, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                add(f"{h}{ln}.weight", f"{o}{ours}.weight")
                add(f"{h}{ln}.bias", f"{o}{ours}.bias")
            add(f"{h}attn.c_attn.weight", *(f"{o}attn.{x}.weight" for x in "qkv"), transpose=True)
            add(f"{h}attn.c_attn.bias", *(f"{o}attn.{x}.bias" for x in "qkv"))
            for hf_name, ours in (("attn.c_proj", "attn.o"), ("mlp.c_fc", "mlp.up"), ("mlp.c_proj", "mlp.down")):
                add(f"{h}{hf_name}.weight", f"{o}{ours}.weight", transpose=True)
                add(f"{h}{hf_name}.bias", f"{o}{ours}.bias")
        add(f"{p}ln_f.weight", "norm.weight")
        add(f"{p}ln_f.bias", "norm.bias")
    else:
        add("model.embed_tokens.weight", "embed.weight")
        for i in range(config.n_layer):
            h, o = f"model.layers.{i}.", f"layers.{i}."
            add(f"{h}input_layernorm.weight", f"{o}attn_norm.weight")
            add(f"{h}post_attention_layernorm.weight", f"{o}mlp_norm.weight")
            if fam == "phi3":
                add(f"{h}self_attn.qkv_proj.weight", *(f"{o}attn.{x}.weight" for x in "qkv"))
            else:
                for x in "qkv":
                    add(f"{h}self_attn.{x}_proj.weight", f"{o}attn.{x}.weight")
                    if config.bias in ("all", "qkv"):
                        add(f"{h}self_attn.{x}_proj.bias", f"{o}attn.{x}.bias")
            add(f"{h}self_attn.o_proj.weight", f"{o}attn.o.weight")
            if config.bias == "all":
                add(f"{h}self_attn.o_proj.bias", f"{o}attn.o.bias")
            if config.n_expert:
                moe = f"{h}block_sparse_moe."
                add(f"{moe}gate.weight", f"{o}mlp.router.weight")
                for e in range(config.n_expert):
                    for hf_name, ours in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
                        add(f"{moe}experts.{e}.{hf_name}.weight", f"{o}mlp.experts.{e}.{ours}.weight")
            elif fam == "phi3":
                add(f"{h}mlp.gate_up_proj.weight", f"{o}mlp.gate.weight", f"{o}mlp.up.weight")
                add(f"{h}mlp.down_proj.weight", f"{o}mlp.down.weight")
            else:
                for x in ("gate", "up", "down"):
                    add(f"{h}mlp.{x}_proj.weight", f"{o}mlp.{x}.weight")
                    if config.bias == "all":
                        add(f"{h}mlp.{x}_proj.bias", f"{o}mlp.{x}.bias")
        add("model.norm.weight", "norm.weight")
    if lm_head and not config.tie_embeddings:
        add("lm_head.weight", "lm_head.weight")
    if lm_head and config.lm_head_bias:
        add("lm_head.bias", "lm_head.bias")
    return rules


# ---------------------------------------------------------------------------------------------- loading


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory: the shards an index names, or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise LMStackError(f"{index}: not a valid safetensors index ({e})") from None
        return [path / f for f in dict.fromkeys(weight_map.values())]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise LMStackError(f"{path}: only pickle weights (*.bin / *.pt) found; lmstack loads safetensors only, "
                           "since pickles can run code (convert them with transformers' save_pretrained)")
    raise LMStackError(f"{path}: no model.safetensors or model.safetensors.index.json")


class TensorSource:
    """Read-only, memory-mapped access to the tensors of one or more safetensors files, by name."""

    def __init__(self, files: Iterable[Path]) -> None:
        self.where: dict[str, Any] = {}
        self.file_of: dict[str, Path] = {}
        self._handles = []
        for f in files:
            if not f.exists():
                raise LMStackError(f"{f}: weight file is missing")
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise LMStackError(f"{f}: not a readable safetensors file ({e})") from None
            self._handles.append(handle)
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                if key in self.where:  # which copy is the model's? Not for us to guess
                    raise LMStackError(f"tensor {key!r} is in both {self.file_of[key]} and {f}")
                self.where[key] = handle
                self.file_of[key] = f

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)


def convert_to_ours(
    rules: list[Rule],
    expected: dict[str, torch.Size],
    keys: Iterable[str],
    get: Callable[[str], torch.Tensor],
    where: str,
    convert: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    file_of: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Build lmstack's state dict from Hugging Face-named tensors, checking every name and shape.

    `where` names the source in error messages (`file_of` the file of each tensor, when there are several);
    `convert` moves or casts each tensor as it is read.
    """
    present = set(keys)
    missing = [r.hf for r in rules if r.hf not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LMStackError(f"{where}: missing tensor {missing[0]!r}{more}")
    known = {r.hf for r in rules}
    unexpected = sorted(k for k in present - known if not IGNORED.search(k) and k != "lm_head.weight")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise LMStackError(f"{where}: unexpected tensor {unexpected[0]!r}{more} for this model config")
    state: dict[str, torch.Tensor] = {}
    for rule in rules:
        t = get(rule.hf)
        if rule.transpose:
            t = t.t()
        shapes = [expected[name] for name in rule.ours]
        want = torch.Size([sum(s[0] for s in shapes), *shapes[0][1:]])
        if t.shape != want:
            source = file_of.get(rule.hf, where) if file_of else where
            raise LMStackError(f"{source}: tensor {rule.hf!r} has shape {list(t.shape)}, expected {list(want)}")
        for name, part in zip(rule.ours, t.split([s[0] for s in shapes], dim=0)):
            state[name] = convert(part.contiguous() if rule.transpose else part)
    return state


def materialize(config: ModelConfig, state: dict[str, torch.Tensor], device: torch.device | str | None) -> DecoderLM:
    """Put `state` into a `DecoderLM` built on the meta device, so weights exist once, never twice."""
    return materialize_module(DecoderLM, config, state, device)


def materialize_module(build: Callable, config: ModelConfig, state: dict[str, torch.Tensor],
                       device: torch.device | str | None) -> Any:
    with torch.device("meta"):
        model = build(config)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.init_buffers(device or state["embed.weight"].device)
    return model.eval()


def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = DecoderLM(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def _common_dtype(source: TensorSource, hf: dict[str, Any], rules: list[Rule], where: Path) -> torch.dtype | None:
    """None when every weight has one of the dtypes models compute in (kept as stored); for a file that mixes
    them (bf16 matrices beside fp32 norms) or holds others (float64, float8), the config's `dtype` /
    `torch_dtype`, else the computing dtype most weights have (else float32), so that the model computes in
    one precision. A weight that is not floating point (int8 codes of a quantized file) is an error."""
    elements: dict[str, int] = {}  # floating dtype -> how many weights have it
    for rule in rules:
        if rule.hf not in source.where:
            continue  # convert_to_ours names a missing tensor
        piece = source.where[rule.hf].get_slice(rule.hf)
        kind = piece.get_dtype()
        if kind not in SAFETENSORS_FLOATING:
            raise LMStackError(f"{source.file_of[rule.hf]}: tensor {rule.hf!r} is stored as {kind}, not floating "
                               f"point: lmstack loads float checkpoints ({where}: a quantized one needs its own "
                               "loader; dequantize it first)")
        elements[kind] = elements.get(kind, 0) + math.prod(piece.get_shape())
    if len(elements) <= 1 and set(elements) <= set(SAFETENSORS_FLOATS):
        return None
    named = hf.get("dtype") or hf.get("torch_dtype")
    if named in ("float32", "float16", "bfloat16"):
        return getattr(torch, named)
    computing = {k: n for k, n in elements.items() if k in SAFETENSORS_FLOATS}
    if not computing:
        return torch.float32
    return SAFETENSORS_FLOATS[max(sorted(computing), key=computing.get)]  # sorted: a tie goes the same way


SAFETENSORS_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # what models compute in
SAFETENSORS_FLOATING = {*SAFETENSORS_FLOATS, "F64", "F8_E4M3", "F8_E5M2"}  # cast to one of those on loading


def load_hf_model(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> DecoderLM:
    """Load a Hugging Face checkpoint directory into a `DecoderLM` (weights memory-mapped, read once)."""
    path = Path(path)
    if not path.exists():
        raise LMStackError(f"{path}: no such file or directory")
    hf = read_hf_config(path)
    quantization = hf.get("quantization_config")
    if quantization:  # lmstack's own quantized checkpoints never come here (load_model sends them to theirs)
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise LMStackError(f"{path / 'config.json'}: a checkpoint quantized with quant_method {method!r} is not "
                           "supported: lmstack loads float checkpoints (and its own `lmstack quantize` output); "
                           "load the unquantized model, and quantize it with `lmstack quantize`")
    config = config_from_hf(hf, where=str(path / "config.json"))
    apply_generation_config(config, path)
    source = TensorSource(safetensors_files(path))
    keys = source.keys()
    prefix = "transformer." if any(k.startswith("transformer.") for k in keys) else ""
    embed = f"{prefix}wte.weight" if config.family == "gpt2" else "model.embed_tokens.weight"
    if config.tie_embeddings and "lm_head.weight" in keys and embed in keys and not torch.equal(
            source.get("lm_head.weight"), source.get(embed)):
        # A head of its own beside a config that says tied (GPT-2 configs rarely say): transformers then
        # keeps the stored head, untied, and so does lmstack.
        warnings.warn(f"{path}: the config ties the output head to the embedding but the checkpoint holds a "
                      "different lm_head.weight; loading it untied, as transformers does", stacklevel=2)
        config.tie_embeddings = False
    rules = weight_rules(config, gpt2_prefix=prefix)
    common = _common_dtype(source, hf, rules, path)  # always: it also refuses weights that are not floats
    dtype = dtype or common

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device or "cpu", dtype=dtype or t.dtype)

    files = ", ".join(sorted({p.name for p in source.file_of.values()}))
    state = convert_to_ours(rules, expected_shapes(config), keys, source.get, f"{path} ({files})", convert,
                            file_of=source.file_of)
    return materialize(config, state, device)


# ---------------------------------------------------------------------------------------------- saving


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / 1000 -> bytes (decimal units, as Hugging Face uses)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise LMStackError(f"cannot parse size {size!r} (use e.g. '5GB' or '500MB')")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def hf_state_dict(model: DecoderLM, lm_head: bool = True) -> dict[str, torch.Tensor]:
    """`model`'s weights under Hugging Face names (fused and transposed where the family wants it);
    `lm_head=False` leaves out the output head."""
    return hf_tensors(model, weight_rules(model.config, lm_head=lm_head))


def hf_tensors(model: torch.nn.Module, rules: Iterable[Rule]) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors `rules` name, from `model`'s weights (on the CPU)."""
    ours = model.state_dict()

    def tensor(name: str) -> torch.Tensor:
        if name not in ours and name.endswith(".bias"):  # the family always has it (GPT-2); none is zeros
            weight = ours[name.removesuffix("bias") + "weight"]
            return weight.new_zeros(weight.shape[0])
        return ours[name]

    out = {}
    for rule in rules:
        t = torch.cat([tensor(n) for n in rule.ours], dim=0) if len(rule.ours) > 1 else tensor(rule.ours[0])
        out[rule.hf] = (t.t() if rule.transpose else t).detach().contiguous().cpu()
    return out


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


def write_safetensors(path: Path, state: dict[str, torch.Tensor], max_shard_size: int | str = "5GB") -> None:
    """Write `state` into directory `path` as model.safetensors, or as shards of at most `max_shard_size`
    with an index, replacing the weight files of any earlier save."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    earlier = set(path.glob("model*.safetensors*"))
    written = {path / "model.safetensors"}
    if len(shards) == 1:
        atomic_write(path / "model.safetensors", lambda p: save_file(shards[0], p, metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(path / name, lambda p, s=shard: save_file(s, p, metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        write_json(path / "model.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
        written = {path / name for name in set(weight_map.values())} | {path / "model.safetensors.index.json"}
    # Only now, with the new weights in place, the files of an earlier save go (a stale shard would confuse
    # readers); a save that fails midway leaves the earlier weights loadable.
    for old in earlier - written:
        old.unlink()


def hf_config_of(model: DecoderLM, tokenizer: Any = None) -> dict[str, Any]:
    """`config_to_hf` of `model`'s config plus its dtype, with the special-token ids the config lacks taken
    from `tokenizer`."""
    hf_config = config_to_hf(model.config)
    hf_config["torch_dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if hf_config.get(key) is None:
                hf_config[key] = getattr(tokenizer, key, None)
    return hf_config


def save_hf_model(
    model: DecoderLM, path: str | os.PathLike, tokenizer: Any = None, max_shard_size: int | str = "5GB"
) -> Path:
    """Write `model` as a Hugging Face directory: config.json, safetensors (sharded above `max_shard_size`,
    with an index), generation_config.json and, if given, the tokenizer files."""
    path = Path(path)
    hf_config = hf_config_of(model, tokenizer)  # first: a config the family cannot hold writes nothing
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, hf_state_dict(model), max_shard_size)
    write_json(path / "config.json", hf_config)
    write_json(path / "generation_config.json", generation_config_of(model.config, hf_config))
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def generation_config_of(config: ModelConfig, hf_config: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json for a model: its special-token ids and the sampling settings it was loaded with."""
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if hf_config.get(k) is not None}
    return {**generation, **config.extra.get("generation_config", {})}
