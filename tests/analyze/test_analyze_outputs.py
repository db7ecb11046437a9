"""JSON (schema fields), CSV, PNG charts, HTML report and sweep tables from the CLI."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import pytest

from kvtools.analyze.policies import POLICY_NAMES
from kvtools.analyze.report import CSV_COLUMNS, SCHEMA
from kvtools.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POLICY_KEYS = {
    "policy",
    "requests",
    "hit_rate_blocks",
    "hit_rate_tokens",
    "hit_blocks",
    "total_blocks",
    "hit_tokens",
    "total_tokens",
    "ttft_ms",
    "queue_ms",
    "load",
    "timeline",
    "index_keys",
    "ingest_skipped",
}


def test_all_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    code = main(
        [
            "analyze",
            "--trace",
            "mooncake-synthetic",
            "--limit",
            "300",
            "--engines",
            "4",
            "--json",
            str(out),
            "--csv",
            str(tmp_path / "r.csv"),
            "--plot",
            str(tmp_path / "png"),
            "--html",
            str(tmp_path / "r.html"),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "precise-prefix" in table and "reuse ceiling" in table
    doc = json.loads(out.read_text())
    assert doc["schema"] == SCHEMA
    assert set(doc) == {"schema", "input", "reuse_ceiling", "sweep", "warnings", "points"}
    assert doc["input"]["format"] == "mooncake" and doc["input"]["requests"] == 300
    assert doc["sweep"] is None
    (point,) = doc["points"]
    assert point["settings"]["engines"] == 4
    assert point["settings"]["weights"]["prefix"] == 3
    assert [p["policy"] for p in point["policies"]] == list(POLICY_NAMES)
    for p in point["policies"]:
        assert set(p) == POLICY_KEYS
        assert set(p["ttft_ms"]) == {"mean", "p50", "p90", "p99"}
        assert len(p["load"]["engines"]) == 4
        assert sum(e["requests"] for e in p["load"]["engines"]) == 300
        assert p["ttft_ms"]["p50"] <= p["ttft_ms"]["p90"] <= p["ttft_ms"]["p99"]
        assert len(p["timeline"]["hit_rate_blocks"]) == 60
    precise = point["policies"][list(POLICY_NAMES).index("precise-prefix")]
    assert precise["index_keys"] > 0
    assert precise["ingest_skipped"] == {}  # every simulated event ingested

    rows = list(csv.reader((tmp_path / "r.csv").open()))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r[1] for r in rows[1:]] == list(POLICY_NAMES)

    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in pngs] == ["engine-load.png", "hit-rate-over-time.png", "ttft-cdf.png"]
    for png in pngs:
        assert png.read_bytes().startswith(PNG_MAGIC)

    html = (tmp_path / "r.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 3
    assert all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    assert 'src="http' not in html  # self-contained


def test_sweep_points_and_json_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "analyze",
            "--trace",
            "mooncake-synthetic",
            "--limit",
            "200",
            "--policies",
            "random,precise-prefix",
            "--sweep",
            "weights=prefix:0,5",
            "--json",
            "-",
        ]
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["sweep"] == {"parameter": "weights", "weight": "prefix", "values": [0.0, 5.0]}
    assert [p["label"] for p in doc["points"]] == ["prefix=0", "prefix=5"]
    zero, five = (
        {p["policy"]: p for p in point["policies"]}["precise-prefix"] for point in doc["points"]
    )
    assert zero["hit_rate_blocks"] < five["hit_rate_blocks"]


def test_sweep_summary_table_and_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "analyze",
        "--trace",
        "mooncake-synthetic",
        "--limit",
        "200",
        "--policies",
        "random,oracle",
        "--sweep",
        "engines=2,4",
        "--plot",
        str(tmp_path / "png"),
        "--html",
        str(tmp_path / "r.html"),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sweep: hit rate" in out and "engines=2" in out and "engines=4" in out
    names = sorted(p.name for p in (tmp_path / "png").glob("*.png"))
    assert "sweep-hit-rate.png" in names and "ttft-cdf-engines-2.png" in names
    assert len(names) == 1 + 2 * 3
    html = (tmp_path / "r.html").read_text()
    assert "Sweep: hit rate" in html and html.count("data:image/png;base64,") == 7


def test_parallel_jobs_give_the_same_results(tmp_path: Path) -> None:
    docs = []
    for jobs in ("1", "2"):
        out = tmp_path / f"{jobs}.json"
        args = [
            "analyze",
            "--trace",
            "mooncake-synthetic",
            "--limit",
            "200",
            "--quiet",
            "--sweep",
            "engines=2,4",
            "--jobs",
            jobs,
            "--json",
            str(out),
        ]
        assert main(args) == 0
        docs.append(json.loads(out.read_text()))
    assert docs[0] == docs[1]


def test_config_file_warnings_and_bad_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "epp.yaml"
    config.write_text(
        "plugins:\n- type: prefix-cache-scorer\n- type: session-affinity-scorer\n"
        "schedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: prefix-cache-scorer\n"
        "    weight: 5\n  - pluginRef: session-affinity-scorer\n    weight: 1\n"
    )
    out = tmp_path / "r.json"
    args = [
        "analyze",
        "--trace",
        "mooncake-synthetic",
        "--limit",
        "50",
        "--quiet",
        "--config",
        str(config),
        "--json",
        str(out),
    ]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["points"][0]["settings"]["weights"]["prefix"] == 5
    assert doc["points"][0]["settings"]["weights"]["queue"] == 0
    # Every scorer is the picker's own plugin: nothing is modelled, nothing to warn of.
    assert doc["warnings"] == []
    # A profile without a prefix scorer is worth a warning: both prefix policies ignore
    # the prefix then.
    args += ["--weights", "prefix=0"]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    assert any("no prefix scorer" in w for w in doc["warnings"])
    assert main(["analyze", "--trace", "mooncake-synthetic", "--policies", "nope"]) == 2
    assert main(["analyze", "--trace", "mooncake-synthetic", "--sweep", "x=1"]) == 2
    assert main(["analyze", "--trace", "mooncake-synthetic", "--weights", "prefix"]) == 2
    assert "NAME=WEIGHT" in capsys.readouterr().out


def test_progress_counts_every_request() -> None:
    from kvtools.analyze.readers import read_mooncake
    from kvtools.analyze.runner import run_point
    from kvtools.analyze.simulation import SimSettings
    from kvtools.analyze.traces import resolve_trace

    trace = read_mooncake(resolve_trace("mooncake-synthetic"), limit=700)
    steps: list[int] = []
    run_point(trace, ["random", "oracle"], SimSettings(engines=2), 1, steps.append)
    assert sum(steps) == 2 * 700 and all(n >= 0 for n in steps) and len(steps) > 2
