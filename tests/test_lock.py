"""The project runs and tests with what uv.lock pins, and the facts that must agree with the
lock (uv's own version, the floors the generated gRPC code imposes) do."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = tomllib.loads((ROOT / "uv.lock").read_text())
PROTO_DIR = ROOT / "src" / "kvindex" / "_proto"


def _locked_versions() -> dict[str, set[str]]:
    # A universal lock may hold two versions of one package (split by Python or platform).
    versions: dict[str, set[str]] = {}
    for package in LOCK["package"]:
        versions.setdefault(canonicalize_name(package["name"]), set()).add(package["version"])
    return versions


def _floor(requirement_text: str) -> str:
    (spec,) = [s for s in Requirement(requirement_text).specifier if s.operator == ">="]
    return spec.version


def _runtime_requirement(name: str) -> str:
    for text in PYPROJECT["project"]["dependencies"]:
        if canonicalize_name(Requirement(text).name) == name:
            return str(text)
    raise AssertionError(f"{name} is not a runtime dependency")


def test_installed_environment_is_the_lock() -> None:
    """Every distribution in the running environment is in the lock, at the locked version:
    the suite never passes on versions the lock does not pin."""
    locked = _locked_versions()
    project = canonicalize_name(PYPROJECT["project"]["name"])
    stray = []
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name == project:
            continue
        if dist.version not in locked.get(name, set()):
            stray.append(f"{name}=={dist.version} (locked: {sorted(locked.get(name, []))})")
    assert stray == [], f"not what uv.lock pins; reinstall with `make clean test`: {stray}"


def test_uv_version_is_one_fact() -> None:
    """The Makefile bootstraps uv from requirements/uv.txt; pyproject's required-version makes
    any other uv refuse to touch the lock. Both name the same release."""
    pinned = re.search(r"^uv==(\S+)", (ROOT / "requirements" / "uv.txt").read_text(), re.M)
    assert pinned is not None
    assert PYPROJECT["tool"]["uv"]["required-version"] == f"=={pinned.group(1)}"


def test_grpc_floors_match_generated_code() -> None:
    """The generated modules refuse to import on an older grpcio or protobuf than the ones that
    generated them, so pyproject's floors (what a library user gets) are exactly those."""
    grpc_versions = {
        m.group(1)
        for path in PROTO_DIR.rglob("*_pb2_grpc.py")
        if (m := re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", path.read_text(), re.M))
    }
    protobuf_versions = {
        m.group(1)
        for path in PROTO_DIR.rglob("*_pb2.py")
        if (m := re.search(r"^# Protobuf Python Version: (\S+)", path.read_text(), re.M))
    }
    assert len(grpc_versions) == 1 and len(protobuf_versions) == 1
    assert _floor(_runtime_requirement("grpcio")) == grpc_versions.pop()
    assert _floor(_runtime_requirement("protobuf")) == protobuf_versions.pop()


def test_every_extra_is_locked() -> None:
    """Each optional environment (demo, dev, bench) is resolved in the lock."""
    (project,) = [p for p in LOCK["package"] if p["name"] == PYPROJECT["project"]["name"]]
    assert set(project.get("optional-dependencies", {})) == set(
        PYPROJECT["project"]["optional-dependencies"]
    )
