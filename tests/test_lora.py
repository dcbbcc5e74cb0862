"""LoRA: identity at step 0, only adapters train, merge/unmerge, PEFT interoperability, real-shape counts;
QLoRA on an NF4 base."""

import copy
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import lmstack
from lmstack import LMStackError, ModelConfig
from lmstack.quantize import NF4Linear, model_bytes, quantize_model
from lmstack.train.lora import (
    LoRALinear,
    apply_lora,
    load_adapter_weights,
    load_peft,
    lora_layers,
    merge_and_unload,
    merge_lora,
    parameter_counts,
    prepare_qlora,
    save_peft,
    set_adapters_enabled,
    unmerge_lora,
)


def _tiny():
    torch.manual_seed(0)
    return lmstack.DecoderLM(ModelConfig.from_name("tiny-llama")).eval()


def test_starts_as_the_base_model_and_only_adapters_train():
    model = _tiny()
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        before = model(ids)
    apply_lora(model, r=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down"))
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    model.train()
    _, loss = model(ids, ids)
    loss.backward()
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


def test_merge_unmerge_and_disable():
    model = _tiny()
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        base = model(ids)
    apply_lora(model, r=4, alpha=16)
    for _, p in model.named_parameters():
        if "lora_B" in _:
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        adapted = model(ids)
        assert (adapted - base).abs().max() > 1e-3
        merge_lora(model)
        assert torch.allclose(model(ids), adapted, atol=1e-5)
        unmerge_lora(model)
        assert torch.allclose(model(ids), adapted, atol=1e-5)
        set_adapters_enabled(model, False)
        assert torch.allclose(model(ids), base, atol=1e-6)
        set_adapters_enabled(model, True)
        merge_lora(model)  # disabling a merged adapter unmerges it: the base model again
        set_adapters_enabled(model, False)
        assert torch.allclose(model(ids), base, atol=1e-5)
        set_adapters_enabled(model, True)
        assert torch.allclose(model(ids), adapted, atol=1e-5)
        set_adapters_enabled(model, False)  # merged while disabled: still the base model, as in PEFT
        merge_lora(model)
        assert torch.allclose(model(ids), base, atol=1e-5)
        set_adapters_enabled(model, True)
        assert torch.allclose(model(ids), adapted, atol=1e-5)
    with pytest.raises(LMStackError, match="already has LoRA adapters"):
        apply_lora(model, r=2, targets=("k",))


def test_adapters_on_a_half_precision_base_are_float32():
    """As PEFT's autocast_adapter_dtype: bf16 adapters would round small updates away."""
    model = _tiny().to(torch.bfloat16)
    apply_lora(model, r=4, alpha=8)
    layer = model.layers[0].attn.q
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    torch.nn.init.normal_(layer.lora_B, std=0.5)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        adapted = model(ids)
        assert adapted.dtype == torch.bfloat16
        merge_lora(model)
        assert layer.base.weight.dtype == torch.bfloat16 and (model(ids).float() - adapted.float()).abs().max() < 0.1
        unmerge_lora(model)
    model.train()
    _, loss = model(ids, ids)
    loss.backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.dtype == torch.float32


def test_save_model_refuses_a_model_with_adapters(tmp_path):
    """save_model would write wrapped names no loader reads: it points to save_peft or merge_and_unload."""
    from lmstack.train.lora import merge_and_unload

    model = apply_lora(_tiny(), r=4, alpha=8)
    merge_lora(model)  # merged but still wrapped
    with pytest.raises(LMStackError, match="has LoRA adapters: save them as a PEFT adapter"):
        lmstack.save_model(model, tmp_path / "m")
    qlora = prepare_qlora(_tiny(), r=4, targets=("q", "v"))
    with pytest.raises(LMStackError, match="save_peft"):
        lmstack.save_model(qlora, tmp_path / "q")
    assert not (tmp_path / "m").exists() and not (tmp_path / "q").exists()
    lmstack.save_model(merge_and_unload(model), tmp_path / "m")  # an ordinary model again
    assert lmstack.load_model(tmp_path / "m").layers[0].attn.q.weight.shape == model.layers[0].attn.q.weight.shape


def test_llama_3_1_8b_trainable_count_on_meta():
    cfg = ModelConfig.from_name("tinyllama-1.1b", vocab_size=128256, n_layer=32, n_embd=4096, n_head=32,
                                n_kv_head=8, intermediate_size=14336, head_dim=128)
    with torch.device("meta"):
        model = apply_lora(lmstack.DecoderLM(cfg), r=8, alpha=16, targets=("q", "v"))
    trainable, total = parameter_counts(model)
    assert trainable == 3_407_872
    assert total - trainable == 8_030_261_248  # Llama-3.1-8B
    assert f"{trainable / total:.2%}" == "0.04%"


def test_lora_textbook_counts():
    for n, expected in ((1024, 16_384), (4096, 65_536)):
        with torch.device("meta"):
            layer = torch.nn.Linear(n, n, bias=False)
            wrapped = torch.nn.Sequential()
            wrapped.q = layer
            apply_lora(wrapped, r=8, targets=("q",))
        assert parameter_counts(wrapped)[0] == expected


def test_peft_loads_our_adapters_with_identical_logits(tmp_path):
    hf_config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=112,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(tmp_path / "base")
    ours = lmstack.load_model(tmp_path / "base")
    apply_lora(ours, r=4, alpha=8, targets=("q", "v", "down"))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    save_peft(ours, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))

    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(0, 101, (3, 12))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() < 1e-4
        again = load_peft(lmstack.load_model(tmp_path / "base"), tmp_path / "adapter")
        assert torch.allclose(again(ids), ours(ids), atol=1e-6)
    with pytest.raises(LMStackError, match="already has LoRA adapters"):
        load_peft(again, tmp_path / "adapter")
    # an adapter directory loads as its base merged, in the base's own precision unless told otherwise
    AutoModelForCausalLM.from_config(hf_config).to(torch.bfloat16).save_pretrained(tmp_path / "half")
    save_peft(ours, tmp_path / "half-adapter", base_model_name_or_path=str(tmp_path / "half"))
    assert lmstack.load_model(tmp_path / "half-adapter").embed.weight.dtype == torch.bfloat16
    assert lmstack.load_model(tmp_path / "half-adapter", dtype="float32").embed.weight.dtype == torch.float32


def _random_b(model, std=0.3):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)


# GPT-2 fuses q/k/v into c_attn (a Conv1D); Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj.
FUSED = {
    "gpt2": (dict(n_embd=64, n_head=4, vocab_size=101, block_size=64),
             ("q", "v", "up", "o"),
             {"transformer.h.0.attn.c_attn": 8, "transformer.h.0.attn.c_proj": 4, "transformer.h.0.mlp.c_fc": 4},
             ["c_attn", "c_fc", "h.0.attn.c_proj", "h.1.attn.c_proj"], "c_attn"),
    "phi3": (dict(family="phi3", vocab_size=101),
             ("q", "k", "v", "gate", "down"),
             {"model.layers.0.self_attn.qkv_proj": 12, "model.layers.0.mlp.gate_up_proj": 4,
              "model.layers.0.mlp.down_proj": 4},
             ["down_proj", "gate_up_proj", "qkv_proj"], "qkv_proj"),
}


@pytest.mark.parametrize("family, use_rslora", [("gpt2", False), ("phi3", True)])
def test_adapters_on_fused_layers_round_trip_through_peft(tmp_path, family, use_rslora):
    """Adapters on the parts of a fused layer are one PEFT adapter of the summed rank with identical outputs,
    and read back into the same parts and ranks; a dense PEFT adapter on a fused layer loads as well."""
    from peft import LoraConfig, PeftModel, get_peft_model

    changes, targets, ranks, target_modules, fused = FUSED[family]
    torch.manual_seed(0)
    lmstack.save_model(lmstack.DecoderLM(ModelConfig.from_name("gpt2" if family == "gpt2" else "tiny-llama",
                                                                n_layer=2, **changes)), tmp_path / "base")
    ours = apply_lora(lmstack.load_model(tmp_path / "base"), r=4, alpha=8, targets=targets, use_rslora=use_rslora)

    def ranks_of(model):
        return {n: (m.r, m.scaling) for n, m in lora_layers(model)}

    # Saved untrained (B zero), the adapters still split back into their own layers and ranks.
    save_peft(ours, tmp_path / "untrained")
    assert ranks_of(load_peft(lmstack.load_model(tmp_path / "base"), tmp_path / "untrained")) == ranks_of(ours)
    _random_b(ours)
    save_peft(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == target_modules and config["fan_in_fan_out"] == (family == "gpt2")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {m: saved[f"base_model.model.{m}.lora_A.weight"].shape[0] for m in ranks} == ranks  # summed ranks
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        expected = ours(ids)
        assert (expected - lmstack.load_model(tmp_path / "base")(ids)).abs().max() > 1e-2  # the adapter matters
        assert (theirs(ids).logits - expected).abs().max() < 1e-4
        # Read back: the same layers and ranks (k has none on GPT-2), the same outputs; resuming copies exactly.
        again = load_peft(lmstack.load_model(tmp_path / "base"), tmp_path / "adapter")
        assert ranks_of(again) == ranks_of(ours)
        assert (again(ids) - expected).abs().max() < 1e-5
        resumed = apply_lora(lmstack.load_model(tmp_path / "base"), r=4, alpha=8, targets=targets,
                             use_rslora=use_rslora)
        load_adapter_weights(resumed, tmp_path / "adapter")
        assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), ours.state_dict().values()))

    # An adapter peft trained on the fused layers themselves: every part gets the whole A and its rows of B.
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=use_rslora))
    _random_b(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = load_peft(lmstack.load_model(tmp_path / "base"), tmp_path / "peft")
    assert loaded.layers[0].attn.k.r == 4
    with torch.no_grad():
        assert (peft_model.eval()(ids).logits - loaded(ids)).abs().max() < 1e-4
    # Untrained (B zero), every part keeps the whole rank, so training can go on from it.
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=[fused]))
    fresh.save_pretrained(tmp_path / "fresh")
    loaded = load_peft(lmstack.load_model(tmp_path / "base"), tmp_path / "fresh")
    assert [m.r for _, m in lora_layers(loaded)] == [4] * 6


def test_mixture_of_experts_takes_adapters_on_attention(tmp_path):
    """Mixtral's attention adapters round-trip through peft; its experts, one fused tensor per layer in
    transformers, have no PEFT module, so adapters there are refused by name."""
    from peft import PeftModel

    torch.manual_seed(0)
    lmstack.save_model(lmstack.DecoderLM(ModelConfig.from_name("tiny-mixtral", vocab_size=101)), tmp_path / "base")
    ours = apply_lora(lmstack.load_model(tmp_path / "base"), r=4, alpha=8, targets=("q", "k", "v", "o"))
    _random_b(ours)
    save_peft(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                       tmp_path / "adapter").eval()
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() < 1e-4
    on_experts = apply_lora(lmstack.load_model(tmp_path / "base"), r=4, targets=("q", "up"))
    with pytest.raises(LMStackError, match="experts of a mixture-of-experts model has no PEFT format"):
        save_peft(on_experts, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dora_matches_peft_both_ways_and_merges(tmp_path, family):
    """DoRA: lmstack's adapters load in peft with the same logits, peft's load in lmstack, fused GPT-2 layers
    included; merging gives the same outputs and unmerging restores the base weights."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    config = (ModelConfig.from_name("gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=101, block_size=64)
              if family == "gpt2" else ModelConfig.from_name("tiny-llama", vocab_size=101))
    lmstack.save_model(lmstack.DecoderLM(config), tmp_path / "base")
    ids = torch.randint(0, 101, (2, 12))
    ours = apply_lora(lmstack.load_model(tmp_path / "base"), r=4, alpha=8, targets=("q", "v", "up"), use_dora=True)
    with torch.no_grad():
        assert torch.equal(ours(ids), lmstack.load_model(tmp_path / "base")(ids))  # m = ||W||: the base
        _random_b(ours)
        for _, layer in lora_layers(ours):
            layer.lora_magnitude.mul_(1 + 0.2 * torch.rand_like(layer.lora_magnitude))
    save_peft(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                       tmp_path / "ours").eval()
    with torch.no_grad():
        expected = ours(ids)
        assert (theirs(ids).logits - expected).abs().max() < 1e-4
        again = load_peft(lmstack.load_model(tmp_path / "base"), tmp_path / "ours")
        assert (again(ids) - expected).abs().max() < 1e-5
        merge_lora(ours)
        assert (ours(ids) - expected).abs().max() < 1e-4
        unmerge_lora(ours)
        base = lmstack.load_model(tmp_path / "base")
        assert (ours.layers[0].attn.q.base.weight - base.layers[0].attn.q.weight).abs().max() < 1e-5
    # peft's own DoRA adapter, on the fused layers for GPT-2
    targets = ["c_attn", "c_fc"] if family == "gpt2" else ["q_proj", "v_proj", "up_proj"]
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = load_peft(lmstack.load_model(tmp_path / "base"), tmp_path / "peft")
    with torch.no_grad():
        assert (peft_model.eval()(ids).logits - loaded(ids)).abs().max() < 1e-4


def test_info_describes_an_adapter_directory_and_its_base(tmp_path, capsys):
    from lmstack.cli import main

    lmstack.save_model(_tiny(), tmp_path / "base")
    model = apply_lora(lmstack.load_model(tmp_path / "base"), r=4, alpha=8, targets=("q", "v"))
    save_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    capsys.readouterr()
    assert main(["info", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.index("{"):])
    assert info["adapter"]["r"] == 4 and info["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert info["adapter_parameters"] == parameter_counts(model)[0]  # A and B of every adapter
    assert info["base"]["parameters"] == _tiny().num_params()


def test_adapter_for_another_base_names_the_shapes(tmp_path):
    model = _tiny()
    apply_lora(model, r=4)
    save_peft(model, tmp_path)
    other = lmstack.DecoderLM(ModelConfig.from_name("tiny-llama", n_embd=96, n_head=4, n_kv_head=2))
    with pytest.raises(LMStackError, match=r"lora_A.weight has shape \[4, 64\], the base model's layers.0.attn.q"):
        load_peft(other, tmp_path)
    with pytest.raises(LMStackError, match="unknown LoRA targets"):
        apply_lora(_tiny(), targets=("query",))


# --- QLoRA: LoRA on a frozen NF4 base ---


@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
def test_qlora_starts_as_the_nf4_base_and_trains_only_adapters(use_dora):
    float_model = _tiny()
    ids = torch.randint(0, 256, (4, 16))
    nf4 = quantize_model(copy.deepcopy(float_model), "nf4", skip=("lm_head",))
    with torch.no_grad():
        base_out = nf4(ids)
    all_linear = ("q", "k", "v", "o", "gate", "up", "down")
    model = prepare_qlora(copy.deepcopy(float_model), r=4, alpha=8, targets=all_linear, use_dora=use_dora)
    q = model.layers[0].attn.q
    assert isinstance(q, LoRALinear) and isinstance(q.base, NF4Linear)
    assert isinstance(model.lm_head, torch.nn.Linear)  # the output head stays float (and frozen)
    assert q.lora_A.dtype == q.lora_B.dtype == torch.float32 and q.base.dtype == torch.bfloat16
    assert q.weight.shape == (64, 64)
    with torch.no_grad():
        assert torch.equal(model(ids), base_out)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == (3 if use_dora else 2) * 7 * 2  # A and B (and DoRA's m) on 7 layers in 2 blocks
    assert model_bytes(nf4) < 0.5 * model_bytes(float_model)

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(12):
        _, loss = model(ids, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    assert torch.equal(model.layers[0].attn.q.base.qweight, nf4.layers[0].attn.q.qweight)  # base untouched


def test_qlora_adapter_loads_onto_the_float_base(tmp_path):
    float_model = _tiny()
    ids = torch.randint(0, 256, (2, 10))
    qlora = prepare_qlora(copy.deepcopy(float_model), r=4, alpha=8, targets=("q", "v", "down"))
    plain = apply_lora(copy.deepcopy(float_model), r=4, alpha=8, targets=("q", "v", "down"))
    with torch.no_grad():
        for name, p in qlora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    with pytest.raises(LMStackError, match="cannot merge LoRA into a 4-bit NF4 base"):
        merge_lora(qlora)
    save_peft(qlora, tmp_path / "qlora")
    save_peft(plain, tmp_path / "plain")
    ours = load_file(tmp_path / "qlora" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
    config = json.loads((tmp_path / "qlora" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"] and config["r"] == 4

    loaded = load_peft(copy.deepcopy(float_model), tmp_path / "qlora")
    assert isinstance(loaded.layers[1].mlp.down.base, torch.nn.Linear)
    for (name, a), (_, b) in zip(lora_layers(qlora), lora_layers(loaded)):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B), name
    with torch.no_grad():
        adapted, quantized = loaded(ids), qlora(ids)
        assert (adapted - float_model(ids)).abs().max() > 0.1  # the adapter changes the float model ...
        assert (adapted - quantized).norm() < 0.15 * adapted.norm()  # ... as it changed the NF4 one
        merge_lora(loaded)  # on the float base, merging works
        assert torch.allclose(loaded(ids), adapted, atol=1e-4)
        # And back onto an NF4 base: the same quantization, so exactly the QLoRA model's output.
        nf4 = quantize_model(copy.deepcopy(float_model), "nf4", skip=("lm_head",))
        again = load_peft(nf4, tmp_path / "qlora")
        assert torch.equal(again(ids), quantized)
        # Resuming: the adapter's weights into a freshly prepared QLoRA model.
        resumed = prepare_qlora(copy.deepcopy(float_model), r=4, alpha=8, targets=("q", "v", "down"))
        assert not torch.equal(resumed(ids), quantized)
        load_adapter_weights(resumed, tmp_path / "qlora")
        assert torch.equal(resumed(ids), quantized)
    with pytest.raises(LMStackError, match=r"no LoRA adapters \(apply_lora first\)"):
        load_adapter_weights(_tiny(), tmp_path / "qlora")


def test_prepare_qlora_checks_before_quantizing():
    model = _tiny()
    with pytest.raises(LMStackError, match="unknown LoRA targets"):
        prepare_qlora(model, targets=("query",))
    with pytest.raises(LMStackError, match="LoRA rank r=0"):
        prepare_qlora(model, r=0)
    assert isinstance(model.layers[0].attn.q, torch.nn.Linear)  # left as it was


# --- adapters written by Hugging Face peft ---


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A tiny random Hugging Face Llama checkpoint."""
    path = tmp_path_factory.mktemp("hf") / "base"
    hf_config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=112,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(path)
    return path


def _peft_adapter(hf_base, path, **settings):
    """A peft LoRA adapter on `hf_base` with non-zero B, saved to `path`; returns the peft model."""
    from peft import LoraConfig, get_peft_model

    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **settings}
    torch.manual_seed(1)
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_base), LoraConfig(**settings))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    theirs.save_pretrained(path)
    return theirs.eval()


@pytest.mark.parametrize("settings", [
    {"use_rslora": True, "rank_pattern": {"v_proj": 2}},  # alpha / sqrt(r), each layer with its own r
    {"alpha_pattern": {"v_proj": 32}, "rank_pattern": {"layers.1.self_attn.q_proj": 8}},
    {"target_modules": "all-linear", "exclude_modules": ["layers.1.mlp.down_proj"], "use_rslora": True},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]},
    {"target_modules": ["v_proj", "up_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
], ids=["rslora+rank_pattern", "alpha+rank_pattern", "all-linear+exclude", "layers_to_transform",
        "layers_to_transform+pattern"])
def test_load_peft_applies_peft_scaling_and_patterns(hf_base, tmp_path, settings):
    from peft import PeftModel

    theirs = _peft_adapter(hf_base, tmp_path / "peft", **settings)
    ours = load_peft(lmstack.load_model(hf_base), tmp_path / "peft").eval()
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        expected = theirs(ids).logits
        assert (expected - lmstack.load_model(hf_base)(ids)).abs().max() > 1e-2  # the adapter matters
        assert (expected - ours(ids)).abs().max() < 1e-4
    # Saved again by lmstack, the adapter states the same settings: peft and lmstack both get the same model.
    save_peft(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_rslora"] == settings.get("use_rslora", False) and config["bias"] == "none"
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_base), tmp_path / "ours").eval()
    reloaded = load_peft(lmstack.load_model(hf_base), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (again(ids).logits - expected).abs().max() < 1e-4
        assert (reloaded(ids) - expected).abs().max() < 1e-4


def test_a_classifier_adapter_peft_trained_loads_with_its_head(hf_base, tmp_path):
    """A PEFT SEQ_CLS adapter (LoRA on the body, the score head saved whole) loads as a classifier, with
    Hugging Face's default label names, scoring as peft does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from lmstack.models.classifier import SequenceClassifier

    torch.manual_seed(2)
    hf = AutoModelForSequenceClassification.from_pretrained(hf_base, num_labels=3)
    theirs = get_peft_model(hf, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                           target_modules=["q_proj", "v_proj"]))
    _random_b(theirs)
    theirs.save_pretrained(tmp_path)
    assert "score" in json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    model = lmstack.load_model(tmp_path)
    assert isinstance(model, SequenceClassifier) and model.labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        assert (theirs.eval()(ids).logits - model(ids)).abs().max() < 1e-4
    # Without its head the adapter is no classifier: the error names what is missing.
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors["base_model.model.score.weight"]
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(LMStackError, match="a SEQ_CLS adapter without its head"):
        lmstack.load_model(tmp_path)


def test_rslora_adapters_of_lmstack_load_in_peft(hf_base, tmp_path):
    from peft import PeftModel

    ours = apply_lora(lmstack.load_model(hf_base), r=4, alpha=8, targets=("q", "v"), use_rslora=True)
    assert ours.layers[0].attn.q.scaling == 8 / 2  # alpha / sqrt(r)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    save_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["rank_pattern"] == config["alpha_pattern"] == {}
    assert config["use_dora"] is False and config["modules_to_save"] is None
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_base), tmp_path).eval()
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() < 1e-4


@pytest.mark.parametrize("settings, message", [
    ({"lora_bias": True}, r"PEFT setting lora_bias=True \(a bias on lora_B\)"),
    ({"bias": "lora_only", "lora_bias": True},
     r"PEFT settings lora_bias=True \(a bias on lora_B\), bias='lora_only' \(trained biases\)"),
])
def test_load_peft_refuses_settings_it_cannot_apply(hf_base, tmp_path, settings, message):
    _peft_adapter(hf_base, tmp_path, **settings)
    model = lmstack.load_model(hf_base)
    with pytest.raises(LMStackError, match=message):
        load_peft(model, tmp_path)
    assert not lora_layers(model)  # left as it was


def test_load_peft_refuses_unknown_settings_and_unused_tensors(hf_base, tmp_path):
    from safetensors.torch import save_file

    _peft_adapter(hf_base, tmp_path)
    model = lmstack.load_model(hf_base)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_some_new_variant": True}))
    with pytest.raises(LMStackError, match="PEFT setting use_some_new_variant=True"):
        load_peft(model, tmp_path)
    config_file.write_text(json.dumps(config))
    # A tensor the file holds but lmstack would not use (here a bias on B) is named, not dropped.
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    bias = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    tensors[bias] = torch.zeros(64)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(LMStackError, match=rf"lmstack cannot apply: {bias}$"):
        load_peft(model, tmp_path)
    assert not lora_layers(model)
    apply_lora(model, r=4, alpha=8, targets=("q", "v"))
    with pytest.raises(LMStackError, match=bias):
        load_adapter_weights(model, tmp_path)


def _hf_llama(path, tie=False, vocab=101):
    hf_config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(path)
    return path


def _trained_peft(base, path, resize=0, **settings):
    """A peft adapter on `base` (its vocabulary first grown by `resize` rows) with non-zero B and every module
    it saves whole changed, saved to `path`; returns the peft model."""
    from peft import LoraConfig, get_peft_model

    hf = AutoModelForCausalLM.from_pretrained(base)
    if resize:
        hf.resize_token_embeddings(hf.config.vocab_size + resize)
    torch.manual_seed(3)
    settings = {"target_modules": ["q_proj", "v_proj"], **settings}
    theirs = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, **settings))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.3)
    theirs.save_pretrained(path)
    return theirs.eval()


@pytest.mark.parametrize("tie, settings", [
    (False, {"modules_to_save": ["lm_head", "embed_tokens", "norm"]}),  # "norm" also ends every layer's norms
    (True, {"modules_to_save": ["embed_tokens"]}),  # PEFT trains a copy of the embedding: the head is untied
    (True, {"modules_to_save": ["embed_tokens"], "ensure_weight_tying": True}),  # the copy is both
], ids=["untied", "tied", "ensure_weight_tying"])
def test_modules_peft_saved_whole_replace_the_base(tmp_path, tie, settings):
    import warnings

    base = _hf_llama(tmp_path / "base", tie=tie)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about tied modules
        theirs = _trained_peft(base, tmp_path / "peft", **settings)
    ours = load_peft(lmstack.load_model(base), tmp_path / "peft").eval()
    assert ours.config.tie_embeddings == (tie and settings.get("ensure_weight_tying", False))
    assert (ours.lm_head.weight is ours.embed.weight) == ours.config.tie_embeddings
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        expected = theirs(ids).logits
        assert (expected - ours(ids)).abs().max() < 1e-4
    # Saved again by lmstack, the adapter holds the same modules whole: peft and lmstack read the same model.
    _same_after_save_peft(ours, base, tmp_path / "ours", ids, expected)
    # Merged and saved as a checkpoint, the whole modules stay: transformers reads the same model.
    lmstack.save_model(merge_and_unload(ours), tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (again(ids).logits - expected).abs().max() < 1e-4


def _same_after_save_peft(model, base, path, ids, expected, resize=0):
    from peft import PeftModel

    save_peft(model, path)
    hf = AutoModelForCausalLM.from_pretrained(base)
    if resize:
        hf.resize_token_embeddings(hf.config.vocab_size + resize)
    again = PeftModel.from_pretrained(hf, path).eval()
    reloaded = load_peft(lmstack.load_model(base), path).eval()
    with torch.no_grad():
        assert (again(ids).logits - expected).abs().max() < 1e-4
        assert (reloaded(ids) - expected).abs().max() < 1e-4


def test_an_adapter_with_a_resized_vocabulary_grows_the_model(tmp_path):
    """Tokens added in finetuning: PEFT saves the grown embedding and head, and lmstack resizes the base to them
    (transformers would need resize_token_embeddings first)."""
    base = _hf_llama(tmp_path / "base")
    theirs = _trained_peft(base, tmp_path / "peft", resize=3, modules_to_save=["embed_tokens", "lm_head"])
    ours = load_peft(lmstack.load_model(base), tmp_path / "peft").eval()
    assert ours.config.vocab_size == ours.embed.num_embeddings == ours.lm_head.out_features == 104
    ids = torch.tensor([[1, 102, 5, 103, 101, 7]])  # the new tokens in and out
    with torch.no_grad():
        expected = theirs(ids).logits
        assert expected.shape[-1] == 104 and (expected - ours(ids)).abs().max() < 1e-4
    _same_after_save_peft(ours, base, tmp_path / "ours", ids, expected, resize=3)


def test_the_embedding_and_head_peft_saves_by_themselves_are_applied(tmp_path):
    """After a vocabulary resize PEFT saves the embedding and the head even without modules_to_save
    (save_embedding_layers) and loads them into the base: so does lmstack."""
    from peft import PeftModel

    base = _hf_llama(tmp_path / "base")
    _trained_peft(base, tmp_path / "peft")
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    torch.manual_seed(4)
    tensors["base_model.model.lm_head.weight"] = torch.randn(101, 64)
    save_file(tensors, tmp_path / "peft" / "adapter_model.safetensors")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "peft").eval()
    ours = load_peft(lmstack.load_model(base), tmp_path / "peft").eval()
    assert torch.equal(ours.lm_head.weight, tensors["base_model.model.lm_head.weight"])
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() < 1e-4


def test_whole_modules_that_do_not_fit_are_named(tmp_path):
    base = _hf_llama(tmp_path / "base")
    model = lmstack.load_model(base)
    _trained_peft(base, tmp_path / "a", modules_to_save=["embed_tokens", "no_such_module"])
    with pytest.raises(LMStackError, match=r"modules_to_save \['no_such_module'\] match no module"):
        load_peft(model, tmp_path / "a")
    # The embedding grew but the (untied) head did not come along: the vocabulary sizes cannot agree.
    _trained_peft(base, tmp_path / "b", resize=3, modules_to_save=["embed_tokens"])
    tensors = load_file(tmp_path / "b" / "adapter_model.safetensors")
    tensors.pop("base_model.model.lm_head.weight", None)  # PEFT's save_embedding_layers may have kept it
    save_file(tensors, tmp_path / "b" / "adapter_model.safetensors")
    with pytest.raises(LMStackError, match=r"embed_tokens.weight has 104 rows, resized from the base model's 101, "
                                           r"but the adapter holds no lm_head.weight"):
        load_peft(model, tmp_path / "b")
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    config["modules_to_save"] = ["q_proj"]
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LMStackError, match="q_proj is both a LoRA target and in modules_to_save"):
        load_peft(model, tmp_path / "b")
    assert not lora_layers(model) and model.config.vocab_size == 101  # left as it was
    # A saved module's tensor missing from the file is named.
    _trained_peft(base, tmp_path / "c", modules_to_save=["norm"])
    tensors = load_file(tmp_path / "c" / "adapter_model.safetensors")
    del tensors["base_model.model.model.norm.weight"]
    save_file(tensors, tmp_path / "c" / "adapter_model.safetensors")
    with pytest.raises(LMStackError, match="missing tensor 'model.norm.weight'"):
        load_peft(model, tmp_path / "c")
    # A tied base whose embedding alone grew: PEFT would keep the base's head of the old size.
    tied = _hf_llama(tmp_path / "tied", tie=True)
    _trained_peft(tied, tmp_path / "d", resize=3, modules_to_save=["embed_tokens"])
    tensors = {k: v for k, v in load_file(tmp_path / "d" / "adapter_model.safetensors").items()
               if not k.startswith("base_model.model.lm_head.")}  # as save_embedding_layers=False writes it
    save_file(tensors, tmp_path / "d" / "adapter_model.safetensors")
    with pytest.raises(LMStackError, match="but the adapter holds no lm_head.weight of that size"):
        load_peft(lmstack.load_model(tied), tmp_path / "d")


def test_whole_modules_on_a_quantized_head(tmp_path):
    """An NF4 base (its untied head quantized): a saved embedding applies, a saved head is refused, and the
    model is left as it was."""
    base = _hf_llama(tmp_path / "base")
    _trained_peft(base, tmp_path / "embed", modules_to_save=["embed_tokens"])
    _trained_peft(base, tmp_path / "head", modules_to_save=["lm_head"])
    model = quantize_model(lmstack.load_model(base), "nf4", group_size=32)
    assert isinstance(model.lm_head, NF4Linear)
    with pytest.raises(LMStackError, match="holds lm_head.weight whole, which this model holds quantized"):
        load_peft(model, tmp_path / "head")
    assert not lora_layers(model)
    embed = load_file(tmp_path / "embed" / "adapter_model.safetensors")["base_model.model.model.embed_tokens.weight"]
    assert torch.equal(load_peft(model, tmp_path / "embed").embed.weight, embed)


def test_gpt2_wte_saved_whole_follows_peft(tmp_path):
    """GPT-2's embedding is `wte`, which PEFT's ensure_weight_tying does not know: PEFT keeps the head tied to
    the base's embedding, and so does lmstack (untied from the trained copy); saved again, peft agrees."""
    import warnings

    base = tmp_path / "base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101,
                                                             n_positions=64)).save_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _trained_peft(base, tmp_path / "peft", target_modules=["c_attn"], modules_to_save=["wte"],
                               ensure_weight_tying=True)
    ours = load_peft(lmstack.load_model(base), tmp_path / "peft").eval()
    assert not ours.config.tie_embeddings
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        expected = theirs(ids).logits
        assert (expected - ours(ids)).abs().max() < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _same_after_save_peft(ours, base, tmp_path / "ours", ids, expected)
