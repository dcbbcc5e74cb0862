"""The GPU paths: decoding with lookahead and CUDA graphs, no host sync per token, int8 weights, sampling
and a bf16 training run. They need CUDA and skip without it (CI has no GPU)."""

import copy
import warnings

import pytest
import torch

import lmstack
from lmstack import Engine
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "O"]


@pytest.fixture(scope="module")
def tiny():
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:100_000]
    tok = lmstack.Tokenizer.train([text], vocab_size=400, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=400)).eval()
    with torch.no_grad():  # sharp distributions: greedy paths without near-ties
        model.lm_head.weight.mul_(20)
    return model.cuda(), tok


def count_syncs(fn) -> int:
    """How many synchronizing CUDA operations `fn` makes (PyTorch's sync debug mode, as warnings)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def test_lookahead_and_cuda_graphs_give_the_same_tokens(tiny):
    model, tok = tiny
    params = dict(max_new_tokens=16, temperature=0, ignore_eos=True)
    lockstep = Engine(model, tok, lookahead=False).generate(PROMPTS, **params)
    ahead = Engine(model, tok).generate(PROMPTS, **params)
    graphed = Engine(model, tok, compile=True)
    graphed.generate(PROMPTS, **params)  # warm-up and CUDA graph capture
    again = graphed.generate(PROMPTS, **params)
    assert [c.token_ids for c in ahead] == [c.token_ids for c in lockstep]
    assert [c.token_ids for c in again] == [c.token_ids for c in lockstep]


def test_masked_grouped_attention_needs_no_math_kernel(tiny):
    """With a KV cache (so a mask) and grouped K/V heads, every step runs in a fused SDPA kernel: with the math
    kernel, the fallback that copies K/V per head in float32, switched off, bf16 decoding still runs, and
    gives the tokens of the default kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, tok = tiny
    assert model.config.n_kv_head < model.config.n_head
    half = copy.deepcopy(model).to(torch.bfloat16)
    params = dict(max_new_tokens=8, temperature=0, ignore_eos=True)
    expected = Engine(half, tok).generate(PROMPTS, **params)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        fused = Engine(half, tok).generate(PROMPTS, **params)
    assert [c.token_ids for c in fused] == [c.token_ids for c in expected]


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.8, top_p=0.9, seed=1)],
                         ids=["greedy", "sampled"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "graphed"])
def test_decoding_makes_no_host_sync_per_token(tiny, sampling, compile):
    """A longer generation makes no more synchronizing calls than a shorter one: each step's tokens reach
    the host through an event, never by waiting for the whole stream."""
    model, tok = tiny
    assert count_syncs(lambda: [x.item() for x in torch.ones(3, device="cuda")]) == 3  # the counter counts
    engine = Engine(model, tok, compile=compile)

    def run(n):
        return lambda: engine.generate(PROMPTS, max_new_tokens=n, ignore_eos=True, **sampling)

    run(24)(), run(8)()  # warm-up (compilation, graph capture)
    assert count_syncs(run(24)) == count_syncs(run(8))


def test_int8_linear_on_the_gpu(tiny):
    from lmstack.quantize import QuantizedLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512, bias=True).cuda()
    q = QuantizedLinear.from_linear(linear, bits=8, dtype=torch.bfloat16)  # stays on the GPU
    x = torch.randn(3, 7, 256, device="cuda", dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x.float(), q.dequantized().float(), q.bias.float())
    for fn in (q, torch.compile(q)):
        assert (fn(x).float() - expected).abs().max().item() < 0.05 * expected.abs().max().item()


def _greedy_agreement(model, prompt: list[int], tokens: list[int], tie: float = 0.0) -> torch.Tensor:
    """Per generated position, whether `tokens` is the model's argmax there given the tokens before it
    (teacher forcing: one early difference does not carry on). The runner-up counts too where the top two
    are within `tie` of the top logit, relatively: bf16 logits near 10 are 0.0625 apart (2**-8 relative), so
    two paths that round differently may swap a near-tie."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens], device="cuda"))[0, len(prompt) - 1:-1].float()
    top = logits.topk(2, dim=-1)
    chosen = torch.tensor(tokens, device="cuda")
    near_tie = top.values[:, 0] - top.values[:, 1] <= tie * top.values[:, 0].abs()
    return (top.indices[:, 0] == chosen) | (near_tie & (top.indices[:, 1] == chosen))


def test_int8_engine_on_the_gpu_follows_bf16(tiny):
    """A model quantized on the GPU picks, position by position, mostly the bf16 model's greedy tokens; and its
    engine, eager and graphed, decodes its own greedy path (up to near-ties one bf16 step apart)."""
    import copy

    from lmstack.quantize import quantize_model

    model, tok = tiny
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    params = dict(max_new_tokens=12, temperature=0, ignore_eos=True)
    expected = Engine(bf16, tok).generate(PROMPTS, **params)
    prompts = [tok.encode(p) for p in PROMPTS]
    int8 = quantize_model(copy.deepcopy(bf16), bits=8, dtype=torch.bfloat16)
    assert all(t.is_cuda for t in int8.buffers())
    agreed = torch.cat([_greedy_agreement(int8, p, c.token_ids) for p, c in zip(prompts, expected)])
    assert agreed.float().mean() >= 0.8
    for compile in (False, True):
        out = Engine(int8, tok, compile=compile).generate(PROMPTS, **params)
        assert all(len(c.token_ids) == 12 for c in out)
        assert all(_greedy_agreement(int8, p, c.token_ids, tie=0.02).all() for p, c in zip(prompts, out))


def test_exponential_race_on_the_gpu_is_seeded_and_unbiased():
    from lmstack.generate.sampling import exponential_race

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], device="cuda").repeat(50_000, 1)
    draws = [exponential_race(probs, torch.Generator(device="cuda").manual_seed(3)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    freq = torch.bincount(draws[0], minlength=4).float() / len(draws[0])
    assert torch.allclose(freq, probs[0], atol=0.01)


def test_bf16_compiled_training_follows_the_cpu_run(tmp_path):
    """A few steps of compiled bf16 training with fused AdamW on the GPU track the float32 CPU run."""
    import json

    from lmstack.data.shards import prepare_shards
    from lmstack.train.config import load_config
    from lmstack.train.loop import train
    from lmstack.train.metrics import peak_flops

    corpus = REPO / "data" / "tinyshakespeare.txt"
    data = tmp_path / "data"
    prepare_shards([corpus], lmstack.Tokenizer.train_chars([corpus.read_text()]), data, progress=False)
    losses = {}
    for device, precision, compile in (("cpu", "fp32", False), ("cuda", "bf16", True)):
        out = tmp_path / device
        cfg = load_config(None, ["--data", str(data), "--out_dir", str(out), "--device", device, "--precision",
                                 precision, "--compile", str(compile).lower(), "--max_steps", "8", "--block_size",
                                 "64", "--batch_size", "8", "--log_interval", "1", "--eval_interval", "8",
                                 "--progress", "false", "--model.n_layer", "2", "--model.dropout", "0",
                                 "--warmup_steps", "0"])  # the full rate from the start: the loss moves
        train(cfg)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[device] = [r["loss"] for r in rows if "loss" in r]
        steps = [r for r in rows if "loss" in r]
        assert "tok_per_s" not in steps[0] and all(r["tok_per_s"] > 0 for r in steps[1:])  # warm-up left out
        if device == "cuda" and peak_flops(torch.device("cuda"), "bf16"):
            assert all(0 < r["mfu"] < 1 for r in steps[1:])
    assert torch.backends.cuda.matmul.allow_tf32  # float32 products on a GPU run on TF32 tensor cores
    assert len(losses["cuda"]) == len(losses["cpu"]) == 8
    assert max(abs(a - b) for a, b in zip(losses["cuda"], losses["cpu"])) < 0.05
    assert losses["cuda"][-1] < losses["cuda"][0]


@pytest.fixture
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_loss_on_the_gpu_equals_the_plain_loss(autocast, no_tf32):
    """`linear_cross_entropy` on CUDA (in-place log-softmax, addmm_ or a bf16 product summed in float32),
    several chunks, against the plain loss: float32 (TF32 off) and under bf16 autocast."""
    from lmstack.models.loss import linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", generator=g).requires_grad_()
    weight = (0.3 * torch.randn(1000, 64, device="cuda", generator=g)).requires_grad_()
    targets = torch.randint(0, 1000, (300,), device="cuda", generator=g)
    targets[::7] = -100
    results = []
    for fn in (lambda: torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(),
                                                         targets, ignore_index=-100),
               lambda: linear_cross_entropy(hidden, weight, None, targets, chunk_rows=64)):
        hidden.grad = weight.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = fn()
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    (want, *want_grads), (got, *got_grads) = results
    tol = 2e-2 if autocast else 1e-5
    assert abs(got.item() - want.item()) < tol
    for g_, w in zip(got_grads, want_grads):
        assert g_.dtype == torch.float32 and ((g_ - w).norm() / w.norm()).item() < tol
