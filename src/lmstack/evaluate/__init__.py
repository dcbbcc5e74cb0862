"""Evaluation: perplexity and bits per byte."""

from lmstack.evaluate.perplexity import perplexity

__all__ = ["perplexity"]
