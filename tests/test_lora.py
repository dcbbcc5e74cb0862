"""LoRA: identity at step 0, only adapters train, merge/unmerge, PEFT interoperability, real-shape counts."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import lmstack
from lmstack import LMStackError, ModelConfig
from lmstack.train.lora import (
    apply_lora,
    load_peft,
    merge_lora,
    parameter_counts,
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


def test_adapter_for_another_base_names_the_shapes(tmp_path):
    model = _tiny()
    apply_lora(model, r=4)
    save_peft(model, tmp_path)
    other = lmstack.DecoderLM(ModelConfig.from_name("tiny-llama", n_embd=96, n_head=4, n_kv_head=2))
    with pytest.raises(LMStackError, match=r"lora_A.weight has shape \[4, 64\], the base model's layers.0.attn.q"):
        load_peft(other, tmp_path)
    with pytest.raises(LMStackError, match="unknown LoRA targets"):
        apply_lora(_tiny(), targets=("query",))
