"""Model architectures: `DecoderLM` for every decoder-only Transformer family, `RNNLM` for recurrent LMs."""

from __future__ import annotations

from lmstack.config import ModelConfig
from lmstack.models.classifier import SequenceClassifier
from lmstack.models.decoder import DecoderLM, active_params, flops_per_token
from lmstack.models.rnn import RNNLM


def build_model(config: ModelConfig) -> DecoderLM | RNNLM:
    """The model `config.arch` names, freshly initialised."""
    return DecoderLM(config) if config.arch == "transformer" else RNNLM(config)


__all__ = ["DecoderLM", "RNNLM", "SequenceClassifier", "active_params", "build_model", "flops_per_token"]
