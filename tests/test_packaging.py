"""The project's dependency set resolves for every Python version it claims (requires-python),
and not for the one below: pip resolves it against the package index for that version, as a
user's `pip install .[simulation]` (or Flower's runtime `uv sync`) would."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = [f"3.{minor}" for minor in range(8, 20)]


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _claimed() -> SpecifierSet:
    return SpecifierSet(PROJECT["requires-python"])


def _resolves(version: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """pip's resolution of the dependency set (base + simulation extra) for ``version``."""
    requirements = PROJECT["dependencies"] + PROJECT["optional-dependencies"]["simulation"]
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
         "--only-binary=:all:", "--python-version", version, "--target", str(tmp_path / version),
         *requirements], capture_output=True, text=True, timeout=600)


def test_requires_python_is_a_closed_range_that_includes_this_python():
    claimed = [v for v in CANDIDATES if v in _claimed()]
    assert claimed and claimed[-1] != CANDIDATES[-1], "claim a tested upper bound"
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in claimed


@pytest.mark.slow
@pytest.mark.parametrize("version", [v for v in CANDIDATES if v in _claimed()])
def test_dependencies_resolve_for_every_claimed_python(version, tmp_path):
    proc = _resolves(version, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_dependencies_do_not_resolve_below_the_claimed_range(tmp_path):
    below = [v for v in CANDIDATES if v not in _claimed() and
             tuple(map(int, v.split("."))) < tuple(map(int, next(
                 c for c in CANDIDATES if c in _claimed()).split(".")))][-1]
    proc = _resolves(below, tmp_path)
    assert proc.returncode != 0 and "flwr" in proc.stderr, "the lower bound could be lower"
