"""The sequence-classification head: logits parity with transformers' XForSequenceClassification in both
directions, padding, losses, and clear errors for checkpoints that do not fit."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lmstack import DecoderLM, LMStackError, ModelConfig
from lmstack.models import SequenceClassifier
from lmstack.models.classifier import last_token_index, load_classifier, save_classifier
from lmstack.tokenizer import Tokenizer
from lmstack.train.tasks import ClassifyTask, PreferenceTask
from tests.parity.test_against_hf import _randomize

TOL = 1e-4
PAD = 0
LABELS = ["negative", "neutral", "positive"]
SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
ID2LABEL = dict(enumerate(LABELS))
CASES = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, pad_token_id=PAD, id2label=ID2LABEL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, pad_token_id=PAD, id2label=ID2LABEL,
                                              tie_word_embeddings=True),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                            pad_token_id=PAD, id2label=ID2LABEL),
}


def _batch(vocab: int, lengths=(11, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (real tokens never equal PAD) and the matching key_padding mask."""
    g = torch.Generator().manual_seed(1)
    T = max(lengths)
    ids = torch.full((len(lengths), T), PAD)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, :n] = True
    return ids, mask


@pytest.fixture(params=sorted(CASES))
def hf_classifier(request, tmp_path):
    torch.manual_seed(0)
    hf_config = CASES[request.param]()
    hf = AutoModelForSequenceClassification.from_config(hf_config, attn_implementation="eager",
                                                        dtype=torch.float32).eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path


def test_logits_parity_both_directions(hf_classifier):
    hf, tmp_path = hf_classifier
    ours = load_classifier(tmp_path / "hf")
    assert ours.labels == LABELS and ours.pad_token_id == PAD and ours.num_labels == 3
    ids, mask = _batch(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask.long()).logits
        by_mask = ours(ids, key_padding=mask)
        by_pad_id = ours(ids)
        alone = ours(ids[1:, :6])  # the short row without its padding
    assert expected.shape == by_mask.shape == (2, 3)
    assert (by_mask - expected).abs().max().item() < TOL
    assert (by_pad_id - expected).abs().max().item() < TOL
    assert (alone - expected[1:]).abs().max().item() < TOL

    save_classifier(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == [type(hf).__name__]
    assert config["num_labels"] == 3 and config["pad_token_id"] == PAD
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert config["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == set(hf.state_dict()) - {
        k for k in hf.state_dict() if k.endswith((".attn.bias", ".attn.masked_bias"))}
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back) is type(hf) and back.config.id2label == ID2LABEL
    with torch.no_grad():
        again = back(ids, attention_mask=mask.long()).logits
        reloaded = load_classifier(tmp_path / "ours")(ids, key_padding=mask)
    assert (again - by_mask).abs().max().item() < TOL
    assert torch.equal(reloaded, by_mask)


def test_wrong_score_shape_is_named(tmp_path):
    model = SequenceClassifier(ModelConfig.from_name("tiny-llama"), LABELS, pad_token_id=PAD)
    save_classifier(model, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    n_embd = model.config.n_embd
    weights["score.weight"] = torch.zeros(4, n_embd)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(LMStackError, match=rf"'score\.weight' has shape \[4, {n_embd}\], expected \[3, {n_embd}\]"):
        load_classifier(tmp_path)


def test_causal_lm_checkpoint_is_not_a_classifier(tmp_path):
    import lmstack

    lmstack.save_model(DecoderLM(ModelConfig.from_name("tiny-llama")), tmp_path)
    with pytest.raises(LMStackError, match=r"no 'score\.weight' tensor.*from_decoder"):
        load_classifier(tmp_path)


def test_cross_entropy_loss():
    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig.from_name("tiny-llama"), LABELS, pad_token_id=PAD)
    ids, mask = _batch(model.config.vocab_size, lengths=(5, 9, 7))
    labels = torch.tensor([2, 0, 1])
    logits, loss = model(ids, key_padding=mask, labels=labels)
    assert logits.shape == (3, 3)
    assert torch.allclose(loss, F.cross_entropy(logits, labels))
    assert loss.item() > 0
    loss.backward()
    assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0
    _, ignored = model(ids, key_padding=mask, labels=torch.tensor([2, -100, -100]))
    assert torch.allclose(ignored, F.cross_entropy(logits[:1], labels[:1]))


def test_scalar_score_head_is_a_reward_model():
    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig.from_name("tiny-gpt2"), 1, pad_token_id=PAD)
    assert model.labels == ["LABEL_0"]
    ids, mask = _batch(model.config.vocab_size)
    target = torch.tensor([0.5, -1.0])
    scores, loss = model(ids, key_padding=mask, labels=target)
    assert scores.shape == (2, 1)
    assert torch.allclose(loss, F.mse_loss(scores.squeeze(-1), target))


def test_from_decoder_puts_a_fresh_head_on_the_body():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-llama", n_embd=256, n_head=4, tie_embeddings=False)
    decoder = DecoderLM(cfg).eval()
    ids, mask = _batch(cfg.vocab_size)
    with torch.no_grad():
        hidden = decoder(ids, return_hidden=True)
    clf = SequenceClassifier.from_decoder(decoder, ["no", "yes"], pad_token_id=PAD).eval()
    assert clf.model is decoder and decoder.lm_head is None
    assert not any("lm_head" in k for k in clf.state_dict())
    std = clf.score.weight.std().item()
    assert 0.8 * cfg.init_std < std < 1.2 * cfg.init_std  # 512 samples of N(0, init_std)
    with torch.no_grad():
        logits = clf(ids, key_padding=mask)
    want = torch.stack([hidden[0, 10], hidden[1, 5]]) @ clf.score.weight.T
    assert torch.allclose(logits, want, atol=1e-5)


def test_left_padding_with_key_padding_scores_as_unpadded():
    torch.manual_seed(0)
    # GPT-2's learned positions: RoPE is shift-invariant, so only absolute positions show an off-by-3.
    model = SequenceClassifier(ModelConfig.from_name("tiny-gpt2"), 2, pad_token_id=PAD).eval()
    ids, _ = _batch(model.config.vocab_size, lengths=(8,))
    left = torch.cat([torch.full((1, 3), PAD), ids], dim=1)
    mask = left != PAD
    with torch.no_grad():
        assert torch.allclose(model(left, key_padding=mask), model(ids), atol=1e-5)


def test_last_token_index():
    ids = torch.tensor([[5, 6, 0, 0], [0, 0, 7, 8], [1, 2, 3, 4]])
    assert last_token_index(ids, pad_token_id=0).tolist() == [1, 3, 3]
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    # A real token equal to the pad id is not pooled (Hugging Face's rule); a row with none left gives 0.
    assert last_token_index(ids, key_padding=mask, pad_token_id=0).tolist() == [1, 0, 3]
    assert last_token_index(ids, key_padding=mask).tolist() == [2, 0, 3]
    assert last_token_index(ids).tolist() == [3, 3, 3]


def test_real_pad_id_tokens_pool_as_transformers(hf_classifier):
    """Rows that end in (and contain) real tokens equal to pad_token_id, as with pad = eos: lmstack's
    loader scores transformers' checkpoint as transformers does, with key_padding and without."""
    hf, tmp_path = hf_classifier
    ours = load_classifier(tmp_path / "hf")
    ids, mask = _batch(hf.config.vocab_size, lengths=(11, 6, 8))
    ids[0, 10] = ids[1, 5] = ids[1, 2] = ids[2, 6] = ids[2, 7] = PAD  # real, and equal to the pad id
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask.long()).logits
        by_mask = ours(ids, key_padding=mask)
        by_pad_id = ours(ids)
    assert (by_mask - expected).abs().max().item() < TOL
    assert (by_pad_id - expected).abs().max().item() < TOL


def _chatml_tokenizer():
    """A ChatML tokenizer whose pad token is its eos, the end of turn `<|im_end|>` (as SmolLM2-Instruct's)."""
    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "good", "bad"]
    text = "\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(100))
    return Tokenizer.train([text], 300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                           eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template="chatml")


def _task_batch(task_name: str, tok, tmp_path) -> dict:
    """A batch as lmstack's reward or classify task collates it, from records whose inputs end in
    `<|im_end|>` (the pad id)."""
    if task_name == "reward":
        records = [{"prompt": [{"role": "user", "content": "the cat sat"}], "chosen": "good mat",
                    "rejected": "bad dog ran on the log"},
                   {"prompt": "a dog ran", "chosen": "good", "rejected": "bad bad"}]  # text: eos appended
        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        task = PreferenceTask("reward", tok, seed=0, data=str(data), val_data=None, block_size=64, beta=0.1)
    else:
        texts = [tok.apply_chat_template([{"role": "user", "content": c}, {"role": "assistant", "content": a}],
                                         tokenize=False).rstrip()
                 for c, a in [("the cat", "good"), ("a dog sat on the mat", "bad log")]]
        data = tmp_path / "texts.jsonl"
        data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in zip(texts, "ab")))
        task = ClassifyTask(tok, seed=0, data=str(data), val_data=None, block_size=64, labels=None)
    batch = task.collate("train", np.arange(task.size("train")))
    ids, real = batch["input_ids"], batch["key_padding"]
    last = real.sum(-1) - 1
    assert (ids[torch.arange(len(ids)), last] == tok.pad_token_id).all()  # every input ends in the pad id
    return batch


@pytest.mark.parametrize("task_name", ["reward", "classify"])
def test_pad_equal_to_eos_scores_the_same_in_transformers(task_name, tmp_path):
    """A classifier on a tokenizer with pad = eos = <|im_end|>, fed as lmstack trains it, exported and loaded
    in transformers, scores the same on a batch the transformers tokenizer right-pads."""
    tok = _chatml_tokenizer()
    batch = _task_batch(task_name, tok, tmp_path)
    torch.manual_seed(0)
    decoder = DecoderLM(ModelConfig.from_name("tiny-llama", vocab_size=len(tok), block_size=64))
    labels = ["score"] if task_name == "reward" else ["a", "b"]
    model = SequenceClassifier.from_decoder(decoder, labels, tok.pad_token_id).eval()  # as the training loop
    _randomize(model)
    ids, real = batch["input_ids"], batch["key_padding"]
    with torch.no_grad():
        trained_on = model(ids, key_padding=real)  # what the task's loss sees
        by_pad_id = model(ids)

    save_classifier(model, tmp_path / "out", tokenizer=tok)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pad_token_id"] == tok.pad_token_id
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    hf_tok.padding_side = "right"
    assert hf_tok.pad_token_id == tok.pad_token_id
    rows = [r[m].tolist() for r, m in zip(ids, real)]
    padded = hf_tok.pad({"input_ids": rows}, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(**padded).logits
        alone = torch.cat([hf(torch.tensor([r])).logits for r in rows])
    assert (theirs - trained_on).abs().max().item() < TOL
    assert (alone - trained_on).abs().max().item() < TOL
    assert (by_pad_id - trained_on).abs().max().item() < TOL  # lmstack without key_padding: the same


@pytest.mark.parametrize(("labels", "match"), [([], "labels is empty"), (["a", "b", "a"], "'a' is listed more"),
                                               (0, "at least one label")])
def test_bad_labels(labels, match):
    with pytest.raises(LMStackError, match=match):
        SequenceClassifier(ModelConfig.from_name("tiny-llama"), labels)


def test_id2label_gaps_are_rejected(tmp_path):
    save_classifier(SequenceClassifier(ModelConfig.from_name("tiny-llama"), LABELS, PAD), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["id2label"] = {"0": "a", "2": "b"}
    config.pop("num_labels")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LMStackError, match=r"id2label must number the labels 0\.\.1"):
        load_classifier(tmp_path)
