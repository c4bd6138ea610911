"""homebake: fine-tune an open-weight LLM on your own data, on your own machine."""

__version__ = "0.1.0"
