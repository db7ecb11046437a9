"""Real vLLM engines for the real-engine tests (tests/real_vllm) and `kvindex demo --engine
vllm`: the tiny model directory (`model`) and engines on loopback (`engines`)."""
