"""llm-d's request-handling plugins: body parsers (selected by the config's top-level
`parser`) and the request-attribute reporter.

This picker parses every request body itself (`epp.requests`: OpenAI completions, chat,
responses, embeddings, Anthropic messages), so `openai-parser` names what it already does;
the other parsers load and say at start-up what this picker does instead."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from epp.framework.params import Params
from epp.framework.plugin import Plugin
from epp.framework.registry import BuildContext, PluginType, Registry
from epp.plugins.common import no_parameters

log = logging.getLogger(__name__)


class RequestParserPlugin(Plugin):
    """A body parser named in the config (`parser.pluginRef`)."""

    # What this picker does for a request when this parser is configured (start-up log).
    behaviour_here: str = ""


class OpenAIParser(RequestParserPlugin):
    type_name = "openai-parser"
    behaviour_here = "OpenAI-compatible bodies are parsed by the picker's built-in parser"


class PassthroughParser(RequestParserPlugin):
    type_name = "passthrough-parser"
    behaviour_here = (
        "does not pass bodies through unparsed: the picker still parses each body as an "
        "OpenAI-compatible request (one it cannot parse is routed without prompt-based "
        "scoring)"
    )


class VertexAIParser(RequestParserPlugin):
    type_name = "vertexai-parser"
    behaviour_here = (
        "does not parse Vertex AI request or response bodies: bodies are parsed as "
        "OpenAI-compatible requests, so Vertex AI prompts get no prompt-based scoring and no "
        "usage accounting"
    )


class VLLMGRPCParser(RequestParserPlugin):
    type_name = "vllmgrpc-parser"
    behaviour_here = (
        "does not parse vLLM's gRPC (vllm.grpc.engine) messages: the picker serves HTTP model "
        "servers only, so gRPC requests get no prompt-based scoring and no usage accounting"
    )


def _parser_builder(
    cls: type[RequestParserPlugin],
) -> Callable[[str, None, BuildContext], Plugin]:
    def build(name: str, _p: None, _ctx: BuildContext) -> Plugin:
        if cls is OpenAIParser:
            log.info("%s %r: %s", cls.type_name, name, cls.behaviour_here)
        else:
            log.warning("%s %r: %s", cls.type_name, name, cls.behaviour_here)
        return cls(name)

    return build


# --- request-attribute-reporter -----------------------------------------------------------


@dataclass(frozen=True)
class ReportedAttribute:
    namespace: str
    name: str
    expression: str
    condition: str = ""


def _parse_reporter(params: Params) -> ReportedAttribute:
    attributes = params.items("attributes")
    if len(attributes) != 1:
        raise params.fail("attributes", "must contain exactly one entry")
    if not isinstance(attributes[0], dict):
        raise params.fail("attributes[0]", "must be a mapping")
    entry = Params(attributes[0], "attributes[0]")
    key = entry.nested("key")
    name = key.string("name", "")
    if not name:
        raise key.fail("name", "cannot be empty")
    namespace = key.string("namespace", "") or "envoy.lb"
    key.finish()
    expression = entry.string("expression", "")
    if not expression:
        raise entry.fail("expression", "cannot be empty")
    condition = entry.string("condition", "")
    entry.finish()
    return ReportedAttribute(namespace, name, expression, condition)


class RequestAttributeReporter(Plugin):
    """llm-d evaluates a CEL expression over the response's `usage` and writes the integer
    result to Envoy dynamic metadata (`namespace`/`name`) for rate limiting. This picker has
    no CEL evaluator and writes no response dynamic metadata: the attribute is not reported
    (said at start-up)."""

    type_name = "request-attribute-reporter"

    def __init__(self, name: str, attribute: ReportedAttribute) -> None:
        super().__init__(name)
        self.attribute = attribute


def register(registry: Registry) -> None:
    for cls in (OpenAIParser, PassthroughParser, VertexAIParser, VLLMGRPCParser):
        registry.register(
            PluginType(
                cls.type_name,
                cls,
                no_parameters,
                _parser_builder(cls),
                "request body parser",
            )
        )

    def build_reporter(name: str, a: ReportedAttribute, _ctx: BuildContext) -> Plugin:
        log.warning(
            "request-attribute-reporter %r: does not evaluate %r (CEL over the response usage) "
            "and writes no dynamic metadata %s.%s: not supported by this picker",
            name,
            a.expression,
            a.namespace,
            a.name,
        )
        return RequestAttributeReporter(name, a)

    registry.register(
        PluginType(
            RequestAttributeReporter.type_name,
            RequestAttributeReporter,
            _parse_reporter,
            build_reporter,
            "usage attributes as Envoy metadata (not reported here)",
        )
    )
