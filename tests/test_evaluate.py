"""Perplexity and bits per byte against hand-computed values."""

import json
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


def test_bits_per_byte_counts_the_text_not_its_decoding(tok):
    """Bytes come from the text the scored tokens stand for: a character the vocabulary lacks counts its own
    UTF-8 bytes (not those of `<unk>`), and a first token that ends inside a character leaves the rest of it
    counted as bytes, not as a U+FFFD."""
    from lmstack.evaluate.perplexity import scored_span

    text = "Z\u00e9 " + TEXT[:40]  # neither character is in the Shakespeare vocabulary
    ids, rest, n_bytes = scored_span(tok, text)
    assert len(ids) == len(text) and rest == text[1:] and n_bytes == len(text[1:].encode())
    assert "<unk>" in tok.decode(ids)  # what a decoding would have counted
    bpe = Tokenizer.train(["plain ascii text only " * 40], vocab_size=300)  # no merges for the bytes of "€"
    text = "\u20ac\u20ac hello"
    ids, rest, n_bytes = scored_span(bpe, text)
    assert len(ids) > len(text) and n_bytes == len(text.encode()) - 1  # the first token is one byte of "€"
    model = DecoderLM(ModelConfig.from_name("tiny-llama", vocab_size=bpe.vocab_size, tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    r = perplexity(model, bpe, text, max_length=64, stride=64)
    assert r.bytes == n_bytes and r.bits_per_byte == pytest.approx((len(ids) - 1) * math.log2(bpe.vocab_size)
                                                                     / n_bytes, rel=1e-6)
    # A first token holding two of a character's three bytes ("—" starts E2 80, merged here) takes off two.
    merged = Tokenizer.train(["\u2013 \u2014 \u2018 \u2019 \u201c \u201d words " * 200], vocab_size=300)
    text = "\u2014hello there"
    first = merged.backend.encode(text, add_special_tokens=False).ids[0]
    assert len(merged.id_to_token(first)) == 2  # the premise: two bytes in the first token
    assert scored_span(merged, text)[2] == len(text.encode()) - 2


@pytest.mark.parametrize("prepend", ["normalizer", "metaspace"])
def test_bits_per_byte_leaves_out_a_sentencepiece_prefix(prepend):
    """Llama 2 / Mistral-style: the "▁" put in front of the text stands for none of it, so where it is a token
    of its own, the scored tokens stand for the whole text."""
    from lmstack.evaluate.perplexity import scored_span
    from tests.test_train import CORPUS, _sentencepiece_style

    sp = _sentencepiece_style(CORPUS.read_text()[:60_000], prepend)
    for text in ("The king", "12 apples", *(["  two kings"] if prepend == "normalizer" else [])):
        encoding = sp.backend.encode(text, add_special_tokens=False)
        assert encoding.tokens[0] == "\u2581" and encoding.offsets[1][0] == 0  # the premise: a bare prefix
        assert scored_span(sp, text)[1:] == (text, len(text.encode()))


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
    for w, s in [(32, 8), (32, 32), (16, 5)]:
        # Token t is scored once, by the first window whose inputs ids[begin:begin + w] reach t - 1.
        logps = {}
        with torch.no_grad():
            for t in range(1, len(ids)):
                begin = min(b for b in range(0, len(ids), s) if b <= t - 1 < b + w)
                logp = model(torch.tensor([ids[begin:min(begin + w, len(ids) - 1)]]))[0].log_softmax(-1)
                logps[t] = logp[t - 1 - begin, ids[t]].item()
        r = perplexity(model, tok, text, max_length=w, stride=s)
        assert r.tokens == len(ids) - 1 and r.bytes == len(text[1:].encode())  # none skipped, stride == w too
        assert r.nll_per_token == pytest.approx(-sum(logps.values()) / (len(ids) - 1), rel=1e-5)


def test_a_tokenizer_that_adds_bos_scores_every_token_after_it(tmp_path):
    """Llama 2-style tokenizers put bos before a text: as the Hugging Face guide's `tokenizer(text)`, bos opens
    the first window and every token of the text is scored (its bytes all counted), equal to transformers'
    loss on the same ids."""
    from transformers import AutoModelForCausalLM

    bpe = Tokenizer.train([TEXT], 300, special_tokens=["<s>", "</s>"], bos_token="<s>", eos_token="</s>",
                          add_bos=True)
    assert bpe.adds_bos
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name("tiny-llama", vocab_size=bpe.vocab_size)).eval()
    lmstack.save_model(model, tmp_path / "m", tokenizer=bpe)
    text = TEXT[:200]
    ids = bpe.encode(text)
    assert ids[0] == bpe.bos_token_id and len(ids) < 128
    r = perplexity(model, bpe, text, max_length=128, stride=128)
    assert r.tokens == len(ids) - 1 and r.bytes == len(text.encode())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        assert r.nll_per_token == pytest.approx(hf(x, labels=x).loss.item(), rel=1e-5)


def test_bad_arguments(tok):
    model = DecoderLM(ModelConfig.from_name("tiny-llama", vocab_size=tok.vocab_size))
    with pytest.raises(LMStackError, match="stride"):
        perplexity(model, tok, TEXT, max_length=16, stride=32)
    with pytest.raises(LMStackError, match="fewer than two tokens"):
        perplexity(model, tok, "a")
    with pytest.raises(LMStackError, match="stride must be between 1"):
        perplexity(model, tok, TEXT, max_length=16, stride=0)  # not the default in disguise
    with pytest.raises(LMStackError, match="max_length must be at least 1"):
        perplexity(model, tok, TEXT, max_length=0)


def test_cli_perplexity(tok, tmp_path, capsys):
    import json

    model = DecoderLM(ModelConfig.from_name("tiny-llama", vocab_size=tok.vocab_size))
    lmstack.save_model(model, tmp_path / "m", tokenizer=tok)
    (tmp_path / "t.txt").write_text(TEXT[:300])
    assert main(["eval", "perplexity", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"),
                 "--max-length", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 299 and out["perplexity"] > 1


# ---------------------------------------------------------------------------------------------- ROUGE, BLEU

REF = "Large language models are very important for text processing."
GEN = "Large language models are useful in processing text."


def test_rouge_textbook_values():
    from lmstack.evaluate import rouge

    r = rouge([GEN], [REF])
    assert r["rouge1"]["recall"] == pytest.approx(6 / 9)
    assert r["rouge1"]["precision"] == pytest.approx(6 / 8)
    assert r["rougeL"]["recall"] == pytest.approx(5 / 9)  # LCS: large language models are ... text/processing
    assert r["rougeL"]["precision"] == pytest.approx(5 / 8)
    # Lin (2004) with beta = 8 weights recall: F = (1 + b^2) P R / (R + b^2 P) ~ 0.56
    p, rec, b2 = 5 / 8, 5 / 9, 64
    assert (1 + b2) * p * rec / (rec + b2 * p) == pytest.approx(0.56, abs=0.005)
    assert r["rouge2"]["recall"] == pytest.approx(3 / 8)  # large language, language models, models are


def test_rouge_lsum_splits_sentences_and_averages():
    from lmstack.evaluate import rouge

    preds = ["the cat sat\nthe dog ran", "a b c"]
    refs = ["the dog ran\nthe cat sat", "a b d"]
    r = rouge(preds, refs, rouge_types=["rougeL", "rougeLsum"])
    assert r["rougeLsum"]["f1"] > r["rougeL"]["f1"]  # sentence order does not hurt Lsum
    assert r["rougeL"]["f1"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_rouge_of_text_in_other_scripts(capsys, tmp_path):
    """rouge-score's default tokenizer keeps ASCII letters and digits only: Russian scores 0, with a warning;
    "whitespace" reads its words, "char" the characters of Chinese."""
    from lmstack.evaluate import rouge

    pred, ref = "кошка сидит на ковре", "кошка лежит на ковре"
    with pytest.warns(UserWarning, match="2 texts hold letters but no ASCII letter"):
        assert rouge([pred], [ref], ["rouge1"])["rouge1"]["f1"] == 0.0
    assert rouge([pred], [ref], ["rouge1"], tokenizer="whitespace")["rouge1"]["f1"] == pytest.approx(3 / 4)
    r = rouge(["猫坐在垫子上"], ["猫躺在垫子上"], ["rouge1", "rouge2"], tokenizer="char")
    assert r["rouge1"]["f1"] == pytest.approx(5 / 6) and r["rouge2"]["f1"] == pytest.approx(3 / 5)
    with pytest.raises(LMStackError, match="unknown ROUGE tokenizer 'words'"):
        rouge([pred], [ref], tokenizer="words")
    with pytest.raises(LMStackError, match="the Porter stemmer is the default tokenizer's"):
        rouge([pred], [ref], use_stemmer=True, tokenizer="char")
    (tmp_path / "p.txt").write_text(pred + "\n")
    (tmp_path / "r.txt").write_text(ref + "\n")
    assert main(["eval", "rouge", "--predictions", str(tmp_path / "p.txt"), "--references",
                 str(tmp_path / "r.txt")]) == 0
    out = capsys.readouterr()
    assert "--tokenizer whitespace or char" in out.err and json.loads(out.out)["rouge1"]["f1"] == 0.0
    assert main(["eval", "rouge", "--predictions", str(tmp_path / "p.txt"), "--references",
                 str(tmp_path / "r.txt"), "--tokenizer", "whitespace"]) == 0
    out = capsys.readouterr()
    assert not out.err and json.loads(out.out)["rouge1"]["f1"] == pytest.approx(3 / 4)


def test_bleu_values():
    import sacrebleu

    from lmstack.evaluate import bleu

    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] == pytest.approx(100.0)
    hyp = ["the cat is on the mat", "there is a dog in the garden today"]
    refs = ["the cat sat on the mat", "a dog is in the garden today"]
    ours = bleu(hyp, refs)
    assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyp, [refs]).score)
    # by hand: 1- to 4-gram precisions and brevity penalty (lengths 6+8 vs 6+7: no penalty)
    p1, p2, p3, p4 = 12 / 14, 7 / 12, 3 / 10, 1 / 8
    assert ours["bleu"] == pytest.approx(100 * math.exp((math.log(p1) + math.log(p2) + math.log(p3)
                                                          + math.log(p4)) / 4), rel=1e-6)
    with pytest.raises(LMStackError, match="1 predictions but 0 references"):
        bleu(["a b c"], [])
    with pytest.raises(LMStackError, match="no predictions to score"):
        bleu([], [])


def test_metric_inputs_must_pair(tmp_path, capsys):
    from lmstack.evaluate import rouge

    with pytest.raises(LMStackError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
    (tmp_path / "p.txt").write_text(GEN + "\n")
    (tmp_path / "r.txt").write_text(REF + "\n")
    assert main(["eval", "rouge", "--predictions", str(tmp_path / "p.txt"), "--references",
                 str(tmp_path / "r.txt")]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["rouge1"]["recall"] == pytest.approx(6 / 9)
    (tmp_path / "bad.jsonl").write_text('"ok"\n{"not": "a string"}\n')
    assert main(["eval", "bleu", "--predictions", str(tmp_path / "bad.jsonl"), "--references",
                 str(tmp_path / "r.txt")]) == 1
    assert "bad.jsonl:2: expected a JSON string" in capsys.readouterr().err


def test_metric_files_split_at_newlines_only(tmp_path):
    """A form feed, U+2028 or a lone carriage return inside an example does not split it in two: the
    predictions stay paired with their references."""
    from lmstack.evaluate.text_metrics import read_lines

    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffone\x0cstill one\r\ntwo\u2028still two\nthree\rstill three\n".encode())
    assert read_lines(path) == ["one\x0cstill one", "two\u2028still two", "three\rstill three"]
    path.write_text("no final newline\n\nafter a blank")
    assert read_lines(path) == ["no final newline", "", "after a blank"]
