"""Benchmark (pytest-benchmark; run with --benchmark-enable): MEMIT's edit step at m = 64, 256, 1024 on
tiny-gpt2, beside MALMEN's (tests/benchmarks/test_bench_malmen.py) so both are timed on the same machine in one run.

Only `edit()` is timed: statistics and context prefixes are prepared (and cached) before. Peak memory
(bench.core.measure: CUDA allocator peak on GPU, sampled resident set on CPU) goes to `extra_info`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.core.measure import measure
from bench.models import LoadContext, load_model
from editors.base import EditorContext, model_defaults
from editors.memit import MEMIT, MEMITHparams
from tasks.synthetic import SyntheticTask

M = [64, 256, 1024]
RESULTS = Path(__file__).parents[2] / "results"


@pytest.fixture(scope="module")
def tiny():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(LoadContext("tiny-gpt2", RESULTS, device=device))


@pytest.fixture(scope="module")
def memit(tiny):
    ed = MEMIT(tiny, MEMITHparams(**model_defaults("memit", "tiny-gpt2")), EditorContext(results_dir=RESULTS))
    ed.prepare([])
    return ed


@pytest.mark.slow
@pytest.mark.parametrize("m", M)
def test_bench_memit_edit(benchmark, tiny, memit, m):
    task = SyntheticTask()
    reqs = (task.train_split() + task.eval_split())[:m]
    stats = {}

    def once():
        with measure(tiny.device) as st:
            edit = memit.edit(reqs)
        stats.update(peak=st.peak_bytes, kind=st.mem_kind, residual=edit.mean_residual)

    benchmark.pedantic(once, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(m=m, phase="edit", editor="memit", peak_mem_bytes=stats["peak"],
                                mem_kind=stats["kind"], mean_residual=stats["residual"])
