"""`kvindex hash`: print vLLM block digests and their 64-bit wire values for given tokens.

Useful to check what an engine should publish for a prompt (see docs/vllm-hash.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvindex.errors import KVIndexError
from kvindex.vllm_hash import (
    DEFAULT_SHA256_SEED,
    HASH_ALGOS,
    MultiModalItem,
    RequestExtras,
    check_algo,
    default_seed,
    request_block_hashes,
    wire_value,
)


class InputError(KVIndexError, ValueError):
    """Bad command-line input; the message names the fix."""


def parse_tokens(tokens: str | None, token_range: str | None) -> list[int]:
    if (tokens is None) == (token_range is None):
        raise InputError("give exactly one of --tokens 1,2,3 or --range START:END")
    if tokens is not None:
        try:
            return [int(t) for t in tokens.replace(" ", "").split(",") if t != ""]
        except ValueError as exc:
            raise InputError(f"--tokens must be comma-separated integers ({exc})") from None
    assert token_range is not None
    start_s, sep, end_s = token_range.partition(":")
    try:
        start, end = int(start_s), int(end_s)
    except ValueError:
        raise InputError(f"--range must be START:END integers, got {token_range!r}") from None
    if not sep or end < start or start < 0:
        raise InputError(f"--range must be START:END with 0 <= START <= END, got {token_range!r}")
    return list(range(start, end))


def parse_mm(spec: str) -> MultiModalItem:
    # ID:OFFSET[:LENGTH]; the identifier may itself contain colons, so split from the right.
    parts = spec.rsplit(":", 2)
    try:
        if len(parts) == 3 and parts[0] and parts[2].lstrip("-").isdigit():
            return MultiModalItem(parts[0], int(parts[1]), int(parts[2]))
        ident, offset = spec.rsplit(":", 1)
        if not ident:
            raise ValueError
        return MultiModalItem(ident, int(offset), 1)
    except ValueError:
        raise InputError(f"--mm must be ID:OFFSET or ID:OFFSET:LENGTH, got {spec!r}") from None


def build_extras(args: argparse.Namespace) -> RequestExtras:
    lora_name: str | None = None
    lora_path: str | None = None
    if args.lora:
        lora_name, _, path = args.lora.partition(":")
        lora_path = path or None
        if not lora_name:
            raise InputError("--lora must be NAME or NAME:PATH")
    return RequestExtras(
        lora_name=lora_name,
        lora_path=lora_path,
        mm_items=tuple(parse_mm(m) for m in args.mm),
        cache_salt=args.cache_salt,
    )


def run(args: argparse.Namespace) -> int:
    try:
        algo = check_algo(args.algo)
        tokens = parse_tokens(args.tokens, args.range)
        if args.block_size <= 0:
            raise InputError("--block-size must be a positive integer")
        extras = build_extras(args)
    except ValueError as exc:
        print(f"kvindex hash: error: {exc}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else default_seed(algo)
    if seed is None:
        print(
            f"kvindex hash: error: {algo} has no reproducible default seed; pass --seed "
            "(the engine's PYTHONHASHSEED)",
            file=sys.stderr,
        )
        return 2
    digests = request_block_hashes(tokens, args.block_size, extras, algo, seed)
    rows: list[dict[str, Any]] = [
        {
            "block": i,
            "digest": d.hex(),
            "wire_value": wire_value(d),
            "extra_keys": _jsonable(extras.event_keys(i, args.block_size)),
        }
        for i, d in enumerate(digests)
    ]
    if args.json:
        print(
            json.dumps({"algo": algo, "seed": seed, "block_size": args.block_size, "blocks": rows})
        )
        return 0
    print(f"# algo={algo} seed={seed!r} block_size={args.block_size} full_blocks={len(rows)}")
    for row in rows:
        print(f"{row['block']:>5}  {row['digest']}  {row['wire_value']:>20}")
    return 0


def _jsonable(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "hash",
        help="print vLLM block digests and wire values for tokens",
        description="Compute vLLM prefix-cache block hashes (full blocks only).",
    )
    parser.add_argument("--tokens", help="comma-separated token ids, e.g. 1,2,3")
    parser.add_argument("--range", help="token ids START:END (END exclusive), e.g. 0:64")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--algo", default="sha256_cbor", help=f"one of {', '.join(HASH_ALGOS)}")
    parser.add_argument(
        "--seed",
        help=f"NONE_HASH seed string (default: PYTHONHASHSEED, else {DEFAULT_SHA256_SEED} for "
        "sha256*)",
    )
    parser.add_argument("--lora", help="LoRA adapter NAME or NAME:PATH")
    parser.add_argument("--cache-salt", help="cache_salt of the request (first block only)")
    parser.add_argument(
        "--mm",
        action="append",
        default=[],
        metavar="ID:OFFSET[:LENGTH]",
        help="multimodal item at prompt OFFSET spanning LENGTH tokens (default 1); repeatable",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)
