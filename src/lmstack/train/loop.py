"""The training loop: one process, or many under `torchrun` with DDP or FSDP2.

A step is one optimizer update over `grad_accum` micro-batches per process. Which sequences a step sees is a
pure function of (seed, step): every offset of the global batch is drawn from a generator seeded with both,
then laid out [micro-step, rank, row]. So a resumed run sees exactly the batches the uninterrupted run would
have seen, and N processes with batch b see what one process with batch N*b sees.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lmstack.checkpoints import load_model, save_model
from lmstack.data.shards import TokenShards
from lmstack.errors import LMStackError
from lmstack.models import active_params, build_model, flops_per_token
from lmstack.train import checkpoint as ckpt
from lmstack.train.config import TrainConfig, config_differences
from lmstack.train.metrics import MetricsLog, peak_flops, plot_losses, read_metrics

EVAL_STREAM = 2**31 - 1  # the generator stream of validation batches, apart from every training step's


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
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank, world, local, device)


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision == "fp16" and device.type == "cpu":
        raise LMStackError("precision fp16 needs a GPU (use bf16 or fp32 on the CPU)")
    if cfg.precision != "auto":
        return cfg.precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
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


def batch_offsets(seed: int, stream: int, count: int, data_len: int, block_size: int) -> np.ndarray:
    """`count` window starts for stream `stream` (a step, or the validation stream), reproducibly."""
    if data_len <= block_size:
        raise LMStackError(f"the data has {data_len} tokens, fewer than block_size + 1 = {block_size + 1}")
    rng = np.random.default_rng([seed, stream])
    return rng.integers(0, data_len - block_size, size=count)


def make_batch(data: np.ndarray, offsets: np.ndarray, block_size: int, device: torch.device):
    rows = np.stack([data[o:o + block_size + 1] for o in offsets]).astype(np.int64)
    batch = torch.from_numpy(rows)
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linear and embedding weights); leave biases and norm gains alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _full_state(model: torch.nn.Module, rt: Runtime, fsdp: bool) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on the CPU of rank 0 (gathered from the shards under FSDP)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict() if rt.is_main else None


def _full_optimizer_state(model, optimizer, rt: Runtime, fsdp: bool) -> Any:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict() if rt.is_main else None


def pretrain(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or continue training) the run in `cfg.out_dir`; returns a summary of the run."""
    rt = setup_runtime(cfg)
    try:
        return _pretrain(cfg, resume, rt)
    except torch.cuda.OutOfMemoryError:
        raise LMStackError(
            f"out of GPU memory at batch_size={cfg.batch_size}, block_size={cfg.block_size}: lower batch_size "
            "(and raise grad_accum to keep the global batch), or set activation_checkpointing: true") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _pretrain(cfg: TrainConfig, resume: bool, rt: Runtime) -> dict[str, Any]:
    run_dir = Path(cfg.out_dir)
    fsdp = rt.distributed and cfg.distributed == "fsdp"
    start_step, state, resume_from = 0, {}, None
    if resume:
        resume_from = ckpt.latest_checkpoint(run_dir)
        saved_config = json.loads((run_dir / "config.json").read_text())
        diffs = config_differences(saved_config, cfg)
        if diffs:
            raise LMStackError(f"{run_dir}: cannot resume with a different config: " + "; ".join(diffs))
    elif rt.is_main and (run_dir / "checkpoints").exists() and ckpt.list_checkpoints(run_dir):
        raise LMStackError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose "
                           "another out_dir")
    if not cfg.data:
        raise LMStackError("no data: set `data:` to a shard directory from `lmstack data prepare`")
    shards = TokenShards(cfg.data)
    tokenizer = shards.tokenizer()
    train_data, val_data = shards["train"], shards["val"]
    precision = resolve_precision(cfg, rt.device)

    # Seed before building the model so initial weights are reproducible.
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    if cfg.init_from == "checkpoint":
        model = load_model(cfg.model, dtype=torch.float32)
    else:
        model = build_model(cfg.model_config(vocab_size=shards.meta["vocab_size"]))
    if model.config.vocab_size < shards.meta["vocab_size"]:
        raise LMStackError(f"model vocab_size {model.config.vocab_size} is smaller than the data's "
                           f"{shards.meta['vocab_size']}")
    if resume_from is not None:
        model.load_state_dict(load_model(resume_from, dtype=torch.float32).state_dict())
        state, optim_state, rng = ckpt.read_trainer_state(resume_from, rt.rank)
        start_step = state["step"]
    model.to(rt.device).train()
    model.activation_checkpointing = cfg.activation_checkpointing
    raw_model = model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
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
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    log = MetricsLog(run_dir, cfg.tensorboard, resume_step=start_step if resume else None) if rt.is_main else None

    rows = cfg.batch_size * rt.world_size  # sequences per micro-step, all processes together
    tokens_per_step = rows * cfg.grad_accum * cfg.block_size
    flops = flops_per_token(raw_model.config, active_params(raw_model), cfg.block_size)
    peak = peak_flops(rt.device, precision)

    def evaluate() -> float:
        model.eval()
        total = torch.zeros(2, device=rt.device)
        with torch.no_grad():
            for i in range(cfg.eval_batches):
                offsets = batch_offsets(cfg.seed, EVAL_STREAM + i, rows, len(val_data), cfg.block_size)
                x, y = make_batch(val_data, offsets[rt.rank * cfg.batch_size:][:cfg.batch_size], cfg.block_size,
                                  rt.device)
                with _autocast(rt.device, precision):
                    _, loss = forward(x, y)
                total += torch.stack([loss.float().detach(), torch.ones((), device=rt.device)])
        if rt.distributed:
            dist.all_reduce(total)
        model.train()
        return (total[0] / total[1]).item()

    def save(step: int) -> Path | None:
        stage = ckpt.staging_dir(run_dir, step)
        full = _full_state(model, rt, fsdp)
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
            save_model(to_save, stage, tokenizer=tokenizer)
        if rt.distributed:
            dist.barrier()  # the staging directory exists before the other ranks write their RNG state
        ckpt.write_trainer_state(stage, rt.rank, {"step": step, "config": cfg.to_dict()},
                                 {"optimizer": optim, "scaler": scaler.state_dict()} if rt.is_main else None)
        if rt.distributed:
            dist.barrier()
        return ckpt.publish(run_dir, step, cfg.keep_checkpoints) if rt.is_main else None

    def samples(step: int) -> None:
        if not (rt.is_main and cfg.sample_tokens and not fsdp):
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

    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (rt.is_main and cfg.progress),
               unit="step", dynamic_ncols=True)
    t_last = time.perf_counter()
    for step in range(start_step, cfg.max_steps):
        if step % cfg.eval_interval == 0:  # evaluation reads no RNG, so redoing it on resume changes nothing
            last_val = evaluate()
            if rt.is_main:
                log.log({"step": step, "val_loss": last_val, "val_ppl": math.exp(min(last_val, 50))})
            samples(step)
        if step % cfg.checkpoint_interval == 0 and step > start_step:
            save(step)

        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        offsets = batch_offsets(cfg.seed, step, rows * cfg.grad_accum, len(train_data), cfg.block_size)
        offsets = offsets.reshape(cfg.grad_accum, rt.world_size, cfg.batch_size)[:, rt.rank]
        step_loss = torch.zeros((), device=rt.device)
        for micro in range(cfg.grad_accum):
            x, y = make_batch(train_data, offsets[micro], cfg.block_size, rt.device)
            sync = micro == cfg.grad_accum - 1
            no_sync = model.no_sync() if rt.distributed and not fsdp and not sync else contextlib.nullcontext()
            if fsdp:
                model.set_requires_gradient_sync(sync)
            with no_sync, _autocast(rt.device, precision):
                _, loss = forward(x, y)
                loss = loss / cfg.grad_accum
            scaler.scale(loss).backward()
            step_loss += loss.detach()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        if step % cfg.log_interval == 0 or step == cfg.max_steps - 1:
            if rt.distributed:
                dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
            loss_value = step_loss.item()  # the one host sync per logged step
            now = time.perf_counter()
            steps_done = cfg.log_interval if step - start_step >= cfg.log_interval else step - start_step + 1
            tok_s = tokens_per_step * steps_done / (now - t_last)
            t_last = now
            mfu = flops * tok_s / (peak * rt.world_size) if peak else None
            if rt.is_main:
                record = {"step": step, "loss": loss_value, "lr": lr, "tokens": tokens_per_step * (step + 1),
                          "tok_per_s": round(tok_s, 1)}
                if mfu is not None:
                    record["mfu"] = round(mfu, 4)
                log.log(record)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}",
                                mfu=f"{mfu:.1%}" if mfu is not None else "-", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
    bar.close()

    final_step = cfg.max_steps
    last_val = evaluate()
    summary: dict[str, Any] = {"steps": final_step, "val_loss": last_val, "val_ppl": math.exp(min(last_val, 50))}
    if rt.is_main:
        log.log({"step": final_step, "val_loss": last_val, "val_ppl": summary["val_ppl"]})
        samples(final_step)
    final = save(final_step)
    if rt.is_main:
        log.close()
        summary["checkpoint"] = str(final)
        summary["plot"] = str(plot_losses(run_dir))
        summary["best_val_loss"] = min((r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r),
                                       default=last_val)
    return summary
