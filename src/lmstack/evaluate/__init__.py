"""Evaluation: perplexity and bits per byte, ROUGE and BLEU."""

from lmstack.evaluate.perplexity import perplexity
from lmstack.evaluate.text_metrics import bleu, rouge

__all__ = ["bleu", "perplexity", "rouge"]
