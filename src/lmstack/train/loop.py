"""The training loop: one process, or many under `torchrun` with DDP or FSDP2, for every task.

What is trained, on what data and with which loss comes from a task (`lmstack.train.tasks`): pretraining,
SFT, classification, reward modelling, DPO and its family, GRPO. Everything else is here, once.

A step is one optimizer update over `grad_accum` micro-batches per process. Which items a step sees (windows
of the token stream, or examples) is a pure function of (seed, step): the global batch is drawn from a
generator seeded with both, then laid out [micro-step, rank, row]. So a resumed run sees exactly the batches the uninterrupted run would
have seen, and N processes with batch b see what one process with batch N*b sees.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lmstack.atomic import atomic_write_text
from lmstack.checkpoints import load_model, load_tokenizer, save_model
from lmstack.data.shards import TokenShards
from lmstack.errors import LMStackError
from lmstack.models import active_params, build_model, flops_per_token
from lmstack.models.classifier import (
    SequenceClassifier,
    load_classifier,
    read_head,
    save_classifier,
    save_head,
)
from lmstack.onednn import onednn_linears
from lmstack.train import checkpoint as ckpt
from lmstack.train.config import TrainConfig, config_differences
from lmstack.train.metrics import MetricsLog, best_validation, peak_flops, plot_losses, read_metrics
from lmstack.train.tasks import (
    NEEDS_REFERENCE,
    ClassifyTask,
    GRPOTask,
    PreferenceTask,
    PretrainTask,
    SFTTask,
    Task,
)


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Read torchrun's environment, start the process group, and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        from lmstack.checkpoints import parse_device

        device = parse_device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local}")
        elif device.type == "cuda" and world > 1:  # every rank on one GPU: NCCL fails with "Duplicate GPU"
            raise LMStackError(f"device {cfg.device!r} under torchrun would put all {world} processes on one GPU; "
                               "give --device cuda (each process takes cuda:LOCAL_RANK) and choose the GPUs "
                               "with CUDA_VISIBLE_DEVICES")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # float32 matrix products on tensor cores (TF32), as nanoGPT runs them and as MFU's fp32 peak assumes.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        # The other ranks wait at a barrier while rank 0 writes a checkpoint: allow a large one 30 minutes
        # (NCCL's default gives up after 10).
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return Runtime(rank, world, local, device)


def caused_by_oom(error: BaseException) -> bool:
    """Whether `error` is a CUDA out-of-memory error, or wraps one (torch.compile raises an OOM met while
    compiling or autotuning inside its own BackendCompilerFailed)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, torch.cuda.OutOfMemoryError):
            return True
        seen.add(id(error))
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return False


def resolve_precision(cfg: TrainConfig, device: torch.device, sharded: bool = False) -> str:
    """The precision a run trains in: `cfg.precision`, or for "auto" bf16 where the GPU has it, else fp32."""
    if cfg.precision == "fp16" and device.type == "cpu":
        raise LMStackError("precision fp16 needs a GPU (use bf16 or fp32 on the CPU)")
    if cfg.precision == "fp16" and sharded:  # each rank's loss scaler would see only its own shard's infs
        raise LMStackError("precision fp16 is not supported with distributed: fsdp (the loss scaler would have "
                           "to agree across shards); use bf16, or fp16 with ddp")
    if cfg.precision != "auto":
        return cfg.precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):  # not emulated (V100, T4)
        return "bf16"
    return "fp32"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `learning_rate`, then cosine decay to `min_lr` at `lr_decay_steps`."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_steps + 1)
    if step >= decay_steps:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def run_flops_per_token(cfg: TrainConfig, decoder: torch.nn.Module) -> Callable[[int], float] | None:
    """Model FLOPs per trained token, for MFU, as a function of the batch's sequence length (the attention
    term grows with it; SFT and preference batches are padded to their longest row, not to block_size):
    nanoGPT's 6 N plus attention for full training; 4 N with LoRA (frozen weights take no weight gradients;
    the adapters' are negligible); 2 N more where a frozen reference scores the same tokens (DPO, IPO, KTO).
    A classifier or reward model has no LM head to count. None for GRPO, whose time goes mostly to sampling."""
    if cfg.task == "grpo":
        return None
    config = decoder.config
    with torch.device("meta"):  # the base model's weights: LoRA wrappers and 4-bit buffers aside
        n = active_params(build_model(config))
    if cfg.task in ("classify", "reward"):  # a score head of a few rows stands where the LM head was
        n -= config.vocab_size * config.n_embd
    weights = (4 if cfg.lora_r else 6) + (2 if cfg.task in NEEDS_REFERENCE and cfg.beta else 0)
    return lambda seq_len: flops_per_token(config, n, seq_len) + (weights - 6) * n


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linear and embedding weights); leave biases and norm gains alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def compute_context(device: torch.device, precision: str):
    """How a forward pass computes: autocast for bf16 / fp16; in float32 on the CPU, linear layers through
    oneDNN where it is the faster (`lmstack.onednn`: 1.6x the step of PyTorch's default on the AMD machine of
    BENCHMARKS.md; not on Intel's CPUs, whose MKL is as fast)."""
    if precision == "fp32":
        return onednn_linears(enabled=None if device.type == "cpu" else False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _gathered_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An FSDP model's whole weights, gathered from the shards onto the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _full_optimizer_state(model, optimizer, rt: Runtime, fsdp: bool) -> Any:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict() if rt.is_main else None



# ---------------------------------------------------------------------------------------------- set-up


def build_task(cfg: TrainConfig) -> Task:
    """The task `cfg.task` names, with its data read and tokenized."""
    if not cfg.data:
        raise LMStackError("no data: set `data:` (a shard directory from `lmstack data prepare` for "
                           "pretraining, a JSONL file otherwise)")
    if cfg.task == "pretrain":
        return PretrainTask(TokenShards(cfg.data), cfg.block_size, cfg.seed)
    if not Path(cfg.data).is_file():
        raise LMStackError(f"{cfg.data}: no such file (task {cfg.task} reads JSONL records)")
    tokenizer = load_tokenizer(cfg.model)
    common = dict(tokenizer=tokenizer, seed=cfg.seed, data=cfg.data, val_data=cfg.val_data or None,
                  val_fraction=cfg.val_fraction)
    if cfg.task == "sft":
        return SFTTask(**common, block_size=cfg.block_size, packing=cfg.packing)
    if cfg.task == "classify":
        return ClassifyTask(**common, block_size=cfg.block_size, labels=cfg.labels or None)
    if cfg.task == "grpo":
        if not cfg.reward_function:
            raise LMStackError("task grpo needs reward_function: 'file.py:function' or 'module:function'")
        return GRPOTask(**common, reward=cfg.reward_function, group_size=cfg.group_size, beta=cfg.beta,
                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    options = {"dpo": {"label_smoothing": cfg.label_smoothing, "rpo_alpha": cfg.rpo_alpha},
               "simpo": {"gamma": cfg.simpo_gamma},
               "kto": {"desirable_weight": cfg.kto_desirable_weight, "undesirable_weight": cfg.kto_undesirable_weight}}
    return PreferenceTask(cfg.task, **common, block_size=cfg.block_size, beta=cfg.beta,
                          **options.get(cfg.task, {}))


def checkpoint_tokenizer_hash(path: Path) -> str | None:
    """The sha256 of a checkpoint directory's tokenizer (as `data prepare` records it), None without one."""
    from lmstack.data.shards import tokenizer_hash

    return tokenizer_hash(load_tokenizer(path)) if (path / "tokenizer.json").is_file() else None


def check_checkpoint_tokenizer(cfg: TrainConfig) -> None:
    """Pretraining from a checkpoint: its tokenizer must be the one the shards were tokenized with (when
    both say which), or every token id would mean another token to the model."""
    data_hash = TokenShards(cfg.data).meta.get("tokenizer_sha256")
    if not data_hash:
        return
    model_dir = Path(cfg.model)
    model_hash = checkpoint_tokenizer_hash(model_dir)
    if model_hash and model_hash != data_hash:
        raise LMStackError(f"the checkpoint {model_dir} has another tokenizer (sha256 {model_hash[:12]}) than "
                           f"the data {cfg.data} was prepared with (sha256 {data_hash[:12]}): prepare the data "
                           f"with `lmstack data prepare --tokenizer {model_dir}`")


def check_reference_vocabulary(cfg: TrainConfig, reference: torch.nn.Module, policy: torch.nn.Module) -> None:
    """The reference scores the policy's token ids: it must have the same vocabulary, and the same tokenizer
    where both directories hold one (a different one of the same size would score other tokens silently)."""
    ours, theirs = policy.config.vocab_size, reference.config.vocab_size
    if ours != theirs:
        raise LMStackError(f"reference {cfg.reference} has vocab_size {theirs}, the model {cfg.model} {ours}: the "
                           "reference must use the model's tokenizer")
    hashes = [checkpoint_tokenizer_hash(Path(cfg.model)), checkpoint_tokenizer_hash(Path(cfg.reference))]
    if None not in hashes and hashes[0] != hashes[1]:
        raise LMStackError(f"reference {cfg.reference} has another tokenizer (sha256 {hashes[1][:12]}) than the "
                           f"model {cfg.model} (sha256 {hashes[0][:12]}): the reference must use the model's")


def build_policy(cfg: TrainConfig, task: Task) -> torch.nn.Module:
    """The model to train: a new or loaded LM, a classification / reward head on a loaded LM, and LoRA
    adapters (on a 4-bit NF4 base with QLoRA) when `lora_r` is set."""
    if cfg.task == "pretrain" and cfg.init_from == "scratch":
        model = build_model(cfg.model_config(vocab_size=task.vocab_size))
    else:
        if cfg.model_overrides:
            started = f"task {cfg.task}" if cfg.task != "pretrain" else "init_from: checkpoint"
            raise LMStackError(f"model_overrides ({', '.join(cfg.model_overrides)}) apply when a model is built; "
                               f"{started} starts from the checkpoint {cfg.model} as it is (--model_overrides "
                               "'{}' clears a recipe's)")
        model = load_model(cfg.model, dtype=torch.float32)
        if cfg.task in ("classify", "reward"):
            labels = task.labels if cfg.task == "classify" else ["score"]
            model = SequenceClassifier.from_decoder(model, labels, task.tokenizer.pad_token_id)
    if cfg.task in NO_DROPOUT_TASKS:
        disable_dropout(model)  # before LoRA: the adapters' own dropout (lora_dropout) stays as set
    context = decoder_of(model).config.block_size
    if cfg.block_size > context and cfg.task != "grpo":  # GRPO's rows are its prompts and samples, not blocks
        raise LMStackError(f"block_size {cfg.block_size} is longer than the model's context ({context} positions): "
                           f"lower block_size to at most {context}")
    if cfg.lora_r:
        # Adapters go on the decoder; a classifier's new head stays outside them and trains in full.
        from lmstack.train.lora import apply_lora, check_peft_exportable, prepare_qlora

        # LoRA checkpoints are PEFT adapters: fail now, not at a save
        check_peft_exportable(decoder_of(model), cfg.lora_targets)
        wrap = prepare_qlora if cfg.qlora else apply_lora
        wrap(decoder_of(model), r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
             targets=cfg.lora_targets, use_rslora=cfg.lora_rslora, use_dora=cfg.lora_dora)
    elif decoder_of(model).config.arch == "transformer":
        from lmstack.checkpoints.hf import config_to_hf

        config_to_hf(decoder_of(model).config)  # checkpoints are Hugging Face directories: fail now, not at a save
    return model


# Tasks that compare log-probabilities (of a pair, or with a reference scored in eval mode) train without the
# model's dropout, as TRL's trainers do by default (disable_dropout): with it, the rewards start as noise.
NO_DROPOUT_TASKS = ("reward", "dpo", "ipo", "kto", "orpo", "simpo", "grpo")


def disable_dropout(model: torch.nn.Module) -> None:
    """Switch off every dropout of `model` (the modules and the attention's dropout_p); its config, and so
    its saved checkpoint, keeps the rate it had."""
    from lmstack.models.attention import Attention

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        elif isinstance(m, Attention):
            m.dropout = 0.0


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The DecoderLM inside a classifier (or the model itself)."""
    return model.model if isinstance(model, SequenceClassifier) else model


def save_weights(model: torch.nn.Module, path: Path, cfg: TrainConfig, tokenizer) -> None:
    """Write the trained weights where a checkpoint is expected: the LoRA adapters in PEFT's format (plus a
    classifier's head), a classifier in Hugging Face's sequence-classification format, or the whole LM."""
    if cfg.lora_r:
        from lmstack.train.lora import save_peft

        head = model.score.weight if isinstance(model, SequenceClassifier) else None
        save_peft(decoder_of(model), path, base_model_name_or_path=str(Path(cfg.model).resolve()), head=head)
        if head is not None:
            save_head(model, path)
        tokenizer.save(path)
    elif isinstance(model, SequenceClassifier):
        save_classifier(model, path, tokenizer=tokenizer)
    else:
        save_model(model, path, tokenizer=tokenizer)


def restore_weights(model: torch.nn.Module, path: Path, cfg: TrainConfig) -> None:
    """Load what `save_weights` wrote back into `model` (built as at the start of the run)."""
    if cfg.lora_r:
        from lmstack.train.lora import load_adapter_weights

        load_adapter_weights(decoder_of(model), path)
        if isinstance(model, SequenceClassifier):
            with torch.no_grad():
                model.score.weight.copy_(read_head(path)[0])
    else:
        saved = (load_classifier if isinstance(model, SequenceClassifier) else load_model)(path, dtype=torch.float32)
        model.load_state_dict(_without_zero_biases(saved.state_dict(), model))


def _without_zero_biases(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`state` less the all-zero biases that `model` does not have: a family whose checkpoints always hold
    biases (GPT-2) stores a bias-free model's (nanoGPT's bias=False) as zeros."""
    own = model.state_dict()
    return {k: v for k, v in state.items() if k in own or not (k.endswith(".bias") and not v.any())}


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    # Contiguous before pinning: a strided view (inputs and labels are slices of one window) would be copied
    # to pageable memory by the transfer, which then waits for the GPU instead of queueing ahead of it.
    pin = device.type == "cuda"
    return {k: (v.contiguous().pin_memory().to(device, non_blocking=True) if pin else v.to(device))
            if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or continue training) the run in `cfg.out_dir`; returns a summary of the run. `cfg.task`
    picks pretraining, SFT, classification, a reward model, DPO and its family, or GRPO."""
    rt = setup_runtime(cfg)
    try:
        return _train(cfg, resume, rt)
    except KeyboardInterrupt:
        if rt.is_main:  # the CLI then prints "interrupted" and exits non-zero
            print(interrupted_message(cfg), file=sys.stderr, flush=True)
        raise
    except Exception as e:
        if not caused_by_oom(e):
            raise
        raise LMStackError(
            f"out of GPU memory at batch_size={cfg.batch_size}, block_size={cfg.block_size}: lower batch_size "
            "(and raise grad_accum to keep the global batch), or set activation_checkpointing: true") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


pretrain = train  # the name pretraining callers know


def interrupted_message(cfg: TrainConfig) -> str:
    """What a Ctrl-C leaves: the last complete checkpoint (none is written from the interrupted step) and
    the command that continues from it."""
    run_dir = Path(cfg.out_dir)
    verb = "pretrain" if cfg.task == "pretrain" else f"finetune {cfg.task}"
    found = ckpt.list_checkpoints(run_dir)
    if not found:
        return (f"stopped before the first checkpoint of {run_dir} (checkpoint_interval {cfg.checkpoint_interval}): "
                "nothing to resume from; start the run again")
    return (f"stopped: the last checkpoint is {found[-1]}; continue the run with "
            f"`lmstack {verb} --resume {run_dir}`")


def _train(cfg: TrainConfig, resume: bool, rt: Runtime) -> dict[str, Any]:
    run_dir = Path(cfg.out_dir)
    fsdp = rt.distributed and cfg.distributed == "fsdp"
    if fsdp and (cfg.lora_r or cfg.task in ("classify", "reward", "grpo")):
        raise LMStackError("distributed: fsdp supports full finetuning of language models (not GRPO's sampling); "
                           "use ddp with LoRA, classification heads or GRPO")
    start_step, state, resume_from = 0, {}, None
    if resume:
        resume_from = ckpt.latest_checkpoint(run_dir)
        saved_config = json.loads((run_dir / "config.json").read_text())
        diffs = config_differences(saved_config, cfg)
        if diffs:
            raise LMStackError(f"{run_dir}: cannot resume with a different config: " + "; ".join(diffs))
        state, optim_state, rng = ckpt.read_trainer_state(resume_from, rt.rank)
        start_step = state["step"]
        if cfg.max_steps <= start_step:
            raise LMStackError(f"{run_dir}: max_steps {cfg.max_steps} is not past the last checkpoint's step "
                               f"{start_step} ({resume_from}): give a larger --max_steps to train on")
        old_end = saved_config.get("lr_decay_steps") or saved_config.get("max_steps")
        new_end = cfg.lr_decay_steps or cfg.max_steps
        if rt.is_main and old_end != new_end:
            print(f"note: the cosine decay now ends at step {new_end} (it ended at {old_end}); "
                  f"--lr_decay_steps {old_end} keeps the old schedule", file=sys.stderr)
    elif rt.is_main and (run_dir / "checkpoints").exists() and ckpt.list_checkpoints(run_dir):
        raise LMStackError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose "
                           "another out_dir")
    if rt.is_main and not resume and cfg.warmup_steps >= cfg.max_steps:
        print(f"note: warmup_steps {cfg.warmup_steps} >= max_steps {cfg.max_steps}: the learning rate stays below "
              f"learning_rate {cfg.learning_rate:g} for the whole run", file=sys.stderr)
    task = build_task(cfg)
    if rt.is_main:
        for note in task.notes:
            print(f"note: {note}", file=sys.stderr)
    tokenizer = task.tokenizer
    precision = resolve_precision(cfg, rt.device, sharded=fsdp)
    if rt.is_main and state.get("precision", precision) != precision:  # "auto" on another device
        print(f"note: this run trained in {state['precision']} and continues in {precision} (precision "
              f"{cfg.precision} on {rt.device.type}): its losses will differ from an uninterrupted run's",
              file=sys.stderr)

    # Seed before building the model so initial weights (and new heads, adapters) are reproducible.
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    if cfg.task == "pretrain" and cfg.init_from == "checkpoint":
        check_checkpoint_tokenizer(cfg)
    model = build_policy(cfg, task)
    decoder = decoder_of(model)
    if cfg.task == "pretrain" and decoder.config.vocab_size < task.vocab_size:
        source = f"the checkpoint {cfg.model}" if cfg.init_from == "checkpoint" else f"model {cfg.model}"
        raise LMStackError(f"{source} has vocab_size {decoder.config.vocab_size}, smaller than the data's "
                           f"{task.vocab_size} ({cfg.data}): its token ids would be out of range")
    if resume_from is not None:
        saved_world = ckpt.saved_world_size(resume_from, state)
        if saved_world != rt.world_size:  # batch_size is per process: the global batch would change
            raise LMStackError(f"{run_dir}: cannot resume with a different number of processes: the run had "
                               f"{saved_world}, now {rt.world_size} (batch_size is per process)")
        restore_weights(model, resume_from, cfg)
    if not fsdp:  # FSDP moves each block to the device as it shards it: no device ever holds the whole model
        model.to(rt.device)
    model.train()
    decoder.activation_checkpointing = cfg.activation_checkpointing
    raw_model = model
    task.policy = raw_model
    if cfg.task in NEEDS_REFERENCE and cfg.beta:
        # Under LoRA the default reference is the base model itself, with the adapters switched off: no copy.
        if cfg.lora_r and not cfg.reference:
            task.reference = raw_model
        else:
            reference = load_model(cfg.reference or cfg.model, dtype=torch.float32).eval().requires_grad_(False)
            if cfg.reference:
                check_reference_vocabulary(cfg, reference, decoder)
            task.reference = reference if fsdp else reference.to(rt.device)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # The frozen reference is sharded like the policy: neither is ever whole on one device.
        for sharded in (model, task.reference) if task.reference not in (None, raw_model) else (model,):
            for block in decoder_of(sharded).layers:
                fully_shard(block)
            fully_shard(sharded)
    elif rt.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    forward = torch.compile(model) if cfg.compile else model

    optimizer = torch.optim.AdamW(optimizer_groups(raw_model, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2), fused=rt.device.type == "cuda")
    scaler = torch.amp.GradScaler(rt.device.type, enabled=precision == "fp16")
    if resume_from is not None:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(optim_state["optimizer"])
        if optim_state.get("scaler"):
            scaler.load_state_dict(optim_state["scaler"])
        ckpt.set_host_rng_state(state)
        if rng:
            ckpt.set_rng_state(rng)

    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.saved_dict(), indent=2) + "\n")
    # A fresh run starts metrics.jsonl anew (a run killed before its first checkpoint may have left one).
    # Off the eval grid, an evaluation logged at the resume step (a finished run's last) is not redone: kept.
    log = MetricsLog(run_dir, cfg.tensorboard, resume_step=start_step,
                     keep_evaluation=start_step % cfg.eval_interval != 0) if rt.is_main else None
    if rt.is_main and cfg.lora_r:
        from lmstack.train.lora import parameter_counts

        trainable, total = parameter_counts(raw_model)
        log.log({"step": start_step, "trainable_params": trainable, "total_params": total})
        if cfg.progress:
            print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})")

    rows = cfg.batch_size * rt.world_size  # sequences per micro-step, all processes together
    flops_at = run_flops_per_token(cfg, decoder)
    peak = peak_flops(rt.device, precision) if flops_at is not None else None

    def evaluate() -> dict[str, float]:
        model.eval()
        totals: dict[str, torch.Tensor] = {}
        weight_sum = 0.0
        with torch.no_grad():
            for i in range(task.eval_batches(rows, cfg.eval_batches)):
                items = task.eval_items(i, rows)[rt.rank * cfg.batch_size:][:cfg.batch_size]
                # A process left without items by a short last batch scores one with weight 0, so every
                # process reduces the same metrics.
                empty = len(items) == 0
                if empty:
                    items = task.eval_items(0, rows)[:1]
                batch = task.collate("val", items)
                if empty:  # counted nowhere, not even in a reduction a loss makes itself (KTO's KL point)
                    batch["placeholder"] = True
                weight = 0.0 if empty else float(task.weight(batch, items))  # on the host, before the copy
                batch = _to_device(batch, rt.device)
                with compute_context(rt.device, precision):
                    loss, metrics = task.loss(forward, batch)
                for name, value in {"loss": loss, **metrics}.items():
                    totals[name] = totals.get(name, 0) + value.detach().float().to(rt.device) * weight
                weight_sum += weight  # on the host: a tensor made from it per batch would sync with the GPU
        totals["weight"] = torch.tensor(weight_sum, device=rt.device)
        names = sorted(totals)
        stacked = torch.stack([totals[n] for n in names])
        if rt.distributed:
            dist.all_reduce(stacked)
        model.train()
        means = dict(zip(names, (stacked / stacked[names.index("weight")]).tolist()))
        means.pop("weight")
        return means

    def log_eval(step: int) -> dict[str, float]:
        means = evaluate()
        if rt.is_main:
            record = {"step": step, "val_loss": means["loss"]}
            if cfg.task in ("pretrain", "sft"):
                record["val_ppl"] = math.exp(min(means["loss"], 50))
            record.update({f"val_{k}": v for k, v in means.items() if k != "loss"})
            log.log(record)
        return means

    def save(step: int) -> Path | None:
        stage = ckpt.staging_dir(run_dir, step)
        full = _gathered_state(model) if fsdp else None
        optim = _full_optimizer_state(model, optimizer, rt, fsdp)
        if rt.is_main:
            if stage.exists():
                shutil.rmtree(stage)
            to_save = raw_model
            if fsdp:
                with torch.device("meta"):
                    to_save = build_model(raw_model.config)
                to_save.load_state_dict(full, assign=True)
                to_save.tie_weights()
            save_weights(to_save, stage, cfg, tokenizer)
        if rt.distributed:
            dist.barrier()  # the staging directory exists before the other ranks write their RNG state
        ckpt.write_trainer_state(stage, rt.rank, {"step": step, "world_size": rt.world_size, "precision": precision,
                                             "config": cfg.to_dict()},
                                 {"optimizer": optim, "scaler": scaler.state_dict()} if rt.is_main else None)
        if rt.distributed:
            dist.barrier()
        return ckpt.publish(run_dir, step, cfg.keep_checkpoints) if rt.is_main else None

    def samples(step: int) -> None:
        if not (rt.is_main and cfg.sample_tokens and not fsdp and cfg.task in ("pretrain", "sft")):
            return
        from lmstack.generate import generate_ids

        g = torch.Generator(device=rt.device).manual_seed(cfg.seed)
        cpu_state = torch.get_rng_state()  # sampling must not move the training RNG
        for prompt in cfg.sample_prompts:
            ids = tokenizer.encode(prompt, add_special_tokens=False)
            out = generate_ids(raw_model, ids, cfg.sample_tokens, temperature=cfg.sample_temperature,
                               top_k=cfg.sample_top_k, generator=g)
            log.log({"step": step, "sample": prompt + tokenizer.decode(out)})
        torch.set_rng_state(cpu_state)
        raw_model.train()

    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (rt.is_main and cfg.progress),
               unit="step", dynamic_ncols=True)
    def device_clock() -> float:
        """The time once the device has finished what is queued (a GPU runs ahead of Python)."""
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        return time.perf_counter()

    t_last, tokens_since, flops_since = time.perf_counter(), 0, 0.0
    try:  # a Ctrl-C ends the bar's line, so that what is printed next starts a line of its own
        for step in range(start_step, cfg.max_steps):
            evaluating, saving = step % cfg.eval_interval == 0, step % cfg.checkpoint_interval == 0 and step > start_step
            if evaluating or saving:
                paused = device_clock()  # the clock stops here: tok/s and MFU count training steps only
                if evaluating:  # evaluation reads no training RNG: redoing it on resume changes nothing
                    log_eval(step)
                    samples(step)
                if saving:
                    save(step)
                t_last += time.perf_counter() - paused

            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            items = task.draw("train", step, rows * cfg.grad_accum)
            items = items.reshape(cfg.grad_accum, rt.world_size, cfg.batch_size)[:, rt.rank]
            step_loss = torch.zeros((), device=rt.device)
            step_metrics: dict[str, torch.Tensor] = {}
            batches = [task.collate("train", items[micro]) for micro in range(cfg.grad_accum)]
            # Weigh each micro-batch's mean loss by what it averages over (tokens, for SFT), all processes
            # together, so the step's loss is the mean over the global batch however it is split.
            weights = [float(task.weight(b, items[m])) for m, b in enumerate(batches)]
            total = sum(weights)
            if rt.distributed:  # host values, so a single process never waits on the device here
                total_t = torch.tensor(total, device=rt.device)
                dist.all_reduce(total_t)
                total = total_t.item()
            shares = [w * rt.world_size / max(total, 1.0) for w in weights]
            for micro, batch in enumerate(batches):
                if "input_ids" in batch:  # padding included: the device computes it too (this process's)
                    tokens = batch["input_ids"].numel()
                    tokens_since += tokens
                    if flops_at is not None:
                        flops_since += tokens * flops_at(batch["input_ids"].shape[-1])
                batch = _to_device(batch, rt.device)
                sync = micro == cfg.grad_accum - 1
                no_sync = model.no_sync() if rt.distributed and not fsdp and not sync else contextlib.nullcontext()
                if fsdp:
                    model.set_requires_gradient_sync(sync)
                with no_sync, compute_context(rt.device, precision):
                    loss, metrics = task.loss(forward, batch)
                    loss = loss * shares[micro]
                scaler.scale(loss).backward()
                step_loss += loss.detach()
                for name, value in metrics.items():
                    step_metrics[name] = step_metrics.get(name, 0) + value.detach().float().to(rt.device) * shares[micro]
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            if step % cfg.log_interval == 0 or step == cfg.max_steps - 1:
                names = sorted(step_metrics)
                values = torch.stack([step_loss, *(step_metrics[n] for n in names)])
                if rt.distributed:  # one sum: the metrics' mean (older gloo has no ReduceOp.AVG), and the tokens
                    # and FLOPs of all processes, whose padded batches may differ in length
                    counts = torch.tensor([tokens_since, flops_since], dtype=torch.float64, device=rt.device)
                    packed = torch.cat([values.double(), counts])
                    dist.all_reduce(packed)
                    values = (packed[:-2] / rt.world_size).float()
                    tokens_since, flops_since = packed[-2:].tolist()
                loss_value, *metric_values = values.tolist()  # the one host sync per logged step
                now = time.perf_counter()
                # The first step after a start also compiles and warms up: it gives no throughput figure.
                # None where batches hold no token ids (GRPO samples its own): no throughput to report
                tok_s = tokens_since / (now - t_last) if step > start_step and tokens_since else None
                mfu = flops_since / (now - t_last) / (peak * rt.world_size) if peak and tok_s is not None else None
                t_last, tokens_since, flops_since = now, 0, 0.0
                if rt.is_main:
                    record = {"step": step, "loss": loss_value, "lr": lr, **dict(zip(names, metric_values))}
                    if tok_s is not None:
                        record["tok_per_s"] = round(tok_s, 1)
                    if cfg.task == "pretrain":
                        record["tokens"] = rows * cfg.grad_accum * cfg.block_size * (step + 1)
                    if mfu is not None:
                        record["mfu"] = float(f"{mfu:.4g}")  # significant digits: a tiny model's MFU is not 0
                    log.log(record)
                    bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}" if tok_s is not None else "-",
                                    mfu=f"{mfu:.1%}" if mfu is not None else "-", lr=f"{lr:.2e}", refresh=False)
            if step == start_step:  # the warm-up step is left out of the first window
                t_last, tokens_since, flops_since = device_clock(), 0, 0.0
            bar.update(1)
    finally:
        bar.close()

    final_step = cfg.max_steps
    last = log_eval(final_step)
    summary: dict[str, Any] = {"steps": final_step, "val_loss": last["loss"],
                               **{f"val_{k}": v for k, v in last.items() if k != "loss"}}
    if cfg.task in ("pretrain", "sft"):
        summary["val_ppl"] = math.exp(min(last["loss"], 50))
    if rt.is_main:
        samples(final_step)
    final = save(final_step)
    if rt.is_main:
        log.close()
        summary["checkpoint"] = str(final)
        try:
            summary["plot"] = str(plot_losses(run_dir))
        except ImportError:  # a bare machine (a borrowed GPU) without matplotlib still finishes the run
            print("note: matplotlib is not installed: no loss.png (lmstack plot RUN_DIR draws it later)",
                  file=sys.stderr)
        records = read_metrics(run_dir)
        summary["best_val_loss"] = min((r["val_loss"] for r in records if "val_loss" in r), default=last["loss"])
        summary["best"] = best_validation(records, cfg.task)
    return summary
