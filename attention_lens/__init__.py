"""Attention Lens: interactive, exact views inside small transformer language models."""

__version__ = "0.1.0"
