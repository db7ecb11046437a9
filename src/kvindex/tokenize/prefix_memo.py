"""Prefix memo: the ids of a long text prefix seen before, found with one comparison.

The segment cache (segments.py) already spares the tokenizer a long shared prefix, but each
request still scans the whole text for added tokens and plain cuts, hashes every chunk to
look it up, and copies its ids one chunk at a time: about 45 us for a 41 KB (8k-token)
prompt, whose fresh part is one short user turn. The memo keeps, per distinct prefix, the
text up to where the last request's final segment began and the ids before it; the next
text that starts with it (`str.startswith`, a memory compare) takes those ids whole and
runs the segment path on the rest only.

Why it is exact. A stored prefix P ends at a boundary between two pieces of the segment
path (between an added-token match and what follows, or at a plain-text cut), and
`SegmentedEncoder` stores it only if no suffix of P is a proper prefix of an added token.
For a text T = P + R:
 1. no added-token match of T starts inside P and ends after it (it would make a suffix of
    P a proper prefix of a token), so the matches inside P, found leftmost-longest on the
    same characters, are those of P's own text, and none crosses the boundary;
 2. a plain-text cut at the boundary (P ends with "\\n") is a cut in T iff T's next
    character is an ASCII letter (checked on lookup, `needs_letter`); the cuts before it
    depend only on characters inside P (plain_cuts.chunks);
 3. so T's pieces are P's pieces followed by the pieces of R processed alone (the scans
    and chunking restart at the boundary exactly as they do on R), and
    ids(T) = ids(P) + ids(R).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

_ENTRY_OVERHEAD = 160  # bytes of bookkeeping per prefix, roughly
_ASCII_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True, slots=True)
class MemoPrefix:
    text: str
    ids: tuple[int, ...]  # without the post-processor's wrapping
    needs_letter: bool  # ends at a plain-text cut: T[len(text)] must be an ASCII letter
    # Chain keys of the prefix's full blocks, filled by the scorer through the
    # SharedPrefixIds it is handed (kvindex.keys.prefix_chain_keys).
    keys: dict[tuple[int, int, int], list[int]] = field(default_factory=dict)


class PrefixMemo:
    """Prefixes grouped by their first `head` characters, at most `per_head` each (most
    recently stored or used first; the last is dropped), the whole bounded by approximate
    bytes; thread-safe."""

    def __init__(self, max_bytes: int, min_chars: int, head: int = 64, per_head: int = 8) -> None:
        self.max_bytes = max_bytes
        self.min_chars = min_chars
        self.head = max(1, min(head, min_chars))
        self.per_head = per_head
        self._groups: OrderedDict[str, list[MemoPrefix]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.entries = 0

    @staticmethod
    def _cost(prefix: MemoPrefix) -> int:
        # + the chain keys the scorer may keep for it (one 8-byte int per 16 ids, x4 roots)
        return len(prefix.text) + 10 * len(prefix.ids) + _ENTRY_OVERHEAD

    def find(self, text: str) -> MemoPrefix | None:
        """The longest stored prefix that `text` starts with and extends (never all of
        `text`: the last segment is always processed, so the next prefix can be stored)."""
        if len(text) <= self.min_chars:
            return None
        key = text[: self.head]
        with self._lock:
            group = self._groups.get(key)
            if group is None:
                return None
            best: MemoPrefix | None = None
            for prefix in group:
                n = len(prefix.text)
                if (
                    n < len(text)
                    and (best is None or n > len(best.text))
                    and (not prefix.needs_letter or text[n] in _ASCII_LETTERS)
                    and text.startswith(prefix.text)
                ):
                    best = prefix
            if best is not None:
                self.hits += 1
                self._groups.move_to_end(key)
                if group[0] is not best:
                    # Most recently used first: a prefix many prompts share (a system prompt
                    # before each conversation's turns) stays while the longer ones come and go.
                    group.remove(best)
                    group.insert(0, best)
            return best

    def holds(self, text: str) -> bool:
        with self._lock:
            group = self._groups.get(text[: self.head])
            return group is not None and any(p.text == text for p in group)

    def put(self, prefix: MemoPrefix) -> None:
        cost = self._cost(prefix)
        if len(prefix.text) < self.min_chars or cost > self.max_bytes:
            return
        key = prefix.text[: self.head]
        with self._lock:
            group = self._groups.setdefault(key, [])
            if any(p.text == prefix.text for p in group):
                return
            group.insert(0, prefix)
            self.bytes += cost
            self.entries += 1
            while len(group) > self.per_head:
                self._drop(group.pop())
            self._groups.move_to_end(key)
            while self.bytes > self.max_bytes and self._groups:
                _, oldest = self._groups.popitem(last=False)
                for p in oldest:
                    self._drop(p)

    def _drop(self, prefix: MemoPrefix) -> None:
        self.bytes -= self._cost(prefix)
        self.entries -= 1
