"""`kvindex hash` prints the known vector and rejects bad input with a named fix."""

from __future__ import annotations

import json

import pytest

from kvindex.cli import main


def test_known_vector_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash", "--range", "0:40", "--seed", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [b["block"] for b in out["blocks"]] == [0, 1]
    assert out["blocks"][0]["wire_value"] == 12687895063098490012
    assert out["blocks"][0]["extra_keys"] is None


def test_table_and_extras(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["hash", "--tokens", ",".join(map(str, range(16))), "--seed", "0"]
    assert main(argv) == 0
    assert "12687895063098490012" in capsys.readouterr().out
    assert main([*argv, "--cache-salt", "t", "--lora", "sql:/a", "--json"]) == 0
    block = json.loads(capsys.readouterr().out)["blocks"][0]
    assert block["wire_value"] != 12687895063098490012
    assert block["extra_keys"] == ["sql", "t"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tokens", "1,a"], "comma-separated integers"),
        (["--range", "5:2"], "START:END"),
        (["--range", "0:4", "--tokens", "1"], "exactly one"),
        (["--range", "0:4", "--block-size", "0"], "positive"),
        (["--range", "0:4", "--algo", "md5"], "choose one of"),
        (["--range", "0:4", "--mm", "nooffset"], "ID:OFFSET"),
        (["--range", "0:4", "--algo", "xxhash"], "pass --seed"),
    ],
)
def test_bad_input(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    assert main(["hash", *argv]) == 2
    assert message in capsys.readouterr().err
