"""Exact segment cache: tokenize long shared prefixes once.

Why it is exact. `tokenizers` encodes a text in this order (tokenizer/added_vocabulary.rs):
 1. split the raw text on the added tokens whose `normalized` flag is false, found by one
    leftmost-longest, non-overlapping scan (an Aho-Corasick automaton);
 2. normalize each remaining piece, split it again on the `normalized` added tokens;
 3. pre-tokenize and run the model on each piece on its own;
 4. post-process the whole (BOS/EOS, templates).
Steps 2-3 never look across a step-1 match, so the ids of a text are the ids of each gap between
step-1 matches, encoded alone, with each match's id between them. We run the same scan (a regex
alternation of the token strings, longest first, is leftmost-longest) and look gaps up in an LRU
keyed by their text. A gap scanned alone contains no match (any match inside it would start
before the next match of the whole-text scan, contradicting leftmost order), so the library
treats it exactly as it treated it inside the whole text.

Preconditions, checked per tokenizer (otherwise every call is tokenized whole, and counted):
 - no step-1 token has lstrip / rstrip / single_word (they would consume or look at neighbours);
 - no pre-tokenizer depends on a piece's absolute offset (Metaspace prepend_scheme="first");
 - for add_special_tokens=True, the post-processor only wraps the ids (TemplateProcessing,
   BertProcessing, RobertaProcessing, ByteLevel, or a Sequence of these), so its prefix and
   suffix are measured once.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from kvindex.keys import SharedPrefixIds
from kvindex.tokenize.cache_config import TokenizationCacheConfig
from kvindex.tokenize.plain_cuts import chunks, plain_cuts_reason
from kvindex.tokenize.prefix_memo import MemoPrefix, PrefixMemo

_WRAPPING_POST_PROCESSORS = frozenset(
    {"TemplateProcessing", "BertProcessing", "RobertaProcessing", "ByteLevel"}
)
_ENTRY_OVERHEAD = 96  # bytes of dict/OrderedDict bookkeeping per entry, roughly


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    uncached_calls: int = 0  # calls tokenized whole because exactness could not be shown
    prefix_hits: int = 0  # calls that took a long prefix's ids from the prefix memo
    prefix_entries: int = 0
    prefix_bytes: int = 0


class SegmentLRU:
    """Gap text -> ids, bounded by approximate bytes; thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @staticmethod
    def _cost(text: str, ids: tuple[int, ...]) -> int:
        return len(text) + 8 * len(ids) + _ENTRY_OVERHEAD

    def get(self, text: str) -> tuple[int, ...] | None:
        with self._lock:
            ids = self._entries.get(text)
            if ids is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(text)
            self.stats.hits += 1
            return ids

    def put(self, text: str, ids: tuple[int, ...]) -> None:
        cost = self._cost(text, ids)
        if cost > self._max_bytes:
            return
        with self._lock:
            if text in self._entries:
                return
            self._entries[text] = ids
            self.stats.bytes += cost
            while self.stats.bytes > self._max_bytes:
                old_text, old_ids = self._entries.popitem(last=False)
                self.stats.bytes -= self._cost(old_text, old_ids)
                self.stats.evictions += 1
            self.stats.entries = len(self._entries)


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _processor_types(node: Any) -> list[str]:
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [t for p in node.get("processors", []) for t in _processor_types(p)]
    return [str(node.get("type"))]


def _component(component: Any) -> Any:
    return None if component is None else json.loads(component.__getstate__())


def pipeline_spec(tokenizer: HFTokenizer) -> dict[str, Any]:
    """The pipeline parts of tokenizer.json that the cache's preconditions read, without
    serialising the vocabulary (to_str() of a 128k-token BPE takes half a second)."""
    model = tokenizer.model
    return {
        "normalizer": _component(tokenizer.normalizer),
        "pre_tokenizer": _component(tokenizer.pre_tokenizer),
        "post_processor": _component(tokenizer.post_processor),
        "model": {"type": type(model).__name__, "dropout": getattr(model, "dropout", None)},
    }


def _alternation(contents: Iterator[str] | Any) -> re.Pattern[str] | None:
    """A leftmost-longest matcher for a set of literal strings, as a trie-shaped regex: at
    each node the (distinct-first-character) extensions are tried before ending there, so
    the match found at a position is the longest token starting there, and finditer scans
    positions left to right. The trie shares prefixes, so a failed position costs one
    character test instead of one test per token (DeepSeek has ~1,300 added tokens)."""
    words = sorted({c for c in contents if c})
    if not words:
        return None
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}  # end of a token
    return re.compile(_trie_regex(trie))


class _TokenScanner:
    """The matches of `_alternation(words)`, found faster. A pattern whose first character
    is a literal is scanned with a fast substring search; one whose tokens start with
    different characters (DeepSeek's normalized tokens start with "<" or U+FF5C) is tried at
    every position, ten times slower on a long gap. So the tokens are grouped by first
    character, one trie per group. Tokens of different groups never start at the same
    position, so the earliest match over the groups (each the longest of its group there)
    is the match the single trie finds; after it, each group searches on from its end."""

    # More groups than this: one search per group per match costs more than it saves.
    MAX_GROUPS = 4

    def __init__(self, words: Iterable[str]) -> None:
        distinct = sorted({w for w in words if w})
        groups: dict[str, list[str]] = {}
        for word in distinct:
            groups.setdefault(word[0], []).append(word)
        parts = list(groups.values()) if len(groups) <= self.MAX_GROUPS else [distinct]
        self.patterns = [p for p in (_alternation(part) for part in parts) if p is not None]

    def finditer(self, text: str) -> Iterator[re.Match[str]]:
        patterns = self.patterns
        if len(patterns) == 1:
            yield from patterns[0].finditer(text)
            return
        nexts = [p.search(text) for p in patterns]
        while True:
            best: re.Match[str] | None = None
            for m in nexts:
                if m is not None and (best is None or m.start() < best.start()):
                    best = m
            if best is None:
                return
            yield best
            end = best.end()
            for i, m in enumerate(nexts):
                if m is not None and m.start() < end:
                    nexts[i] = patterns[i].search(text, end)


def _trie_regex(node: dict[str, Any]) -> str:
    branches = [re.escape(char) + _trie_regex(child) for char, child in node.items() if char]
    ends_here = "" in node
    if not branches:
        return ""
    if len(branches) == 1 and not ends_here:
        return branches[0]
    body = "|".join(branches)
    return f"(?:{body})?" if ends_here else f"(?:{body})"


_BRACKETED = re.compile(r"<[^<>]*>")


def _never_overlap(contents: Any) -> bool:
    """True when every token is `<...>` with no other `<`/`>` inside: then two occurrences
    in a text never overlap or nest (an overlap would need a suffix of one, ending in `>`,
    to be a prefix of another, starting with `<`; each holds those only at its ends)."""
    return all(_BRACKETED.fullmatch(c) for c in contents)


def _is_identity_normalizer(node: Any) -> bool:
    if node is None:
        return True
    if node.get("type") == "Sequence":
        return all(_is_identity_normalizer(n) for n in node.get("normalizers", []))
    return False


class SegmentedEncoder:
    """Encodes text as the library does, reusing cached ids of gaps between added tokens."""

    def __init__(self, tokenizer: HFTokenizer, config: TokenizationCacheConfig) -> None:
        self._tok = tokenizer
        # Without offsets (tokenizers >= 0.21): the same ids, ~20% faster on a fresh turn.
        self._encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        self.lru = SegmentLRU(config.max_bytes)
        spec = pipeline_spec(tokenizer)
        added = tokenizer.get_added_tokens_decoder()
        self.unsafe_reason = self._check_preconditions(spec, added)
        # One int object per token id, shared by every cached segment and prefix. A
        # tokenizer call makes a fresh int per id, scattered over the heap; copying and
        # freeing a request's 8k ids then touches 8k objects' reference counts, thousands
        # of cache misses on a busy machine. Shared, they are the prompt's distinct ids
        # (far fewer). Grows with the distinct ids seen, at most the vocabulary.
        self._int_of: dict[int, int] = {}
        self._ids: dict[str, int] = {
            t.content: self._shared(i) for i, t in added.items() if t.content
        }
        self._step1: re.Pattern[str] | None = None
        self._step2: re.Pattern[str] | None = None
        # What encode scans with: the same matches as _step1 / _step2, found faster.
        self._scan1: _TokenScanner | None = None
        self._scan2: _TokenScanner | None = None
        if self.unsafe_reason is None:
            words1 = [t.content for t in added.values() if not t.normalized]
            words2: list[str] = []
            self._step1 = _alternation(words1)
            # Step-2 tokens are matched on normalized text; with an identity normalizer that is
            # the raw gap, so they split it too (unless they strip or match whole words).
            normalized = [t for t in added.values() if t.normalized]
            if _is_identity_normalizer(spec.get("normalizer")) and not any(
                t.lstrip or t.rstrip or t.single_word for t in normalized
            ):
                words2 = [t.content for t in normalized]
                self._step2 = _alternation(words2)
                if self._step2 is not None and _never_overlap(self._ids):
                    # No two token occurrences can overlap, so the two passes find exactly
                    # the matches of one pass over all tokens: scan once.
                    words1, words2 = list(self._ids), []
                    self._step1 = _alternation(words1)
                    self._step2 = None
            if self._step1 is not None:
                self._scan1 = _TokenScanner(words1)
            if self._step2 is not None:
                self._scan2 = _TokenScanner(words2)
        self._wrap = self._measure_wrap(spec)
        self._chunk_chars = config.chunk_chars
        self.plain_cuts_reason = plain_cuts_reason(spec, [t.content for t in added.values()])
        # The prefix memo needs each match's length (to know where the pieces end) and the
        # proper prefixes of every added token (a prefix ending in one is not stored).
        lengths: dict[int, int] = {}
        for content, i in self._ids.items():
            if lengths.setdefault(i, len(content)) != len(content):
                lengths = {}  # one id, two contents of different lengths: no memo
                break
        self._token_len = lengths
        self._token_heads = {c[:k] for c in self._ids for k in range(1, len(c))}
        self._token_head_max = max((len(c) for c in self._ids), default=1) - 1
        self.memo = (
            PrefixMemo(config.prefix_memo_bytes, config.prefix_min_chars)
            if config.prefix_memo_bytes > 0 and (lengths or not self._ids)
            else None
        )

    def _shared(self, token_id: int) -> int:
        return self._int_of.setdefault(token_id, token_id)

    @property
    def exact(self) -> bool:
        return self.unsafe_reason is None

    @staticmethod
    def _check_preconditions(spec: dict[str, Any], added: dict[int, Any]) -> str | None:
        model = spec.get("model") or {}
        if model.get("dropout") not in (None, 0, 0.0):
            return "BPE dropout makes tokenization random"
        for tok in added.values():
            if not tok.normalized and (tok.lstrip or tok.rstrip or tok.single_word):
                return f"added token {tok.content!r} strips or matches whole words"
        for node in _walk(spec.get("pre_tokenizer")):
            if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                return "Metaspace pre-tokenizer prepends only at offset 0"
        return None

    def _measure_wrap(self, spec: dict[str, Any]) -> tuple[list[int], list[int]] | None:
        types = _processor_types(spec.get("post_processor"))
        if any(t not in _WRAPPING_POST_PROCESSORS for t in types):
            return None
        probe = "a"
        inner = self._tok.encode(probe, add_special_tokens=False).ids
        outer = self._tok.encode(probe, add_special_tokens=True).ids
        for start in range(len(outer) - len(inner) + 1):
            if outer[start : start + len(inner)] == inner:
                return outer[:start], outer[start + len(inner) :]
        return None

    def _cut(self, scanner: _TokenScanner | None, text: str) -> list[str | int]:
        """Text cut at the tokens' leftmost-longest matches: gaps (str) and match ids."""
        if scanner is None:
            return [text] if text else []
        out: list[str | int] = []
        pos = 0
        for match in scanner.finditer(text):
            if match.start() > pos:
                out.append(text[pos : match.start()])
            out.append(self._ids[match.group()])
            pos = match.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def _whole(self, text: str, add_special_tokens: bool) -> list[int]:
        with self.lru._lock:
            self.lru.stats.uncached_calls += 1
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if not self.exact or (add_special_tokens and self._wrap is None):
            return self._whole(text, add_special_tokens)
        wrap = self._wrap if add_special_tokens else None
        memo = self.memo
        prefix = memo.find(text) if memo is not None else None
        start = 0
        out: list[int]
        if prefix is not None:
            # The ids say which shared prefix they start with, so the scorer reuses its
            # chain keys (kvindex.keys.prefix_chain_keys).
            shared = SharedPrefixIds(wrap[0]) if wrap is not None else SharedPrefixIds()
            shared.extend(prefix.ids)
            shared.lead = len(shared)
            shared.lead_keys = prefix.keys
            out = shared
            start = len(prefix.text)
            text_rest = text[start:]
        else:
            out = list(wrap[0]) if wrap is not None else []
            text_rest = text
        pieces = self._pieces(text_rest)
        found, missing = self._lookup(pieces)
        new = set(missing)
        # Where the last segment starts (chars into text_rest, ids into out): the text
        # before it is the prefix the memo may keep for the next request that extends this
        # one. Where the first segment the LRU did not hold starts: the text before it is
        # what this request shares with earlier ones (a system prompt before a fresh user
        # turn), kept for the next request that shares it too.
        offset, last_at, ids_before, cut_before = 0, -1, 0, False
        new_at, new_ids_before, new_cut_before = -1, 0, False
        previous_is_text = prefix is not None and prefix.needs_letter
        lengths = self._token_len
        for piece in pieces:
            if isinstance(piece, int):
                out.append(piece)
                if lengths:
                    offset += lengths[piece]
                previous_is_text = False
            else:
                last_at, ids_before, cut_before = offset, len(out), previous_is_text
                if new_at < 0 and piece in new:
                    new_at, new_ids_before, new_cut_before = last_at, ids_before, cut_before
                out.extend(found[piece])
                offset += len(piece)
                previous_is_text = True
        if memo is not None:
            first = len(wrap[0]) if wrap is not None else 0  # the ids after the wrapping
            if 0 < new_at < last_at:
                self._remember(text, start + new_at, out, first, new_ids_before, new_cut_before)
            if last_at > 0:
                self._remember(text, start + last_at, out, first, ids_before, cut_before)
        if wrap is not None:
            out.extend(wrap[1])
        return out

    def _pieces(self, text: str) -> list[str | int]:
        """The text cut at added tokens (ids) and, where proven exact, at plain cuts."""
        pieces: list[str | int] = []
        for part in self._cut(self._scan1, text):
            if isinstance(part, str) and self._scan2 is not None:
                pieces.extend(self._cut(self._scan2, part))
            else:
                pieces.append(part)
        if self.plain_cuts_reason is None:
            pieces = [
                chunk
                for piece in pieces
                for chunk in (
                    chunks(piece, self._chunk_chars) if isinstance(piece, str) else (piece,)
                )
            ]
        return pieces

    def _lookup(self, pieces: list[str | int]) -> tuple[dict[str, tuple[int, ...]], list[str]]:
        """Ids of every text piece, and the pieces the LRU did not hold: from the LRU, the
        rest in one batch call."""
        missing: list[str] = []
        found: dict[str, tuple[int, ...]] = {}
        for piece in pieces:
            if isinstance(piece, str) and piece not in found:
                ids = self.lru.get(piece)
                if ids is None:
                    missing.append(piece)
                    found[piece] = ()
                else:
                    found[piece] = ids
        if missing:
            for piece, enc in zip(
                missing, self._encode_batch(missing, add_special_tokens=False), strict=True
            ):
                ids = tuple(map(self._int_of.setdefault, enc.ids, enc.ids))
                found[piece] = ids
                self.lru.put(piece, ids)
        return found, missing

    def _remember(
        self, text: str, end: int, out: list[int], first: int, last: int, cut: bool
    ) -> None:
        """Offer text[:end] (ids out[first:last]) to the memo, if it may be reused exactly:
        no suffix of it starts an added token (prefix_memo.py, point 1)."""
        memo = self.memo
        assert memo is not None
        if end < memo.min_chars:
            return
        heads = self._token_heads
        for k in range(1, min(self._token_head_max, end) + 1):
            if text[end - k : end] in heads:
                return
        candidate = text[:end]
        if memo.holds(candidate):
            return
        memo.put(MemoPrefix(candidate, tuple(out[first:last]), cut))
