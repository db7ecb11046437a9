"""The committed generated code under src/kvindex/_proto is what tools/gen_protos.py makes
from proto/ now, and the llm-d-compatible proto keeps llm-d's names and numbers."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import gen_protos  # noqa: E402

from kvindex._proto.indexer.v1 import indexer_pb2  # noqa: E402


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    generate_into = tmp_path / "_proto"
    gen_protos.generate(generate_into)
    assert gen_protos.diff(generate_into, gen_protos.OUT_DIR) == [], "run `make protos`"


def test_llmd_indexer_descriptor() -> None:
    file = indexer_pb2.DESCRIPTOR
    assert file.package == "indexer.v1"
    service = file.services_by_name["IndexerService"]
    method = service.methods_by_name["GetPodScores"]
    assert method.input_type.full_name == "indexer.v1.GetPodScoresRequest"
    assert method.output_type.full_name == "indexer.v1.GetPodScoresResponse"

    def fields(name: str) -> dict[str, tuple[int, int, bool]]:
        message = file.message_types_by_name[name]
        return {f.name: (f.number, f.type, f.is_repeated) for f in message.fields}

    fd = indexer_pb2.PodScore.DESCRIPTOR.fields[0]
    assert fields("GetPodScoresRequest") == {
        "prompt": (1, fd.TYPE_STRING, False),
        "model_name": (2, fd.TYPE_STRING, False),
        "pod_identifiers": (3, fd.TYPE_STRING, True),
    }
    assert fields("GetPodScoresResponse") == {"scores": (1, fd.TYPE_MESSAGE, True)}
    assert fields("PodScore") == {
        "pod": (1, fd.TYPE_STRING, False),
        "score": (2, fd.TYPE_DOUBLE, False),
        "data_parallel_rank": (3, fd.TYPE_INT32, False),
    }
    assert indexer_pb2.PodScore.DESCRIPTOR.fields_by_name["data_parallel_rank"].has_presence
