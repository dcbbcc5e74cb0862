"""Weight-only int8 / int4 quantization: error bounds, memory, checkpoints that load back quantized, and the
perplexity change on a real model."""

import copy

import pytest
import torch
from torch import nn

import lmstack
from lmstack import LMStackError
from lmstack.evaluate import perplexity
from lmstack.quantize import QuantizedLinear, model_bytes, quantize_model
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


def test_int4_codes_are_exact_for_representable_weights():
    linear = nn.Linear(32, 2, bias=False)
    with torch.no_grad():  # 16 evenly spaced values per group: exactly the 16 levels of a 4-bit code
        linear.weight.copy_(torch.arange(16).repeat(2, 2).float() * 0.25 - 1.0)
    q = QuantizedLinear.from_linear(linear, 4, 32, dtype=torch.float32)
    assert torch.allclose(q.dequantized(), linear.weight, atol=1e-6)


def test_group_size_must_divide():
    with pytest.raises(LMStackError, match="group_size 64 does not divide the layer's 96 inputs"):
        QuantizedLinear.from_linear(nn.Linear(96, 8), 4, 64)


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
    lmstack.quantize.save_quantized(q, tmp_path)
    loaded = lmstack.load_model(tmp_path)
    assert isinstance(loaded.layers[0].mlp.up, QuantizedLinear)
    with torch.no_grad():
        assert torch.equal(loaded(ids), out)


@pytest.fixture(scope="module")
def smollm(smollm2_gguf):
    return lmstack.load_model(smollm2_gguf), lmstack.load_tokenizer(smollm2_gguf)


def test_real_model_perplexity_change_and_answer(smollm):
    model, tok = smollm
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
    assert isinstance(lmstack.load_model(tmp_path / "q").layers[0].attn.q, QuantizedLinear)
