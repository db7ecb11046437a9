"""A vLLM-faithful engine simulator: OpenAI-style HTTP, a prefix-cache block pool with real
vLLM hashes, and KV events published over ZMQ exactly as vLLM 0.33 does (docs/simulator.md)."""
