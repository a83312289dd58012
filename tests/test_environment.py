"""The three places that name our dependencies must agree: requirements.txt (exact CPU pins),
environment.yml (the same pins for conda) and pyproject.toml (ranges that also admit a CUDA torch)."""

import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def pins(lines) -> dict[str, str]:
    """{name: version} from `name==version` lines; comments, blanks and `-e .` are skipped."""
    found = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{line!r}: pin an exact version (==) here; ranges belong in pyproject.toml"
        found[req.name.lower()] = spec.version
    return found


def requirement_pins() -> dict[str, str]:
    return pins((ROOT / "requirements.txt").read_text().splitlines())


def test_environment_yml_has_the_same_pins_as_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict))
    assert pins(pip_section) == requirement_pins(), "environment.yml drifted from requirements.txt: copy the pins over"
    assert "-e ." in pip_section, "environment.yml must install minillm itself (`-e .`)"
    assert "python=3.11" in env["dependencies"]


def test_pins_satisfy_pyproject_ranges():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = pyproject["dependencies"] + [d for extra in pyproject["optional-dependencies"].values() for d in extra]
    pinned = requirement_pins()
    for line in ranges:
        req = Requirement(line)
        assert req.name.lower() in pinned, f"{req.name} is a dependency in pyproject.toml but not pinned in requirements.txt"
        version = pinned[req.name.lower()]
        assert req.specifier.contains(version), f"pin {req.name}=={version} is outside pyproject's range {req.specifier}"


def test_pins_are_what_is_installed():
    from importlib.metadata import version

    for name, pinned in requirement_pins().items():
        installed = version(name).split("+")[0]  # torch reports 2.13.0+cpu
        assert installed == pinned, f"{name} {installed} is installed but {pinned} is pinned: run `make setup`"
