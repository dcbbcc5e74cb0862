"""Generation: sampling with the static KV cache."""

from lmstack.generate.sampling import generate_ids, sample_next_token

__all__ = ["generate_ids", "sample_next_token"]
