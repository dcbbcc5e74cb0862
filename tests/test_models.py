"""ModelConfig, the decoder's parts (RoPE, masks, KV cache, MoE) and its sizes, against hand values and HF."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lmstack import DecoderLM, LMStackError, ModelConfig
from lmstack.models import active_params, flops_per_token
from lmstack.models.attention import apply_rope, attention_mask, rope_cos_sin, rope_inv_freq
from lmstack.models.layers import MoE, load_balancing_loss

# Published parameter counts of the real shapes.
PUBLISHED = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "tinyllama-1.1b": 1_100_048_384,
    "llama-3.2-1b": 1_235_814_400,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "mixtral-8x7b": 46_702_792_704,
    "phi-3-mini": 3_821_079_552,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = DecoderLM(ModelConfig.from_name(name))
    assert model.num_params() == PUBLISHED[name]


def test_textbook_parameter_count():
    # VECTORS.md: vocab 32,011, width 128, 8 heads, 2 blocks, 4x MLP with biases, RMSNorm, output bias,
    # no attention biases -> 8,621,963. Expressed as: bias on MLP only is not a preset, so count by parts.
    cfg = ModelConfig(vocab_size=32011, n_embd=128, n_head=8, n_layer=2, norm="rmsnorm", positions="rope",
                      mlp="gelu", bias="none", lm_head_bias=True, tie_embeddings=False)
    with torch.device("meta"):
        model = DecoderLM(cfg)
    mlp_biases = 2 * (4 * 128 + 128)
    assert model.num_params() + mlp_biases == 8_621_963


def test_config_validation_names_the_field():
    with pytest.raises(LMStackError, match="n_kv_head"):
        ModelConfig(n_head=12, n_kv_head=5)
    with pytest.raises(LMStackError, match="norm"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(LMStackError, match="unknown model preset 'gpt5'"):
        ModelConfig.from_name("gpt5")
    with pytest.raises(LMStackError, match=r"unknown ModelConfig fields \['colour'\]"):
        ModelConfig.from_dict({"colour": "blue"})
    with pytest.raises(LMStackError, match="rope_scaling"):
        ModelConfig(positions="rope", rope_scaling={"rope_type": "longrope"})


def test_hf_config_round_trip():
    for name in ("gpt2", "llama-3.2-1b", "mistral-7b", "qwen2.5-0.5b", "mixtral-8x7b", "phi-3-mini"):
        cfg = ModelConfig.from_name(name)
        back = ModelConfig.from_hf(cfg.to_hf())
        for field in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "norm", "mlp",
                      "bias", "tie_embeddings", "sliding_window", "n_expert", "rope_theta", "rope_scaling"):
            assert getattr(back, field) == getattr(cfg, field), (name, field)


def test_to_hf_refuses_what_a_family_cannot_express():
    cfg = ModelConfig.from_name("tiny-gpt2", positions="rope", family="gpt2")
    with pytest.raises(LMStackError, match="positions='rope'"):
        cfg.to_hf()


# ---------------------------------------------------------------------------------------------- RoPE


def test_rope_textbook_vector():
    # VECTORS.md: q at t=100, d=6, base 10,000, adjacent pairs -> [0.99, 0.11, 0.25, -0.72, 0.40, 0.50].
    # lmstack pairs split halves (x_i, x_{i+d/2}); permuting adjacent pairs to halves gives the same rotation.
    q = torch.tensor([0.8, 0.6, 0.7, 0.3, 0.5, 0.4])
    to_halves = [0, 2, 4, 1, 3, 5]
    cfg = ModelConfig(n_embd=6, n_head=1, positions="rope", norm="rmsnorm", mlp="swiglu")
    inv_freq, scale = rope_inv_freq(cfg)
    cos, sin = rope_cos_sin(torch.tensor([100]), inv_freq, scale, torch.float32)
    rotated = apply_rope(q[to_halves].view(1, 1, 1, 6), cos, sin).flatten()
    back = torch.empty(6)
    back[to_halves] = rotated
    assert torch.allclose(back, torch.tensor([0.99, 0.11, 0.25, -0.72, 0.40, 0.50]), atol=0.006)


def test_rope_relative_property():
    cfg = ModelConfig(n_embd=16, n_head=1, positions="rope", norm="rmsnorm", mlp="swiglu")
    inv_freq, _ = rope_inv_freq(cfg)
    q, k = torch.randn(16), torch.randn(16)

    def dot(m, n):
        cq, sq = rope_cos_sin(torch.tensor([m]), inv_freq, 1.0, torch.float32)
        ck, sk = rope_cos_sin(torch.tensor([n]), inv_freq, 1.0, torch.float32)
        return (apply_rope(q.view(1, 1, 1, -1), cq, sq) * apply_rope(k.view(1, 1, 1, -1), ck, sk)).sum()

    assert torch.allclose(dot(5, 2), dot(13, 10), atol=1e-5)


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
])
def test_rope_frequencies_match_transformers(scaling):
    hf = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=256, rope_theta=50000.0,
                     rope_scaling=scaling)
    cfg = ModelConfig.from_hf({**hf.to_dict(), "model_type": "llama"})
    kind = (scaling or {}).get("rope_type", "default")
    seq_len = 1000 if kind == "dynamic" else None  # past the trained length, where dynamic NTK kicks in
    if kind == "default":
        expected, expected_scale = hf.rope_parameters["rope_theta"], None
        theirs = 1.0 / (expected ** (torch.arange(0, 32, 2).float() / 32))
        expected_scale = 1.0
    else:
        theirs, expected_scale = ROPE_INIT_FUNCTIONS[kind](hf, "cpu", seq_len=seq_len)
    ours, scale = rope_inv_freq(cfg, seq_len=seq_len)
    assert torch.allclose(ours, theirs.float(), rtol=1e-6)
    assert math.isclose(scale, expected_scale, rel_tol=1e-6)
    if kind == "dynamic":  # as the model computes it, from a tensor (no host sync): the same frequencies
        assert torch.equal(rope_inv_freq(cfg, seq_len=torch.tensor(seq_len))[0], ours)


# ---------------------------------------------------------------------------------------------- attention


def test_casting_the_model_keeps_rope_frequencies_in_float32():
    model = DecoderLM(ModelConfig.from_name("tiny-llama"))
    exact = model.rope_inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.rope_inv_freq.dtype == torch.float32 and torch.equal(model.rope_inv_freq, exact)


def test_causal_attention_textbook():
    # VECTORS.md: scaled scores [2, 7, 4, 5] at query position 1 of 4 (keys 2, 3 masked) -> [0.0067, 0.9933].
    mask = attention_mask(torch.arange(4), 4)
    scores = torch.tensor([2.0, 7.0, 4.0, 5.0]).masked_fill(~mask[1], float("-inf"))
    assert torch.allclose(F.softmax(scores, -1), torch.tensor([0.0067, 0.9933, 0, 0]), atol=1e-4)


def test_sliding_window_mask():
    mask = attention_mask(torch.arange(6), 6, sliding_window=3)
    assert mask[5].tolist() == [False, False, False, True, True, True]
    assert mask[1].tolist() == [True, True, False, False, False, False]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("mask_shape", ["none", "TS", "B1TS"])
def test_grouped_query_attention_equals_attention_over_repeated_heads(heads, kv_heads, mask_shape):
    """The masked path folds each query group into the query length: the same as SDPA over K/V repeated for
    every head, whatever the mask's layout ([T, S] causal-window, [B, 1, T, S] with padding)."""
    from lmstack.models.attention import grouped_query_attention

    g = torch.Generator().manual_seed(0)
    B, T, S, D = 3, 5, 9, 8
    q = torch.randn(B, T, heads, D, generator=g).transpose(1, 2)  # as the model lays it out
    k, v = (torch.randn(B, kv_heads, S, D, generator=g) for _ in range(2))
    padding = torch.ones(B, S, dtype=torch.bool)
    padding[1, :3] = False
    mask = {"none": None, "TS": attention_mask(torch.arange(S - T, S), S, sliding_window=4),
            "B1TS": attention_mask(torch.arange(S - T, S), S, key_padding=padding)}[mask_shape]
    if mask is None:  # causal needs T == S
        k, v = k[:, :, :T], v[:, :, :T]
    group = heads // kv_heads
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=mask, is_causal=mask is None)
    got = grouped_query_attention(q, k, v, mask)
    assert got.shape == (B, heads, T, D) and torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2", "tiny-mixtral"])
def test_kv_cache_decoding_equals_full_forward(preset):
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name(preset, sliding_window=5 if preset == "tiny-llama" else None)).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(ids)
        model.setup_kv_cache(batch_size=2, max_seq_len=16)
        steps = [model(ids[:, :7], input_pos=torch.arange(7))]
        for t in range(7, 12):
            steps.append(model(ids[:, t:t + 1], input_pos=torch.tensor([t])))
        model.clear_kv_cache()
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


def test_left_padding_with_positions_matches_unpadded():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name("tiny-llama")).eval()
    ids = torch.randint(0, 256, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    keep = torch.tensor([[False] * 3 + [True] * 6])
    positions = (keep.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(ids)
        batched = model(padded, position_ids=positions, key_padding=keep)
    assert (batched[:, 3:] - alone).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------- MoE


def test_moe_routes_to_top_k_experts():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-mixtral")
    moe = MoE(cfg).eval()
    x = torch.randn(5, cfg.n_embd)
    out, logits = moe(x)
    probs = logits.softmax(-1)
    w, idx = probs.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    expected = torch.stack([
        sum(w[n, j] * moe.experts[int(idx[n, j])](x[n]) for j in range(2)) for n in range(5)
    ])
    assert torch.allclose(out, expected, atol=1e-6)


def _route(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w, idx = moe.router(x).softmax(-1).topk(moe.top_k, dim=-1)
    return idx, (w / w.sum(-1, keepdim=True)).to(x.dtype)


@pytest.mark.parametrize("bits", [None, 8], ids=["float", "int8"])
def test_moe_static_mixtures_equal_the_routing_loop(bits, tmp_path):
    """Compiled inference mixes without data-dependent shapes: every expert weighted (zero where not chosen),
    or the chosen experts' weights gathered from stacked tensors. Both give the loop's output; the stacked
    tensors are the experts' own storage (no copy, the same Parameters), a model saves as before, and a cast
    or quantization lets go of them."""
    from lmstack import load_model, save_model
    from lmstack.models.layers import static_routing
    from lmstack.quantize import quantize_model

    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name("tiny-mixtral")).eval()
    if bits:
        quantize_model(model, bits, dtype=torch.float32)
    moe = model.layers[0].mlp
    x = torch.randn(5, model.config.n_embd)
    loop = moe(x)[0]
    idx, w = _route(moe, x)
    assert torch.allclose(moe._mix_static(x, idx, w), loop, atol=1e-6)
    params = list(model.parameters())
    with torch.inference_mode(), static_routing(model):  # stacking in inference mode makes no inference tensors
        assert moe.static and moe.stacked_current() and set(moe.stacked) == {"gate", "up", "down"}
    assert not moe.static and moe.stacked_current()
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]  # an optimizer keeps its parameters
    assert not any(p.is_inference() for p in model.parameters())
    stored = moe.stacked["up"][0]
    assert stored.shape == (4, model.config.intermediate_size, model.config.n_embd)
    first = moe.experts[1].up.qweight if bits else moe.experts[1].up.weight
    assert first.data_ptr() == stored[1].data_ptr()
    for n in range(5):  # one token routes to 2 of the 4 experts: gathered
        assert torch.allclose(moe._mix_static(x[n:n + 1], idx[n:n + 1], w[n:n + 1]), loop[n:n + 1], atol=1e-6)
    assert torch.equal(moe(x)[0], loop)  # eager keeps the loop
    if bits:
        return
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert torch.equal(again.layers[0].mlp.experts[3].down.weight, moe.experts[3].down.weight)
    model.double()
    assert moe.stacked is None and not moe.stacked_current()
    with static_routing(model):
        assert moe.stacked_current() and moe.stacked["down"][0].dtype == torch.float64
    quantize_model(model, 8)
    assert moe.stacked is None
    # An expert that is not chosen may overflow: weighted zero, it must not turn the output into NaN.
    model = DecoderLM(ModelConfig.from_name("tiny-mixtral")).eval()
    moe = model.layers[0].mlp
    idx, w = _route(moe, x[:1])
    unchosen = next(e for e in range(4) if e not in idx[0].tolist())
    with torch.no_grad():
        moe.experts[unchosen].up.weight.fill_(float("inf"))
    assert torch.allclose(moe._mix_static(x[:1], idx, w), moe(x[:1])[0], atol=1e-6)


def test_load_balancing_loss_hand_values():
    # Uniform router: every expert gets probability 1/E and (top-k ties aside) the loss is top_k.
    logits = torch.zeros(8, 4)
    assert math.isclose(load_balancing_loss([logits], 4, 2).item(), 2.0, rel_tol=1e-6)
    # All tokens prefer experts 0 and 1 strongly: f = [1, 1, 0, 0] per slot sum, P ~ [0.5, 0.5, 0, 0].
    skewed = torch.tensor([[20.0, 19.0, -20.0, -20.0]]).repeat(8, 1)
    p = skewed.softmax(-1)[0]
    expected = 4 * (p[0] * 1 + p[1] * 1)
    assert math.isclose(load_balancing_loss([skewed], 4, 2).item(), expected.item(), rel_tol=1e-5)


def test_load_balancing_loss_leaves_padding_out_as_transformers_does():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    layers = [torch.randn(12, 4) * 3 for _ in range(3)]
    ours = load_balancing_loss(layers, 4, 2, mask)
    theirs = load_balancing_loss_func(tuple(layers), 4, 2, mask.long())
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert not torch.allclose(ours, load_balancing_loss(layers, 4, 2), atol=1e-3)  # the mask mattered
    assert torch.allclose(load_balancing_loss(layers, 4, 2), load_balancing_loss_func(tuple(layers), 4, 2),
                          atol=1e-6)


def test_moe_router_loss_ignores_padding_tokens():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name("tiny-mixtral", moe_aux_loss_coef=0.5))  # training mode
    ids = torch.randint(0, 256, (1, 6))
    _, alone = model(ids, ids)
    # Right padding: causal attention keeps the real tokens' logits (and cross-entropy) as they were.
    padded = torch.cat([ids, torch.randint(0, 256, (1, 4))], dim=1)
    targets = torch.cat([ids, torch.full((1, 4), -100)], dim=1)
    real = torch.tensor([[True] * 6 + [False] * 4])
    _, masked = model(padded, targets, token_mask=real)
    _, unmasked = model(padded, targets)
    assert torch.allclose(alone, masked, atol=1e-6) and not torch.allclose(alone, unmasked, atol=1e-4)


def test_moe_loss_includes_aux_term():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-mixtral", moe_aux_loss_coef=0.5)
    model = DecoderLM(cfg)
    ids = torch.randint(0, 256, (2, 8))
    logits, loss = model(ids, ids)
    ce = F.cross_entropy(logits.view(-1, 256), ids.view(-1))
    assert loss.item() > ce.item() + 0.5  # the aux term is at least top_k * coef = 1.0
    # In eval mode the loss is cross-entropy alone: validation loss and perplexity are not inflated.
    _, val = model.eval()(ids, ids)
    assert torch.allclose(val, ce, atol=1e-6)


# ---------------------------------------------------------------------------------------------- sizes


def test_loss_ignores_minus_100():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name("tiny-llama"))
    ids = torch.randint(0, 256, (1, 8))
    targets = ids.clone()
    targets[0, :4] = -100
    logits, loss = model(ids, targets)
    expected = F.cross_entropy(logits[0, 4:], ids[0, 4:])
    assert torch.allclose(loss, expected)


def test_flops_per_token_gpt2():
    # nanoGPT's estimate for GPT-2 124M at T=1024: 6 N + 12 L H Q T, with N all parameters but the position
    # embedding (the token embedding is the tied output head's weight, so it counts).
    with torch.device("meta"):
        model = DecoderLM(ModelConfig.from_name("gpt2"))
    assert model.num_params(non_embedding=True) == 124_439_808 - 50257 * 768 - 1024 * 768
    n = active_params(model)
    assert n == 124_439_808 - 1024 * 768
    assert flops_per_token(model.config, n, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_active_params_mixtral():
    with torch.device("meta"):
        model = DecoderLM(ModelConfig.from_name("mixtral-8x7b"))
    # Mixtral 8x7B is published as ~12.9B active parameters per token; non_embedding keeps the (untied)
    # output head, so only the input embedding is added back.
    active = active_params(model) + 32000 * 4096
    assert abs(active - 12.9e9) < 0.05e9


def test_config_replace_derives_defaults_again():
    """replace(n_embd=...) gives what from_name(..., n_embd=...) gives; fields set explicitly stay."""
    base = ModelConfig.from_name("tiny-gpt2")
    assert base.replace(n_embd=64) == ModelConfig.from_name("tiny-gpt2", n_embd=64)
    assert base.replace(n_head=8).n_kv_head == 8  # multi-head stays multi-head, not GQA by accident
    gqa = ModelConfig.from_name("tiny-llama")
    assert gqa.n_kv_head < gqa.n_head and gqa.replace(n_layer=1).n_kv_head == gqa.n_kv_head
    assert gqa.replace(n_head=gqa.n_head * 2, head_dim=gqa.head_dim).head_dim == gqa.head_dim
