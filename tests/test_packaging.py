"""The declared requirements are the ones CI proves: pyproject's minimums equal .ci/lowest-versions.txt."""
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    minimums = {}
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", requirement)
        assert match, f"requirement {requirement!r} must be written NAME>=LOWEST so that CI can prove LOWEST"
        minimums[match[1].lower()] = match[2]
    return minimums


def _pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "lowest-versions.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_every_declared_minimum_is_the_version_ci_installs_and_tests():
    assert _declared() == _pinned()


def test_the_declared_python_is_the_one_that_runs_the_tests():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    lowest = tuple(int(part) for part in re.fullmatch(r">=(\d+)\.(\d+)", requires).groups())
    assert lowest == (3, 11)  # tomllib needs 3.11; CI runs the lowest declared Python
    assert sys.version_info[:2] >= lowest


def test_ci_runs_the_lowest_versions():
    script = (ROOT / ".ci" / "run").read_text()
    assert "lowest-versions.txt" in script
