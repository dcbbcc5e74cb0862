"""LoRA: low-rank adapters on chosen linear layers, with PEFT's file format.

A wrapped layer computes base(x) + (alpha / r) * B(A(dropout(x))) with A [r, in] initialised as PEFT does
(Kaiming-uniform) and B [out, r] at zero, so the wrapped model equals the base model until B trains (rank-
stabilised LoRA, `use_rslora`, scales by alpha / sqrt(r) instead). Only A and B train. `merge` folds B A into
the base weight for inference; `unmerge` takes it back out. Adapters save as `adapter_config.json` +
`adapter_model.safetensors` under Hugging Face parameter names, so `peft.PeftModel.from_pretrained` applies them
to the Hugging Face export of the same base model. Where the Hugging Face family fuses layers that lmstack keeps
apart (GPT-2's c_attn, Phi-3's qkv_proj and gate_up_proj), the adapters on the parts are written as one adapter
on the fused layer, of the summed rank with a block-diagonal B, and read back apart: the outputs are the same.
`load_peft` reads adapters written by PEFT, with per-module ranks and alphas (`rank_pattern`, `alpha_pattern`),
DoRA (`use_dora`) included, and modules PEFT saved whole (`modules_to_save`, or the token embedding and output
head after a vocabulary resize), and refuses, naming the setting, any PEFT option it cannot apply (trained
biases, a bias on B, ...).

QLoRA (Dettmers et al. 2023): `prepare_qlora` first quantizes the frozen base to 4-bit NF4 (`NF4Linear`), then
adds float32 adapters; the base costs ~4.5 bits per weight while gradients still flow through it to the
adapters. The adapter files are the same as for a float base, so a QLoRA adapter loads onto the float model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lmstack.errors import LMStackError
from lmstack.models.classifier import HEAD_KEY
from lmstack.quantize import NF4Linear, quantize_model

# The names of lmstack's linear layers LoRA can wrap (Hugging Face's names are mapped in `peft_modules`).
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """The factor on B A: alpha / r, or alpha / sqrt(r) under rank-stabilised LoRA (PEFT's update_layer)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _plain(number: float) -> float:
    """A derived alpha as an int where it is one (16, not 16.0), as configs write it."""
    return int(number) if float(number).is_integer() else number


class LoRALinear(nn.Module):
    """A frozen nn.Linear (or NF4Linear, for QLoRA) plus a trainable low-rank update.

    The adapters are float32 on a bf16, fp16 or NF4 base (PEFT's `autocast_adapter_dtype`: small updates to
    half-precision adapters would round away), else the base weight's dtype. With `use_dora` (DoRA, Liu et al.
    2024) the updated weight W + s B A is also renormalised row by row to a trained magnitude m:
    y = m / ||W + s B A|| * (W + s B A) x + bias, the norm taken as a constant (detached), as PEFT computes it;
    m starts at ||W||, so the model starts as the base."""

    def __init__(self, base: nn.Linear | NF4Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False) -> None:
        super().__init__()
        if r < 1:
            raise LMStackError(f"LoRA rank r={r}: must be >= 1")
        self.base = base
        for p in base.parameters():  # weight and bias (an NF4Linear has only buffers)
            p.requires_grad_(False)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        if isinstance(base, NF4Linear):
            device, dtype = base.absmax.device, torch.float32
        else:
            device, dtype = base.weight.device, base.weight.dtype
            if dtype in (torch.float16, torch.bfloat16):
                dtype = torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=dtype))
        if device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.merged = False
        self.enabled = True
        self.use_dora = use_dora
        self.lora_magnitude = None
        if use_dora:
            # in the adapters' dtype, as forward computes the norm, so that the model starts exactly as the base
            self.lora_magnitude = nn.Parameter(base.weight.to(dtype).norm(dim=1) if device.type != "meta"
                                               else torch.empty(base.out_features, device=device, dtype=dtype))
        self._merged_norm: torch.Tensor | None = None  # DoRA's norm at merge time, to unmerge exactly

    @property
    def weight(self) -> torch.Tensor:  # so code that reads `.weight` (shapes, dtype) keeps working
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def _dora_updated(self, weight: torch.Tensor) -> torch.Tensor:
        """W + s B A, in the adapters' dtype: DoRA's direction, before each row is scaled to its magnitude."""
        return weight.to(self.lora_A.dtype) + self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged and not self.enabled:  # disabled means the base alone, merged or not (as in PEFT)
            self.unmerge()
        active = self.enabled and not self.merged
        if active and self.use_dora:  # the base's output from the weight DoRA needs too: an NF4 base dequantizes once
            weight = self.base.weight
            y = F.linear(x.to(weight.dtype), weight, self.base.bias).to(x.dtype)
        else:
            y = self.base(x)
        if active:
            # The casts are no-ops on a float base; on an NF4 base the update is computed in float32.
            h = self.dropout(x).to(self.lora_A.dtype)
            update = (h @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
            if self.use_dora:
                weight = weight.to(h.dtype)  # once: an NF4 or 16-bit base in the adapters' dtype
                with torch.no_grad():  # the norm is a constant to the gradient, as PEFT computes it
                    norm = self._dora_updated(weight).norm(dim=1)
                scale = self.lora_magnitude / norm
                # As PEFT: the base term rescaled is W x on the same (dropped-out) input as the update
                plain = h @ weight.t()
                update = (scale - 1) * plain + scale * update
            y = y + update.to(y.dtype)
        return y

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight. An NF4 base raises: B A added to 4-bit codes would be lost to
        re-quantization, so load the adapter onto the float model (`load_peft`) and merge there."""
        if isinstance(self.base, NF4Linear):
            raise LMStackError("cannot merge LoRA into a 4-bit NF4 base (QLoRA): save the adapter with "
                               "save_peft, load it onto the float model with load_peft and merge there")
        if not self.merged:
            weight = self.base.weight
            if self.use_dora:  # W' = m / ||W + s B A|| * (W + s B A)
                updated = self._dora_updated(weight)
                self._merged_norm = updated.norm(dim=1)
                scale = (self.lora_magnitude / self._merged_norm)[:, None]
                weight.copy_((scale * updated).to(weight.dtype))
            else:
                weight += ((self.lora_B @ self.lora_A) * self.scaling).to(weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = self.base.weight
            if self.use_dora:
                scale = (self.lora_magnitude / self._merged_norm)[:, None]
                weight.copy_((weight.to(scale.dtype) / scale - self.scaling * (self.lora_B @ self.lora_A))
                             .to(weight.dtype))
            else:
                weight -= ((self.lora_B @ self.lora_A) * self.scaling).to(weight.dtype)
            self.merged = False


def _check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise LMStackError(f"unknown LoRA targets {unknown}; choose from {list(TARGETS)}")
    return targets


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _wrappable(model: nn.Module) -> list[str]:
    """Names of the layers LoRA can wrap: linear layers (float or NF4) named q, k, v, o, gate, up or down."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear)) and _leaf(n) in TARGETS]


def _refuse_second_adapter(model: nn.Module) -> None:
    if lora_layers(model):
        raise LMStackError("the model already has LoRA adapters: merge_and_unload it (or start from the base "
                           "model) before applying another")


def _wrap(model: nn.Module, layers: dict[str, tuple[int, float]], dropout: float, use_rslora: bool,
          use_dora: bool = False) -> None:
    """Freeze `model` and wrap each named layer with its own (r, alpha)."""
    for name, (r, _) in layers.items():  # checked first, so bad input leaves the model as it was
        if r < 1:
            raise LMStackError(f"LoRA rank r={r} for {name}: must be >= 1")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, (r, alpha) in layers.items():
        parent_name, _, child = name.rpartition(".")
        base = model.get_submodule(name)
        setattr(model.get_submodule(parent_name), child, LoRALinear(base, r, alpha, dropout, use_rslora, use_dora))


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets: Iterable[str] = ("q", "v"), use_rslora: bool = False, use_dora: bool = False) -> nn.Module:
    """Wrap every linear layer whose name ends in one of `targets` (q, k, v, o, gate, up, down) and freeze
    everything else. Targets may be nn.Linear or NF4Linear (see `prepare_qlora`). `use_rslora` scales the
    update by alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r; `use_dora` adds DoRA's trained
    magnitudes (see `LoRALinear`). Returns the model, changed in place."""
    targets = _check_targets(targets)
    _refuse_second_adapter(model)
    chosen = [n for n in _wrappable(model) if _leaf(n) in targets]
    if not chosen:
        raise LMStackError(f"no linear layer named {list(targets)} in the model")
    _wrap(model, dict.fromkeys(chosen, (r, alpha)), dropout, use_rslora, use_dora)
    model.lora = {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets), "use_rslora": use_rslora,
                  "use_dora": use_dora}
    return model


def prepare_qlora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                  targets: Iterable[str] = ("q", "v"), block_size: int = 64,
                  dtype: torch.dtype = torch.bfloat16, skip: tuple[str, ...] = ("lm_head",),
                  use_rslora: bool = False, use_dora: bool = False) -> nn.Module:
    """QLoRA: quantize every linear layer of `model` to a frozen NF4 base, then `apply_lora` on `targets`.

    The base computes in `dtype` (bfloat16, QLoRA's compute dtype) from NF4 blocks of `block_size` weights;
    the adapters are float32. Layers named in `skip` stay in floating point (and frozen): by default the
    output head, as bitsandbytes/PEFT do. `merge_lora` raises on the result; `save_peft` writes the same
    adapter files as for a float base, so `load_peft` applies them to the float model (where they can be
    merged). Returns the model, changed in place."""
    targets = _check_targets(targets)
    if r < 1:  # checked before quantizing, so bad input leaves the model as it was
        raise LMStackError(f"LoRA rank r={r}: must be >= 1")
    _refuse_second_adapter(model)
    quantize_model(model, "nf4", group_size=block_size, dtype=dtype, skip=tuple(skip))
    return apply_lora(model, r, alpha, dropout, targets, use_rslora, use_dora)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch the adapters off to get the base model back (e.g. as DPO's reference) without a copy. A merged
    adapter is unmerged first (as PEFT's disable_adapter does): its update lives in the base weight."""
    for _, m in lora_layers(model):
        if not enabled:
            m.unmerge()
        m.enabled = enabled


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (raises LMStackError on a QLoRA model's NF4 base)."""
    for _, m in lora_layers(model):
        m.merge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and put the plain linear layers back (PEFT's
    `merge_and_unload`): an ordinary model again, as fast as the base."""
    for name, layer in lora_layers(model):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    if hasattr(model, "lora"):
        del model.lora
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_layers(model):
        m.unmerge()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters. An NF4 layer's weights count as the in x out (+ bias) they stand for:
    QLoRA keeps them as codes in buffers, not parameters."""
    params = list(model.parameters())
    nf4 = sum(m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
              for m in model.modules() if isinstance(m, NF4Linear))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + nf4


def peft_modules(model: nn.Module) -> dict[str, list[str]]:
    """The Hugging Face modules PEFT puts adapters on, each with the lmstack layers it stands for in the order
    of its outputs: one layer for most (model.layers.0.self_attn.q_proj -> layers.0.attn.q), several where the
    family fuses them (GPT-2's c_attn -> q, k, v; Phi-3's qkv_proj and gate_up_proj). Read off the checkpoint
    mapping, so adapters and weights can never disagree on a name."""
    from lmstack.checkpoints.hf import weight_rules

    linear = {n for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, NF4Linear, LoRALinear)) and _leaf(n) in TARGETS}
    modules = {}
    for rule in weight_rules(model.config, lm_head=False):
        layers = [name.removesuffix(".weight") for name in rule.ours]
        if rule.hf.endswith(".weight") and all(name in linear and ".experts." not in name for name in layers):
            modules[rule.hf.removesuffix(".weight")] = layers
    return modules


def _key(module: str) -> str:
    """model.layers.3.self_attn.q_proj -> base_model.model.model.layers.3.self_attn.q_proj (PEFT's prefix)."""
    return f"base_model.model.{module}"


# The layers of a mixture of experts' experts: transformers keeps each MoE layer's experts as one fused tensor,
# so PEFT has no module to put these adapters on.
_EXPERT_TARGETS = ("gate", "up", "down")


def check_peft_exportable(model: nn.Module, targets: Iterable[str] | None = None) -> None:
    """Raise unless adapters on `targets` of `model` (by default, the adapters it has) can be written in PEFT's
    format; checked before training, too."""
    if not model.config.n_expert:
        return
    if targets is None:
        on_experts = any(".experts." in name for name, _ in lora_layers(model))
    else:
        on_experts = bool(set(targets) & set(_EXPERT_TARGETS))
    if on_experts:
        raise LMStackError("LoRA on the experts of a mixture-of-experts model has no PEFT format (transformers "
                           "keeps each layer's experts as one fused tensor): target the attention (q, k, v, o)")


def _fuse(parts: list[LoRALinear | None], out_features: list[int]) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """One adapter (A, B, r, alpha) on a fused layer equal to the adapters on its parts (None: no adapter): A
    stacks the parts' A, B is block-diagonal, each block scaled to the first part's scaling, so the rank is the
    sum of the parts' ranks and nothing is approximated."""
    present = [p for p in parts if p is not None]
    first = present[0]
    if len(parts) == 1:
        return first.lora_A.detach(), first.lora_B.detach(), first.r, first.alpha
    r = sum(p.r for p in present)
    alpha = first.scaling * (math.sqrt(r) if first.use_rslora else r)  # the fused scaling is the first part's
    A = torch.cat([p.lora_A.detach() for p in present])
    B = first.lora_B.new_zeros(sum(out_features), r)
    row = col = 0
    for part, out in zip(parts, out_features):
        if part is not None:
            B[row:row + out, col:col + part.r] = part.lora_B.detach() * (part.scaling / first.scaling)
            col += part.r
        row += out
    return A, B, r, _plain(alpha)


def _unfuse(A: torch.Tensor, B: torch.Tensor, r: int, alpha: float, out_features: list[int], use_rslora: bool,
            recorded: list[list[float]] | None = None, keep_all: bool = False
            ) -> list[tuple[torch.Tensor, torch.Tensor, int, float] | None]:
    """The parts of a fused layer's adapter, each (A, B, r, alpha) or None. With `recorded` (each part's
    [r, alpha], r 0 for none, as `save_peft` records them) the block-diagonal adapter `_fuse` made splits back
    exactly. Else each part keeps the columns of B its rows use: a dense adapter (trained by PEFT on the fused
    layer) gives every part the whole A and its rows of B, and an untrained one (B all zero) every part the
    whole rank."""
    if len(out_features) == 1:
        return [(A, B, r, alpha)]
    blocks = B.split(out_features)
    if recorded is not None and len(recorded) == len(blocks) and sum(int(k) for k, _ in recorded) == r:
        scaling = lora_scaling(r, alpha, use_rslora)
        # _fuse scaled each block to the fused scaling: undo it
        return [None if piece is None else (piece[0], piece[1] * (scaling / lora_scaling(int(k), a, use_rslora)),
                                            int(k), a)
                for piece, (k, a) in zip(_blocks(A, B, out_features, [int(k) for k, _ in recorded]), recorded)]
    used = [block.ne(0).any(0) for block in blocks]
    if keep_all or not any(u.any() for u in used):
        used = [torch.ones(r, dtype=torch.bool)] * len(blocks)
    parts = []
    for block, cols in zip(blocks, used):
        k = int(cols.sum())
        # The same scaling at rank k: alpha / r = alpha_k / k (alpha / sqrt(r) under rslora).
        alpha_k = alpha * (math.sqrt(k / r) if use_rslora else k / r)
        parts.append((A[cols], block[:, cols], k, _plain(alpha_k)) if k else None)
    return parts


def _blocks(A: torch.Tensor, B: torch.Tensor, out_features: list[int], ranks: list[int]
            ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Each part's (A, B) of a block-diagonal fused adapter, the parts' ranks given in order (0: none)."""
    pieces, row, col = [], 0, 0
    for out, k in zip(out_features, ranks):
        pieces.append((A[col:col + k], B[row:row + out, col:col + k]) if k else None)
        row, col = row + out, col + k
    return pieces


MAGNITUDE = "lora_magnitude_vector"  # PEFT's name for DoRA's magnitudes, one per output row

# safetensors metadata key under which save_peft records each fused layer's parts as [r, alpha] (r 0: a part
# without an adapter), so that they split back exactly, even while B is still zero; PEFT ignores it.
FUSED_RANKS_KEY = "lmstack.fused_ranks"


def save_peft(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None,
              head: torch.Tensor | None = None) -> Path:
    """Write the adapters in PEFT's format. The config states every setting that changes what PEFT computes
    (rslora, DoRA, per-module ranks and alphas; no biases), so PEFT applies exactly these. Modules a loaded
    adapter held whole (`load_peft`: PEFT's modules_to_save) are written whole again.
    With `head` (a classifier's score weight) it is a SEQ_CLS adapter, the head a module PEFT saves whole, so
    that PEFT's AutoModelForSequenceClassification adapter loads it."""
    if not getattr(model, "lora", None):
        raise LMStackError("the model has no LoRA adapters (apply_lora first)")
    check_peft_exportable(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    from lmstack.checkpoints.hf import family_of

    wrapped = dict(lora_layers(model))
    modules = peft_modules(model)
    tensors, adapters, fused_ranks = {}, {}, {}  # adapters: HF module -> (r, alpha)
    for module, names in modules.items():
        parts = [wrapped.get(name) for name in names]
        if any(parts):
            if len(parts) > 1:
                fused_ranks[module] = [[p.r, p.alpha] if p is not None else [0, 0] for p in parts]
            out_features = [model.get_submodule(name).out_features for name in names]
            A, B, r, alpha = _fuse(parts, out_features)
            tensors[f"{_key(module)}.lora_A.weight"] = A.contiguous().cpu()
            tensors[f"{_key(module)}.lora_B.weight"] = B.contiguous().cpu()
            if model.lora.get("use_dora"):  # a part without an adapter keeps its own norm: unchanged
                tensors[f"{_key(module)}.{MAGNITUDE}"] = torch.cat([
                    p.lora_magnitude.detach() if p is not None
                    else model.get_submodule(n).weight.detach().to(A.dtype).norm(dim=1)
                    for p, n in zip(parts, names)]).contiguous().cpu()
            adapters[module] = (r, alpha)
    if head is not None:
        tensors[HEAD_KEY] = head.detach().contiguous().cpu()
    # Modules a loaded adapter held whole (load_peft) are written whole again; a tied head as a copy of its own,
    # as PEFT writes it.
    whole_names = list(model.lora.get("modules_to_save") or ())
    rules = _module_rules(model)
    whole_rules = _under(rules, whole_names)
    pair = [r for r in rules if r.ours[0] in ("embed.weight", "lm_head.weight")]
    if model.config.tie_embeddings and any(r in whole_rules for r in pair):
        # A tied pair goes whole, both halves: PEFT would otherwise pair the saved one with the base's other.
        missing = [r for r in pair if r not in whole_rules]
        whole_names += [r.hf.rpartition(".")[0] for r in missing]
        whole_rules += missing
    if whole_rules:
        from lmstack.checkpoints.hf import hf_tensors

        tensors.update({_key(k): t.clone() for k, t in hf_tensors(model, whole_rules).items()})
    save_file(tensors, str(path / "adapter_model.safetensors"),
              metadata={"format": "pt", FUSED_RANKS_KEY: json.dumps(fused_ranks)})
    cfg = model.lora
    r, alpha = cfg["r"], cfg["alpha"]
    # PEFT matches a bare "layers.0.self_attn.q_proj" as a suffix of the module name (target_modules) or as the
    # regex (.*\.)?(pattern)$ (rank/alpha patterns): either way exactly that module.
    short = {module: module.split(".", 1)[1] for module in adapters}
    # A kind with adapters on every module of it is named by kind, as usual; otherwise (e.g. an adapter loaded
    # with exclude_modules, or on GPT-2's attention c_proj and not its MLP's) its modules are listed.
    whole = {_leaf(m) for m in adapters} - {_leaf(m) for m in modules if m not in adapters}
    target_modules = sorted(whole) + sorted(short[m] for m in adapters if _leaf(m) not in whole)
    config = {"peft_type": "LORA", "task_type": "SEQ_CLS" if head is not None else "CAUSAL_LM", "r": r,
              "lora_alpha": alpha,
              "lora_dropout": cfg["dropout"], "target_modules": target_modules,
              "use_rslora": bool(cfg.get("use_rslora", False)),
              "rank_pattern": {short[m]: mr for m, (mr, _) in adapters.items() if mr != r},
              "alpha_pattern": {short[m]: ma for m, (_, ma) in adapters.items() if ma != alpha},
              "use_dora": bool(cfg.get("use_dora", False)), "bias": "none",
              "modules_to_save": [*whole_names, *(["score"] if head is not None else [])] or None,
              # A tied embedding saved whole stays tied (PEFT unties its copy otherwise).
              "ensure_weight_tying": can_tie_saved_copies(model, whole_names),
              "layers_to_transform": None, "layers_pattern": None, "init_lora_weights": True,
              # GPT-2's Conv1D layers keep weights as [in, out]; PEFT sets this for them itself.
              "fan_in_fan_out": family_of(model.config) == "gpt2", "inference_mode": True,
              "base_model_name_or_path": base_model_name_or_path}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


# adapter_config.json keys that load_peft applies, and keys that change nothing it computes (bookkeeping, or
# options of features that are refused anyway). Every other key must be off (null, false, empty): PEFT keeps
# adding options, and one lmstack does not know is refused rather than silently ignored.
_PEFT_APPLIED = frozenset({"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
                           "layers_to_transform", "layers_pattern", "use_dora", "modules_to_save",
                           "ensure_weight_tying", "use_rslora", "rank_pattern", "alpha_pattern", "bias",
                           "init_lora_weights"})
_PEFT_NO_EFFECT = frozenset({"task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                             "peft_version", "megatron_core", "qalora_group_size", "eva_config",
                             "fan_in_fan_out"})  # PEFT sets it from the layer's type (Conv1D or Linear)
_PEFT_WHY = {"bias": "trained biases", "lora_bias": "a bias on lora_B",
             "init_lora_weights": "an initialisation that changes the base weights; convert the adapter with "
                                  "PEFT's save_pretrained(path_initial_model_for_weight_conversion=...)"}
_PEFT_INITS = ("gaussian", "orthogonal", "eva")  # initialisations of A and B only: the loaded weights replace them


def _is_off(value: Any) -> bool:
    return value is None or value is False or value in ("", [], {})


def _check_peft_settings(cfg: dict[str, Any], where: Path) -> None:
    """Raise naming every setting of a PEFT adapter config that lmstack cannot apply."""
    refused = [k for k, v in cfg.items() if k not in _PEFT_APPLIED | _PEFT_NO_EFFECT and not _is_off(v)]
    if cfg.get("bias", "none") != "none":
        refused.append("bias")
    init = cfg.get("init_lora_weights", True)
    if not isinstance(init, bool) and init not in _PEFT_INITS:
        refused.append("init_lora_weights")
    if refused:
        named = ", ".join(f"{k}={cfg[k]!r}" + (f" ({_PEFT_WHY[k]})" if k in _PEFT_WHY else "") for k in refused)
        plural = "s" if len(refused) > 1 else ""
        raise LMStackError(f"{where}: lmstack's LoRA cannot apply the PEFT setting{plural} {named}; it loads plain "
                           "LoRA adapters on the attention and MLP layers")


def _peft_matches(spec: str | list[str] | None, module: str) -> bool:
    """PEFT's rule for target_modules / exclude_modules: a string is a regex for the whole module name, a list
    holds names or name suffixes."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in spec)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the value of the first pattern that matches the end of the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _in_transformed_layers(cfg: dict[str, Any], targets: str | list[str], module: str) -> bool:
    """PEFT's `layers_to_transform` (with `layers_pattern`): a module matched by a name suffix is kept only in
    the listed layers, its layer the first number after a dotted name (model.layers.3.mlp.up_proj: 3). A regex
    `target_modules`, or a module named whole, is not restricted, as in PEFT."""
    indexes = cfg.get("layers_to_transform")
    if indexes is None or indexes == [] or not isinstance(targets, list) or module in targets:
        return True
    patterns = cfg.get("layers_pattern") or None
    if patterns is None:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        match = next((m for p in ([patterns] if isinstance(patterns, str) else patterns)
                      if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module))), None)
    if match is None:
        return False
    index = int(match["idx"])
    return index == indexes if isinstance(indexes, int) else index in indexes


def _peft_targets(modules: dict[str, list[str]], cfg: dict[str, Any], where: Path) -> dict[str, tuple[int, float]]:
    """The Hugging Face modules (of `peft_modules`) an adapter config targets, each with its (r, alpha), chosen
    by PEFT's rules."""
    targets = cfg.get("target_modules")
    if not targets:
        raise LMStackError(f"{where}: no target_modules")
    kinds = sorted({_leaf(m) for m in modules})
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = kinds  # every linear layer but the output head, as PEFT expands it
    if isinstance(targets, list):
        unknown = [t for t in targets if not any(_peft_matches([t], m) for m in modules)]
        if unknown:
            raise LMStackError(f"{where}: target modules {unknown} are not lmstack layers (LoRA goes on "
                               f"{', '.join(kinds)})")
    exclude = cfg.get("exclude_modules")
    chosen = [m for m in modules if _peft_matches(targets, m) and not _peft_matches(exclude, m)
              and _in_transformed_layers(cfg, targets, m)]
    if not chosen:
        raise LMStackError(f"{where}: target_modules {targets!r} match no layer of the model")
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)  # PEFT's defaults
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    return {m: (_pattern_value(ranks, m, r), _pattern_value(alphas, m, alpha)) for m in chosen}


def _module_label(module: str, names: list[str]) -> str:
    """An HF module as error messages name it: its lmstack layer, or the layers it fuses."""
    return names[0] if len(names) == 1 else f"{module} ({', '.join(names)})"


def load_peft(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply a PEFT LoRA adapter directory to `model` (wrapping the layers it targets) as PEFT does, with its
    rslora scaling and per-module ranks and alphas. An adapter on a fused layer (GPT-2's c_attn, Phi-3's
    qkv_proj and gate_up_proj) becomes adapters on the layers it fuses, with the same outputs. Modules the
    adapter holds whole (`whole_modules`) replace the model's, a resized vocabulary included. A setting lmstack
    cannot apply (trained biases, a bias on B, ...) or a tensor in the file it would not use raises
    LMStackError naming it, with `model` left as it was."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    cfg = adapter_config(path)
    if cfg.get("peft_type") != "LORA":
        raise LMStackError(f"{config_file}: peft_type {cfg.get('peft_type')!r} is not LORA")
    _check_peft_settings(cfg, config_file)
    _refuse_second_adapter(model)
    modules = peft_modules(model)
    chosen = _peft_targets(modules, cfg, config_file)
    tensors = _read_adapter(path, cfg)
    ties = ties_saved_copies(model, cfg)
    whole, whole_names = whole_modules(model, cfg, tensors, config_file, chosen, ties)
    fused_ranks = _fused_ranks(path)
    use_dora = bool(cfg.get("use_dora", False))
    shapes, out_features = {}, {}
    for module, (r, _) in chosen.items():
        bases = [model.get_submodule(name) for name in modules[module]]
        out_features[module] = [base.out_features for base in bases]
        shapes.update(_adapter_shapes(module, modules[module], r, bases[0].in_features, out_features[module],
                                      use_dora))
    _check_adapter_tensors(tensors, shapes, path)  # before wrapping, so a bad adapter leaves the model alone
    use_rslora, dropout = bool(cfg.get("use_rslora", False)), cfg.get("lora_dropout") or 0.0
    layers, weights = {}, {}
    for module, (r, alpha) in chosen.items():
        A, B = tensors[f"{_key(module)}.lora_A.weight"], tensors[f"{_key(module)}.lora_B.weight"]
        # Under DoRA a part with no update of its own may still have a trained magnitude: only the split
        # save_peft recorded (whose parts without adapters keep their norms) drops parts.
        parts = _unfuse(A, B, r, alpha, out_features[module], use_rslora, fused_ranks.get(module),
                        keep_all=use_dora)
        magnitudes = (tensors[f"{_key(module)}.{MAGNITUDE}"].split(out_features[module]) if use_dora
                      else [None] * len(parts))
        for name, part, magnitude in zip(modules[module], parts, magnitudes):
            if part is not None:
                layers[name], weights[name] = part[2:], (*part[:2], magnitude)
    _wrap(model, layers, dropout, use_rslora, use_dora)
    targets = [k for k in TARGETS if any(_leaf(name) == k for name in layers)]
    model.lora = {"r": cfg.get("r", 8), "alpha": cfg.get("lora_alpha", 8), "dropout": dropout, "targets": targets,
                  "use_rslora": use_rslora, "use_dora": use_dora, "modules_to_save": whole_names}
    with torch.no_grad():
        for name, (A, B, magnitude) in weights.items():
            layer = model.get_submodule(name)
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            if magnitude is not None:
                layer.lora_magnitude.copy_(magnitude)
    _put_whole_modules(model, whole, ties)
    return model


_CLASSIFIER_HEADS = {"score", "classifier"}  # a SEQ_CLS adapter's head: `classifier.read_head` reads it
_VOCABULARY_SIZED = ("embed.weight", "lm_head.weight", "lm_head.bias")


def _module_rules(model: nn.Module) -> list[Any]:
    """The checkpoint rules of every Hugging Face tensor of `model`, a tied head's too (a module of its own in
    transformers)."""
    from lmstack.checkpoints.hf import Rule, weight_rules

    rules = weight_rules(model.config)
    if model.config.tie_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",)))
    return rules


def _under(rules: list[Any], modules: Iterable[str]) -> list[Any]:
    return [r for r in rules if any(r.hf.startswith(f"{m}.") for m in modules)]


def whole_modules(model: nn.Module, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path,
                  lora_targets: Iterable[str] = (), ties: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Take out of `tensors` (an adapter file's) the modules it holds whole: PEFT's `modules_to_save` (matched
    as PEFT matches them: every module whose name ends with an entry), and the token embedding and output head
    that PEFT saves by themselves after a vocabulary resize. Returns them as lmstack state entries, with the
    Hugging Face modules they make up. Every name and shape is checked; the embedding and head may bring a new
    vocabulary size, which they must agree on (`ties`: the tied pair is kept one, `ties_saved_copies`)."""
    from lmstack.checkpoints.hf import convert_to_ours

    rules = _module_rules(model)
    names = [m for m in cfg.get("modules_to_save") or ()
             if not (is_classifier_adapter(cfg) and m in _CLASSIFIER_HEADS)]
    modules = {".".join(r.hf.split(".")[:i]) for r in rules for i in range(1, r.hf.count(".") + 1)}
    unmatched = [m for m in names if not any(module.endswith(m) for module in modules)]
    if unmatched:
        raise LMStackError(f"{where}: modules_to_save {unmatched} match no module of the model")
    # PEFT's wrapper of a saved module may also write its two inner modules: the trained copy again, and the
    # base's own (which PEFT runs with the adapter disabled, never merged).
    for key in list(tensors):
        match = re.fullmatch(r"base_model\.model\.(.+)\.(modules_to_save|original_module)\.(.+)", key)
        if match and match[1] in modules:
            copy = tensors.pop(key)
            if match[2] == "modules_to_save":
                tensors.setdefault(_key(f"{match[1]}.{match[3]}"), copy)
    saved = {module for module in modules if any(module.endswith(m) for m in names)}
    both = sorted(t for t in lora_targets if any(t == s or t.startswith(f"{s}.") for s in saved))
    if both:
        raise LMStackError(f"{where}: {both[0]} is both a LoRA target and in modules_to_save")
    saved |= {r.hf.rpartition(".")[0] for r in rules if r.ours[0] in _VOCABULARY_SIZED and _key(r.hf) in tensors}
    saved = {m for m in saved if not any(m.startswith(f"{other}.") for other in saved)}  # the outermost
    chosen = _under(rules, saved)
    if not chosen:
        return {}, []
    expected = {n: p.shape for n, p in model.named_parameters(remove_duplicate=False)}
    quantized = [r.hf for r in chosen if not all(name in expected for name in r.ours)]
    if quantized:
        raise LMStackError(f"{where}: the adapter holds {quantized[0]} whole, which this model holds quantized; "
                           "apply it to the unquantized base")
    rows = {_key(r.hf): tensors[_key(r.hf)].shape[0] for r in chosen
            if r.ours[0] in _VOCABULARY_SIZED and _key(r.hf) in tensors}
    if len(set(rows.values())) > 1:
        raise LMStackError(f"{where}: the token embedding and the output head disagree on the vocabulary size "
                           f"({', '.join(f'{k} has {n} rows' for k, n in rows.items())})")
    vocab = next(iter(rows.values()), model.config.vocab_size)
    have = {r.ours[0] for r in chosen if _key(r.hf) in tensors}
    if vocab != model.config.vocab_size:
        # Tied and kept tied, one of the two is both; otherwise each needs its resized copy.
        needed = {"embed.weight", "lm_head.weight"} - (have if ties else set())
        needed |= {"lm_head.bias"} if model.config.lm_head_bias else set()
        if not needed <= have:
            missing = next(r.hf for r in rules if r.ours[0] in needed - have)
            raise LMStackError(f"{where}: {next(iter(rows))} has {vocab} rows, resized from the base model's "
                               f"{model.config.vocab_size}, but the adapter holds no {missing} of that size")
        for name in _VOCABULARY_SIZED:
            if name in expected:
                expected[name] = torch.Size([vocab, *expected[name][1:]])
    present = [r.hf for r in chosen if _key(r.hf) in tensors]  # convert_to_ours names a missing one
    state = convert_to_ours(chosen, expected, present, lambda k: tensors[_key(k)],
                            f"{where.parent}/adapter_model.safetensors")
    for k in present:
        tensors.pop(_key(k), None)
    return state, sorted(saved)


def can_tie_saved_copies(model: nn.Module, modules_to_save: Iterable[str]) -> bool:
    """Whether PEFT's `ensure_weight_tying` ties a tied model's saved embedding and head copies to each other:
    only for a module to save named as transformers names embeddings (PEFT's EMBEDDING_LAYER_NAMES: GPT-2's
    `wte` is not)."""
    return model.config.tie_embeddings and any(m.split(".")[-1] in ("embed_tokens", "lm_head")
                                               for m in modules_to_save)


def ties_saved_copies(model: nn.Module, cfg: dict[str, Any]) -> bool:
    """Whether PEFT ties the saved embedding and head copies of adapter config `cfg` on `model`."""
    return bool(cfg.get("ensure_weight_tying")) and can_tie_saved_copies(model, cfg.get("modules_to_save") or ())


def _put_whole_modules(model: nn.Module, state: dict[str, torch.Tensor], ties: bool) -> None:
    """Copy the tensors `whole_modules` took into `model`. An embedding or head that is saved gets a new
    Parameter (of a resized vocabulary, maybe). As in PEFT, a tied head saved or kept apart from the embedding
    is untied, unless `ties` (`ties_saved_copies`) ties the saved copy to both."""
    with torch.no_grad():
        for name, t in state.items():
            if name not in _VOCABULARY_SIZED:
                model.get_parameter(name).copy_(t)
    embed, head, bias = (state.get(name) for name in _VOCABULARY_SIZED)
    tied = model.config.tie_embeddings
    if tied and ties:
        embed = head = embed if embed is not None else head
    elif tied and (embed is None) != (head is None):  # the other one keeps the base's weights, apart
        embed, head = (embed if embed is not None else model.embed.weight.detach(),
                       head if head is not None else model.lm_head.weight.detach())

    def parameter(t: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.to(like.device, like.dtype, copy=True), requires_grad=like.requires_grad)

    if embed is not None:
        model.embed.weight = parameter(embed, model.embed.weight)
        model.embed.num_embeddings = embed.shape[0]
    if head is not None:
        model.lm_head.weight = parameter(head, model.lm_head.weight)
        model.lm_head.out_features = head.shape[0]
    if bias is not None:
        model.lm_head.bias = parameter(bias, model.lm_head.bias)
    if embed is not None or head is not None:
        tie = tied and embed is not None and head is not None and torch.equal(embed, head)
        model.config = dataclasses.replace(model.config, vocab_size=model.embed.num_embeddings,
                                           tie_embeddings=tie)
        model.tie_weights()


def is_classifier_adapter(cfg: dict[str, Any]) -> bool:
    """Whether an adapter config is a sequence classifier's (PEFT's task_type SEQ_CLS) whose saved modules
    include the head: `load_adapter_model` puts that head on the adapted body (`classifier.read_head`)."""
    return cfg.get("task_type") == "SEQ_CLS" and bool(_CLASSIFIER_HEADS & set(cfg.get("modules_to_save") or ()))


def adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The adapter_config.json of PEFT adapter directory `path`."""
    config_file = Path(path) / "adapter_config.json"
    if not config_file.exists():
        raise LMStackError(f"{path}: no adapter_config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise LMStackError(f"{config_file}: not valid JSON ({e})") from None


def _read_adapter(path: Path, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The adapter's tensors, less a classifier's head (`classifier.read_head` reads it)."""
    file = path / "adapter_model.safetensors"
    if not file.exists():
        raise LMStackError(f"{path}: no adapter_model.safetensors")
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors' own error type: a cut-off or corrupt file
        raise LMStackError(f"{file}: unreadable ({e})") from None
    if is_classifier_adapter(cfg):  # the head goes on through read_head, not on the body
        tensors.pop(HEAD_KEY, None)
    return tensors


def _fused_ranks(path: Path) -> dict[str, list[list[float]]]:
    """The parts' [r, alpha] `save_peft` recorded for each fused layer ({} for an adapter written elsewhere)."""
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        recorded = (f.metadata() or {}).get(FUSED_RANKS_KEY)
    try:
        return json.loads(recorded) if recorded else {}
    except json.JSONDecodeError:
        return {}


def _check_adapter_tensors(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[str, list[int]]],
                           path: Path) -> None:
    """The file must hold each expected tensor (name -> (lmstack layer, shape)) and nothing else: a tensor left
    unused (biases, modules_to_save) would silently change the outputs."""
    where = f"{path}/adapter_model.safetensors"
    for key, (name, shape) in shapes.items():
        t = tensors.get(key)
        if t is None:
            raise LMStackError(f"{where}: missing {key}")
        if list(t.shape) != shape:
            raise LMStackError(f"{where}: {key} has shape {list(t.shape)}, the base model's {name} needs {shape}")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise LMStackError(f"{where}: holds tensors that are not the LoRA A and B of the model's adapters, which "
                           f"lmstack cannot apply: {', '.join(extra[:5])}{more}")


def _adapter_shapes(module: str, names: Sequence[str], r: int, in_features: int, out_features: Sequence[int],
                    dora: bool) -> dict[str, tuple[str, list[int]]]:
    """The tensors a PEFT adapter of rank `r` on HF `module` (our layers `names`) holds, each with the label its
    errors name and its shape, for `_check_adapter_tensors`."""
    label, key = _module_label(module, names), _key(module)
    shapes = {f"{key}.lora_A.weight": (label, [r, in_features]),
              f"{key}.lora_B.weight": (label, [sum(out_features), r])}
    if dora:
        shapes[f"{key}.{MAGNITUDE}"] = (label, [sum(out_features)])
    return shapes


def load_adapter_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Copy a PEFT adapter directory's A and B into a model that already has its LoRA layers (e.g. to resume
    training), checking every name and shape, and that the file holds nothing else; a fused layer's adapter
    (as `save_peft` wrote it) splits back into its parts exactly. Returns the model."""
    path = Path(path)
    wrapped = dict(lora_layers(model))
    if not wrapped:
        raise LMStackError("the model has no LoRA adapters (apply_lora first)")
    cfg = adapter_config(path) if (path / "adapter_config.json").exists() else {}
    tensors = _read_adapter(path, cfg)
    shapes, fused = {}, {}
    for module, names in peft_modules(model).items():
        parts = [wrapped.get(name) for name in names]
        if any(parts):
            out_features = [model.get_submodule(name).out_features for name in names]
            r = sum(p.r for p in parts if p is not None)
            shapes.update(_adapter_shapes(module, names, r, model.get_submodule(names[0]).in_features, out_features,
                                          any(p is not None and p.use_dora for p in parts)))
            fused[module] = (parts, out_features)
    _check_adapter_tensors(tensors, shapes, path)
    with torch.no_grad():
        for module, (parts, out_features) in fused.items():
            A, B = tensors[f"{_key(module)}.lora_A.weight"], tensors[f"{_key(module)}.lora_B.weight"]
            first = next(p for p in parts if p is not None)  # _fuse scaled every block to its scaling
            pieces = _blocks(A, B, out_features, [p.r if p is not None else 0 for p in parts])
            magnitudes = (tensors[f"{_key(module)}.{MAGNITUDE}"].split(out_features) if first.use_dora
                          else [None] * len(parts))
            for part, piece, magnitude in zip(parts, pieces, magnitudes):
                if part is not None:
                    part.lora_A.copy_(piece[0])
                    part.lora_B.copy_(piece[1] / (part.scaling / first.scaling))
                    if magnitude is not None:
                        part.lora_magnitude.copy_(magnitude)
    return model
