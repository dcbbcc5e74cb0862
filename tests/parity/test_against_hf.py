"""Logits parity with `transformers` for every supported family, in both directions.

Each case builds a tiny random model in `transformers` from a config (no download), saves it, loads it through
lmstack's checkpoint loader and compares float32 logits on a batch; then saves from lmstack and reloads in
`transformers`. Tolerance: max abs difference < 1e-4.
"""

import json
import math

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.activations import ACT2FN

import lmstack
from lmstack.checkpoints.hf import FAMILY_DEFAULTS, GELU_APPROXIMATE, config_from_hf, config_to_hf

TOL = 1e-4
SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=128)

CASES = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4),
    "llama-gqa": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2),
    "llama-mqa-bias-tied": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=1, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "llama3-rope-scaling": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}),
    "llama-linear-rope": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    # transformers gives a top-level original_max_position_embeddings (as Phi-3 writes it) priority
    "llama-yarn-top-level-original": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, rope_scaling={"rope_type": "yarn", "factor": 4.0},
        original_max_position_embeddings=16),
    "llama3-top-level-original": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, rope_theta=500000.0, original_max_position_embeddings=16,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    "llama-yarn-rope": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral-window": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=7),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
    "mixtral": lambda: transformers.MixtralConfig(
        **SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "phi3": lambda: transformers.Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0, sliding_window=None),
    "phi3-window": lambda: transformers.Phi3Config(
        **SMALL, num_key_value_heads=4, pad_token_id=0, sliding_window=9),
    # Exact (erf) GELU in a gated MLP: neither read nor written as the tanh approximation.
    "llama-geglu-exact": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, hidden_act="gelu"),
    "phi3-geglu-tanh": lambda: transformers.Phi3Config(
        **SMALL, num_key_value_heads=2, pad_token_id=0, sliding_window=None, hidden_act="gelu_new"),
    # Llama ignores partial_rotary_factor (every dimension rotates); Phi-3 applies it.
    "llama-partial-rotary-ignored": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, partial_rotary_factor=0.5),
    "phi3-partial-rotary": lambda: transformers.Phi3Config(
        **SMALL, num_key_value_heads=2, pad_token_id=0, sliding_window=None, partial_rotary_factor=0.5),
    # Dynamic NTK within max_position_embeddings: transformers does not scale yet, whatever
    # original_max_position_embeddings (16 < the 24 tokens of _inputs) says.
    "llama-dynamic-rope-original-max": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}),
}


def _randomize(model: torch.nn.Module) -> None:
    """Random weights everywhere, norms included, so no mapping mistake hides behind ones or zeros."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name or "ln_" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def _inputs(vocab: int, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (3, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_parity_both_directions(case, tmp_path):
    torch.manual_seed(0)
    hf_config = CASES[case]()
    hf = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager", dtype=torch.float32).eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path / "hf")

    ours = lmstack.load_model(tmp_path / "hf")
    ids = _inputs(hf_config.vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL

    lmstack.save_model(ours, tmp_path / "ours")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        again = back(ids).logits
    assert (again - got).abs().max().item() < TOL


def test_sliding_window_matters(tmp_path):
    """The window case must differ from full attention, or the parity test above proves nothing about it."""
    cfg = lmstack.ModelConfig.from_name("tiny-llama", sliding_window=4)
    model = lmstack.DecoderLM(cfg).eval()
    ids = _inputs(cfg.vocab_size, 16)
    with torch.no_grad():
        windowed = model(ids)
        model.config.sliding_window = None
        full = model(ids)
    assert torch.allclose(windowed[:, :4], full[:, :4], atol=1e-6)  # within the window: identical
    assert (windowed[:, 4:] - full[:, 4:]).abs().max() > 1e-3


def test_sharded_save_loads_in_transformers(tmp_path):
    cfg = lmstack.ModelConfig.from_name("tiny-llama")
    model = lmstack.DecoderLM(cfg).eval()
    lmstack.save_model(model, tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _inputs(cfg.vocab_size)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < TOL
    reloaded = lmstack.load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))


def test_bias_free_gpt2_saves_as_gpt2(tmp_path):
    """nanoGPT's bias=False GPT-2 (recipes/shakespeare-char.yaml): GPT-2 checkpoints always carry linear biases,
    so they are written as zeros, and transformers and lmstack reload the same logits."""
    torch.manual_seed(0)
    cfg = lmstack.ModelConfig.from_name("gpt2", vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32,
                                        bias="none")
    model = lmstack.DecoderLM(cfg).eval()
    assert model.layers[0].attn.q.bias is None
    lmstack.save_model(model, tmp_path / "m")
    ids = _inputs(65, 16)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    reloaded = lmstack.load_model(tmp_path / "m")
    with torch.no_grad():
        expected = model(ids)
        assert (theirs(ids).logits - expected).abs().max().item() < TOL
        assert (reloaded(ids) - expected).abs().max().item() < TOL
    assert not theirs.transformer.h[0].attn.c_attn.bias.any()


@pytest.mark.parametrize("name", sorted(GELU_APPROXIMATE))
def test_gelu_names_compute_what_transformers_computes(name):
    """Each hidden_act lmstack maps to F.gelu computes what transformers' ACT2FN[name] does."""
    x = torch.linspace(-6, 6, 1001)
    approximate = GELU_APPROXIMATE[name]
    theirs = ACT2FN[name](x)
    assert (torch.nn.functional.gelu(x, approximate=approximate) - theirs).abs().max() < 1e-6
    other = "tanh" if approximate == "none" else "none"  # and not the other GELU: the table is not vacuous
    assert (torch.nn.functional.gelu(x, approximate=other) - theirs).abs().max() > 1e-4
    cfg = lmstack.ModelConfig.from_hf({**transformers.LlamaConfig(**SMALL, hidden_act=name).to_dict(),
                                       "model_type": "llama"})
    assert (cfg.mlp, cfg.gelu_approximate) == ("geglu", approximate)


@pytest.mark.parametrize("name", ["quick_gelu", "gelu_10", "relu"])
def test_other_activations_are_refused(name):
    config = {**transformers.LlamaConfig(**SMALL, hidden_act=name).to_dict(), "model_type": "llama"}
    with pytest.raises(lmstack.LMStackError, match=f"hidden_act '{name}' is not supported"):
        lmstack.ModelConfig.from_hf(config)


def test_dynamic_rope_past_max_position_embeddings(tmp_path):
    """Past max_position_embeddings (through the KV cache, which may outgrow block_size) dynamic NTK scales as
    transformers scales: relative to max_position_embeddings, ignoring original_max_position_embeddings."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **{**SMALL, "max_position_embeddings": 16}, num_key_value_heads=2,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8})
    theirs = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    _randomize(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    ours = lmstack.load_model(tmp_path / "hf")
    ids = _inputs(config.vocab_size)  # 24 tokens > 16
    ours.setup_kv_cache(ids.shape[0], ids.shape[1])
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids, input_pos=torch.arange(ids.shape[1]))
        ours.config.rope_scaling = None  # the scaling must matter here, or this test proves nothing
        plain = ours(ids, input_pos=torch.arange(ids.shape[1]))
    assert (got - expected).abs().max().item() < TOL
    assert (plain - expected).abs().max().item() > 1e-3


def test_dynamic_rope_generates_past_max_position_embeddings_as_transformers(tmp_path):
    """Dynamic NTK exists to run past max_position_embeddings: the engine's context is that x factor (vLLM's
    max_model_len), and greedy decoding there gives transformers' tokens; perplexity windows reach it too."""
    from lmstack.evaluate import perplexity
    from lmstack.generate import Engine

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**SMALL, "max_position_embeddings": 16}, num_key_value_heads=2,
                                      rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    theirs = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    _randomize(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    ours = lmstack.load_model(tmp_path / "hf")
    assert (ours.config.block_size, ours.config.context_length) == (16, 32)
    tok = lmstack.Tokenizer.train_chars(["".join(chr(65 + i) for i in range(config.vocab_size))])
    prompt = _inputs(config.vocab_size, seq=6)[0].tolist()
    engine = Engine(ours, tok)
    assert engine.max_seq_len == 32
    out = engine.generate([prompt], max_new_tokens=26, temperature=0, ignore_eos=True)[0]
    expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=26, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, 6:].tolist()
    assert len(out.token_ids) == 26 and out.token_ids == expected
    with pytest.raises(lmstack.LMStackError, match="max_length 33 exceeds the model's context \\(32\\)"):
        perplexity(ours, tok, "AB" * 20, max_length=33)
    text = tok.decode(_inputs(config.vocab_size, seq=30)[0].tolist())
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        loss = theirs(ids, labels=ids).loss.item()
    assert perplexity(ours, tok, text, max_length=30).perplexity == pytest.approx(math.exp(loss), rel=1e-4)


def _hf_logits(path, ids):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()(ids).logits


# 32 heads: Qwen2 defaults to 32 key-value heads, Mistral and Mixtral to 8
REQUIRED = dict(vocab_size=101, hidden_size=128, num_hidden_layers=2, num_attention_heads=32, intermediate_size=112)


@pytest.mark.parametrize("family", sorted(FAMILY_DEFAULTS))
def test_keys_left_out_take_the_family_defaults(family):
    """A config.json with only the required keys reads as transformers' own config class reads it."""
    extra = dict(num_local_experts=4, num_experts_per_tok=2) if family == "mixtral" else {}
    for more in ({}, dict(use_sliding_window=True), dict(output_router_logits=True)):
        hf = transformers.AutoConfig.for_model(family, **REQUIRED, **extra, **more)
        ours = config_from_hf({"model_type": family, **REQUIRED, **extra, **more})
        assert ours.norm_eps == hf.rms_norm_eps
        assert ours.rope_theta == hf.rope_parameters["rope_theta"]
        assert ours.block_size == hf.max_position_embeddings
        assert ours.n_kv_head == hf.num_key_value_heads
        window = getattr(hf, "sliding_window", None)
        windows = {window if kind == "sliding_attention" else None
                   for kind in (getattr(hf, "layer_types", None) or ["sliding_attention"])}
        assert {ours.sliding_window} == windows
        if family == "mixtral":  # the router loss counts in training only with output_router_logits
            assert ours.moe_aux_loss_coef == (hf.router_aux_loss_coef if hf.output_router_logits else 0.0)
    if family == "mixtral":  # the coefficient is kept (and saved) while the loss is off
        mixtral = {"model_type": "mixtral", **REQUIRED, **extra, "router_aux_loss_coef": 0.02}
        assert config_to_hf(config_from_hf(mixtral))["router_aux_loss_coef"] == 0.02
    if family == "llama":  # a null top-level original_max_position_embeddings defers to rope_scaling's
        yarn = {"model_type": "llama", **REQUIRED, "original_max_position_embeddings": None,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}
        assert config_from_hf(yarn).rope_scaling["original_max_position_embeddings"] == 16
    qwen = {"model_type": "qwen2", **REQUIRED, "num_hidden_layers": 30, "use_sliding_window": True}
    with pytest.raises(lmstack.LMStackError, match="only some layers"):  # windows from layer 28 on
        config_from_hf(qwen)


def test_left_out_keys_keep_logits_parity(tmp_path):
    """Mixtral's defaults (rms_norm_eps 1e-5, rope_theta 1e6) differ from Llama's: a config.json without
    them still computes what transformers computes."""
    hf_config = transformers.MixtralConfig(**SMALL, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2, sliding_window=None)
    hf = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager", dtype=torch.float32).eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling"):
        config.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = _inputs(hf_config.vocab_size)
    with torch.no_grad():
        got = lmstack.load_model(tmp_path)(ids)
    assert (got - _hf_logits(tmp_path, ids)).abs().max().item() < TOL


def test_stored_head_beside_a_tied_config_is_kept(tmp_path):
    """A GPT-2 config that says nothing of tying (so: tied) beside its own lm_head.weight: transformers keeps
    the stored head, and so does lmstack (with a warning)."""
    hf_config = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                        tie_word_embeddings=False)
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("tie_word_embeddings")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="loading it untied"):
        ours = lmstack.load_model(tmp_path)
    assert not ours.config.tie_embeddings
    ids = _inputs(hf_config.vocab_size)
    with torch.no_grad():
        got = ours(ids)
    assert (got - _hf_logits(tmp_path, ids)).abs().max().item() < TOL


def test_yarn_without_factor_saves_one_transformers_reads(tmp_path):
    cfg = lmstack.ModelConfig.from_name(
        "tiny-llama", block_size=128, rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 32})
    model = lmstack.DecoderLM(cfg).eval()
    _randomize(model)
    lmstack.save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_scaling"]["factor"] == 4.0
    ids = _inputs(cfg.vocab_size)
    with torch.no_grad():
        got = model(ids)
    assert (got - _hf_logits(tmp_path, ids)).abs().max().item() < TOL


def test_mixed_dtypes_load_in_one(tmp_path):
    """bf16 matrices beside fp32 norms: loaded in the config's dtype, else the most common one, not left
    mixed (where the first matrix product would fail)."""
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama")).eval()
    lmstack.save_model(model, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) if v.dim() == 2 else v for k, v in weights.items()},
              tmp_path / "model.safetensors")
    ids = _inputs(model.config.vocab_size)
    config = json.loads((tmp_path / "config.json").read_text())
    for named, expected in (("float32", torch.float32), (None, torch.bfloat16)):
        config["torch_dtype"] = named
        (tmp_path / "config.json").write_text(json.dumps(config))
        loaded = lmstack.load_model(tmp_path)
        assert {p.dtype for p in loaded.parameters()} == {expected}
        with torch.no_grad():
            out = loaded(ids).float()
        reference = lmstack.load_model(tmp_path, dtype=expected)
        with torch.no_grad():
            assert torch.equal(out, reference(ids).float())
