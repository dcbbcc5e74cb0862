"""oneDNN linear layers on the CPU: same numbers as PyTorch's default path, forward and backward, and the
model left as it was."""

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F

import lmstack
from lmstack import onednn
from lmstack.onednn import PackedLinear, PackedLinears, onednn_available, onednn_linears
from lmstack.train.lora import apply_lora

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no usable oneDNN")


@needs_onednn
def test_packed_linears_compute_the_same_and_leave_the_model_alone():
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", bias="all")).eval()
    ids = torch.randint(0, 256, (2, 9))
    packed = PackedLinears(model, enabled=True)
    assert len(packed.slots) == 7 * model.config.n_layer + 1  # q k v o gate up down per block, and the head
    with torch.no_grad():
        before = model(ids)
        with packed.swapped_in():
            assert isinstance(model.layers[0].attn.q, PackedLinear)
            inside = model(ids)
        assert type(model.layers[0].attn.q) is torch.nn.Linear
        assert torch.allclose(before, inside, atol=1e-5)
        with pytest.raises(IndexError), packed.swapped_in():
            model(torch.full((1, 3), 10**6))  # an out-of-range token id fails inside the pass
        assert type(model.lm_head) is torch.nn.Linear  # restored after an error too

        # An in-place update (an optimizer step) is seen by the next pass: that layer alone is repacked.
        q = next(i for i, (_, _, linear) in enumerate(packed.slots) if linear is model.layers[0].attn.q)
        old_q, old_k = packed.packed[q], packed.packed[q + 1]
        model.layers[0].attn.q.weight.mul_(2)
        with packed.swapped_in():
            changed = model(ids)
        assert packed.packed[q] is not old_q and packed.packed[q + 1] is old_k
        assert torch.allclose(changed, model(ids), atol=1e-5) and not torch.allclose(changed, before, atol=1e-3)


@needs_onednn
def test_dora_adapters_generate_through_packed_bases():
    """A packed layer stands in for the nn.Linear under a DoRA adapter, which reads its weight for the norms:
    the packed engine gives the unpacked one's tokens."""
    tok = lmstack.Tokenizer.train(["hello world the cat sat on the mat " * 50], 300)
    torch.manual_seed(0)
    model = apply_lora(lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=len(tok))).eval(),
                       r=4, targets=("q", "v"), use_dora=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    runs = [lmstack.Engine(model, tok, pack_weights=pack).generate(["the cat"], max_new_tokens=8, temperature=0)
            for pack in (False, True)]
    assert runs[0][0].token_ids == runs[1][0].token_ids


@needs_onednn
def test_a_model_made_under_inference_mode_generates_through_packed_weights():
    """Inference tensors have no version counter; the packed copies then go by the storage alone."""
    with torch.inference_mode():
        torch.manual_seed(0)
        model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama")).eval()
        ids = torch.randint(0, 256, (1, 7))
        packed = PackedLinears(model, enabled=True)
        with packed.swapped_in():
            inside = model(ids)
        assert torch.allclose(inside, model(ids), atol=1e-5)


@needs_onednn
def test_packed_linears_skip_layers_they_cannot_run():
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama"))
    apply_lora(model, r=2, targets=("q", "v"))
    model.layers[1].mlp.up.to(torch.float16)
    names = {name for _, name, _ in PackedLinears(model, enabled=True).slots}
    assert "q" not in names and "v" not in names and "k" in names  # LoRA layers keep their forward
    assert sum(linear is model.layers[1].mlp.up for _, _, linear in PackedLinears(model, enabled=True).slots) == 0
    assert PackedLinears(model, enabled=False).slots == []


@needs_onednn
@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN runs no bf16 on this CPU")
def test_bf16_layers_are_packed_by_default_and_compute_the_same(monkeypatch):
    """On an Intel CPU float32 layers stay on MKL by default, bf16 ones are packed; the packed bf16 model
    gives the unpacked one's logits (the same oneDNN product, without the per-call reorder)."""
    monkeypatch.setattr(onednn, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.delenv("LMSTACK_ONEDNN", raising=False)
    onednn.onednn_preferred.cache_clear()
    try:
        torch.manual_seed(0)
        model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", bias="all")).eval()
        assert PackedLinears(model).slots == []  # float32 on Intel: MKL
        model.to(torch.bfloat16)
        packed = PackedLinears(model)
        assert len(packed.slots) == 7 * model.config.n_layer + 1
        assert PackedLinears(model, enabled=False).slots == []
        ids = torch.randint(0, 256, (2, 9))
        with torch.no_grad():
            before = model(ids)
            with packed.swapped_in():
                inside = model(ids)
                # A float32 input to a bf16 packed layer keeps PyTorch's own rule (an error), not oneDNN's.
                layer = model.layers[0].attn.q
                with pytest.raises(RuntimeError):
                    layer(torch.randn(1, model.config.n_embd))
        assert inside.dtype == torch.bfloat16
        assert torch.allclose(before.float(), inside.float(), atol=2e-2)
    finally:
        onednn.onednn_preferred.cache_clear()


@needs_onednn
def test_a_model_too_large_to_pack_runs_unpacked_through_onednn():
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama")).eval()
    ids = torch.randint(0, 256, (2, 9))
    packed = PackedLinears(model, enabled=True, max_bytes=1000)
    assert packed.slots == [] and packed.unpacked
    with torch.no_grad():
        expected = model(ids)
        with packed.swapped_in():
            assert type(model.layers[0].attn.q) is torch.nn.Linear  # nothing swapped, no copies made
            ops = _ops_run(lambda: model(ids))
            got = model(ids)
    assert "lmstack::onednn_linear" in ops and torch.allclose(got, expected, atol=1e-5)
    assert PackedLinears(model, enabled=True).slots  # a tiny model fits in half of this machine's memory


def _ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@needs_onednn
def test_onednn_linears_give_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", bias="all"))
    apply_lora(model, r=4, targets=("q", "v"))  # LoRA's own F.linear calls go through it too
    for p in model.parameters():
        p.requires_grad_(True)  # the base weights as well: every gradient path of the op
    other = copy.deepcopy(model)
    ids = torch.randint(0, 256, (3, 17))
    reference = model(ids, ids)[1]
    reference.backward()

    def run():
        with onednn_linears(enabled=True):
            loss = other(ids, ids)[1]
        loss.backward()
        return loss

    assert "lmstack::onednn_linear" in _ops_run(run)
    other.zero_grad()
    loss = run()
    assert torch.allclose(loss, reference, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


@needs_onednn
def test_onednn_linears_leave_other_dtypes_and_autograd_cases_alone():
    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(5, 8, dtype=torch.bfloat16)
    with onednn_linears(enabled=True):
        ops = _ops_run(lambda: F.linear(x, w))
        empty = F.linear(torch.randn(0, 8), torch.randn(5, 8))  # zero rows: PyTorch's path
    assert "lmstack::onednn_linear" not in ops and empty.shape == (0, 5)
    # Only the input needs a gradient (a frozen weight): no weight gradient is computed or returned.
    x = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(5, 8)
    with onednn_linears(enabled=True):
        y = F.linear(x, w)
    y.square().sum().backward()
    expected = torch.autograd.grad(F.linear(x, w).square().sum(), x)[0]
    assert torch.allclose(x.grad, expected, atol=1e-5) and w.grad is None
    x, w = torch.randn(2, 8), torch.randn(5, 8)
    with onednn_linears(enabled=False):
        assert "lmstack::onednn_linear" not in _ops_run(lambda: F.linear(x, w))
    with onednn_linears(enabled=True), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's bf16 product, not ours
        assert "lmstack::onednn_linear" not in _ops_run(lambda: F.linear(x, w))


def test_checking_for_onednn_leaves_the_rng_alone():
    # A resumed run restores the RNG before its first forward pass, which is where the check first runs.
    state = torch.get_rng_state()
    onednn_available.__wrapped__()
    assert torch.equal(state, torch.get_rng_state())


@needs_onednn
def test_onednn_linears_under_torch_compile():
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama"))
    other = copy.deepcopy(model)
    ids = torch.randint(0, 256, (2, 12))
    model(ids, ids)[1].backward()
    compiled = torch.compile(other)
    with onednn_linears(enabled=True):
        loss = compiled(ids, ids)[1]
    loss.backward()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


@needs_onednn
def test_activation_checkpointing_recomputes_through_onednn():
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama")).train()
    ids = torch.randint(0, 256, (2, 16))
    with onednn_linears(enabled=True):
        loss = model(ids, ids)[1]
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    with onednn_linears(enabled=True):
        loss2 = model(ids, ids)[1]
    loss2.backward()  # the recomputation saves what the forward saved (no CheckpointError) and matches it
    assert torch.equal(loss, loss2)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


@needs_onednn
def test_odd_biases_take_pytorchs_path():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    for bias in (torch.tensor(0.5), torch.randn(1)):  # broadcast biases F.linear accepts
        with onednn_linears(enabled=True):
            ops = _ops_run(lambda bias=bias: F.linear(x, w, bias))
            got = F.linear(x, w, bias)
        assert "lmstack::onednn_linear" not in ops and torch.allclose(got, x @ w.T + bias)


@needs_onednn
def test_a_layer_replaced_after_packing_is_left_in_place():
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama")).eval()
    packed = PackedLinears(model, enabled=True)
    apply_lora(model, r=2, targets=("q",))
    lora = model.layers[0].attn.q
    with torch.no_grad(), packed.swapped_in():
        assert model.layers[0].attn.q is lora
        model(torch.randint(0, 256, (1, 5)))
    assert model.layers[0].attn.q is lora and type(model.layers[0].attn.k) is torch.nn.Linear


def test_an_engine_and_its_packed_copies_are_freed_when_dropped():
    tok = lmstack.Tokenizer.train_chars(["abcdefgh "])
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", vocab_size=len(tok)))
    engine = lmstack.Engine(model, tok)
    engine.generate(["abc"], max_new_tokens=3)
    alive = weakref.ref(engine)
    del engine  # no reference cycle: freed at once, not at the next garbage collection
    assert alive() is None


@needs_onednn
@pytest.mark.parametrize("vendor, forced, expected", [
    ("AuthenticAMD", "", True), ("GenuineIntel", "", False), (None, "", True),
    ("GenuineIntel", "1", True), ("AuthenticAMD", "0", False), ("GenuineIntel", "On", True),
    ("AuthenticAMD", "false", False),
])
def test_onednn_is_the_default_where_mkl_runs_generic_code(monkeypatch, vendor, forced, expected):
    """MKL's own kernels on Intel's CPUs are as fast as oneDNN; on others MKL runs generic code."""
    monkeypatch.setattr(onednn, "cpu_vendor", lambda: vendor)
    monkeypatch.setenv("LMSTACK_ONEDNN", forced)
    onednn.onednn_preferred.cache_clear()
    try:
        assert onednn.onednn_preferred() is expected
        model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", n_embd=512, intermediate_size=1024,
                                                                 n_layer=1)).eval()
        assert bool(PackedLinears(model).slots) is expected
        assert bool(PackedLinears(model, enabled=True).slots)  # asked for, it packs whatever the CPU
        ids = torch.randint(0, 256, (1, 5))
        with onednn_linears():
            ops = _ops_run(lambda: model(ids))
        assert ("lmstack::onednn_linear" in ops) is expected
    finally:
        onednn.onednn_preferred.cache_clear()


def test_an_unknown_lmstack_onednn_value_is_named(monkeypatch):
    monkeypatch.setenv("LMSTACK_ONEDNN", "maybe")
    onednn.onednn_preferred.cache_clear()
    try:
        with pytest.raises(lmstack.LMStackError, match="LMSTACK_ONEDNN='maybe': set it to 1"):
            onednn.onednn_preferred()
    finally:
        onednn.onednn_preferred.cache_clear()


@needs_onednn
def test_small_float32_layers_stay_on_mkl_by_default(monkeypatch):
    """Below PACK_MIN_WEIGHTS, MKL's product is the faster: by default only the larger layers are packed (a
    key / value projection of 512 x 128 is not), and asked for (enabled=True), all of them."""
    monkeypatch.setattr(onednn, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.delenv("LMSTACK_ONEDNN", raising=False)
    onednn.onednn_preferred.cache_clear()
    try:
        torch.manual_seed(0)
        model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama", n_embd=512, n_head=8, n_kv_head=2,
                                                                 intermediate_size=1024, n_layer=1)).eval()
        packed = {name for _, name, _ in PackedLinears(model).slots}
        assert packed == {"q", "o", "gate", "up", "down", "lm_head"}  # k and v: 512 x 128 = 65,536 weights
        assert {name for _, name, _ in PackedLinears(model, enabled=True).slots} == packed | {"k", "v"}
        tiny = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama")).eval()
        assert PackedLinears(tiny).slots == [] and PackedLinears(tiny, enabled=True).slots
    finally:
        onednn.onednn_preferred.cache_clear()
