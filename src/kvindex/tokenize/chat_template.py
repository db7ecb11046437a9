"""Chat templates rendered the way transformers' `apply_chat_template` renders them.

Environment (transformers 5, utils/chat_template_utils.py): jinja2 ImmutableSandboxedEnvironment
with trim_blocks and lstrip_blocks, the loopcontrols extension and a `{% generation %}` block
tag (rendered as its body), a `tojson` filter that is plain json.dumps (ensure_ascii=False, no
HTML escaping, indent/separators/sort_keys passed through), globals `raise_exception`,
`strftime_now`, `dict` and a `namespace` that refuses underscore names. Variables: `messages`,
`tools`, `documents`, `add_generation_prompt`, the named special tokens (`bos_token`, ...) and
any extra keyword arguments (which override special tokens of the same name).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvindex.tokenize.errors import ChatTemplateError

# Names a message's reasoning may come under; templates read `reasoning_content` (and gpt-oss
# ones `thinking`), so transformers fills both from whichever is present.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for masks; renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A jinja namespace that refuses underscore-prefixed attributes (sandbox hardening)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes, got {name!r}"
            )


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


_ENV = _environment()


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"chat template does not compile (line {exc.lineno}): {exc.message}"
        ) from exc


def parse_template(source: str) -> jinja2.nodes.Template:
    try:
        return _ENV.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"chat template does not compile (line {exc.lineno}): {exc.message}"
        ) from exc


def select_template(
    templates: str | Mapping[str, str] | None,
    *,
    name_or_source: str | None,
    has_tools: bool,
) -> str:
    """transformers' get_chat_template: a named template, `tool_use` when tools are given,
    else `default`; a literal template string passed by the caller wins over a single one."""
    if isinstance(templates, Mapping):
        if name_or_source is not None and name_or_source in templates:
            return templates[name_or_source]
        if name_or_source is not None:
            return name_or_source
        if has_tools and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        raise ChatTemplateError(
            "this tokenizer has several chat templates and none is named 'default'; pass "
            f"chat_template=NAME, one of {sorted(templates)}"
        )
    if name_or_source is not None:
        return name_or_source
    if templates is None:
        raise ChatTemplateError(
            "this tokenizer has no chat template (no chat_template in tokenizer_config.json, no "
            "chat_template.jinja); add one to the model directory or pass chat_template=..."
        )
    return templates


def _plain(value: Any) -> Any:
    """Copy into plain JSON types, as transformers does before a template sees its inputs."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def render_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    tools: Sequence[Mapping[str, Any]] | None,
    documents: Sequence[Mapping[str, Any]] | None,
    special_tokens: Mapping[str, str],
    continue_final_message: bool | str = False,
    **kwargs: Any,
) -> str:
    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation")
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError(
            "continue_final_message and add_generation_prompt are exclusive; set one of them"
        )
    chat: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"chat messages must be objects, got {message!r}")
        # Keys whose value is None are dropped: templates handle a missing key, not a None.
        plain = _plain({k: v for k, v in message.items() if v is not None})
        chat.append(_alias_reasoning(plain))
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise ChatTemplateError("documents must be a list of objects with 'title' and 'text'")

    final_text: str | None = None
    if continue_final_message:
        field_name = (
            continue_final_message if isinstance(continue_final_message, str) else "content"
        )
        last = chat[-1]
        value = last.get(field_name)
        if value is None:
            raise ChatTemplateError(
                f"continue_final_message is set but the final message has no {field_name!r}"
            )
        if isinstance(value, list):
            for block in reversed(value):
                if isinstance(block, dict) and "text" in block:
                    final_text = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise ChatTemplateError("continue_final_message: the final message has no text")
        else:
            final_text = str(value)
            fields = [field_name]
            if field_name in _REASONING_FIELDS:
                fields = [f for f in _REASONING_FIELDS if last.get(f) == value]
            for f in fields:
                last[f] = last[f] + _CONTINUE_TAG

    variables: dict[str, Any] = {**special_tokens, **_plain(dict(kwargs))}
    template = compile_template(source)
    try:
        rendered = template.render(
            messages=chat,
            tools=_plain(list(tools)) if tools is not None else None,
            documents=_plain(list(documents)) if documents is not None else None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template raised: {exc}") from exc
    except Exception as exc:  # templates are untrusted code: any failure is the template's
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc

    if final_text is not None:
        tag = _CONTINUE_TAG.strip()
        if final_text.strip() not in rendered or tag not in rendered:
            raise ChatTemplateError(
                "continue_final_message is set but the template dropped the final message"
            )
        loc = rendered.rindex(tag)
        if rendered[loc : loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            rendered = rendered[:loc]
        else:
            rendered = rendered[:loc].rstrip()
    return rendered


# --- content format detection (vLLM's "auto" chat-template content format) -------------------


def template_iterates_content(source: str) -> bool:
    """True when the template loops over a message's content (vLLM then passes content as a
    list of parts, the "openai" format); False means content is passed as one string."""
    ast = parse_template(source)
    content_aliases: set[str] = set()
    for node in ast.find_all(jinja2.nodes.Assign):
        if isinstance(node.target, jinja2.nodes.Name) and _is_content_access(node.node, set()):
            content_aliases.add(node.target.name)
    for loop in ast.find_all(jinja2.nodes.For):
        if _is_content_access(loop.iter, content_aliases):
            return True
    return False


def _is_content_access(node: jinja2.nodes.Node, aliases: set[str]) -> bool:
    if isinstance(node, jinja2.nodes.Name):
        return node.name in aliases
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, jinja2.nodes.Getitem):
        arg = node.arg
        return isinstance(arg, jinja2.nodes.Const) and arg.value == "content"
    if isinstance(node, jinja2.nodes.Filter) and node.node is not None:
        return _is_content_access(node.node, aliases)
    return False
