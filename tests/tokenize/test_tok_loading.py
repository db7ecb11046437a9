"""Loading: files, directories, the Hugging Face cache layout, the offline hub path, and the
registry of several models with LoRA adapters."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from kvindex.tokenize import (
    TokenizationCacheConfig,
    TokenizerLoadError,
    TokenizerRegistry,
    UnknownModelError,
    load_tokenizer,
    parse_tokenizer_flags,
)
from kvindex.tokenize.locate import hub_cache_candidates

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _make_cache(hub: Path, repo_id: str, source: Path, revision: str = "main") -> Path:
    model = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = model / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file():
            shutil.copy(f, snapshot / f.name)
    (model / "refs").mkdir()
    (model / "refs" / revision).write_text(COMMIT)
    return snapshot


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for var in ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub (a transformers dependency) reads the variable at import; set both.
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_bare_tokenizer_json_and_directory(tokenizer_dirs: dict[str, Path]) -> None:
    d = tokenizer_dirs["chatml"]
    bare = load_tokenizer(d / "tokenizer.json")
    full = load_tokenizer(d)
    assert bare.encode("hello <|im_start|>") == full.encode("hello <|im_start|>")
    assert bare.settings.chat_template is None and full.settings.chat_template is not None
    assert full.special_tokens["eos_token"] == "<|im_end|>"


@pytest.mark.parametrize("var", ["HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE"])
def test_hf_cache_layout(
    var: str, clean_env: Path, monkeypatch: pytest.MonkeyPatch, tokenizer_dirs: dict[str, Path]
) -> None:
    root = clean_env / "cache"
    hub = root / "hub" if var == "HF_HOME" else root
    snapshot = _make_cache(hub, "acme/chat-model", tokenizer_dirs["llama3"])
    monkeypatch.setenv(var, str(root))
    tok = load_tokenizer("acme/chat-model")
    assert tok.files.directory == snapshot
    assert tok.encode("hi there") == load_tokenizer(tokenizer_dirs["llama3"]).encode("hi there")
    assert load_tokenizer(f"acme/chat-model@{COMMIT}").files.directory == snapshot


def test_default_cache_under_home_and_named_revision(
    clean_env: Path, tokenizer_dirs: dict[str, Path]
) -> None:
    hub = clean_env / "home" / ".cache" / "huggingface" / "hub"
    assert hub in hub_cache_candidates()
    _make_cache(hub, "acme/m", tokenizer_dirs["wordpiece"], revision="v1")
    assert load_tokenizer("acme/m@v1").encode("hello")[0] == load_tokenizer(
        tokenizer_dirs["wordpiece"]
    ).backend.token_to_id("[CLS]")
    with pytest.raises(TokenizerLoadError, match=r"refs/main is missing"):
        load_tokenizer("acme/m")


def test_not_cached_and_offline_names_the_fix(clean_env: Path) -> None:
    with pytest.raises(TokenizerLoadError) as info:
        load_tokenizer("acme/absent-model")
    message = str(info.value)
    assert "models--acme--absent-model does not exist" in message
    assert "downloading it from the hub failed" in message and "pass their directory" in message


def test_no_huggingface_hub_installed(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(TokenizerLoadError, match="huggingface_hub is not installed"):
        load_tokenizer("acme/absent-model")


def test_bad_paths_name_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerLoadError, match=r"has no tokenizer\.json.*vocab\.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerLoadError, match="no such file or directory"):
        load_tokenizer(tmp_path / "missing" / "deeper")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(TokenizerLoadError, match="not a valid tokenizers file"):
        load_tokenizer(broken)
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(broken, model / "tokenizer.json")
    with pytest.raises(TokenizerLoadError, match="not a valid tokenizers file"):
        load_tokenizer(model)


def test_bad_tokenizer_config_is_reported(tmp_path: Path, tokenizer_dirs: dict[str, Path]) -> None:
    d = tmp_path / "m"
    shutil.copytree(tokenizer_dirs["chatml"], d)
    (d / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerLoadError, match="must hold a JSON object"):
        load_tokenizer(d)


def test_special_tokens_from_config_are_added(
    tmp_path: Path, tokenizer_dirs: dict[str, Path]
) -> None:
    # A special token named only in the config becomes an added token, as transformers does,
    # and a special_tokens_map.json fills names when there is no added_tokens_decoder.
    import json

    from transformers import AutoTokenizer

    d = tmp_path / "m"
    shutil.copytree(tokenizer_dirs["llama3"], d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder")
    config["extra_special_tokens"] = ["<|tool|>"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|pad|>"}))
    ours = load_tokenizer(d)
    ref = AutoTokenizer.from_pretrained(str(d))
    text = "a<|tool|>b<|pad|>c"
    assert ours.encode(text) == ref.encode(text)
    assert ours.special_tokens["pad_token"] == "<|pad|>"


def test_parse_tokenizer_flags() -> None:
    assert parse_tokenizer_flags(["a=/x", "org/b = org/b@v2", "c=/p=q"]) == {
        "a": "/x",
        "org/b": "org/b@v2",
        "c": "/p=q",
    }
    for bad in (["novalue"], ["=x"], ["a="]):
        with pytest.raises(ValueError, match="MODEL=PATH_OR_HUB_ID"):
            parse_tokenizer_flags(bad)
    with pytest.raises(ValueError, match="two tokenizers"):
        parse_tokenizer_flags(["a=/x", "a=/y"])


def test_registry_resolves_models_and_adapters(tokenizer_dirs: dict[str, Path]) -> None:
    loads: list[str] = []

    def loader(spec: Any, *, cache: TokenizationCacheConfig | None = None) -> Any:
        loads.append(str(spec))
        return load_tokenizer(spec, cache=cache)

    registry = TokenizerRegistry(
        {"llama": str(tokenizer_dirs["llama3"]), "qwen": str(tokenizer_dirs["chatml"])},
        {"llama-sql-lora": "llama"},
        loader=loader,
    )
    assert registry.resolve("llama-sql-lora") == "llama" and registry.resolve("qwen") == "qwen"
    assert registry.get("llama-sql-lora") is registry.get("llama")
    assert loads == [str(tokenizer_dirs["llama3"])]  # lazy, once
    registry.preload()
    assert len(loads) == 2
    assert registry.get("qwen").encode("<|im_start|>") == [
        load_tokenizer(tokenizer_dirs["chatml"]).backend.token_to_id("<|im_start|>")
    ]
    with pytest.raises(UnknownModelError) as info:
        registry.get("gpt-4")
    assert info.value.configured == ("llama", "llama-sql-lora", "qwen")
    assert "gpt-4" in str(info.value) and "--tokenizer gpt-4=" in str(info.value)


def test_registry_preload_fails_fast_naming_each_model(tmp_path: Path) -> None:
    registry = TokenizerRegistry({"a": str(tmp_path / "nope"), "b": str(tmp_path)})
    with pytest.raises(TokenizerLoadError) as info:
        registry.preload()
    message = str(info.value)
    assert "2 of 2 tokenizers failed" in message
    assert "model 'a'" in message and "model 'b'" in message and "has no tokenizer.json" in message
    with pytest.raises(TokenizerLoadError, match="base model 'missing'"):
        TokenizerRegistry({"a": "x"}, {"lora": "missing"})


def test_servers_default_tokenizers_to_the_calling_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvindex.tokenize.local import PARALLELISM_ENV, default_to_calling_thread

    monkeypatch.delenv(PARALLELISM_ENV, raising=False)
    assert default_to_calling_thread() is True
    assert os.environ[PARALLELISM_ENV] == "false"
    # The operator's choice stands.
    monkeypatch.setenv(PARALLELISM_ENV, "true")
    assert default_to_calling_thread() is False
    assert os.environ[PARALLELISM_ENV] == "true"
