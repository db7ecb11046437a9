"""kvindex: a precise KV-cache block index fed by vLLM / SGLang KV-event streams."""

__version__ = "0.1.0"
