"""Cut points inside plain text (no added tokens) where tokenization is provably context-free,
for the byte-level BPE pre-tokenizers whose regexes we have checked by hand.

Rule: a cut at position p where text[p-1] == "\\n" and text[p] is an ASCII letter. For the
approved pipelines, ids(text) == ids(text[:p]) + ids(text[p:]). The argument (details in
docs/tokenization.md) holds for each approved regex, applied with Split(behavior=Isolated):
 1. no alternative can match "\\n" followed by a letter (newlines occur only in
    whitespace-only alternatives or at the end of a punctuation run), so no match spans p;
 2. p-1 and p each start or continue a match, so no unmatched stretch spans p either;
 3. left of p, alternatives behave the same whether the text ends at p or goes on with a
    letter: greedy runs stop at p in both cases, and the one lookahead, `\\s+(?!\\S)`, is never
    reached for a whitespace run ending in "\\n", because the earlier `\\s*[\\r\\n]+` matches it;
 4. right of p, no alternative looks behind or uses anchors, so scanning from p is scanning
    text[p:] from 0.
Digit and CJK splits (DeepSeek) match neither "\\n" nor ASCII letters, so they do not cross p
either; ByteLevel(use_regex=False) maps bytes per piece, and BPE encodes each piece alone.
NFC normalization (Qwen2) never composes across "\\n" + ASCII letter (both are starters
without compositions), so it also commutes with the cut. GPT-2's own regex is NOT approved:
there `\\s+(?!\\S)` splits "  \\n" before a letter differently when the text ends at p.
"""

from __future__ import annotations

import re
from typing import Any

_CL100K = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!" + '"' + r"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?"
    r"[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
APPROVED_SPLIT_SEQUENCES: frozenset[tuple[str, ...]] = frozenset({(_CL100K,), (_QWEN2,), _DEEPSEEK})
_IDENTITY_OR_NFC = frozenset({"NFC"})
CUT = re.compile(r"\n(?=[A-Za-z])")


def _canonical(pattern: str) -> str:
    # A literal CR/LF in a regex means the same as the escape; JSON files use either.
    return pattern.replace("\r", r"\r").replace("\n", r"\n")


def _normalizer_ok(node: Any) -> bool:
    if node is None:
        return True
    if node.get("type") == "Sequence":
        return all(_normalizer_ok(n) for n in node.get("normalizers", []))
    return node.get("type") in _IDENTITY_OR_NFC


def plain_cuts_reason(spec: dict[str, Any], added_contents: list[str]) -> str | None:
    """None when the cut rule is proven for this tokenizer, else why it is not."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
        return "model is not a deterministic BPE"
    if not _normalizer_ok(spec.get("normalizer")):
        return "normalizer is neither identity nor NFC"
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not steps:
        return "no pre-tokenizer"
    *splits, last = steps
    if not (
        last.get("type") == "ByteLevel"
        and not last.get("add_prefix_space")
        and not last.get("use_regex", True)
    ):
        return "pre-tokenizer does not end with ByteLevel(add_prefix_space=False, use_regex=False)"
    patterns: list[str] = []
    for step in splits:
        regex = (step.get("pattern") or {}).get("Regex")
        if not (
            step.get("type") == "Split"
            and step.get("behavior") == "Isolated"
            and not step.get("invert")
            and isinstance(regex, str)
        ):
            return "pre-tokenizer has a step other than an isolated regex Split"
        patterns.append(_canonical(regex))
    approved = {tuple(_canonical(p) for p in seq) for seq in APPROVED_SPLIT_SEQUENCES}
    if tuple(patterns) not in approved:
        return "pre-tokenizer regexes are not among the approved ones"
    if any(CUT.search(content) for content in added_contents):
        return "an added token contains a newline followed by a letter"
    return None


def chunks(text: str, min_chars: int) -> list[str]:
    """Cut text at the first cut point at or after every `min_chars` characters. Where the
    cuts fall depends only on the text up to one character past each cut, so two texts with a
    long common prefix are cut identically along it."""
    if len(text) <= min_chars:
        return [text]
    out: list[str] = []
    start = 0
    while True:
        match = CUT.search(text, start + min_chars)
        if match is None:
            break
        out.append(text[start : match.end()])
        start = match.end()
    out.append(text[start:])
    return out
