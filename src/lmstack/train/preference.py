"""Preference-alignment losses: Bradley-Terry reward modelling, DPO, IPO, KTO, ORPO and SimPO.

Each takes per-example sequence log-probabilities (summed over the response tokens, or averaged where the
method says so) and returns the mean loss and a few metrics; `sequence_logprobs` computes them from a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmstack.models.loss import linear_token_logprobs


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   temperature: float = 1.0, head: torch.nn.Module | None = None) -> torch.Tensor:
    """Log-probability of each label token [B, T] (0 where the label is -100); label[t] is the token after
    input_ids[t]. `temperature` scores under the distribution tokens were sampled from (GRPO's, as TRL's).
    Given the model's output `head` (an `nn.Linear`), the hidden states go through it a chunk at a time
    (`linear_token_logprobs`), never holding all the logits."""
    if head is not None and type(head) is torch.nn.Linear:
        hidden = model(input_ids, return_hidden=True)
        logp = linear_token_logprobs(hidden.flatten(0, 1), head.weight, head.bias, labels.flatten(), temperature)
        return logp.view_as(labels)
    logits = model(input_ids).float()
    logp = (logits / temperature if temperature != 1.0 else logits).log_softmax(dim=-1)
    return logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)


def sequence_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                      head: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, mean) log-probability of the labelled tokens of each sequence (`head` as in `token_logprobs`)."""
    total = token_logprobs(model, input_ids, labels, head=head).sum(-1)
    return total, total / (labels != -100).sum(-1).clamp(min=1)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Reward-model loss: -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))); with label
    smoothing eps, the conservative variant (1 - eps) * that + eps * -log sigmoid(-.)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return loss.mean(), {"chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean(),
                         "margin": margin.mean(), "accuracy": (margin > 0).float().mean()}


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """IPO (Azar et al. 2023): (h - 1 / (2 beta))^2 with h the log-ratio margin; pass length-averaged
    log-probabilities, as the IPO paper and TRL do."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return ((h - 1 / (2 * beta)) ** 2).mean()


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor | float,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024) on unpaired examples: with r = beta (pi - ref) and z0 = beta * KL estimate,
    desirable ones cost w_d (1 - sigmoid(r - z0)), undesirable ones w_u (1 - sigmoid(z0 - r))."""
    r = beta * (policy - ref)
    z0 = beta * torch.as_tensor(kl, dtype=r.dtype).clamp(min=0)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(r - z0)),
                         undesirable_weight * (1 - torch.sigmoid(z0 - r)))
    return losses.mean()


def orpo_loss(chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, chosen_nll: torch.Tensor,
              lam: float = 0.1) -> torch.Tensor:
    """ORPO (Hong et al. 2024): SFT loss on the chosen answer plus lam * -log sigmoid(log odds ratio), the
    odds of p = exp(mean token log-probability) being p / (1 - p). No reference model."""
    def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
        return mean_logp - torch.log1p(-torch.exp(mean_logp).clamp(max=1 - 1e-7))

    ratio = log_odds(chosen_mean_logp) - log_odds(rejected_mean_logp)
    return (chosen_nll - lam * F.logsigmoid(ratio)).mean()


def simpo_loss(chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, beta: float = 2.0,
               gamma: float = 0.5) -> torch.Tensor:
    """SimPO (Meng et al. 2024): -log sigmoid(beta (mean logp_chosen - mean logp_rejected) - gamma); no
    reference model."""
    return -F.logsigmoid(beta * (chosen_mean_logp - rejected_mean_logp) - gamma).mean()
