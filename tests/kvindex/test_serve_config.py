"""The service assembly's options (tokenizers, LoRA, scoring, speculative, Redis): one loader
for flags and the config file, errors naming the flag, and what the assembly builds."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvindex.commands.serve import add_service_flags, config_from_args
from kvindex.config import ConfigError, ServiceConfig
from kvindex.service.assembly import AssemblyError, KvindexServer, load_tokenizers
from kvindex.service.redis_backend import RedisBackend


def parse(*argv: str) -> ServiceConfig:
    parser = argparse.ArgumentParser()
    add_service_flags(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_flags_and_file_give_the_same_config(tmp_path: Path) -> None:
    flags = parse(
        "--zmq-bind", "tcp://127.0.0.1:5557",
        "--accept-any-engine",
        "--backend", "redis",
        "--redis-url", "redis://127.0.0.1:6390/2",
        "--redis-prefix", "team-a",
        "--redis-ttl", "120",
        "--tokenizer", "m=/models/m",
        "--lora", "sql=m",
        "--tier-weight", "gpu=1.0,cpu=0.7",
        "--tier-weight", "storage=0.25",
        "--max-prompt-tokens", "8192",
        "--speculative-ttl", "0.5",
        "--block-size", "32",
    )  # fmt: skip
    config_file = tmp_path / "kvindex.yaml"
    config_file.write_text(
        "zmq_bind: [tcp://127.0.0.1:5557]\naccept_any_engine: true\nbackend: redis\nredis-url: redis://127.0.0.1:6390/2\n"
        "redis_prefix: team-a\nredis_ttl_s: 120\ntokenizers: {m: /models/m}\n"
        "lora_adapters: {sql: m}\ntier_weights: {gpu: 1.0, cpu: 0.7, storage: 0.25}\n"
        "max_prompt_tokens: 8192\nspeculative_ttl_s: 0.5\nblock_size: 32\n"
    )
    assert parse("--config", str(config_file)) == flags
    assert flags.tier_weights == {"gpu": 1.0, "cpu": 0.7, "storage": 0.25}


def test_map_flags_merge_over_the_file(tmp_path: Path) -> None:
    config_file = tmp_path / "kvindex.yaml"
    config_file.write_text("tokenizers: {a: /models/a}\ntier_weights: {cpu: 0.5}\n")
    config = parse("--config", str(config_file), "--tokenizer", "b=/models/b")
    assert config.tokenizers == {"a": "/models/a", "b": "/models/b"}
    assert parse("--config", str(config_file), "--tier-weight", "gpu=0.9").tier_weights == {
        "cpu": 0.5,
        "gpu": 0.9,
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tier-weight", "gpu=2"], "--tier-weight"),
        (["--tier-weight", "hbm=1"], "unknown tier 'hbm'"),
        (["--tier-weight", "gpu=fast"], "the weight must be a number"),
        (["--tokenizer", "m"], "--tokenizer 'm': expected KEY=VALUE"),
        (["--tokenizer", "m=/a", "--tokenizer", "m=/b"], "given twice"),
        (["--tokenizer", "m=/a", "--lora", "sql=other"], "base model 'other' has no --tokenizer"),
        (["--max-prompt-tokens", "0"], "--max-prompt-tokens"),
        (["--speculative-ttl", "-1"], "--speculative-ttl"),
        (["--redis-prefix", "a{b}"], "--redis-prefix"),
        (["--redis-ttl", "-5"], "--redis-ttl"),
    ],
)
def test_bad_values_name_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse("--zmq-bind", "tcp://127.0.0.1:5557", "--accept-any-engine", *argv)


def test_tokenizer_failures_are_assembly_errors_naming_the_fix(tmp_path: Path) -> None:
    with pytest.raises(AssemblyError, match="fix --tokenizer MODEL=PATH_OR_ID"):
        load_tokenizers(ServiceConfig(tokenizers={"m": str(tmp_path / "missing")}))
    with pytest.raises(AssemblyError, match="--lora needs"):
        load_tokenizers(ServiceConfig(lora_adapters={"sql": "m"}))
    assert load_tokenizers(ServiceConfig()) is None


def test_the_assembly_builds_one_registry_and_the_shared_block_size() -> None:
    config = ServiceConfig(
        zmq_bind=["tcp://127.0.0.1:0"],
        block_size=32,
        tier_weights={"cpu": 0.6},
        speculative_ttl_s=0,
        backend="redis",
        redis_url="redis://127.0.0.1:1/0",  # nothing listens: degraded, not failed
        redis_prefix="kvitest-assembly",
    )
    server = KvindexServer(config)
    assert server.scorer.block_size == 32 == server.service.ingest.applier.config.block_size
    assert server.scorer.config.weights.cpu == 0.6
    assert server.scorer.speculative is None
    assert server.score.metrics.registry is server.service.metrics.registry
    assert isinstance(server.redis, RedisBackend)
    reason = server.service.index.health()
    assert reason is not None and reason.startswith("redis degraded")
    names = {m.name for m in server.service.metrics.registry.collect()}
    assert {"kvindex_score_requests", "kvindex_index_degraded", "kvindex_ingest_batches"} <= names
    # With speculative entries on, the engines' events settle them (kvindex.ingest).
    memory = KvindexServer(ServiceConfig(zmq_bind=["tcp://127.0.0.1:0"], speculative_ttl_s=2.0))
    assert memory.scorer.speculative is not None
    assert memory.service.ingest.applier.speculative is memory.scorer.speculative


def test_a_bad_redis_url_names_the_flag() -> None:
    with pytest.raises(ValueError, match="--redis-url 'foo://x'"):
        KvindexServer(ServiceConfig(backend="redis", redis_url="foo://x"))
