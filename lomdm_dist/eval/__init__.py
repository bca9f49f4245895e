"""Evaluation: validation NELBO perplexity."""

from .perplexity import validation_nelbo

__all__ = ["validation_nelbo"]
