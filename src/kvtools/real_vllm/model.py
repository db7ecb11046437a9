"""A model directory a real vLLM engine can serve without weights.

vLLM's `--load-format dummy` fills the weights with random values, so the directory needs only a
config, a generation config and the tokenizer. The tokenizer and chat template are the demo's
(`kvtools.demo.model`), so simulated engines, real engines and the picker all tokenize alike.
The network is deliberately tiny (2 layers, hidden 128): the prefix cache, not the output, is
what the project measures, and a tiny network keeps two engines within 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvtools.demo.model import write_model_dir

# The DeepSeek tokenizer's vocabulary; the embedding must cover every id it can produce.
_VOCAB_SIZE = 129280
MAX_MODEL_LEN = 4096

_LLAMA_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": _VOCAB_SIZE,
    "max_position_embeddings": MAX_MODEL_LEN,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 0,
    "eos_token_id": 1,
}


def write_real_model_dir(directory: Path) -> Path:
    """Write (or refresh) the tiny model's directory and return it."""
    write_model_dir(directory)
    (directory / "config.json").write_text(json.dumps(_LLAMA_CONFIG, indent=1))
    generation = {"bos_token_id": 0, "eos_token_id": 1}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=1))
    return directory
