"""Preference losses against the worked examples and hand-computed values."""

import math

import pytest
import torch

import lmstack
from lmstack.train.preference import (
    bradley_terry_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    sequence_logprobs,
    simpo_loss,
)

T = torch.tensor


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_worked_example():
    loss, m = dpo_loss(T([-4.5]), T([-5.0]), T([-5.0]), T([-4.0]), beta=0.1)
    assert m["chosen_reward"].item() == pytest.approx(0.05)
    assert m["rejected_reward"].item() == pytest.approx(-0.10)
    assert m["margin"].item() == pytest.approx(0.15)
    assert loss.item() == pytest.approx(0.620957, abs=1e-6)
    same, _ = dpo_loss(T([-3.0]), T([-7.0]), T([-3.0]), T([-7.0]))
    assert same.item() == pytest.approx(math.log(2))
    smoothed, _ = dpo_loss(T([-4.5]), T([-5.0]), T([-5.0]), T([-4.0]), beta=0.1, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(-0.8 * math.log(sigmoid(0.15)) - 0.2 * math.log(sigmoid(-0.15)))


def test_bradley_terry():
    assert bradley_terry_loss(T([1.3]), T([1.3])).item() == pytest.approx(math.log(2))
    assert bradley_terry_loss(T([2.0]), T([0.0])).item() == pytest.approx(-math.log(sigmoid(2.0)))


def test_ipo_kto_orpo_simpo_hand_values():
    h = (-1.0 - -1.5) - (-2.0 - -1.8)  # 0.7
    assert ipo_loss(T([-1.0]), T([-2.0]), T([-1.5]), T([-1.8]), beta=0.5).item() == pytest.approx((h - 1.0) ** 2)
    r_good, r_bad, z0 = 0.1 * (-1.0 - -1.4), 0.1 * (-2.0 - -1.5), 0.1 * 0.3
    kto = kto_loss(T([-1.0, -2.0]), T([-1.4, -1.5]), T([True, False]), kl=0.3, beta=0.1)
    assert kto.item() == pytest.approx(((1 - sigmoid(r_good - z0)) + (1 - sigmoid(z0 - r_bad))) / 2)
    pc, pr = -0.5, -1.2
    odds = (pc - math.log(1 - math.exp(pc))) - (pr - math.log(1 - math.exp(pr)))
    assert orpo_loss(T([pc]), T([pr]), T([0.5]), lam=0.1).item() == pytest.approx(
        0.5 - 0.1 * math.log(sigmoid(odds)), rel=1e-5)
    assert simpo_loss(T([-0.5]), T([-1.2]), beta=2.0, gamma=0.5).item() == pytest.approx(
        -math.log(sigmoid(2.0 * 0.7 - 0.5)))


def test_sequence_logprobs_by_hand():
    torch.manual_seed(0)
    model = lmstack.DecoderLM(lmstack.ModelConfig.from_name("tiny-llama")).eval()
    ids = torch.randint(0, 256, (1, 8))
    labels = torch.full((1, 8), -100)
    labels[0, 4:7] = ids[0, 5:8]  # score the last three tokens
    with torch.no_grad():
        total, mean = sequence_logprobs(model, ids, labels)
        logp = model(ids)[0].log_softmax(-1)
    expected = sum(logp[t, ids[0, t + 1]].item() for t in range(4, 7))
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert mean.item() == pytest.approx(expected / 3, rel=1e-5)
