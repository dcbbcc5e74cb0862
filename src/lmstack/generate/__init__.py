"""Generation: samplers, the batched streaming engine with a static KV cache.

`lmstack.generate(model, tokenizer, prompts, **sampling)` calls `generate`, while `lmstack.generate` stays
this package, so `lmstack.generate.speculative` and `import lmstack.generate.sampling` work as paths do
(binding the function to the package's name would hide its submodules).
"""

import sys
import types

from lmstack.generate.engine import Completion, Engine, TokenLogprob, generate
from lmstack.generate.sampling import SamplingParams, generate_ids, process_logits, sample_next_token


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = ["Completion", "Engine", "SamplingParams", "TokenLogprob", "generate", "generate_ids",
           "process_logits", "sample_next_token"]
