"""Checkpoint directories: round trips, bad input with clear errors, lazy loading, and the CLI around them."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmstack
from lmstack import DecoderLM, LMStackError, ModelConfig
from lmstack.cli import main
from tests.conftest import REPO


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name("tiny-llama")).eval()
    lmstack.save_model(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_round_trip_is_exact(saved):
    model, path = saved
    again = lmstack.load_model(path)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (path / "generation_config.json").exists()


def test_dtype_and_tied_weights(tmp_path):
    model = DecoderLM(ModelConfig.from_name("tiny-gpt2"))
    lmstack.save_model(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # tied: stored once
    half = lmstack.load_model(tmp_path, dtype="bfloat16")
    assert half.embed.weight.dtype == torch.bfloat16
    assert half.lm_head.weight is half.embed.weight
    # Nothing is left on the meta device it is built on (GPT-2 has no RoPE buffer to fill), so it can move.
    assert not any(t.is_meta for t in [*half.parameters(), *half.buffers()])
    assert half.to("cpu", torch.float32).embed.weight.dtype == torch.float32


def test_stored_dtypes_load_in_one_computing_precision(saved):
    """float64 norms or float8 matrices are cast to one dtype models compute in; integer weights (a quantized
    file's codes) and a foreign quantization_config are refused by name, with or without `dtype`."""
    model, path = saved
    weights = load_file(path / "model.safetensors")
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        expected = model(ids)
    mixed = {k: v.double() if "norm" in k else v for k, v in weights.items()}
    save_file(mixed, path / "model.safetensors")
    again = lmstack.load_model(path)
    assert {p.dtype for p in again.parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.allclose(again(ids), expected, atol=1e-6)
    fp8 = {k: v.to(torch.float8_e4m3fn) if k.endswith("proj.weight") else v for k, v in weights.items()}
    save_file(fp8, path / "model.safetensors")
    again = lmstack.load_model(path)
    assert {p.dtype for p in again.parameters()} == {torch.float32}
    with torch.no_grad():
        assert again(ids).isfinite().all()
    codes = {k: v.to(torch.int8) if k.endswith("q_proj.weight") else v for k, v in weights.items()}
    save_file(codes, path / "model.safetensors")
    for dtype in (None, "float32"):
        with pytest.raises(LMStackError, match=r"tensor 'model.layers.0.self_attn.q_proj.weight' is stored as I8, "
                                               r"not floating point"):
            lmstack.load_model(path, dtype=dtype)
    save_file(weights, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(LMStackError, match=r"quantized with quant_method 'fp8' is not supported"):
        lmstack.load_model(path)


def test_directory_without_config(tmp_path):
    with pytest.raises(LMStackError, match="no config.json"):
        lmstack.load_model(tmp_path)


def test_unsupported_model_type(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "bloom"}))
    with pytest.raises(LMStackError, match="model_type 'bloom' is not supported"):
        lmstack.load_model(path)


def test_missing_tensor_is_named(saved):
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(LMStackError, match=r"\(model.safetensors\): missing tensor "
                                           r"'model.layers.1.self_attn.k_proj.weight'"):
        lmstack.load_model(path)


def test_misshaped_tensor_names_both_shapes(saved):
    _, path = saved
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(LMStackError, match=r"model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' has "
                                           r"shape \[100, 64\], expected \[160, 64\]"):
        lmstack.load_model(path)


def test_pickle_only_checkpoint_is_refused(tmp_path, saved):
    _, path = saved
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(LMStackError, match="only pickle weights"):
        lmstack.load_model(path)


def test_loading_does_not_copy_the_weights(tmp_path):
    """A model loads memory-mapped: peak memory grows by about one copy of the weights, not two."""
    model = DecoderLM(ModelConfig(vocab_size=8192, n_layer=8, n_embd=1024, n_head=8, norm="rmsnorm",
                                  positions="rope", mlp="swiglu", bias="none", tie_embeddings=False,
                                  family="llama"))
    lmstack.save_model(model, tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    assert size > 300e6
    del model
    script = textwrap.dedent(f"""
        import resource, torch, lmstack
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = lmstack.load_model({str(tmp_path)!r})
        total = sum(p.float().sum().item() for p in model.parameters())  # touch every weight
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(after - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grown = int(out.stdout.strip().splitlines()[-1])
    assert grown < 1.5 * size, f"peak memory grew by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"


# ---------------------------------------------------------------------------------------------- what a family holds


def _llama_json(**changes) -> dict:
    return {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, **changes}


@pytest.mark.parametrize("family, changes", [
    ("llama", {}), ("mistral", {}), ("qwen2", {"bias": "qkv"}), ("mixtral", {"n_expert": 4}),
])
def test_partial_rotary_is_refused_where_transformers_ignores_it(family, changes, tmp_path):
    model = DecoderLM(ModelConfig.from_name("tiny-llama", family=family, rotary_fraction=0.5, **changes))
    with pytest.raises(LMStackError, match=f"Hugging Face '{family}': rotary_fraction=0.5 .*only 'phi3'"):
        lmstack.save_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()  # refused before anything is written


def test_partial_rotary_is_kept_for_phi3():
    config = ModelConfig.from_name("tiny-llama", family="phi3", rotary_fraction=0.5)
    assert config.to_hf()["partial_rotary_factor"] == 0.5
    assert ModelConfig.from_hf(config.to_hf()).rotary_fraction == 0.5


@pytest.mark.parametrize("spelling", [
    {"partial_rotary_factor": 0.5},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
])
def test_partial_rotary_factor_is_ignored_for_llama(spelling):
    """transformers' Llama rotates every dimension whatever partial_rotary_factor says; so does lmstack."""
    assert ModelConfig.from_hf(_llama_json(**spelling)).rotary_fraction == 1.0


def test_partial_rotary_with_rope_scaling_is_refused_for_llama():
    """There transformers' scaled RoPE is partial but its attention is not: it fails, and lmstack refuses."""
    config = _llama_json(partial_rotary_factor=0.5, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(LMStackError, match=r"partial_rotary_factor=0.5 with 'linear' rope scaling"):
        ModelConfig.from_hf(config)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
])
def test_phi3_rope_scaling_is_refused(scaling):
    config = ModelConfig.from_name("tiny-llama", family="phi3", rope_scaling=scaling)
    with pytest.raises(LMStackError, match=f"'phi3': rope_scaling type '{scaling['rope_type']}' .*longrope"):
        config.to_hf()
    # Read back, transformers takes a Phi-3 'yarn' for longrope and refuses the others: so does lmstack.
    hf = {**ModelConfig.from_name("tiny-llama", family="phi3").to_hf(), "rope_scaling": scaling}
    with pytest.raises(LMStackError, match=f"phi3 with rope scaling type '{scaling['rope_type']}'"):
        ModelConfig.from_hf(hf)


def test_mixtral_without_renormalisation_is_refused(tmp_path):
    model = DecoderLM(ModelConfig.from_name("tiny-mixtral", moe_renormalize=False))
    with pytest.raises(LMStackError, match=r"'mixtral': moe_renormalize=False \(needs True\)"):
        lmstack.save_model(model, tmp_path)


@pytest.mark.parametrize("mlp, approximate, act", [
    ("geglu", "none", "gelu"), ("geglu", "tanh", "gelu_pytorch_tanh"), ("swiglu", "tanh", "silu"),
])
def test_gated_mlp_activation_round_trips(mlp, approximate, act):
    config = ModelConfig.from_name("tiny-llama", mlp=mlp, gelu_approximate=approximate)
    assert config.to_hf()["hidden_act"] == act
    again = ModelConfig.from_hf(config.to_hf())
    assert (again.mlp, again.gelu_approximate) == (mlp, approximate)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err


def test_cli_subprocess_exit_code(tmp_path):
    run = subprocess.run([sys.executable, "-m", "lmstack.cli", "convert", str(tmp_path), str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip() == f"error: {tmp_path}: no config.json (not a Hugging Face checkpoint directory)"


def test_cli_tokenizer_train_and_convert(tmp_path, capsys):
    corpus = REPO / "data" / "tinyshakespeare.txt"
    small = tmp_path / "small.txt"
    small.write_text(corpus.read_text()[:50_000])
    assert main(["tokenizer", "train", "--input", str(small), "--vocab-size", "400", "--output",
                 str(tmp_path / "tok"), "--chat-template", "chatml"]) == 0
    tok = lmstack.load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == 400 and tok.chat_template
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "tok"), "ROMEO:"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == tok.encode("ROMEO:")

    model = DecoderLM(ModelConfig.from_name("tiny-llama", vocab_size=400))
    lmstack.save_model(model, tmp_path / "m", tokenizer=tok)
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "m16"), "--dtype", "bfloat16"]) == 0
    converted = lmstack.load_model(tmp_path / "m16")
    assert converted.embed.weight.dtype == torch.bfloat16
    assert torch.equal(converted.embed.weight, model.embed.weight.to(torch.bfloat16))
    assert lmstack.load_tokenizer(tmp_path / "m16").encode("ROMEO:") == tok.encode("ROMEO:")
    assert main(["info", str(tmp_path / "m16")]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.index("{"):])
    assert info["parameters"] == model.num_params() and info["config"]["vocab_size"] == 400


def test_a_tensor_in_two_shards_is_named(tmp_path):
    """Two copies of one tensor (a stale shard): which is the model's is not guessed."""
    from safetensors.torch import save_file

    from lmstack.checkpoints.hf import TensorSource

    save_file({"a": torch.zeros(2), "b": torch.ones(2)}, str(tmp_path / "one.safetensors"))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(LMStackError, match=r"tensor 'b' is in both .*one.safetensors and .*two.safetensors"):
        TensorSource([tmp_path / "one.safetensors", tmp_path / "two.safetensors"])


@pytest.mark.parametrize("changes, match", [
    (dict(num_attention_heads=3), r"config.json: num_key_value_heads=2: must divide num_attention_heads \(3\)"),
    (dict(num_hidden_layers=0), r"config.json: num_hidden_layers=0: must be a positive integer"),
    (dict(model_type=None, architectures=["FooForCausalLM"]), r"no model_type \(architectures: \['FooForCausalLM'\]\)"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1),
     r"use_sliding_window with max_window_layers=1: qwen2 with sliding windows on only some layers"),
])
def test_a_refused_config_names_its_config_json_key(changes, match, tmp_path):
    from lmstack.checkpoints.hf import config_from_hf

    config = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(LMStackError, match=match):
        config_from_hf(tmp_path)


def test_gpt2_attention_scaling_variants_are_named():
    from lmstack.checkpoints.hf import config_from_hf

    config = dict(model_type="gpt2", vocab_size=10, n_layer=1, n_embd=8, n_head=2)
    for key, value in (("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True)):
        with pytest.raises(LMStackError, match=rf"{key}={value}: GPT-2's attention scaling variants"):
            config_from_hf({**config, key: value}, where="config.json")
