"""lmstack: the language-model stack from raw text to a served, evaluated model, on PyTorch."""

from lmstack import generate  # the package, callable as the function (see lmstack.generate)
from lmstack.checkpoints import load_model, load_tokenizer, save_model
from lmstack.config import PRESETS, ModelConfig
from lmstack.errors import LMStackError
from lmstack.generate import Engine, SamplingParams
from lmstack.models import DecoderLM
from lmstack.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "DecoderLM",
    "Engine",
    "LMStackError",
    "ModelConfig",
    "SamplingParams",
    "Tokenizer",
    "generate",
    "load_model",
    "load_tokenizer",
    "save_model",
]
