"""Perplexity and bits per byte against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

import lmstack
from lmstack import DecoderLM, LMStackError, ModelConfig, Tokenizer
from lmstack.cli import main
from lmstack.evaluate import perplexity
from tests.conftest import REPO

TEXT = (REPO / "data" / "tinyshakespeare.txt").read_text()[:4000]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_chars([TEXT])


def test_uniform_model_has_perplexity_vocab_size(tok):
    model = DecoderLM(ModelConfig.from_name("tiny-llama", vocab_size=tok.vocab_size, tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every token equally likely
    r = perplexity(model, tok, TEXT[:500], max_length=64, stride=16)
    assert r.perplexity == pytest.approx(tok.vocab_size, rel=1e-5)
    assert r.tokens == 499 and r.bytes == len(TEXT[1:500].encode())
    assert r.bits_per_byte == pytest.approx(499 * math.log2(tok.vocab_size) / r.bytes, rel=1e-5)


def test_single_window_equals_full_forward(tok):
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name("tiny-llama", vocab_size=tok.vocab_size)).eval()
    ids = torch.tensor([tok.encode(TEXT[:100])])
    with torch.no_grad():
        nll = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:]).item()
    r = perplexity(model, tok, TEXT[:100], max_length=128, stride=128)
    assert r.perplexity == pytest.approx(math.exp(nll), rel=1e-5)


def test_sliding_window_scores_every_token_once(tok):
    """Against an explicit loop that scores each token once, in the first window that reaches it."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name("tiny-llama", vocab_size=tok.vocab_size)).eval()
    text = TEXT[:200]
    ids = tok.encode(text)
    w, s = 32, 8
    total, prev_end = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), s):
            end = min(begin + w, len(ids))
            logp = model(torch.tensor([ids[begin:end - 1]]))[0].log_softmax(-1)
            for t in range(max(prev_end, begin + 1), end):
                total -= logp[t - begin - 1, ids[t]].item()
            prev_end = end
            if end == len(ids):
                break
    r = perplexity(model, tok, text, max_length=w, stride=s)
    assert r.tokens == len(ids) - 1
    assert r.nll_per_token == pytest.approx(total / (len(ids) - 1), rel=1e-5)


def test_bad_arguments(tok):
    model = DecoderLM(ModelConfig.from_name("tiny-llama", vocab_size=tok.vocab_size))
    with pytest.raises(LMStackError, match="stride"):
        perplexity(model, tok, TEXT, max_length=16, stride=32)
    with pytest.raises(LMStackError, match="fewer than two tokens"):
        perplexity(model, tok, "a")


def test_cli_perplexity(tok, tmp_path, capsys):
    import json

    model = DecoderLM(ModelConfig.from_name("tiny-llama", vocab_size=tok.vocab_size))
    lmstack.save_model(model, tmp_path / "m", tokenizer=tok)
    (tmp_path / "t.txt").write_text(TEXT[:300])
    assert main(["eval", "perplexity", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"),
                 "--max-length", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 299 and out["perplexity"] > 1
