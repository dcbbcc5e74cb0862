"""Model architectures. `DecoderLM` covers every decoder-only family through `ModelConfig`."""

from lmstack.models.decoder import DecoderLM, active_params, flops_per_token

__all__ = ["DecoderLM", "active_params", "flops_per_token"]
