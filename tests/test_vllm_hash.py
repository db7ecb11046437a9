"""vLLM block hashes: the known vector, the CBOR encoder against cbor2, and the definition."""

from __future__ import annotations

import hashlib
import pickle

import cbor2
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from kvindex import vllm_hash
from kvindex.vllm_hash import (
    MultiModalItem,
    RequestExtras,
    block_hashes,
    cbor_encode,
    default_seed,
    none_hash,
    request_block_hashes,
    wire_value,
)

KNOWN_NONE_HASH = "4e1195df020de59e0d65a33a4279f1183e7ae4e5d980e309f8b55adff2e61c3e"
KNOWN_FIRST_BLOCK_WIRE = 12687895063098490012


def test_known_vector_sha256_cbor_seed_0() -> None:
    assert none_hash("sha256_cbor", "0").hex() == KNOWN_NONE_HASH
    first = block_hashes(list(range(16)), 16, "sha256_cbor", "0")
    assert len(first) == 1
    assert wire_value(first[0]) == KNOWN_FIRST_BLOCK_WIRE


def test_none_hash_input_is_cbor_text_string() -> None:
    assert cbor_encode("0") == b"\x61\x30"
    assert none_hash("sha256_cbor", "0") == hashlib.sha256(b"\x61\x30").digest()


def test_first_block_cbor_layout() -> None:
    parent = none_hash("sha256_cbor", "0")
    encoded = cbor_encode((parent, tuple(range(16)), None))
    assert encoded[:3] == b"\x83\x58\x20"
    assert encoded[3:35] == parent
    assert encoded[35] == 0x90  # array(16)
    assert encoded[36:52] == bytes(range(16))
    assert encoded[-1] == 0xF6


hash_inputs = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.binary(max_size=40)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=6) | st.tuples(children, children),
    max_leaves=30,
)


@given(hash_inputs)
def test_cbor_encoder_matches_cbor2_canonical(value: object) -> None:
    assert cbor_encode(value) == cbor2.dumps(value, canonical=True)


def test_cbor_rejects_unsupported_types() -> None:
    with pytest.raises(TypeError, match="float"):
        cbor_encode(1.5)


def _reference_chain(algo: str, seed: str, tokens: list[int], size: int) -> list[bytes]:
    # The definition, written out with the libraries vLLM itself calls.
    def h(obj: object) -> bytes:
        if algo == "sha256":
            return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()
        if algo == "sha256_cbor":
            return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()
        if algo == "xxhash":
            return bytes(xxhash.xxh3_128_digest(pickle.dumps(obj, protocol=5)))
        return bytes(xxhash.xxh3_128_digest(cbor2.dumps(obj, canonical=True)))

    prev = h(seed)
    out = []
    for i in range(len(tokens) // size):
        prev = h((prev, tuple(tokens[i * size : (i + 1) * size]), None))
        out.append(prev)
    return out


@pytest.mark.parametrize("algo", vllm_hash.HASH_ALGOS)
@given(
    tokens=st.lists(st.integers(min_value=0, max_value=200_000), max_size=70),
    size=st.integers(min_value=1, max_value=20),
    seed=st.text(min_size=1, max_size=8),
)
def test_chain_matches_definition(
    algo: vllm_hash.HashAlgo, tokens: list[int], size: int, seed: str
) -> None:
    ours = block_hashes(tokens, size, algo, seed)
    assert ours == _reference_chain(algo, seed, tokens, size)
    assert all(len(d) == vllm_hash.DIGEST_SIZES[algo] for d in ours)


def test_only_full_blocks_hashed_and_prefix_stable() -> None:
    tokens = list(range(40))
    assert len(block_hashes(tokens, 16)) == 2
    assert block_hashes(tokens[:32], 16) == block_hashes(tokens, 16)
    assert block_hashes(tokens[:15], 16) == []


def test_wire_value_is_last_8_bytes_unsigned() -> None:
    digest = bytes(range(24)) + b"\xff" * 8
    assert wire_value(digest) == 2**64 - 1
    assert wire_value(bytes(16)) == 0


def test_default_seed_rules() -> None:
    assert default_seed("sha256_cbor", {"PYTHONHASHSEED": "7"}) == "7"
    assert default_seed("sha256", {}) == "vllm-none-hash"
    assert default_seed("xxhash_cbor", {}) is None
    # Unseeded xxhash: random per call, like vLLM per process.
    assert none_hash("xxhash", None) != none_hash("xxhash", None)


def test_tagged_extra_keys_and_untagged_event_keys() -> None:
    extras = RequestExtras(
        lora_name="sql",
        lora_path="/adapters/sql",
        mm_items=(MultiModalItem("img-1", offset=10, length=12),),
        cache_salt="tenant-a",
    )
    assert extras.hash_keys(0, 16) == (
        ("lora", "sql", "/adapters/sql"),
        ("mm", "img-1", 10),
        ("cache_salt", "tenant-a"),
    )
    # Second block: the image continues (offset negative), no salt.
    assert extras.hash_keys(1, 16) == (("lora", "sql", "/adapters/sql"), ("mm", "img-1", -6))
    assert extras.hash_keys(2, 16) == (("lora", "sql", "/adapters/sql"),)
    assert extras.event_keys(0, 16) == ("sql", ("img-1", 10), "tenant-a")
    assert extras.event_keys(1, 16) == ("sql", ("img-1", -6))
    assert RequestExtras().hash_keys(0, 16) is None


def test_extras_change_hashes_from_first_block() -> None:
    tokens = list(range(48))
    plain = request_block_hashes(tokens, 16, RequestExtras())
    salted = request_block_hashes(tokens, 16, RequestExtras(cache_salt="s"))
    lora = request_block_hashes(tokens, 16, RequestExtras(lora_name="a"))
    assert plain == block_hashes(tokens, 16)
    assert len({plain[0], salted[0], lora[0]}) == 3
    assert len({plain[2], salted[2], lora[2]}) == 3
    # Salt only on block 0 but the chain carries it on.
    expected_second = vllm_hash.hash_block("sha256_cbor", salted[0], tokens[16:32], None)
    assert salted[1] == expected_second


def test_prompt_embeds_digest_key() -> None:
    digest = hashlib.sha256(b"emb").digest()
    extras = RequestExtras(prompt_embeds_digests={1: digest})
    assert extras.hash_keys(0, 4) is None
    assert extras.hash_keys(1, 4) == (("prompt_embeds", digest),)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="block size"):
        block_hashes([1, 2], 0)
    with pytest.raises(ValueError, match="choose one of"):
        vllm_hash.check_algo("md5")
    with pytest.raises(ValueError, match="one per full block"):
        block_hashes(list(range(32)), 16, extra_keys_per_block=[None])
