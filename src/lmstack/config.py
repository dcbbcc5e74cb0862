"""`ModelConfig`: one dataclass that describes every decoder architecture lmstack builds.

GPT-2, Llama, Mistral, Qwen2, Mixtral and Phi-3 differ only in a handful of switches (norm, positions, MLP,
biases, kv heads, window, experts). They are fields here, not subclasses. Hugging Face's config names appear
only in `lmstack.checkpoints.hf`; `from_hf` / `to_hf` below delegate there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from lmstack.errors import LMStackError

Norm = Literal["layernorm", "rmsnorm"]
Positions = Literal["learned", "rope"]
MLPKind = Literal["gelu", "swiglu", "geglu"]
Bias = Literal["none", "all", "qkv"]
Arch = Literal["transformer", "rnn", "lstm", "gru"]

ROPE_SCALING_TYPES = ("linear", "dynamic", "llama3", "yarn")
_ROPE_SCALING_NEEDS = {"linear": ("factor",), "dynamic": ("factor",),  # yarn has defaults for all of its keys
                       "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def eos_ids(eos: int | list[int] | None) -> list[int]:
    """An eos_token_id as configs spell it (one id, a list of them, or None) as a list."""
    return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]


@dataclass
class ModelConfig:
    """Shape and switches of a decoder-only Transformer.

    `rope_scaling` follows the Hugging Face dictionary form, e.g. ``{"rope_type": "llama3", "factor": 32.0,
    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}``.
    """

    arch: Arch = "transformer"  # or a recurrent LM: "rnn" (Elman), "lstm", "gru" (lmstack.models.rnn)
    vocab_size: int = 50304
    block_size: int = 1024  # context length
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    n_kv_head: int | None = None  # None: same as n_head (MHA); 1: MQA; in between: GQA
    head_dim: int | None = None  # None: n_embd // n_head
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    positions: Positions = "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rotary_fraction: float = 1.0  # share of each head's dims that RoPE rotates (Phi-style partial rotary)
    mlp: MLPKind = "gelu"
    gelu_approximate: Literal["none", "tanh"] = "tanh"  # GPT-2's "gelu_new" is the tanh approximation
    intermediate_size: int | None = None  # None: 4 * n_embd
    bias: Bias = "all"  # which linear layers carry a bias: all, none (LayerNorms too, nanoGPT's bias=False), q/k/v
    lm_head_bias: bool = False
    tie_embeddings: bool = True
    sliding_window: int | None = None  # a query sees at most this many keys, itself included
    n_expert: int = 0  # 0: dense MLP; > 0: sparse mixture of experts
    n_expert_per_token: int = 2
    moe_renormalize: bool = True  # renormalise the top-k router weights to sum to 1 (Mixtral)
    moe_aux_loss_coef: float = 0.01
    dropout: float = 0.0
    init_std: float = 0.02
    family: str = ""  # the checkpoint family to write ("gpt2", "llama", "mistral", "qwen2", "mixtral", "phi3")
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys a checkpoint carried through

    def __post_init__(self) -> None:
        for name in ("n_embd", "n_head"):  # the defaults below compute with them before `validate` runs
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LMStackError(f"ModelConfig.{name}={value!r}: must be a positive integer")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise LMStackError(f"n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head})")
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        self.validate()

    def validate(self) -> None:
        """Raise `LMStackError` naming the first field that does not make sense."""

        def bad(field_name: str, why: str) -> LMStackError:
            return LMStackError(f"ModelConfig.{field_name}={getattr(self, field_name)!r}: {why}")

        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        if self.n_head % self.n_kv_head:
            raise bad("n_kv_head", f"must divide n_head ({self.n_head})")
        choices = {"arch": Arch, "norm": Norm, "positions": Positions, "mlp": MLPKind, "bias": Bias}
        for name, kind in choices.items():
            if getattr(self, name) not in kind.__args__:
                raise bad(name, f"must be one of {list(kind.__args__)}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ROPE_SCALING_TYPES and kind != "default":
                raise bad("rope_scaling", f"unsupported type {kind!r}; supported: {list(ROPE_SCALING_TYPES)}")
            for key in _ROPE_SCALING_NEEDS.get(kind, ()):
                value = self.rope_scaling.get(key)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise bad("rope_scaling", f"{kind!r} needs a positive number {key!r}, got {value!r}")
        if self.positions == "rope" and self.rotary_dim % 2:
            raise bad("rotary_fraction", f"gives an odd rotary dimension {self.rotary_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise bad("sliding_window", "must be a positive integer or None")
        if self.n_expert and not 1 <= self.n_expert_per_token <= self.n_expert:
            raise bad("n_expert_per_token", f"must be between 1 and n_expert ({self.n_expert})")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @property
    def context_length(self) -> int:
        """The longest sequence the model runs: `block_size` (Hugging Face's max_position_embeddings), or for
        dynamic NTK RoPE, whose base grows on past it, block_size x factor, as vLLM derives max_model_len."""
        if self.rope_type == "dynamic":
            return int(self.block_size * self.rope_scaling["factor"])
        return self.block_size

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again). A field that held its default derived from
        `n_head` or `n_embd` (n_kv_head = n_head, head_dim = n_embd / n_head, intermediate_size = 4 * n_embd)
        is derived again from the new values unless `changes` sets it, as `from_name` would."""
        derived = {"n_kv_head": (("n_head",), self.n_kv_head == self.n_head),
                   "head_dim": (("n_embd", "n_head"), self.head_dim * self.n_head == self.n_embd),
                   "intermediate_size": (("n_embd",), self.intermediate_size == 4 * self.n_embd)}
        for name, (sources, was_derived) in derived.items():
            if name not in changes and was_derived and any(s in changes for s in sources):
                changes[name] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LMStackError(f"unknown ModelConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **changes: Any) -> ModelConfig:
        """A named preset (see `PRESETS`), optionally with fields changed."""
        if name not in PRESETS:
            raise LMStackError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
        cls.check_settings(changes)
        return cls(name=name, **{**PRESETS[name], **changes})

    @classmethod
    def check_settings(cls, changes: dict[str, Any], where: str = "model") -> None:
        """Name the keys of `changes` that are not ModelConfig fields, and list the valid ones."""
        valid = {f.name for f in dataclasses.fields(cls)} - {"name"}
        unknown = sorted(set(changes) - valid)
        if unknown:
            raise LMStackError(f"{where}: unknown setting(s) {unknown}; valid ones: {', '.join(sorted(valid))}")

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any] | str) -> ModelConfig:
        """From a Hugging Face `config.json` (a dict, or a path to the file or its directory)."""
        from lmstack.checkpoints.hf import config_from_hf

        return config_from_hf(hf_config)

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` contents for this architecture's family."""
        from lmstack.checkpoints.hf import config_to_hf

        return config_to_hf(self)


_LLAMA = dict(
    norm="rmsnorm", positions="rope", mlp="swiglu", bias="none", tie_embeddings=False, family="llama"
)

# Real shapes, as published; parameter counts are checked in tests/test_config.py.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_embd=768, n_head=12, family="gpt2"),
    "gpt2-medium": dict(vocab_size=50257, block_size=1024, n_layer=24, n_embd=1024, n_head=16, family="gpt2"),
    "tinyllama-1.1b": dict(
        _LLAMA, vocab_size=32000, block_size=2048, n_layer=22, n_embd=2048, n_head=32, n_kv_head=4,
        intermediate_size=5632,
    ),
    "llama-3.2-1b": dict(
        _LLAMA, vocab_size=128256, block_size=131072, n_layer=16, n_embd=2048, n_head=32, n_kv_head=8,
        head_dim=64, intermediate_size=8192, rope_theta=500000.0, tie_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    "mistral-7b": dict(
        _LLAMA, vocab_size=32000, block_size=32768, n_layer=32, n_embd=4096, n_head=32, n_kv_head=8,
        intermediate_size=14336, sliding_window=4096, family="mistral",
    ),
    "qwen2.5-0.5b": dict(
        _LLAMA, vocab_size=151936, block_size=32768, n_layer=24, n_embd=896, n_head=14, n_kv_head=2,
        intermediate_size=4864, rope_theta=1000000.0, norm_eps=1e-6, bias="qkv", tie_embeddings=True,
        family="qwen2",
    ),
    "mixtral-8x7b": dict(
        _LLAMA, vocab_size=32000, block_size=32768, n_layer=32, n_embd=4096, n_head=32, n_kv_head=8,
        intermediate_size=14336, rope_theta=1000000.0, n_expert=8, n_expert_per_token=2, family="mixtral",
    ),
    "phi-3-mini": dict(
        _LLAMA, vocab_size=32064, block_size=4096, n_layer=32, n_embd=3072, n_head=32, n_kv_head=32,
        intermediate_size=8192, sliding_window=2047, family="phi3",
    ),
    # Tiny shapes for tests and CPU demos.
    "tiny-gpt2": dict(vocab_size=256, block_size=64, n_layer=2, n_embd=32, n_head=4, family="gpt2"),
    "tiny-llama": dict(
        _LLAMA, vocab_size=256, block_size=128, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
        intermediate_size=160,
    ),
    "tiny-mixtral": dict(
        _LLAMA, vocab_size=256, block_size=128, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
        intermediate_size=96, n_expert=4, n_expert_per_token=2, family="mixtral",
    ),
}
