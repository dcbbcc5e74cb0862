"""LoRA: low-rank adapters on chosen linear layers, with PEFT's file format.

A wrapped layer computes base(x) + (alpha / r) * B(A(dropout(x))) with A [r, in] initialised as PEFT does
(Kaiming-uniform) and B [out, r] at zero, so the wrapped model equals the base model until B trains. Only A and
B train. `merge` folds B A into the base weight for inference; `unmerge` takes it back out. Adapters save as
`adapter_config.json` + `adapter_model.safetensors` under Hugging Face parameter names, so
`peft.PeftModel.from_pretrained` applies them to the Hugging Face export of the same base model.

QLoRA (Dettmers et al. 2023): `prepare_qlora` first quantizes the frozen base to 4-bit NF4 (`NF4Linear`), then
adds float32 adapters; the base costs ~4.5 bits per weight while gradients still flow through it to the
adapters. The adapter files are the same as for a float base, so a QLoRA adapter loads onto the float model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmstack.errors import LMStackError
from lmstack.quantize import NF4Linear, quantize_model

# lmstack's linear layer names and the Hugging Face (Llama-family) module names PEFT targets.
HF_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
            "down": "down_proj"}


class LoRALinear(nn.Module):
    """A frozen nn.Linear (or NF4Linear, for QLoRA) plus a trainable low-rank update.

    On a float base the adapters take the base weight's dtype; on an NF4 base they are float32."""

    def __init__(self, base: nn.Linear | NF4Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r < 1:
            raise LMStackError(f"LoRA rank r={r}: must be >= 1")
        self.base = base
        for p in base.parameters():  # weight and bias (an NF4Linear has only buffers)
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        if isinstance(base, NF4Linear):
            device, dtype = base.absmax.device, torch.float32
        else:
            device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=dtype))
        if device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.merged = False
        self.enabled = True

    @property
    def weight(self) -> torch.Tensor:  # so code that reads `.weight` (shapes, dtype) keeps working
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.enabled and not self.merged:
            # The casts are no-ops on a float base; on an NF4 base the update is computed in float32.
            h = self.dropout(x).to(self.lora_A.dtype)
            y = y + ((h @ self.lora_A.t() @ self.lora_B.t()) * self.scaling).to(y.dtype)
        return y

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight. An NF4 base raises: B A added to 4-bit codes would be lost to
        re-quantization, so load the adapter onto the float model (`load_peft`) and merge there."""
        if isinstance(self.base, NF4Linear):
            raise LMStackError("cannot merge LoRA into a 4-bit NF4 base (QLoRA): save the adapter with "
                               "save_peft, load it onto the float model with load_peft and merge there")
        if not self.merged:
            self.base.weight += (self.lora_B @ self.lora_A) * self.scaling
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= (self.lora_B @ self.lora_A) * self.scaling
            self.merged = False


def _check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    targets = tuple(targets)
    unknown = [t for t in targets if t not in HF_NAMES]
    if unknown:
        raise LMStackError(f"unknown LoRA targets {unknown}; choose from {list(HF_NAMES)}")
    return targets


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets: Iterable[str] = ("q", "v")) -> nn.Module:
    """Wrap every linear layer whose name ends in one of `targets` (q, k, v, o, gate, up, down) and freeze
    everything else. Targets may be nn.Linear or NF4Linear (see `prepare_qlora`). Returns the model, changed
    in place."""
    targets = _check_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Linear, NF4Linear)) and name.rsplit(".", 1)[-1] in targets:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, LoRALinear(module, r, alpha, dropout))
            wrapped += 1
    if not wrapped:
        raise LMStackError(f"no linear layer named {list(targets)} in the model")
    model.lora = {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets)}
    return model


def prepare_qlora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                  targets: Iterable[str] = ("q", "v"), block_size: int = 64,
                  dtype: torch.dtype = torch.bfloat16, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """QLoRA: quantize every linear layer of `model` to a frozen NF4 base, then `apply_lora` on `targets`.

    The base computes in `dtype` (bfloat16, QLoRA's compute dtype) from NF4 blocks of `block_size` weights;
    the adapters are float32. Layers named in `skip` stay in floating point (and frozen): by default the
    output head, as bitsandbytes/PEFT do. `merge_lora` raises on the result; `save_peft` writes the same
    adapter files as for a float base, so `load_peft` applies them to the float model (where they can be
    merged). Returns the model, changed in place."""
    targets = _check_targets(targets)
    if r < 1:  # checked before quantizing, so bad input leaves the model as it was
        raise LMStackError(f"LoRA rank r={r}: must be >= 1")
    quantize_model(model, "nf4", group_size=block_size, dtype=dtype, skip=tuple(skip))
    return apply_lora(model, r, alpha, dropout, targets)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch the adapters off to get the base model back (e.g. as DPO's reference) without a copy."""
    for _, m in lora_layers(model):
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
    """(trainable, total) parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _hf_key(name: str) -> str:
    """layers.3.attn.q -> base_model.model.model.layers.3.self_attn.q_proj (PEFT's prefix + HF's names)."""
    parts = name.split(".")
    block, kind, leaf = ".".join(parts[:2]), parts[2], parts[3]
    group = "self_attn" if kind == "attn" else "mlp"
    if kind == "mlp" and len(parts) > 4:
        raise LMStackError(f"PEFT export of {name!r} (mixture-of-experts layers) is not supported")
    return f"base_model.model.model.{block}.{group}.{HF_NAMES[leaf]}"


def check_peft_exportable(model: nn.Module) -> None:
    """Raise unless adapters on `model` can be written in PEFT's format (checked before training, too)."""
    from lmstack.checkpoints.hf import family_of

    if family_of(model.config) in ("gpt2", "phi3"):
        raise LMStackError("PEFT export needs separate q/k/v and gate/up projections (GPT-2 and Phi-3 fuse them)")
    if model.config.n_expert:
        raise LMStackError("PEFT export of mixture-of-experts layers is not supported")


def save_peft(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters in PEFT's format."""
    if not getattr(model, "lora", None):
        raise LMStackError("the model has no LoRA adapters (apply_lora first)")
    check_peft_exportable(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in lora_layers(model):
        key = _hf_key(name)
        tensors[f"{key}.lora_A.weight"] = layer.lora_A.detach().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = layer.lora_B.detach().contiguous().cpu()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = model.lora
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["r"], "lora_alpha": cfg["alpha"],
              "lora_dropout": cfg["dropout"], "target_modules": sorted(HF_NAMES[t] for t in cfg["targets"]),
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "base_model_name_or_path": base_model_name_or_path}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_peft(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply a PEFT LoRA adapter directory to `model` (wrapping the layers it targets)."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.exists():
        raise LMStackError(f"{path}: no adapter_config.json")
    cfg = json.loads(config_file.read_text())
    if cfg.get("peft_type") != "LORA":
        raise LMStackError(f"{config_file}: peft_type {cfg.get('peft_type')!r} is not LORA")
    to_ours = {v: k for k, v in HF_NAMES.items()}
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    unknown = [t for t in targets if t not in to_ours]
    if unknown:
        raise LMStackError(f"{config_file}: target modules {unknown} are not lmstack layers")
    apply_lora(model, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
               targets=[to_ours[t] for t in targets])
    return load_adapter_weights(model, path)


def load_adapter_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Copy a PEFT adapter directory's A and B into a model that already has its LoRA layers (e.g. to resume
    training), checking every name and shape. Returns the model."""
    path = Path(path)
    layers = lora_layers(model)
    if not layers:
        raise LMStackError("the model has no LoRA adapters (apply_lora first)")
    if not (path / "adapter_model.safetensors").exists():
        raise LMStackError(f"{path}: no adapter_model.safetensors")
    try:
        tensors = load_file(str(path / "adapter_model.safetensors"))
    except Exception as e:  # safetensors' own error type: a cut-off or corrupt file
        raise LMStackError(f"{path / 'adapter_model.safetensors'}: unreadable ({e})") from None
    for name, layer in layers:
        key = _hf_key(name)
        for which in ("lora_A", "lora_B"):
            t = tensors.get(f"{key}.{which}.weight")
            if t is None:
                raise LMStackError(f"{path}/adapter_model.safetensors: missing {key}.{which}.weight")
            target = getattr(layer, which)
            if t.shape != target.shape:
                raise LMStackError(f"{path}/adapter_model.safetensors: {key}.{which}.weight has shape "
                                   f"{list(t.shape)}, the base model's {name} needs {list(target.shape)}")
            with torch.no_grad():
                target.copy_(t)
    return model
