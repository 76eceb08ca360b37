"""Training the built-in models under pinned numerics, whatever the run's own setting.

A built-in model (tiny-gpt2, tiny-t5, tiny-bert, minilm-fever) is trained on first use and cached.
Its weights must be the same bits on every x86-64 machine, or every number measured on it differs
between a user's machine and the published rows. Two things decide those bits besides the code:
which vector kernels torch / MKL / oneDNN dispatch to (AVX2 or AVX512, chosen when the libraries
load) and how many threads split each reduction. Both are fixed only at process start, so the
training runs in a child Python started with `bench.core.machine.PINNED_ENV` and one thread, while the
parent (the user's run) keeps its own kernels and threads for the editing itself.

`train_pinned(fill, tmp)` pickles `fill` (a module-level function or a `functools.partial` of one)
and runs `fill(tmp)` in the child, which writes the entry's files into `tmp`; the caller
(bench/core/cachefs.py `write_entry`) then adds the manifest and moves the folder into place. The
weights' digest (`state_sha256`) goes into the entry's sidecar and every row (`model_sha256`);
`REFERENCE` holds the digests measured for the default built-in models (docs/reproducibility.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.core.machine import PINNED_ENV

# One thread: besides the kernels, the thread count splits float reductions (bench/core/threads.py).
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
NUMERICS = "pinned:" + ",".join(f"{k}={v}" for k, v in sorted({**PINNED_ENV, **THREAD_ENV}.items()))
REFERENCE_FILE = Path(__file__).with_name("reference_sha256.json")


class PinnedTrainingError(RuntimeError):
    """The child process that trains a built-in model failed; the message says how."""


def pinned_env() -> dict[str, str]:
    """This process's environment with the pinned kernels and one thread forced (the user's values overridden)."""
    return {**os.environ, **PINNED_ENV, **THREAD_ENV}


def train_pinned(fill: Callable[[Path], Any], tmp: Path, label: str) -> None:
    """Run `fill(tmp)` in a child Python under the pinned numerics; PinnedTrainingError if it fails."""
    with tempfile.TemporaryDirectory(prefix="editbench-pinned-") as scratch:
        payload, error = Path(scratch) / "fill.pkl", Path(scratch) / "error.pkl"
        payload.write_bytes(pickle.dumps(fill))
        rc = subprocess.run([sys.executable, "-m", "bench.models.pinned", str(payload), str(tmp), str(error)],
                            env=pinned_env(), check=False).returncode
        if rc == 0:
            return
        try:  # the child's own exception (e.g. ModelLoadError with its advice), raised here as if in-process
            exc = pickle.loads(error.read_bytes())
        except Exception:  # noqa: BLE001 - killed, or an exception that does not pickle
            exc = None
    if isinstance(exc, BaseException):
        raise exc
    raise PinnedTrainingError(f"training {label} under the pinned numerics failed (exit {rc}); its output is above")


def state_sha256(model: Any) -> str:
    """sha256 over a module's state dict: every tensor's name, dtype, shape and bytes, names sorted.

    Independent of the file format the weights were saved in, so it names the weights themselves.
    """
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ChildProgress:
    """A picklable progress-bar factory for the child: the bars go to its stderr, as the parent's do."""

    def __call__(self) -> Any:
        from rich.console import Console

        from bench.core.progress import progress_factory

        return progress_factory(Console(stderr=True))()


def child_progress(progress: Any) -> ChildProgress | None:
    """The child's stand-in for the parent's progress factory (None stays None: no bars)."""
    return None if progress is None else ChildProgress()


def reference_sha256(alias: str) -> str | None:
    """The digest measured for a default built-in model (`reference_sha256.json`), or None."""
    try:
        return json.loads(REFERENCE_FILE.read_text())["sha256"].get(alias)
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def _main(argv: list[str]) -> int:
    """Child side: unpickle the fill function and run it on the entry's temporary folder."""
    payload, tmp, error = argv
    fill = pickle.loads(Path(payload).read_bytes())
    try:
        fill(Path(tmp))
    except BaseException as e:
        try:  # the parent raises it again: no second report here
            Path(error).write_bytes(pickle.dumps(e))
        except Exception:  # noqa: BLE001 - an exception that does not pickle: the traceback says it instead
            raise e from None
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
