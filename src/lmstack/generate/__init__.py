"""Generation: samplers, the batched streaming engine with a static KV cache."""

from lmstack.generate.engine import Completion, Engine, TokenLogprob, generate
from lmstack.generate.sampling import SamplingParams, generate_ids, process_logits, sample_next_token

__all__ = ["Completion", "Engine", "SamplingParams", "TokenLogprob", "generate", "generate_ids",
           "process_logits", "sample_next_token"]
