"""Weight-only int8 / int4 quantization: error bounds, memory, checkpoints that load back quantized, and the
perplexity change on a real model."""

import copy
import importlib

import pytest
import torch
from torch import nn

import lmstack
from lmstack import LMStackError
from lmstack.evaluate import perplexity
from lmstack.quantize import (
    NF4_CODES,
    NF4Linear,
    QuantizedLinear,
    model_bytes,
    nf4_dequantize,
    nf4_quantize,
    quantize_model,
)
from tests.conftest import REPO


@pytest.mark.parametrize("bits,group,tol", [(8, 128, 0.01), (4, 32, 0.15)])
def test_quantized_linear_error(bits, group, tol):
    torch.manual_seed(0)
    linear = nn.Linear(256, 64)
    q = QuantizedLinear.from_linear(linear, bits, group, dtype=torch.float32)
    w = linear.weight.detach()
    assert (q.dequantized() - w).abs().max() <= w.abs().max() * tol
    x = torch.randn(3, 256)
    rel = (q(x) - linear(x)).norm() / linear(x).norm()
    assert rel < tol
    assert q.qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q.qweight.numel() == w.numel() // (1 if bits == 8 else 2)


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_are_rounded_against_the_stored_scale(bits):
    """In bf16 each weight lies within half a step of what the stored codes, scale and offset stand for
    (rounding against the float32 scale, then storing it in bf16, left errors past one step)."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 512)
    q = QuantizedLinear.from_linear(linear, bits, 64, dtype=torch.bfloat16)
    scale = q.scale.float()
    if bits == 8:
        exact, step = q.qweight.float() * scale[:, None], scale[:, None]
    else:
        codes = torch.stack((q.qweight & 0xF, q.qweight >> 4), dim=-1).view(512, -1, 64).float()
        exact = (codes * scale[..., None] + q.low.float()[..., None]).view(512, 256)
        step = scale.repeat_interleave(64, dim=1)
    assert ((linear.weight - exact).abs() / step).max() <= 0.5 + 1e-3


@pytest.mark.parametrize("bits,group", [(8, 128), (4, 32)])
def test_quantized_linear_takes_inputs_that_are_not_contiguous(bits, group):
    """A transposed or sliced input, which nn.Linear takes, gives the same output as its contiguous copy."""
    torch.manual_seed(0)
    q = QuantizedLinear.from_linear(nn.Linear(64, 24), bits, group, dtype=torch.float32)
    x = torch.randn(64, 2, 5).permute(1, 2, 0)
    assert not x.is_contiguous()
    assert torch.allclose(q(x), q(x.contiguous()), atol=1e-6)


@pytest.mark.parametrize("in_features", [8, 24, 33, 40, 64])
@pytest.mark.parametrize("rows", [1, 5, 17])
def test_int8_bf16_any_input_width(in_features, rows):
    """bf16 int8 layers of any width match their dequantized weights (PyTorch's CPU int8 kernel is wrong
    or crashes below widths that are multiples of 16; those layers must not reach it), through the kernel
    (up to 16 rows) and past it."""
    torch.manual_seed(0)
    q = QuantizedLinear.from_linear(nn.Linear(in_features, 16), 8, dtype=torch.bfloat16)
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    expected = x.float() @ q.dequantized().float().t() + q.bias.float()
    assert ((q(x).float() - expected).abs().max() / expected.abs().max()).item() < 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rows", [1, 5, 64, 65])
def test_int4_cpu_kernel_matches_the_dequantized_weights(dtype, rows):
    """Up to 64 rows, a 16-bit int4 layer on the CPU multiplies through PyTorch's int4 kernel on a packed copy
    of its codes (zero = low + 8 * scale, for the kernel's (code - 8) * scale + zero); more rows dequantize.
    Both match the weights the codes stand for, and the packed copy follows the codes when they change."""
    torch.manual_seed(0)
    q = QuantizedLinear.from_linear(nn.Linear(96, 48), 4, 32, dtype=dtype)
    x = torch.randn(rows, 96, dtype=dtype)

    def expected():
        return x.float() @ q.dequantized().float().t() + q.bias.float()

    assert ((q(x).float() - expected()).abs().max() / expected().abs().max()).item() < 0.01
    assert (q._cpu_int4 is not None) == (rows <= 64)
    q.qweight.copy_(q.qweight.flip(0))  # in place: the next call repacks
    assert ((q(x).float() - expected()).abs().max() / expected().abs().max()).item() < 0.01
    other = QuantizedLinear.from_linear(nn.Linear(96, 48), 4, 32, dtype=dtype)
    with torch.inference_mode():  # no version counter there: loading new codes drops the packed copy
        q.load_state_dict(other.state_dict())
        assert ((q(x).float() - expected()).abs().max() / expected().abs().max()).item() < 0.01
    # The kernel has no backward: an input that wants a gradient (LoRA on earlier layers) takes the other form.
    xg = x.clone().requires_grad_()
    q(xg).sum().backward()
    assert torch.allclose(xg.grad.float(), q.dequantized().float().sum(0).expand(rows, -1), rtol=0.02, atol=0.05)


def test_int4_codes_are_exact_for_representable_weights():
    linear = nn.Linear(32, 2, bias=False)
    with torch.no_grad():  # 16 evenly spaced values per group: exactly the 16 levels of a 4-bit code
        linear.weight.copy_(torch.arange(16).repeat(2, 2).float() * 0.25 - 1.0)
    q = QuantizedLinear.from_linear(linear, 4, 32, dtype=torch.float32)
    assert torch.allclose(q.dequantized(), linear.weight, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layer_is_built_on_the_layers_device(bits):
    """A layer quantized on a GPU keeps its codes there (the meta device stands in for one on the CPU)."""
    q = QuantizedLinear.from_linear(nn.Linear(64, 32, device="meta"), bits, 32)
    assert {t.device.type for t in q.buffers()} == {"meta"}


def test_group_size_must_divide():
    with pytest.raises(LMStackError, match="group_size 64 does not divide the layer's 96 inputs"):
        QuantizedLinear.from_linear(nn.Linear(96, 8), 4, 64)


@pytest.mark.parametrize("bits,group,match", [
    (4, 0, "group_size=0: must be an integer >= 1"), (4, -2, "group_size=-2: must be an integer >= 1"),
    (8, 0, "group_size=0"), ("nf4", 0, "group_size=0"), ("nf4", 3, "NF4 block_size 3: must be an even number"),
    (4, 2.5, "group_size=2.5"),
])
def test_bad_group_sizes_are_named(bits, group, match):
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=64))
    with pytest.raises(LMStackError, match=match):
        quantize_model(model, bits=bits, group_size=group)


def test_a_layer_that_cannot_be_quantized_leaves_the_model_as_it_was():
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=64, intermediate_size=160))
    with pytest.raises(LMStackError, match=r"does not divide the 160 inputs of layer layers.0.mlp.down; group "
                                           r"sizes that fit every layer: \[32, 16, 8, 4, 2\]"):
        quantize_model(model, bits=4, group_size=64)  # mlp.down, after q, k, v, o, gate and up
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert not getattr(model, "quantization", None)


def test_int4_default_group_is_the_largest_that_fits():
    """128 where every layer's inputs allow it, else 64 or 32 (SmolLM2's 576-wide layers take 64)."""
    for width, expected in ((128, 128), (576, 64), (96, 32), (48, 16)):
        model = lmstack.DecoderLM(lmstack.ModelConfig.from_name(
            "tiny-llama", vocab_size=64, n_embd=width, n_head=4, n_kv_head=2, intermediate_size=2 * width))
        assert quantize_model(model, bits=4).quantization["group_size"] == expected
    # int8: one scale per output channel, no group size recorded
    assert quantize_model(lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=64)),
                          bits=8).quantization["group_size"] is None
    odd = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=64, intermediate_size=175))
    with pytest.raises(LMStackError, match="layer layers.0.mlp.down has 175 inputs, an odd number"):
        quantize_model(odd, bits=4)


def test_int4_needs_an_even_number_of_inputs():
    with pytest.raises(LMStackError, match="the layer's 9 inputs must be even"):
        QuantizedLinear.from_linear(nn.Linear(9, 4), 4, 3)
    with pytest.raises(LMStackError, match="group_size=0"):
        QuantizedLinear(32, 4, bits=4, group_size=0)


def test_memory_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", tie_embeddings=False)).eval()
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    before = model_bytes(model)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        reference = model(ids)
    q = quantize_model(copy.deepcopy(model), bits=8)
    after = model_bytes(q)
    assert before - after > 0.7 * linear_bytes  # int8 codes + bf16 scales instead of fp32 weights
    with torch.no_grad():
        out = q(ids)
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()
    lmstack.save_model(q, tmp_path)  # save_model knows a quantized model (save_quantized, as the CLI does)
    loaded = lmstack.load_model(tmp_path)
    assert isinstance(loaded.layers[0].mlp.up, QuantizedLinear)
    with torch.no_grad():
        assert torch.equal(loaded(ids), out)
    # dtype converts what is left in floating point; the quantized layers keep their codes
    half = lmstack.load_model(tmp_path, dtype="bfloat16")
    assert half.embed.weight.dtype == torch.bfloat16 and half.layers[0].attn_norm.weight.dtype == torch.bfloat16
    assert torch.equal(half.layers[0].mlp.up.qweight, loaded.layers[0].mlp.up.qweight)
    with torch.no_grad():
        assert (half(ids).float() - out).abs().max() < 0.05 * out.abs().max()


def test_real_model_perplexity_change_and_answer(smollm2):
    model, tok = smollm2
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:3000]
    base = perplexity(model, tok, text, max_length=256, stride=128).perplexity
    q8 = quantize_model(copy.deepcopy(model), bits=8)
    ppl8 = perplexity(q8, tok, text, max_length=256, stride=128).perplexity
    q4 = quantize_model(copy.deepcopy(model), bits=4, group_size=32)
    ppl4 = perplexity(q4, tok, text, max_length=256, stride=128).perplexity
    assert abs(ppl8 / base - 1) < 0.02
    assert abs(ppl4 / base - 1) < 0.05  # the file's own Q4_1 blocks are 32 wide: close to lossless
    assert model_bytes(q4) < model_bytes(q8) < model_bytes(model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    answer = lmstack.generate(q8, tok, prompt, max_new_tokens=12, temperature=0)[0].text
    assert "Paris" in answer


def test_cli_quantize(tmp_path, capsys):
    from lmstack.cli import main

    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:20000]
    tok = lmstack.Tokenizer.train([text], vocab_size=300)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=300))
    lmstack.save_model(model, tmp_path / "m", tokenizer=tok)
    (tmp_path / "t.txt").write_text(text[:2000])
    assert main(["quantize", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "q"), "--bits", "4",
                 "--group-size", "32", "--eval-data", str(tmp_path / "t.txt")]) == 0
    out = capsys.readouterr().out
    assert "int4 weights" in out and "perplexity on 2,000 characters" in out
    assert " MB in float32 -> " in out and "embeddings and norms stay float32" in out
    assert isinstance(lmstack.load_model(tmp_path / "q").layers[0].attn.q, QuantizedLinear)
    assert main(["quantize", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "nf4"), "--bits", "nf4"]) == 0
    assert "NF4 weights" in capsys.readouterr().out
    assert isinstance(lmstack.load_model(tmp_path / "nf4").layers[0].attn.q, NF4Linear)
    for group in ("0", "-2"):  # one error line naming the parameter (was a ZeroDivisionError / RuntimeError)
        assert main(["quantize", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "bad"), "--bits", "4",
                     "--group-size", group]) == 1
        err = capsys.readouterr().err
        assert err == f"error: group_size={group}: must be an integer >= 1\n"
    assert not (tmp_path / "bad").exists()


# --- NF4 (QLoRA's 4-bit NormalFloat) ---

BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The test's own unpacking: first element in the high nibble."""
    return torch.stack((packed >> 4, packed & 0xF), dim=-1).view(-1)[:n].long()


def test_nf4_code_table_is_bitsandbytes():
    assert list(NF4_CODES) == BNB_NF4
    # bitsandbytes' create_normal_map(0.9677083): 8 positive and 7 negative normal quantiles, a zero, max 1.
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    assert torch.equal(levels / levels.max(), torch.tensor(BNB_NF4))


@pytest.mark.parametrize("shape", [(64, 256), (7, 31)])  # the second: a partial last block, odd count
def test_nf4_nearest_code_and_error_bound(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    w.view(-1)[5] = 0.3  # an outlier: its block's other values get coarser steps
    packed, absmax = nf4_quantize(w)
    n = w.numel()
    n_blocks = -(-n // 64)
    assert packed.dtype == torch.uint8 and packed.shape == (-(-n // 2),)
    assert absmax.dtype == torch.float32 and absmax.shape == (n_blocks,)
    blocks = torch.nn.functional.pad(w.view(-1), (0, n_blocks * 64 - n)).view(n_blocks, 64)
    assert torch.equal(absmax, blocks.abs().amax(dim=1))
    # Brute force: the index of the nearest level (ties to the lower one, like argmin).
    table = torch.tensor(BNB_NF4)
    scaled = (blocks / absmax[:, None]).view(-1)[:n]
    nearest = (scaled[:, None] - table).abs().argmin(dim=1)
    codes = _unpack(packed, n)
    assert torch.equal(codes, nearest)
    dq = nf4_dequantize(packed, absmax, shape)
    assert dq.shape == shape and dq.dtype == torch.float32
    per_element_absmax = absmax.repeat_interleave(64)[:n].view(shape)
    assert torch.equal(dq, table[codes].view(shape) * per_element_absmax)
    half_gap = (table[1:] - table[:-1]).max() / 2  # 0.1385: between 0.723 and 1.0
    assert ((w - dq).abs() <= per_element_absmax * half_gap).all()
    assert nf4_dequantize(packed, absmax, shape, torch.bfloat16).dtype == torch.bfloat16


def test_nf4_packing_round_trip():
    # Two codes per byte, the first in the high nibble: -1 -> 0, 1 -> 15, 0 -> 7, 0.5626 -> 13.
    packed, absmax = nf4_quantize(torch.tensor([-2.0, 2.0, 0.0, 1.1252340078353882]), block_size=4)
    assert packed.tolist() == [0x0F, 0x7D] and absmax.tolist() == [2.0]
    torch.manual_seed(1)
    codes = torch.randint(0, 16, (40, 64))
    codes[:, 0] = 15  # every block holds a level of 1.0, so its absmax is exactly its scale
    scale = torch.rand(40, 1) + 0.1
    w = torch.tensor(BNB_NF4)[codes] * scale
    packed, absmax = nf4_quantize(w)
    assert torch.equal(_unpack(packed, w.numel()), codes.view(-1))
    assert torch.equal(absmax, scale.view(-1))
    assert torch.equal(nf4_dequantize(packed, absmax, w.shape), w)  # representable weights come back exactly
    with pytest.raises(LMStackError, match=r"needs 1280 packed bytes and 40 absmax values, got 1279 and 40"):
        nf4_dequantize(packed[:-1], absmax, w.shape)
    with pytest.raises(LMStackError, match="block_size 63"):
        nf4_quantize(w, block_size=63)


def test_nf4_linear_memory_and_forward():
    torch.manual_seed(0)
    linear = nn.Linear(512, 256, bias=True)
    q = NF4Linear.from_linear(linear, dtype=torch.float32)
    assert list(q.parameters()) == []  # frozen: buffers only
    weights = 256 * 512
    weight_bytes = q.qweight.numel() * q.qweight.element_size() + q.absmax.numel() * q.absmax.element_size()
    assert weight_bytes == weights // 2 + weights // 64 * 4 == 73_728
    assert weight_bytes * 8 / weights == 4.5
    assert model_bytes(q) == 73_728 + 256 * 4  # plus the float32 bias
    assert q.weight.shape == (256, 512) and q.weight.dtype == torch.float32
    assert (q.in_features, q.out_features) == (512, 256)
    x = torch.randn(3, 512)
    assert torch.equal(q(x), torch.nn.functional.linear(x, q.weight, q.bias))
    rel = (q(x) - linear(x)).norm() / linear(x).norm()
    assert rel < 0.12
    q16 = NF4Linear.from_linear(linear)  # bfloat16 compute: output in the input's dtype
    assert q16.weight.dtype == torch.bfloat16 and q16(x).dtype == torch.float32
    assert torch.equal(q16.qweight, q.qweight)


def test_nf4_model_quantize_save_load(tmp_path):
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama")).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        reference = model(ids)
    q = quantize_model(copy.deepcopy(model), "nf4")
    assert isinstance(q.layers[0].attn.q, NF4Linear) and isinstance(q.lm_head, NF4Linear)
    assert isinstance(q.embed, nn.Embedding)
    assert q.quantization["bits"] == "nf4" and q.quantization["group_size"] == 64
    assert model_bytes(q) < model_bytes(quantize_model(copy.deepcopy(model), bits=8))
    with torch.no_grad():
        out = q(ids)
    assert (out - reference).norm() < 0.15 * reference.norm()
    lmstack.quantize.save_quantized(q, tmp_path)
    loaded = lmstack.load_model(tmp_path)
    assert isinstance(loaded.layers[1].mlp.down, NF4Linear)
    with torch.no_grad():
        assert torch.equal(loaded(ids), out)
    tied = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", tie_embeddings=True))
    assert isinstance(quantize_model(tied, "nf4").lm_head, nn.Linear)  # the tied head stays float
    with pytest.raises(LMStackError, match="quantizes to 8, 4 or 'nf4'"):
        quantize_model(model, "nf3")


def _torchao_nf4():
    for name in ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor"):
        try:  # the module moved in torchao 0.15
            return importlib.import_module(name)
        except ImportError:
            continue
    pytest.skip("torchao (a test extra) is not installed")


def test_nf4_matches_torchao():
    """torchao's NF4Tensor (an independent implementation) picks the same codes in the same byte layout.

    torchao rounds the levels to 4 decimals and always double-quantizes the absmax, so only the codes can
    match bit for bit, and values between our midpoint of two levels and torchao's may go either way."""
    nf4_tensor = _torchao_nf4()
    torch.manual_seed(0)
    w = torch.randn(128, 256)  # 512 blocks of 64: whole blocks of torchao's 256 absmax scalers
    packed, absmax = nf4_quantize(w)
    theirs = nf4_tensor.to_nf4(w, block_size=64, scaler_block_size=256)
    ours_mid, their_mid = [(t[1:] + t[:-1]) / 2 for t in (torch.tensor(BNB_NF4), theirs.nf4.float())]
    lo, hi = torch.minimum(ours_mid, their_mid) - 1e-6, torch.maximum(ours_mid, their_mid) + 1e-6
    scaled = (w.view(-1, 64) / absmax[:, None]).view(-1, 1)
    ambiguous = ((scaled >= lo) & (scaled <= hi)).any(dim=1)
    assert ambiguous.sum() < 0.001 * w.numel()
    ours_codes, their_codes = _unpack(packed, w.numel()), _unpack(theirs.quantized_data, w.numel())
    assert torch.equal(ours_codes[~ambiguous], their_codes[~ambiguous])
    pair_ok = ~ambiguous.view(-1, 2).any(dim=1)
    assert torch.equal(packed[pair_ok], theirs.quantized_data[pair_ok])
    # Dequantized: the differences are torchao's rounded levels and its double-quantized absmax, no more.
    their_absmax = theirs.dequantize_scalers(theirs.quantized_scalers, theirs.quantization_factor, 256)
    per_element = (absmax - their_absmax).abs().repeat_interleave(64) + 5e-5 * absmax.repeat_interleave(64)
    diff = (nf4_dequantize(packed, absmax, w.shape) - theirs.get_original_weight()).abs().view(-1)
    assert (diff[~ambiguous] <= per_element[~ambiguous] * 1.0001 + 1e-7).all()
