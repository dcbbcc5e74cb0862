"""Training throughput: lmstack vs transformers on the same architecture, weights, batch and precision.

    python bench/train_throughput.py                                # CPU: a small Llama shape, fp32
    python bench/train_throughput.py --shape gpt2 --batch 12 --seq 1024 --precision bf16 --compile  # GPU
    python bench/train_throughput.py --shape tinyllama-1.1b --batch 4 --seq 2048 --precision bf16 --compile

A full training step each (forward, backward, AdamW update), eager and, with --compile, under torch.compile,
in one run. Prints tokens/s, MFU (GPU: against the device's dense peak) and the ratio lmstack / transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import torch

import lmstack
from lmstack.models import active_params, flops_per_token
from lmstack.train.loop import compute_context
from lmstack.train.metrics import peak_flops

SHAPES = {
    "small": dict(preset="tiny-llama", n_layer=6, n_embd=384, n_head=6, n_kv_head=2, intermediate_size=1024,
                  vocab_size=8192),
    "gpt2": dict(preset="gpt2", vocab_size=50304, dropout=0.0),
    "tinyllama-1.1b": dict(preset="tinyllama-1.1b"),
}


def time_steps(steps: dict, device: torch.device, warmup: int, repeat: int, rounds: int = 3) -> dict:
    """Seconds per step of each callable: warm up, then alternate rounds between them and keep each one's
    best round, so a noisy neighbour on a shared machine hurts neither side more than the other."""
    for name, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if time.perf_counter() - t0 > 10:  # compilation, mostly: worth knowing when planning a short GPU lease
            print(f"  ({name}: warm-up {time.perf_counter() - t0:.0f} s, compilation included)", flush=True)
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(repeat):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], (time.perf_counter() - t0) / repeat)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="also time both under torch.compile")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = dict(SHAPES[args.shape])
    cfg = lmstack.ModelConfig.from_name(shape.pop("preset"), block_size=max(args.seq, 256), **shape)
    with torch.device(device):  # built where it trains: a 1.1B model is not initialised on the host first
        ours = lmstack.DecoderLM(cfg)
    with tempfile.TemporaryDirectory() as d:
        lmstack.save_model(ours, d)
        theirs = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32)
    ours.to(device).train()
    theirs.to(device=device, dtype=torch.float32).train()  # transformers < 4.56 ignores dtype= above
    if device.type == "cuda":  # both sides: float32 products on TF32 tensor cores, as lmstack's loop runs them
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    tokens = args.batch * args.seq
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    # lmstack's training loop computes in `compute_context`: autocast, or float32 linear layers through oneDNN
    # on the CPU. transformers runs PyTorch's defaults.
    ours_context = compute_context(device, args.precision)
    flops = flops_per_token(cfg, active_params(ours), args.seq)
    peak = peak_flops(device, args.precision)

    def trainer(model, loss_of, context):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step():
            with context:
                loss = loss_of(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.shape} shape, {ours.num_params():,} parameters, batch {args.batch} x {args.seq}, "
          f"{args.precision}, {name}, torch {torch.__version__}")
    variants = [("eager", lambda m: m)]
    if args.compile:
        variants.append(("compiled", torch.compile))
    for label, wrap in variants:
        seconds = time_steps({"lmstack": trainer(wrap(ours), lambda m: m(ids, ids, return_logits=False)[1], ours_context),
                              "transformers": trainer(wrap(theirs), lambda m: m(ids, labels=ids).loss, autocast)},
                             device, args.warmup, args.repeat)
        results = {}
        for who, s in seconds.items():
            results[who] = tok_s = tokens / s
            mfu = f"{flops * tok_s / peak:6.1%}" if peak else "   n/a"
            print(f"  {label:>8} {who:>12}: {tok_s:12,.0f} tok/s  MFU {mfu}")
        print(f"  {label:>8} ratio lmstack / transformers: {results['lmstack'] / results['transformers']:.2f}")


if __name__ == "__main__":
    main()
