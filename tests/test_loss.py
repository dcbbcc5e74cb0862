"""The chunked cross-entropy through the output head against the plain loss it replaces."""

import pytest
import torch
import torch.nn.functional as F

from lmstack import DecoderLM, ModelConfig
from lmstack.models.loss import linear_cross_entropy
from lmstack.onednn import onednn_available, onednn_linears


def _case(bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(37, 16, generator=g).requires_grad_()
    weight = (0.5 * torch.randn(50, 16, generator=g)).requires_grad_()
    b = torch.randn(50, generator=g).requires_grad_() if bias else None
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[::5] = -100
    return hidden, weight, b, targets


def _loss_and_grads(fn, hidden, weight, bias, targets, grad_scale=1.0):
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    for t in leaves:
        t.grad = None
    loss = fn(hidden, weight, bias, targets)
    (grad_scale * loss).backward()
    return loss.detach(), [t.grad.clone() for t in leaves]


def plain(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=-100)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [4, 10, 37, 64])  # chunks that do not divide the rows, one chunk, more than all
def test_linear_cross_entropy_equals_the_plain_loss_and_its_gradients(bias, rows):
    case = _case(bias)
    want, want_grads = _loss_and_grads(plain, *case, grad_scale=3.0)  # a scaled loss scales the gradients
    got, got_grads = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=rows), *case, grad_scale=3.0)
    assert torch.allclose(got, want, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-6)


def test_linear_cross_entropy_hand_value():
    # One row, logits [2, 0] (hidden [1, 0] times weight rows [2, 0] and [0, 0]), target 1:
    # loss = log(e^2 + 1) - 0; d loss / d logits = softmax - one_hot = [p, (1 - p) - 1] with p = e^2/(e^2+1).
    hidden = torch.tensor([[1.0, 0.0]], requires_grad=True)
    weight = torch.tensor([[2.0, 0.0], [0.0, 0.0]], requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, None, torch.tensor([1]))
    loss.backward()
    e2 = torch.tensor(2.0).exp()
    p = e2 / (e2 + 1)
    assert torch.isclose(loss, torch.log(e2 + 1))
    # d loss / d weight = (softmax - one_hot)^T hidden; d loss / d hidden = (softmax - one_hot) weight
    assert torch.allclose(weight.grad, torch.tensor([[p, 0.0], [-p, 0.0]]))
    assert torch.allclose(hidden.grad, torch.tensor([[2 * p, 0.0]]))


def test_linear_cross_entropy_without_gradients_and_with_frozen_parts():
    hidden, weight, bias, targets = _case(True)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(hidden, weight, bias, targets, chunk_rows=8),
                              plain(hidden, weight, bias, targets), atol=1e-6)
    # A frozen head (only the hidden states train), and a frozen body (only the head trains).
    for frozen in (weight, hidden):
        frozen.requires_grad_(False)
        want, want_grads = _loss_and_grads(plain, hidden, weight, None, targets)
        got, got_grads = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=8),
                                         hidden, weight, None, targets)
        frozen.requires_grad_(True)
        assert torch.allclose(got, want, atol=1e-6) and len(got_grads) == 1
        for g, w in zip(got_grads, want_grads):
            assert torch.allclose(g, w, atol=1e-6)


def test_linear_cross_entropy_with_no_target_counting():
    """As the plain mean: a NaN loss (0 / 0) and zero gradients, not NaN ones."""
    hidden, weight, _, targets = _case(False)
    loss = linear_cross_entropy(hidden, weight, None, torch.full_like(targets, -100), chunk_rows=8)
    loss.backward()
    assert loss.isnan() and torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_linear_cross_entropy_through_onednn_and_under_autocast():
    case = _case(False)
    want, want_grads = _loss_and_grads(plain, *case)
    if onednn_available():  # the products through oneDNN's training mode, the weight gradient not in place
        with onednn_linears(enabled=True):
            got, got_grads = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=8), *case)
        assert torch.allclose(got, want, atol=1e-5)
        for g, w in zip(got_grads, want_grads):
            assert torch.allclose(g, w, atol=1e-5)
    # A bf16 model (no autocast): the chunks in bf16, close to the float32 loss.
    bf16 = [t.detach().bfloat16().requires_grad_() if t is not None else None for t in case[:3]] + [case[3]]
    got, got_grads = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=8), *bf16)
    assert got_grads[1].dtype == torch.bfloat16 and abs(got.item() - want.item()) < 2e-2
    for g, w in zip(got_grads, want_grads):
        assert (g.float() - w).norm() / w.norm() < 2e-2
    # An fp16 model, whose unscaled chunk gradients could underflow, takes the plain loss.
    fp16 = [t.detach().half().requires_grad_() for t in case[:2]]
    assert torch.equal(linear_cross_entropy(*fp16, None, case[3], chunk_rows=8), plain(*fp16, None, case[3]))
    # Under bf16 autocast: bf16 products, as autocast's plain loss, with float32 gradients.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = _loss_and_grads(plain, *case)
        got, got_grads = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=8), *case)
    assert abs(got.item() - want.item()) < 1e-2
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == torch.float32 and (g - w).norm() / w.norm() < 2e-2
    # fp16 autocast takes the plain loss.
    with torch.autocast("cpu", dtype=torch.float16):
        want, want_grads = _loss_and_grads(plain, *case)
        got, got_grads = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=8), *case)
    assert torch.equal(got, want) and all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_decoder_loss_without_logits_equals_the_plain_loss(preset):
    """`return_logits=False` (what training uses) gives the same loss and parameter gradients, the tied head
    included, and under torch.compile too."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name(preset))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    targets = ids.roll(-1, 1)
    targets[:, -3:] = -100

    def grads_of(m, **kwargs):
        model.zero_grad(set_to_none=True)
        logits, loss = m(ids, targets, **kwargs)
        loss.backward()
        return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, want, want_grads = grads_of(model)
    # aot_eager traces what inductor would (dynamo, then AOTAutograd through the chunked loss's backward),
    # in a fraction of its compile time; test_compiled_training_equals_eager runs inductor itself
    for m in (model, torch.compile(model, backend="aot_eager")):
        none, got, got_grads = grads_of(m, return_logits=False)
        assert logits is not None and none is None
        assert torch.allclose(got, want, atol=1e-6)
        assert all(torch.allclose(got_grads[n], g, atol=1e-6) for n, g in want_grads.items())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_token_logprobs_equal_the_plain_ones_and_their_gradients(temperature, bias):
    """Per-token log-probabilities (preference training's) with a per-token upstream gradient, which the
    recomputing backward must follow; ignored tokens are 0 and get no gradient."""
    from lmstack.models.loss import linear_token_logprobs

    case = _case(bias)
    upstream = torch.randn(37, generator=torch.Generator().manual_seed(1))

    def plain_logprobs(hidden, weight, b, targets):
        logp = (F.linear(hidden, weight, b).float() / temperature).log_softmax(-1)
        return logp.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1) * (targets != -100)

    want, want_grads = _loss_and_grads(lambda *a: (plain_logprobs(*a) * upstream).sum(), *case)
    got, got_grads = _loss_and_grads(
        lambda *a: (linear_token_logprobs(*a, temperature=temperature, chunk_rows=10) * upstream).sum(), *case)
    assert torch.allclose(got, want, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-6)
    values = linear_token_logprobs(*case, temperature=temperature, chunk_rows=10)
    assert torch.allclose(values, plain_logprobs(*case), atol=1e-6) and (values[case[3] == -100] == 0).all()
    with torch.no_grad():  # a reference model's: chunk by chunk, no graph
        scored = linear_token_logprobs(*case, temperature=temperature, chunk_rows=10)
    assert torch.allclose(scored, plain_logprobs(*case), atol=1e-6) and not scored.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 products, float32 gradients
        got, got_grads = _loss_and_grads(
            lambda *a: (linear_token_logprobs(*a, temperature=temperature, chunk_rows=10) * upstream).sum(), *case)
    assert abs(got.item() - want.item()) < 0.1
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == torch.float32 and (g - w).norm() / w.norm() < 3e-2


def test_token_logprobs_through_the_head_equal_the_full_logits():
    """`token_logprobs(..., head=model.lm_head)` (DPO's and GRPO's) against the full-logits path, gradients
    of every parameter included (the tied head too)."""
    from lmstack.train.preference import token_logprobs

    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name("tiny-llama"))
    ids = torch.randint(0, 256, (3, 10))
    labels = ids.roll(-1, 1)
    labels[:, :4] = -100
    results = []
    for head in (None, model.lm_head):
        model.zero_grad(set_to_none=True)
        logp = token_logprobs(model, ids, labels, 0.9, head=head)
        (logp.sum(-1) * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        results.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    assert torch.allclose(got, want, atol=1e-5)
    assert all(torch.allclose(got_grads[n], g, atol=1e-6) for n, g in want_grads.items())
