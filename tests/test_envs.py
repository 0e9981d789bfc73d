"""The workflow's conda environments: exact pins equal to pyproject.toml, and every rule names one of them."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENVS = REPO / "workflow" / "envs"
ENV_NAMES = ("train", "analysis", "report")
# What every script needs to import the package (interbrain.provenance imports torch) and what each stage adds.
REQUIRED = {
    "train": {"torch", "numpy", "numba", "safetensors", "tqdm", "pyyaml", "jsonschema"},
    "analysis": {"torch", "numpy", "numba", "safetensors", "scipy", "scikit-learn", "threadpoolctl", "pandas"},
    "report": {"torch", "numpy", "numba", "safetensors", "pandas", "matplotlib", "seaborn", "jinja2"},
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pyproject_pins() -> dict[str, str]:
    pins = {}
    for dep in pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)\s*", dep)
        assert m, f"pyproject dependency {dep!r} is not pinned exactly"
        pins[canonical(m.group(1))] = m.group(2)
    return pins


def load_env(name: str) -> dict:
    return yaml.safe_load((ENVS / f"{name}.yaml").read_text())


def env_pins(env: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(conda pins, pip pins) of an environment file."""
    conda, pip = {}, {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for spec in dep.get("pip", []):
                m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", spec)
                assert m, f"pip requirement {spec!r} is not pinned with =="
                pip[canonical(m.group(1))] = m.group(2)
        else:
            name, _, version = str(dep).partition("=")
            conda[canonical(name)] = version
    return conda, pip


@pytest.mark.parametrize("name", ENV_NAMES)
def test_env_pins_equal_pyproject(name):
    pins = pyproject_pins()
    conda, pip = env_pins(load_env(name))
    assert pip, f"{name}.yaml has no pip section"
    for pkg, version in pip.items():
        assert pkg in pins, f"{name}.yaml pins {pkg}, which pyproject.toml does not list"
        assert version == pins[pkg], f"{name}.yaml pins {pkg}=={version}, pyproject.toml {pins[pkg]}"
    assert REQUIRED[name] <= set(pip), f"{name}.yaml lacks {sorted(REQUIRED[name] - set(pip))}"


@pytest.mark.parametrize("name", ENV_NAMES)
def test_env_python_is_311_and_satisfies_requires_python(name):
    conda, _ = env_pins(load_env(name))
    assert conda.get("python") == "3.11"
    assert set(conda) <= {"python", "pip"}, "only python and pip come from conda; everything else is pinned via pip"
    assert pyproject()["project"]["requires-python"] == ">=3.11"


def test_every_pyproject_dependency_is_in_some_env():
    pins = pyproject_pins()
    used = set().union(*(env_pins(load_env(n))[1] for n in ENV_NAMES))
    assert set(pins) == used


def rule_blocks() -> dict[str, str]:
    """{rule name: its text} from every Snakefile of the workflow."""
    blocks = {}
    for path in [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]:
        parts = re.split(r"^rule (\w+):\s*$", path.read_text(), flags=re.M)
        for name, body in zip(parts[1::2], parts[2::2]):
            blocks[name] = re.split(r"^\S", body, maxsplit=1, flags=re.M)[0]
    return blocks


@pytest.mark.skipif(not (Path(sys.executable).parent / "snakemake").exists(),
                    reason="snakemake is not installed next to python")
def test_rule_blocks_cover_every_rule():
    listed = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "--list-rules"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    names = {line.split()[0] for line in listed.splitlines() if line and not line[0].isspace()}
    assert set(rule_blocks()) == names


def test_every_rule_that_runs_code_names_an_env():
    used = set()
    for name, body in rule_blocks().items():
        runs = re.search(r"^\s+(script|shell|run|wrapper|notebook):", body, flags=re.M)
        if not runs:
            assert name == "all", f"rule {name} runs nothing"
            continue
        m = re.search(r"^\s+conda:\s*\n\s+\"\.\./envs/(\w+)\.yaml\"", body, flags=re.M)
        assert m, f"rule {name} names no conda env"
        assert m.group(1) in ENV_NAMES, f"rule {name} names unknown env {m.group(1)}"
        assert runs.group(1) == "script", f"rule {name} should call a workflow script"
        used.add(m.group(1))
    assert used == set(ENV_NAMES)
