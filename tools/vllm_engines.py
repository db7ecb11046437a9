"""Start N real vLLM engines on loopback (the CPU build from `make vllm-env`), configured as
llm-d's guides configure them, print how to reach them, and stop them on Ctrl-C.

    .venv/bin/python tools/vllm_engines.py --engines 2 --block-size 32
    .venv/bin/python tools/vllm_engines.py --write-model /tmp/tiny-model   # the model dir only

Each engine: the tiny random-weight model (kvtools.real_vllm.model), prefix caching with
sha256_cbor hashes, KV events on topic kv@127.0.0.1:<port>@<model> from a PUB socket that binds
its own port (per-pod mode; --events-connect ENDPOINT makes every engine connect to one
address instead, central mode), and a replay ROUTER. Then e.g.:

    kvindex serve --zmq-connect tcp://127.0.0.1:<events> \\
        --replay-endpoint 127.0.0.1:<port>=tcp://127.0.0.1:<replay> --tokenizer tiny=<model dir>
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

from kvtools.demo.processes import PortReservation
from kvtools.real_vllm.engines import (
    DEFAULT_ENGINE_BLOCK_SIZE,
    KV_BYTES_PER_TOKEN,
    VLLMEngineSpec,
    VLLMEnvironmentMissing,
    start_engines,
)
from kvtools.real_vllm.model import write_real_model_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--model", default="tiny", help="served model name")
    p.add_argument("--block-size", type=int, default=DEFAULT_ENGINE_BLOCK_SIZE)
    p.add_argument("--kv-tokens", type=int, default=8192, help="KV cache size in tokens")
    p.add_argument("--events-connect", metavar="ENDPOINT", help="central mode: connect here")
    p.add_argument("--write-model", type=Path, metavar="DIR", help="only write the model dir")
    args = p.parse_args(argv)
    if args.write_model:
        print(write_real_model_dir(args.write_model))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="vllm-engines-"))
    model_dir = write_real_model_dir(workdir / "model")
    ports = PortReservation()
    central_port = int(args.events_connect.rsplit(":", 1)[1]) if args.events_connect else None
    specs = [
        VLLMEngineSpec(
            name=f"vllm-{i}",
            model=args.model,
            model_dir=model_dir,
            http_port=ports.port(),
            events_port=central_port or ports.port(),
            replay_port=ports.port(),
            block_size=args.block_size,
            kv_cache_bytes=args.kv_tokens * KV_BYTES_PER_TOKEN,
            events_connect=central_port is not None,
        )
        for i in range(args.engines)
    ]
    print(f"starting {len(specs)} engines one after the other (logs in {workdir})...")
    try:
        engines = start_engines(specs, workdir)
    except (VLLMEnvironmentMissing, RuntimeError) as exc:
        print(f"vllm_engines: {exc}", file=sys.stderr)
        return 2
    finally:
        ports.close()
    print(f"model dir: {model_dir}")
    for engine in engines:
        s = engine.spec
        print(f"{s.name}: {s.url}  topic {s.topic}")
        print(f"  events {s.events_endpoint}  replay {s.replay_endpoint}")
    print("Ctrl-C stops them")
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        for engine in engines:
            engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
