"""What transformers reads from a model directory beside tokenizer.json: special tokens,
BOS/EOS flags, added tokens and chat templates (tokenizer_config.json, special_tokens_map.json,
chat_template.jinja / chat_template.json, additional_chat_templates/*.jinja).

Precedence follows transformers 5: chat_template.jinja and additional_chat_templates/ replace
the config's chat_template; special_tokens_map.json fills the named special tokens only when
tokenizer_config.json has no added_tokens_decoder (its legacy role)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvindex.tokenize.errors import TokenizerLoadError
from kvindex.tokenize.locate import CHAT_TEMPLATE_DIR, TokenizerFiles

# The named special tokens transformers passes to every chat template (special_tokens_map).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


@dataclass(frozen=True, slots=True)
class AddedTokenSpec:
    """One added token as transformers serialises it (AddedToken fields)."""

    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool | None = None


@dataclass(frozen=True, slots=True)
class TokenizerSettings:
    special_tokens: dict[str, AddedTokenSpec] = field(default_factory=dict)
    extra_special_tokens: tuple[AddedTokenSpec, ...] = ()
    added_tokens_decoder: dict[int, AddedTokenSpec] = field(default_factory=dict)
    # As written in the config. Informational: transformers 5 ignores both when tokenizer.json
    # exists (BOS/EOS then come from its post-processor), and so do we.
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    chat_template: str | dict[str, str] | None = None
    generation_eos_token_ids: tuple[int, ...] = ()

    def special_token_strings(self) -> dict[str, str]:
        return {name: tok.content for name, tok in self.special_tokens.items()}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerLoadError(f"cannot read {path}: {exc}. Fix or remove the file.") from exc
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_spec(value: Any, *, special: bool, where: str) -> AddedTokenSpec | None:
    if value is None:
        return None
    if isinstance(value, str):
        return AddedTokenSpec(content=value, special=special)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        norm = value.get("normalized")
        return AddedTokenSpec(
            content=value["content"],
            special=bool(value.get("special", special)),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            single_word=bool(value.get("single_word", False)),
            normalized=None if norm is None else bool(norm),
        )
    raise TokenizerLoadError(
        f"{where}: expected a token string or AddedToken object, got {value!r}"
    )


def _templates_from_config(value: Any, where: Path) -> str | dict[str, str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        out: dict[str, str] = {}
        for item in value:
            if not (
                isinstance(item, dict)
                and isinstance(item.get("name"), str)
                and isinstance(item.get("template"), str)
            ):
                raise TokenizerLoadError(
                    f"{where}: chat_template list entries must be {{'name', 'template'}} objects"
                )
            out[item["name"]] = item["template"]
        return out
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return {str(k): v for k, v in value.items()}
    raise TokenizerLoadError(
        f"{where}: chat_template must be a string or a list of named templates"
    )


def _templates_from_files(directory: Path) -> str | dict[str, str] | None:
    templates: dict[str, str] = {}
    jinja = directory / "chat_template.jinja"
    legacy_json = directory / "chat_template.json"
    if jinja.is_file():
        templates["default"] = jinja.read_text(encoding="utf-8")
    elif legacy_json.is_file():
        value = _read_json(legacy_json).get("chat_template")
        if isinstance(value, str):
            templates["default"] = value
    extra_dir = directory / CHAT_TEMPLATE_DIR
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
    if not templates:
        return None
    if list(templates) == ["default"]:
        return templates["default"]
    return templates


def _generation_eos(directory: Path) -> tuple[int, ...]:
    path = directory / "generation_config.json"
    if not path.is_file():
        return ()
    value = _read_json(path).get("eos_token_id")
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    return ()


def read_settings(files: TokenizerFiles) -> TokenizerSettings:
    directory = files.directory
    if directory is None:
        return TokenizerSettings()
    config_path = directory / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    where = str(config_path)

    decoder: dict[int, AddedTokenSpec] = {}
    raw_decoder = config.get("added_tokens_decoder")
    if isinstance(raw_decoder, dict):
        for idx, value in raw_decoder.items():
            spec = _token_spec(value, special=True, where=f"{where} added_tokens_decoder[{idx}]")
            if spec is not None:
                decoder[int(idx)] = spec

    named: dict[str, Any] = {name: config.get(name) for name in SPECIAL_TOKEN_NAMES}
    extra: Any = config.get("extra_special_tokens", config.get("additional_special_tokens"))
    map_path = directory / "special_tokens_map.json"
    if raw_decoder is None and map_path.is_file():
        for key, value in _read_json(map_path).items():
            if key in named:
                named[key] = value
            elif key in ("extra_special_tokens", "additional_special_tokens") and isinstance(
                value, list
            ):
                extra = list(extra or []) + [v for v in value if v not in (extra or [])]

    special: dict[str, AddedTokenSpec] = {}
    for name, value in named.items():
        spec = _token_spec(value, special=True, where=f"{where} {name}")
        if spec is not None:
            special[name] = spec
    extras: list[AddedTokenSpec] = []
    if isinstance(extra, dict):  # model-specific named extras: {"image_token": "<img>"}
        extra = list(extra.values())
    if isinstance(extra, list):
        for value in extra:
            spec = _token_spec(value, special=True, where=f"{where} extra_special_tokens")
            if spec is not None:
                extras.append(spec)

    template = _templates_from_files(directory)
    if template is None:
        template = _templates_from_config(config.get("chat_template"), config_path)

    def flag(name: str) -> bool | None:
        return bool(config[name]) if name in config and config[name] is not None else None

    return TokenizerSettings(
        special_tokens=special,
        extra_special_tokens=tuple(extras),
        added_tokens_decoder=decoder,
        add_bos_token=flag("add_bos_token"),
        add_eos_token=flag("add_eos_token"),
        chat_template=template,
        generation_eos_token_ids=_generation_eos(directory),
    )
