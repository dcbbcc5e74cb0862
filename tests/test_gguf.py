"""GGUF: llama.cpp's tokenizer test vectors, and the real SmolLM2-135M-Instruct against `transformers`."""

import json

import numpy as np
import pytest
import torch

import lmstack
from lmstack import LMStackError
from lmstack.checkpoints.gguf import unpermute_rope_rows
from tests.conftest import REPO, VOCAB_DIR

# llama.cpp's own vectors for the vocabularies of the families lmstack loads.
VOCABS = ["gpt-2", "llama-bpe", "qwen2", "starcoder", "refact", "llama-spm", "phi-3", "falcon", "mpt"]


def _cases(name):
    # Bytes, not read_text: the inputs contain "\r", which universal newlines would rewrite.
    inp = (VOCAB_DIR / f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8")
    out = (VOCAB_DIR / f"ggml-vocab-{name}.gguf.out").read_bytes().decode("utf-8").split("\n")
    texts = inp.split("\n__ggml_vocab_test__\n")  # llama.cpp's test-tokenizer-0 reads them this way
    texts = texts[:-1] if texts[-1] == "" else texts
    out = out[:-1] if out[-1] == "" else out
    assert len(texts) == len(out)
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, out)]


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_tokenizer_vectors(name):
    if not (VOCAB_DIR / f"ggml-vocab-{name}.gguf").exists():
        pytest.skip("llama.cpp test vectors not fetched (make fetch-test-data)")
    tok = lmstack.load_tokenizer(VOCAB_DIR / f"ggml-vocab-{name}.gguf")
    cases = _cases(name)
    assert len(cases) > 20
    for text, expected in cases:
        assert tok.encode(text, add_special_tokens=False) == expected, text


def test_unpermute_inverts_llama_cpp_permutation():
    n_head, head_dim, width = 3, 8, 5
    w = torch.randn(n_head * head_dim, width)
    # llama.cpp's convert_hf_to_gguf.py permutation
    permuted = w.reshape(n_head, 2, head_dim // 2, width).swapaxes(1, 2).reshape(w.shape)
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rope_rows(permuted, n_head), w)


@pytest.fixture
def smollm(smollm2):
    return smollm2


@pytest.fixture
def hf_smollm(hf_smollm2):
    return hf_smollm2


def test_smollm2_config(smollm):
    model, tok = smollm
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.norm_eps == 1e-5  # the float32 in the file read as the number written, as config.json has it
    assert c.tie_embeddings and model.lm_head.weight is model.embed.weight
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


def test_info_reads_a_gguf_config_without_its_weights(smollm, smollm2_gguf, capsys, monkeypatch):
    import gguf.quants

    from lmstack.cli import main

    def no_weights(*_):
        raise AssertionError("lmstack info dequantized a tensor")

    monkeypatch.setattr(gguf.quants, "dequantize", no_weights)
    assert main(["info", str(smollm2_gguf)]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.index("{"):])
    model, _ = smollm
    assert info["config"] == model.config.to_dict() and info["parameters"] == model.num_params()


def test_smollm2_ids_and_logits_match_transformers(smollm, hf_smollm):
    model, tok = smollm
    hf_model, hf_tok = hf_smollm
    # transformers does not split digits for the "smollm" pre-tokenizer, llama.cpp (and SmolLM2's own
    # tokenizer.json) do; lmstack follows llama.cpp, so these texts carry no digits.
    texts = ["The capital of France is", "Hello, world! Ünïcödé and emoji 🦙.", "  spaced\n\nlines\ttabs"]
    for text in texts:
        assert tok.encode(text) == hf_tok.encode(text)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ours = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours == hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok.encode(ours)])
    with torch.no_grad():
        diff = (model(ids) - hf_model(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_smollm2_digits_follow_llama_cpp(smollm):
    _, tok = smollm
    assert tok.decode(tok.encode("1234")) == "1234"
    assert len(tok.encode("1234")) == 4  # one id per digit, as SmolLM2 was trained


def test_smollm2_answers_a_chat_question(smollm):
    model, tok = smollm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    out = []
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(12):  # plain greedy without a cache; the generation engine is tested elsewhere
            nxt = int(model(x)[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    assert "Paris" in tok.decode(out)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(LMStackError, match="not a readable GGUF file"):
        lmstack.load_model(bad)


def _reads_as_ggufs_own_reader(path):
    """lmstack's faster reader (plain views of the memory map) gives gguf's GGUFReader's fields and tensors."""
    from gguf import GGUFReader

    from lmstack.checkpoints.gguf import _reader

    ours, theirs = _reader(path), GGUFReader(str(path))
    assert type(ours) is not GGUFReader and not isinstance(ours.tensors[0].data, np.memmap)
    assert {k: f.contents() for k, f in ours.fields.items()} == {k: f.contents() for k, f in theirs.fields.items()}
    assert [(t.name, t.tensor_type, t.shape.tolist(), t.data.tobytes()) for t in ours.tensors] == \
        [(t.name, t.tensor_type, t.shape.tolist(), t.data.tobytes()) for t in theirs.tensors]


@pytest.mark.parametrize("preset,changes,tensor_type,tol", [
    ("tiny-llama", {}, "f32", 1e-5), ("tiny-llama", {}, "q8_0", 0.2),
    # GPT-2: learned positions, biases, q/k/v fused into attn_qkv. transformers' GGUF reader (5.24) reads the
    # context as n_ctx and keeps n_positions at 1024, so the model has GPT-2's 1024 positions.
    ("tiny-gpt2", {"block_size": 1024}, "f32", 1e-5),
    ("tiny-llama", {"family": "phi3"}, "f32", 1e-5),  # Phi-3: attn_qkv, and gate/up fused into ffn_up
], ids=["llama-f32", "llama-q8_0", "gpt2-f32", "phi3-f32"])
def test_gguf_export_round_trip_and_transformers(tmp_path, preset, changes, tensor_type, tol):
    """lmstack -> GGUF: lmstack reads it back, and so does transformers, with the same logits and ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmstack.checkpoints.gguf import save_gguf

    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:100_000]
    # A pad token, which the file carries: transformers' Phi3Config would otherwise pad with id 32000.
    tok = lmstack.Tokenizer.train([text], vocab_size=512, chat_template="chatml", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.unk_token = "<|endoftext|>"  # as SmolLM2's tokenizer names it
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name(preset, vocab_size=512, **changes)).eval()
    path = save_gguf(model, tok, tmp_path / "m.gguf", tensor_type=tensor_type)
    _reads_as_ggufs_own_reader(path)
    again, tok_again = lmstack.load_model(path), lmstack.load_tokenizer(path)
    assert (tok_again.unk_token, tok_again.pad_token) == ("<|endoftext|>", "<|endoftext|>")  # as SmolLM2's file
    assert again.config.family == model.config.family and again.config.tie_embeddings == model.config.tie_embeddings
    sample = "KING HENRY: Once more unto the breach, 1234 friends! 🦙"
    ids = tok.encode(sample)
    assert tok_again.encode(sample) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (again(x) - model(x)).abs().max() < tol
        hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
        assert (hf(x).logits - model(x)).abs().max() < tol
    assert AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf").encode(sample) == ids


@pytest.mark.parametrize("theta,band,blended", [
    (500000.0, {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 1),
    (10000.0, {"low_freq_factor": 2.0, "high_freq_factor": 16.0, "original_max_position_embeddings": 512}, 2),
    (10000.0, {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, 1),
    (10000.0, {"low_freq_factor": 1.0, "high_freq_factor": 1.5, "original_max_position_embeddings": 100}, 0),
], ids=["llama-3.1-band", "another-band-fitted", "one-blended-frequency", "none-blended"])
def test_llama3_rope_scaling_travels_through_gguf_as_rope_freqs(tmp_path, theta, band, blended):
    """Llama 3's RoPE scaling goes to GGUF as llama.cpp's converter writes it, one divisor per frequency in
    `rope_freqs.weight`, equal to the default frequencies over the Hugging Face scaled ones; reading the file
    recovers a `rope_scaling` with the same frequencies, and the same logits."""
    import gguf

    from lmstack.checkpoints.gguf import llama3_scaling_from_factors, read_gguf_config, save_gguf
    from lmstack.models.attention import rope_inv_freq

    tok = lmstack.Tokenizer.train(["plain ascii text only " * 40], vocab_size=300)
    torch.manual_seed(0)
    config = lmstack.ModelConfig.from_name("tiny-llama", vocab_size=300, rope_theta=theta,
                                           rope_scaling={"rope_type": "llama3", "factor": 8.0, **band})
    model = lmstack.DecoderLM(config).eval()
    path = save_gguf(model, tok, tmp_path / "m.gguf")
    divisors = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(path).tensors}["rope_freqs.weight"]
    default = rope_inv_freq(config.replace(rope_scaling=None))[0]
    assert torch.allclose(divisors, default / rope_inv_freq(config)[0], rtol=1e-5)
    assert int(((divisors > 1 + 1e-6) & (divisors < 8 - 1e-5)).sum()) == blended  # frequencies in the band
    again = lmstack.load_model(path)
    assert again.config.rope_type == "llama3" and read_gguf_config(path) == again.config
    assert torch.allclose(rope_inv_freq(again.config)[0], rope_inv_freq(config)[0], rtol=1e-5)
    x = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        assert (again(x) - model(x)).abs().max() < 1e-5
    with pytest.raises(LMStackError, match="not Llama 3's scaling"):
        llama3_scaling_from_factors(divisors.double().flip(0), theta, config.rotary_dim)


def test_q8_0_export_keeps_rows_that_do_not_fit_its_blocks_in_f16(tmp_path):
    """Q8_0 packs a row in blocks of 32 values: a layer with 48 inputs is written in f16 instead (as llama.cpp's
    converter does), and the file reads back."""
    import gguf

    from lmstack.checkpoints.gguf import save_gguf

    tok = lmstack.Tokenizer.train(["plain ascii text only " * 40], vocab_size=300)
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=300, n_embd=48, n_head=4,
                                                            n_kv_head=2, intermediate_size=64)).eval()
    path = save_gguf(model, tok, tmp_path / "m.gguf", tensor_type="q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16  # 48 inputs
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0  # 64 inputs
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert (lmstack.load_model(path)(x) - model(x)).abs().max() < 0.05


@pytest.mark.parametrize("preset,changes,match", [
    ("tiny-gpt2", {"gelu_approximate": "none"}, "llama.cpp's gpt2 computes the tanh GELU"),
    ("tiny-llama", {"n_expert": 4}, "GGUF export of a mixture of experts is not supported"),
    ("tiny-llama", {"sliding_window": 8, "family": "mistral"}, "not computed by llama.cpp's llama architecture"),
    # llama.cpp's phi3 reads the window but turns it off (full attention)
    ("tiny-llama", {"sliding_window": 8, "family": "phi3"}, r"sliding window \(8 of 128 positions\) .* phi3"),
    ("tiny-llama", {"rotary_fraction": 0.5}, "rotary_fraction=0.5"),
    ("tiny-llama", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope scaling 'yarn'"),
    ("tiny-llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling 'dynamic'"),
])
def test_gguf_export_refuses_what_llama_cpp_would_compute_differently(tmp_path, preset, changes, match):
    from lmstack.checkpoints.gguf import save_gguf

    tok = lmstack.Tokenizer.train(["plain ascii text only " * 40], vocab_size=300)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name(preset, vocab_size=300, **changes))
    with pytest.raises(LMStackError, match=match):
        save_gguf(model, tok, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize("name,family", [("llama-spm", "llama"), ("phi-3", "phi3")])
def test_sentencepiece_tokenizers_export_to_gguf(tmp_path, name, family):
    """A SentencePiece-style vocabulary (Llama 2's, Phi-3's: byte fallback, spaces as U+2581) is written as
    llama.cpp's "llama" tokenizer, its merge order as piece scores: read back, it still passes llama.cpp's
    own tokenizer vectors, and transformers reads it as it reads the original file."""
    from transformers import AutoTokenizer

    from lmstack.checkpoints.gguf import save_gguf

    original = VOCAB_DIR / f"ggml-vocab-{name}.gguf"
    if not original.exists():
        pytest.skip("llama.cpp test vectors not fetched (make fetch-test-data)")
    tok = lmstack.load_tokenizer(original)
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=len(tok), family=family,
                                                            n_layer=1)).eval()
    path = save_gguf(model, tok, tmp_path / "m.gguf")
    again = lmstack.load_tokenizer(path)
    for text, expected in _cases(name):
        assert again.encode(text, add_special_tokens=False) == expected, text
    assert (again.bos_token, again.eos_token, again.unk_token) == (tok.bos_token, tok.eos_token, tok.unk_token)
    assert again.encode("a")[:1] == tok.encode("a")[:1]  # bos added as before
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    reference = AutoTokenizer.from_pretrained(original.parent, gguf_file=original.name)
    for text in ["Hello world", " leading space", "tabs\tand\nnewlines", "Ünïcödé 🦙 1234"]:
        assert theirs.encode(text) == reference.encode(text), text


def test_gguf_export_refuses_a_character_level_tokenizer(tmp_path):
    from lmstack.checkpoints.gguf import save_gguf

    tok = lmstack.Tokenizer.train_chars(["plain text"])
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=len(tok)))
    with pytest.raises(LMStackError, match="supports BPE tokenizers .*not WordLevel"):
        save_gguf(model, tok, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_gguf_phi3_keeps_partial_rotary_and_sliding_window_and_bias_free_gpt2_loads(tmp_path):
    """What llama.cpp's phi3 reads beyond transformers' GGUF loader (rope.dimension_count) comes back; a GPT-2 without biases (nanoGPT's bias=False) is written with zero biases, as llama.cpp needs."""
    from lmstack.checkpoints.gguf import save_gguf

    tok = lmstack.Tokenizer.train(["plain ascii text only " * 40], vocab_size=300)
    torch.manual_seed(0)
    x = torch.randint(0, 300, (1, 24))
    for preset, changes in (("tiny-llama", dict(family="phi3", rotary_fraction=0.5)),
                            ("tiny-gpt2", dict(bias="none", tie_embeddings=False))):
        model = lmstack.DecoderLM(lmstack.ModelConfig.from_name(preset, vocab_size=300, **changes)).eval()
        again = lmstack.load_model(save_gguf(model, tok, tmp_path / f"{preset}.gguf"))
        for key, value in changes.items():
            assert getattr(again.config, key) == (value if key != "bias" else "all"), key
        with torch.no_grad():
            assert (again(x) - model(x)).abs().max() < 1e-5


QWEN2_HF_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _hf_style_tokenizer(tmp_path, pre_tokenizer):
    """A byte-level BPE whose tokenizer.json spells its split rules as a Hugging Face release does."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:50_000]
    backend.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return lmstack.load_tokenizer(tmp_path)


@pytest.mark.parametrize("name,expected", [("qwen2", "qwen2"), ("smollm2", "smollm")])
def test_gguf_export_knows_hugging_face_spellings_of_the_split_rules(tmp_path, name, expected):
    """Qwen2's (?i:...) contractions and SmolLM2's Digits + ByteLevel(use_regex) are llama.cpp's qwen2 and
    smollm pre-tokenizers: the export names them, and the file encodes as the source does."""
    import gguf
    from tokenizers import Regex, pre_tokenizers

    from lmstack.checkpoints.gguf import save_gguf

    pre = {
        "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_HF_SPLIT), behavior="isolated"),
                                          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        "smollm2": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    }[name]
    tok = _hf_style_tokenizer(tmp_path, pre)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=400))
    path = save_gguf(model, tok, tmp_path / "m.gguf")
    field = gguf.GGUFReader(path).fields["tokenizer.ggml.pre"]
    assert field.contents() == expected
    sample = "KING HENRY'S men: 1234 friends, don't\r\n  go!  🦙"
    assert lmstack.load_tokenizer(path).encode(sample) == tok.encode(sample)


def test_gguf_without_add_bos_key_follows_llama_cpp(tmp_path, monkeypatch):
    """A file with no tokenizer.ggml.add_bos_token (older converters): llama.cpp adds bos for its Llama 3
    pre-tokenizers, and so does lmstack."""
    import gguf

    from lmstack.checkpoints.gguf import save_gguf

    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:30_000]
    tok = lmstack.Tokenizer.train([text], vocab_size=320, special_tokens=("<|begin_of_text|>", "<|end_of_text|>"),
                                  bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", add_bos=True)
    monkeypatch.setattr(gguf.GGUFWriter, "add_add_bos_token", lambda self, value: None)
    path = save_gguf(lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=320)), tok,
                     tmp_path / "m.gguf")
    fields = gguf.GGUFReader(path).fields
    assert "tokenizer.ggml.add_bos_token" not in fields and fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    again = lmstack.load_tokenizer(path)
    assert again.encode("hi")[0] == again.bos_token_id == tok.bos_token_id


def test_llama_gguf_with_qk_biases_is_unpermuted(tmp_path):
    """llama.cpp's converter permutes q and k biases as it does their weights (llama architecture): read
    back, the model computes what it did (transformers' GGUF reader drops llama biases: no reference there)."""
    import gguf

    from lmstack.checkpoints.gguf import (
        _gguf_rules,
        _tokenizer_metadata,
        permute_rope_rows,
        write_model_metadata,
    )

    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:30_000]
    tok = lmstack.Tokenizer.train([text], vocab_size=320)
    torch.manual_seed(0)
    cfg = lmstack.ModelConfig.from_name("tiny-llama", vocab_size=320, bias="qkv", family="llama")
    model = lmstack.DecoderLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")  # save_gguf would write qwen2 for biases
    write_model_metadata(writer, cfg)
    _tokenizer_metadata(writer, tok, cfg.vocab_size)
    state = model.state_dict()
    for rule in _gguf_rules(cfg):
        t = state[rule.ours[0]].float()
        if ".attn_q." in rule.hf or ".attn_k." in rule.hf:  # as convert_hf_to_gguf's LlamaModel
            t = permute_rope_rows(t, cfg.n_head if ".attn_q." in rule.hf else cfg.n_kv_head)
        writer.add_tensor(rule.hf, t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    x = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        assert (lmstack.load_model(tmp_path / "m.gguf")(x) - model(x)).abs().max() < 1e-5
