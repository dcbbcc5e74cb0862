"""n-gram LMs: agreement with NLTK's Kneser-Ney, normalisation, hand examples, ARPA round trips, bad input."""

import math

import numpy as np
import pytest

import lmstack
from lmstack import LMStackError
from lmstack.data.shards import TokenShards
from lmstack.models.ngram import NGramLM
from tests.conftest import REPO

TEXT = (REPO / "data" / "tinyshakespeare.txt").read_text()


def test_fixed_discount_kneser_ney_matches_nltk():
    from nltk.lm import KneserNeyInterpolated
    from nltk.lm.preprocessing import pad_both_ends, padded_everygram_pipeline
    from nltk.util import ngrams

    lines = [line.lower().split() for line in TEXT.split("\n") if line.strip()]
    train, test = lines[:1500], lines[1500:1700]
    n = 3
    grams, vocab = padded_everygram_pipeline(n, train)
    reference = KneserNeyInterpolated(n, discount=0.1)
    reference.fit(grams, vocab)
    ids = {w: i for i, w in enumerate(sorted(reference.vocab))}
    ours = NGramLM(n, len(ids), smoothing="kneser_ney", discount=0.1)
    ours.fit([[ids[w] for w in pad_both_ends(s, n)] for s in train])
    # held-out trigrams of known words (NLTK gives unseen words probability 0)
    held = [g for s in test for g in ngrams(pad_both_ends(s, n), n) if all(w in ids for w in g)][:600]
    assert len(held) > 300
    nll = -sum(ours.logprob(ids[g[-1]], [ids[w] for w in g[:-1]]) for g in held) / len(held)
    assert math.exp(nll) == pytest.approx(reference.perplexity(held), rel=0.01)


@pytest.fixture(scope="module")
def char_model():
    chars = sorted(set(TEXT))
    stoi = {c: i for i, c in enumerate(chars)}
    data = np.array([stoi[c] for c in TEXT[:200_000]])
    return NGramLM(4, len(chars)).fit([data]), stoi


def test_modified_kneser_ney_is_a_distribution(char_model):
    model, stoi = char_model
    for context in ("the", "qzx", "", "ROM"):
        ids = [stoi[c] for c in context]
        total = sum(math.exp(model.logprob(w, ids)) for w in range(model.vocab_size))
        assert total == pytest.approx(1.0, abs=1e-6)


def test_higher_orders_fit_better(char_model):
    _, stoi = char_model
    data = np.array([stoi[c] for c in TEXT[:200_000]])
    held = [[stoi[c] for c in TEXT[-20_000:]]]
    ppl = [NGramLM(n, len(stoi)).fit([data]).perplexity(held) for n in (1, 2, 3)]
    assert ppl[0] > ppl[1] > ppl[2]


def test_stupid_backoff_textbook_example():
    words = ["language", "models", "are", "powerful", ".", "language", "models", "are", "useful", "."]
    vocab = {w: i for i, w in enumerate(sorted(set(words) | {"english"}))}
    model = NGramLM(3, len(vocab), smoothing="stupid_backoff").fit([[vocab[w] for w in words]])
    best = max(vocab, key=lambda w: model.logprob(vocab[w], [vocab["language"], vocab["models"]]))
    assert best == "are"
    backed_off = max(vocab, key=lambda w: model.logprob(vocab[w], [vocab["english"], vocab["language"]]))
    assert backed_off == "models"
    # seen trigram: c(language models are) / c(language models) = 2 / 2
    assert model.logprob(vocab["are"], [vocab["language"], vocab["models"]]) == pytest.approx(0.0)
    # backed off once: 0.4 * c(language models) / c(language)
    assert model.logprob(vocab["models"], [vocab["english"], vocab["language"]]) == pytest.approx(math.log(0.4))


def test_add_k_hand_values():
    model = NGramLM(2, 4, smoothing="add_k", k=1.0).fit([[0, 1, 0, 1, 2]])
    # c(0 1) = 2, c(0) = 2 as a context; (2 + 1) / (2 + 4)
    assert model.logprob(1, [0]) == pytest.approx(math.log(3 / 6))
    assert model.logprob(3, [0]) == pytest.approx(math.log(1 / 6))
    assert model.logprob(3) == pytest.approx(math.log(1 / (5 + 4)))
    # the history 2 ends the sequence and is never followed: c(2, .) = 0, so P(. | 2) is uniform, and every
    # distribution sums to 1 (dividing by c(2) = 1 would not)
    for context in ([0], [1], [2], []):
        assert sum(math.exp(model.logprob(w, context)) for w in range(4)) == pytest.approx(1.0)
    assert model.logprob(0, [2]) == pytest.approx(math.log(1 / 4))


def test_arpa_round_trip(char_model, tmp_path):
    model, stoi = char_model
    words = [repr(c)[1:-1] if c.strip() else f"<{ord(c)}>" for c in sorted(stoi)]
    model.to_arpa(tmp_path / "m.arpa", words)
    assert "-100.0000000\t<unk>" in (tmp_path / "m.arpa").read_text()  # listed, with no mass: no id is <unk>
    again = NGramLM.from_arpa(tmp_path / "m.arpa", {w: i for i, w in enumerate(words)})
    for context in ("the", "qzx", "", "ROM"):
        ids = [stoi[c] for c in context]
        for w in range(0, model.vocab_size, 7):
            assert again.logprob(w, ids) == pytest.approx(model.logprob(w, ids), abs=1e-5)


def test_arpa_lists_every_history_and_stays_normalised(tmp_path):
    """`<s> <s>` is a history at the top order but, under continuation counts, never a bigram of its own: the
    ARPA file still needs it (with its backoff weight), or the model read back no longer sums to 1."""
    from lmstack.models.ngram import word_sequences

    train, vocab = word_sequences(["the cat sat\nthe dog sat down\na cat ran"], order=3)
    model = NGramLM(3, len(vocab)).fit(train)
    model.to_arpa(tmp_path / "m.arpa", sorted(vocab, key=vocab.get))
    again = NGramLM.from_arpa(tmp_path / "m.arpa", vocab)
    # Every word is a unigram, <unk> included, and the unigrams sum to 1, as KenLM and SRILM expect.
    text = (tmp_path / "m.arpa").read_text()
    unigrams = text.split("\\1-grams:\n")[1].split("\n\n")[0].splitlines()
    assert f"ngram 1={len(vocab)}" in text and len(unigrams) == len(vocab)
    assert any(line.endswith("\t<unk>") or "\t<unk>\t" in line for line in unigrams)
    assert sum(10 ** float(line.split("\t")[0]) for line in unigrams) == pytest.approx(1.0, abs=1e-6)
    grams = [set(table) for table in again.logp]
    assert all(g[:-1] in grams[k - 1] for k in (1, 2) for g in grams[k])  # every history listed
    bos = vocab["<s>"]
    for context in ([bos, bos], [bos, vocab["the"]], [vocab["cat"]], []):
        total = sum(math.exp(again.logprob(w, context)) for w in range(len(vocab)))
        assert total == pytest.approx(1.0, abs=1e-6)
        for w in range(len(vocab)):
            assert again.logprob(w, context) == pytest.approx(model.logprob(w, context), abs=1e-5)
    # ARPA's <s> and <unk> come back as bos_id and unk_id: perplexity scores the same tokens
    assert (again.bos_id, again.unk_id) == (vocab["<s>"], vocab["<unk>"])
    model.bos_id = vocab["<s>"]
    assert again.perplexity(train) == pytest.approx(model.perplexity(train), rel=1e-4)


def test_perplexity_does_not_score_the_sentence_start():
    """With `bos_id`, the `<s>` padding is context: the words and `</s>` are scored, as KenLM does."""
    from lmstack.models.ngram import word_sequences

    train, vocab = word_sequences(["the cat sat\nthe dog sat"], order=3)
    held, _ = word_sequences(["the cat sat down"], vocab=vocab, order=3)
    model = NGramLM(3, len(vocab), unk_id=vocab["<unk>"], bos_id=vocab["<s>"]).fit(train)
    seq = held[0]
    assert seq[:2] == [vocab["<s>"]] * 2
    nll = -sum(model.logprob(seq[i], seq[i - 2:i]) for i in range(2, len(seq)))  # 4 words + </s>
    assert model.perplexity(held) == pytest.approx(math.exp(nll / (len(seq) - 2)))
    assert NGramLM(3, len(vocab), unk_id=vocab["<unk>"]).fit(train).perplexity(held) > model.perplexity(held)


def test_bad_input(tmp_path):
    with pytest.raises(LMStackError, match="order=0"):
        NGramLM(0, 10)
    with pytest.raises(LMStackError, match="empty training text"):
        NGramLM(2, 10).fit([[]])
    with pytest.raises(LMStackError, match="outside the vocabulary"):
        NGramLM(2, 10).fit([[1, 2, 50]])
    unk = NGramLM(2, 10, unk_id=0).fit([[1, 2, 50, 3]])
    assert math.isfinite(unk.logprob(99, [1]))  # unknown ids score as <unk>
    bad = tmp_path / "bad.arpa"
    bad.write_text("\\data\\\nngram 1=2\n\n\\1-grams:\n-1.0\ta\n-x.5\tb\n\\end\\\n")
    with pytest.raises(LMStackError, match=r"bad.arpa:6: not valid ARPA"):
        NGramLM.from_arpa(bad, {"a": 0, "b": 1})
    bad.write_text("\\data\\\nngram 1=2\n\n\\1-grams:\n-1.0\ta\n-0.5\tb\n\\end\\\n")
    with pytest.raises(LMStackError, match=r"bad.arpa:5: not valid ARPA .*a file of words needs `vocab`"):
        NGramLM.from_arpa(bad)
    with pytest.raises(LMStackError, match=r"bad.arpa:6: the word 'b' is not in `vocab`"):
        NGramLM.from_arpa(bad, {"a": 0})
    with pytest.raises(LMStackError, match="no such ARPA file"):
        NGramLM.from_arpa(tmp_path / "missing.arpa")


def test_compare_runs_every_rung(tmp_path):
    from lmstack.evaluate.compare import compare

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT[:150_000])
    rows = compare(corpus, tmp_path / "out", vocab_size=512, orders=(1, 2, 3), steps=8, block_size=64,
                   batch_size=4, max_val_chars=4000)
    names = [r["model"] for r in rows]
    assert names[:3] == [f"{n}-gram (modified Kneser-Ney)" for n in (1, 2, 3)]
    assert names[3:] == ["Elman RNN", "LSTM", "Transformer (Llama-style)"]
    assert all(0 < r["bits_per_byte"] < 8 and r["train_seconds"] > 0 for r in rows)
    assert rows[1]["bits_per_byte"] < rows[0]["bits_per_byte"]  # context helps even on a small corpus
    assert "| Elman RNN |" in (tmp_path / "out" / "compare.md").read_text()
    assert (tmp_path / "out" / "compare.png").stat().st_size > 5_000
    # Held out by characters: the tokenizer, the counts and the training runs saw the first 90% only
    seen = (tmp_path / "out" / "train.txt").read_text()
    assert seen == TEXT[:150_000][:int(150_000 * 0.9)]
    shards = TokenShards(tmp_path / "out" / "shards")
    tok = lmstack.load_tokenizer(tmp_path / "out" / "shards" / "tokenizer")
    assert shards["train"].tolist() == tok.encode(seen) + [tok.eos_token_id]  # all of it, nothing more
    held = TEXT[:150_000][int(150_000 * 0.9):]
    assert shards["val"].tolist() == tok.encode(held) + [tok.eos_token_id]  # the text every model is scored on
    # run again into the same directory: its own earlier outputs are replaced, not refused
    again = compare(corpus, tmp_path / "out", vocab_size=512, orders=(2,), steps=4, block_size=64,
                    batch_size=4, max_val_chars=4000)
    assert again[0]["bits_per_byte"] == pytest.approx(rows[1]["bits_per_byte"])  # same data, same 2-gram


def test_word_level_model_with_unknown_words():
    from lmstack.models.ngram import word_sequences

    lines = TEXT.split("\n")
    train, vocab = word_sequences(["\n".join(lines[:2000])], order=3)
    held, _ = word_sequences(["\n".join(lines[2000:2300])], vocab=vocab, order=3)
    assert any(vocab["<unk>"] in s for s in held)  # the held-out text has words training never saw
    model = NGramLM(3, len(vocab), unk_id=vocab["<unk>"]).fit(train)
    ppl = model.perplexity(held)
    assert 10 < ppl < len(vocab)
    assert math.exp(model.logprob(vocab["<unk>"], [])) > 0  # documented <unk> mass: never zero


def test_sampling_follows_the_distribution(char_model):
    model, stoi = char_model
    context = [stoi[c] for c in "ROMEO"]
    p = model.distribution(context)
    rng = np.random.default_rng(0)
    draws = [model.sample(context, 1, rng)[0] for _ in range(400)]
    assert all(0 <= d < model.vocab_size for d in draws)
    top = int(p.argmax())
    assert abs(draws.count(top) / 400 - p[top]) < 0.07
    assert len(model.sample(context, 5, rng)) == 5
    # With `stop`, a draw of it ends the sample (a space: it comes soon in any context)
    for _ in range(5):
        drawn = model.sample(context, 200, rng, stop=stoi[" "])
        assert drawn.count(stoi[" "]) == 1 and drawn[-1] == stoi[" "]


@pytest.mark.parametrize("smoothing", ["modified_kneser_ney", "kneser_ney", "add_k"])
def test_sentence_start_is_never_predicted(smoothing, tmp_path):
    """With `bos_id`, `<s>` is context only, as in KenLM: no probability as a next word (log10 -99), every
    other word's distribution still sums to 1, sampling never draws it, and ARPA keeps it at -99."""
    from lmstack.models.ngram import BOS_LOG10, word_sequences

    train, vocab = word_sequences(["the cat sat\nthe dog sat down\na cat ran"], order=3)
    bos = vocab["<s>"]
    model = NGramLM(3, len(vocab), smoothing=smoothing, bos_id=bos).fit(train)
    for context in ([bos, bos], [bos, vocab["the"]], [vocab["cat"]], [], [vocab["down"]]):
        assert model.logprob(bos, context) == pytest.approx(BOS_LOG10 * math.log(10))
        total = sum(math.exp(model.logprob(w, context)) for w in range(len(vocab)) if w != bos)
        if smoothing != "kneser_ney":  # NLTK's formulation: a 1/V floor for unseen words, unnormalised
            assert total == pytest.approx(1.0, abs=1e-9)
    # Without bos_id, the padding's second <s> is predicted after the first and takes mass from the words
    plain = NGramLM(3, len(vocab), smoothing=smoothing).fit(train)
    assert math.exp(plain.logprob(bos, [bos])) > 1e-3
    rng = np.random.default_rng(0)
    assert bos not in model.sample([bos, bos], 300, rng)
    if smoothing == "add_k":
        return
    model.to_arpa(tmp_path / "m.arpa", sorted(vocab, key=vocab.get))
    lines = (tmp_path / "m.arpa").read_text().split("\\2-grams:")[0].splitlines()
    assert any(line.startswith("-99.0000000\t<s>\t") for line in lines)  # with its backoff weight, as KenLM
    again = NGramLM.from_arpa(tmp_path / "m.arpa", vocab)
    assert again.context_only_id == bos
    for context in ([bos, bos], [vocab["a"]], []):
        for w in range(len(vocab)):
            assert again.logprob(w, context) == pytest.approx(model.logprob(w, context), abs=1e-5)
