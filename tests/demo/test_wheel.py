"""The demo runs from an installed wheel, not only from a checkout: the wheel carries the Envoy
template and its renderer as package data (links to deploy/envoy in the checkout), and the
demo's parts import and render from the unpacked wheel with the working directory elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _uv() -> str:
    # The Makefile bootstraps the locked uv into .uv/ (requirements/uv.txt).
    for candidate in (ROOT / ".uv" / "bin" / "uv", shutil.which("uv")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("uv not found: run `make test` (it bootstraps .uv/bin/uv)")


def test_wheel_carries_the_demo_and_runs_from_elsewhere(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    subprocess.run(
        [_uv(), "build", "--wheel", "--out-dir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("kvindex-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    for data in ("kvtools/demo/envoy.yaml.tmpl", "kvtools/demo/envoy_render.py"):
        assert data in names
        assert not (tmp_path / "site" / data).is_symlink()
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = (tmp_path / "site" / entry_points).read_text()
    assert "kvindex = kvtools.cli:main" in text
    assert "kvindex-sim = kvtools.sim.cli:main" in text

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    site = str(tmp_path / "site")
    code = (
        "import kvtools.demo.envoy as e, kvtools.cli as c; "
        f"assert e.__file__.startswith({site!r}), e.__file__; "
        "print(e.envoy_render.render(EPP_PORT=1234)); "
        "c.build_parser().parse_args(['demo', '--help'])"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "port_value: 1234" in result.stdout, result.stderr
    assert "--gateway-port" in result.stdout
