"""Expensive artefacts several tests share, built once per test session beside the tests.

A fresh clone's test session trains every built-in model and meta-trains several hyper-networks; run
one after another in the test process they are most of the suite's time, and each uses one core (the
trainings are pinned to one thread). So tests/conftest.py starts one worker process at the beginning
of the session (`python -m tests.prebuild STATE NAME...`) that builds the artefacts the selected tests
need into the shared cache (<repo>/results), in the order below, while the tests run on the other core.

Every artefact is an ordinary cache entry, built through the same code path a run takes (`load_model`,
`run_one`) and keyed by content, so a test finds it as if an earlier run had built it. Built-in models
are built under a file lock (bench/core/cachefs.py `ensure_entry`): a test that needs one the worker is
building waits for it. Hyper-network checkpoints have no lock, so a test that needs one is marked
`@pytest.mark.prebuilt("name")` and waits until the worker has written `STATE/<name>.done` (or
`.failed`, or the worker ended); it then loads the checkpoint, or builds it itself if the worker could
not. Nothing is asserted here: the tests check what they load. Set EDITBENCH_TEST_PREBUILD=0 to build
everything in the test process instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"


def _model(alias: str) -> Callable[[], None]:
    def build() -> None:
        from bench.models import MODEL_ALIASES, LoadContext, load_model

        info = MODEL_ALIASES[alias]
        if info.installed():  # a packaged model that is not installed: its tests say so themselves
            load_model(LoadContext(alias, results_dir=RESULTS, task_kind=info.kind))

    return build


def _checkpoint(editor: str, model: str, n_edits: int, **overrides: str) -> Callable[[], None]:
    """The run `bench run --editor E --model M --task synthetic --edits m --seed 0 [--set k=v]` prepares."""

    def build() -> None:
        from bench.runner.run import run_one

        with tempfile.TemporaryDirectory(prefix="editbench-prebuild-") as tmp:
            run_one(editor=editor, model=model, task="synthetic", n_edits=n_edits, seed=0, overrides=overrides,
                    results=tmp, cache_dir=RESULTS, log=lambda *_: None)

    return build


# In build order: the worker takes them one after another. tiny-gpt2 itself is trained by the test
# process (its first tests need it at once), and so is MALMEN's default checkpoint (tests/results/
# test_targets_tiny.py meta-trains it first); the other tiny-gpt2 checkpoints come after the tiny-t5
# ones, when tiny-gpt2 is in the cache. tiny-bert and SmolLM2 go last: tests early in the session that
# need them build them under their cache lock, and the worker then finds them there.
ARTEFACTS: dict[str, Callable[[], None]] = {
    "tiny-t5": _model("tiny-t5"),
    "tiny-t5/malmen-64": _checkpoint("malmen", "tiny-t5", 64),  # tests/models/test_t5.py
    "tiny-t5/mend-64": _checkpoint("mend", "tiny-t5", 64),
    "tiny-gpt2/mend-8": _checkpoint("mend", "tiny-gpt2", 8),  # tests/results/test_targets_tiny.py (and CI's smoke)
    "tiny-gpt2/malmen-64-sum": _checkpoint("malmen", "tiny-gpt2", 64, shift="sum"),
    "minilm-fever": _model("minilm-fever"),  # tests/zoo/test_builtin_weights.py only
    "tiny-bert": _model("tiny-bert"),
    "smollm2-135m": _model("smollm2-135m"),
}


# -- the test process's side (tests/conftest.py) ----------------------------------------------------

_worker: dict[str, object] = {}  # "proc": the worker process, "state": its folder of <name>.done / .failed


def start_worker(names: list[str]) -> None:
    """Start `python -m tests.prebuild STATE NAME...` in its own process group (the trainings it starts end with it)."""
    state = Path(tempfile.mkdtemp(prefix="editbench-prebuild-"))
    with open(state / "worker.log", "w") as log:  # its output, for when a build failed
        _worker["proc"] = subprocess.Popen([sys.executable, "-m", "tests.prebuild", str(state), *names], cwd=REPO,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _worker["state"] = state


def wait_for(name: str, timeout_s: float = 3600) -> None:
    """Until the worker has built `name` (or failed, or ended); at once when no worker runs."""
    proc, state = _worker.get("proc"), _worker.get("state")
    if proc is None:
        return
    stem = name.replace("/", "__")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if (state / f"{stem}.done").exists() or (state / f"{stem}.failed").exists():
            return
        time.sleep(0.5)


def stop_worker() -> None:
    """At the end of the session the worker's remaining builds are for no selected test: end it and its children."""
    proc = _worker.pop("proc", None)
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# -- the worker ----------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    state, names = Path(argv[0]), argv[1:]
    for name in [n for n in ARTEFACTS if n in names]:
        try:
            ARTEFACTS[name]()
        except Exception:  # the test that needs it builds it again and reports the error
            (state / f"{name.replace('/', '__')}.failed").write_text(traceback.format_exc())
        else:
            (state / f"{name.replace('/', '__')}.done").write_text("")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
