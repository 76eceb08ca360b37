"""Where a sweep's cells run: the registry behind `bench sweep --executor`.

`local` (the default) runs the cells one after another in this process (bench/executors/sweep.py,
`run_sweep`). `ray` runs them as Ray tasks on a local or existing Ray cluster (bench/executors/ray_exec.py);
Ray is an optional extra, imported only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.core.config import RunConfig

RAY_INSTALL = "pip install -e '.[ray]'  (or: pip install ray==2.60.0)"


class ExecutorUnavailable(RuntimeError):
    """The executor asked for needs a package that is not installed; the message says how to install it."""


@dataclass(frozen=True)
class ExecutorOptions:
    """Options of the distributed executors; `local` accepts only the defaults."""

    address: str | None = None  # Ray cluster address (None: start a local Ray instance)
    gpus_per_cell: float = 0.0  # GPUs Ray reserves for each cell (fractions share a GPU)
    cpus_per_cell: float = 1.0  # CPUs Ray reserves for each cell (its torch threads)

    def is_default(self) -> bool:
        return self == ExecutorOptions()


Executor = Callable[..., list[Any]]  # (cfgs, results_dir, *, cache_dir, force, console, options) -> [CellResult]


def run_local(cfgs: Sequence[RunConfig], results_dir: str | Path, *, cache_dir: str | Path | None = None,
              force: bool = False, console: Any = None, options: ExecutorOptions = ExecutorOptions()) -> list[Any]:
    """Today's sweep: every cell in this process, one model load for the grid."""
    if not options.is_default():
        raise ValueError("--address, --gpus-per-cell and --cpus-per-cell are options of --executor ray")
    from bench.executors.sweep import run_sweep

    return run_sweep(cfgs, results_dir, cache_dir=cache_dir, force=force, console=console)


def run_ray(cfgs: Sequence[RunConfig], results_dir: str | Path, *, cache_dir: str | Path | None = None,
            force: bool = False, console: Any = None, options: ExecutorOptions = ExecutorOptions()) -> list[Any]:
    """The cells as Ray tasks (bench/executors/ray_exec.py); ExecutorUnavailable when Ray is not installed."""
    try:
        import ray  # noqa: F401  (only to fail early, with the install line)
    except ImportError:
        raise ExecutorUnavailable(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    from bench.executors.ray_exec import run_ray_sweep

    return run_ray_sweep(cfgs, results_dir, cache_dir=cache_dir, force=force, console=console,
                         address=options.address, gpus_per_cell=options.gpus_per_cell,
                         cpus_per_cell=options.cpus_per_cell)


EXECUTORS: dict[str, Executor] = {"local": run_local, "ray": run_ray}


def get_executor(name: str) -> Executor:
    """The executor registered as `name`; ValueError listing the choices otherwise."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown --executor '{name}'; choices: {', '.join(EXECUTORS)}")
    return EXECUTORS[name]
