"""editbench: a benchmark harness for editing facts in language models.

Python API, for scripts (the same run loop, store and checks as `bench run`):

    from bench import RunConfig, run_one

    row = run_one(editor="ft", model="tiny-gpt2", task="synthetic", n_edits=16, results="results")
    print(row["metrics"]["es"], row["config_hash"])
    plan = run_one(RunConfig(editor="malmen", model="smollm2-135m"), dry_run=True)  # loads nothing

`run_one` raises `UserError` for bad input (before any model loads) and `RunFailed` when the run
failed (its row is stored as failed). `overrides={"lr": "1e-4"}` is `--set lr=1e-4`.
"""

from typing import Any

from bench.core.config import RunConfig

__all__ = ["RunConfig", "RunFailed", "UserError", "execute", "resolve", "run_one"]


def __getattr__(name: str) -> Any:  # torch is imported on first use, not by `import bench`
    if name in ("RunFailed", "UserError", "execute", "resolve", "run_one"):
        from bench.runner import run

        return getattr(run, name)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
