"""Benchmarks (pytest-benchmark; run with --benchmark-enable): MALMEN's edit step and one meta-training
step at m = 64, 256, 1024 on tiny-gpt2, two-stage vs naive meta-gradient, with peak memory.

Peak memory is `torch.cuda.max_memory_allocated` above the entry level on GPU and the sampled
resident set above the entry level on CPU (bench.core.measure), stored in `benchmark.extra_info`.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from bench.core.measure import measure
from bench.models import LoadContext, load_model
from editors.base import model_defaults
from editors.malmen import MalmenEditor, MalmenHParams
from editors.meta import MetaBatch, cache_for, meta_backward
from tasks.synthetic import SyntheticTask

M = [64, 256, 1024]


@pytest.fixture(scope="module")
def tiny():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(LoadContext("tiny-gpt2", Path(__file__).parents[2] / "results", device=device))


@pytest.fixture(scope="module")
def requests_pool():
    task = SyntheticTask()
    return task.train_split() + task.eval_split()


def _editor(tiny) -> MalmenEditor:
    """MALMEN with the hyperparameters `bench run` uses on tiny-gpt2 (editors/hparams/malmen/tiny-gpt2.json)."""
    return MalmenEditor(tiny, MalmenHParams(**model_defaults("malmen", "tiny-gpt2")))


def _run_measured(benchmark, fn, device):
    stats = {}

    def once():
        with measure(torch.device(device)) as st:
            fn()
        stats["peak"] = st.peak_bytes
        stats["kind"] = st.mem_kind

    benchmark.pedantic(once, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(peak_mem_bytes=stats["peak"], mem_kind=stats["kind"])


@pytest.mark.slow
@pytest.mark.parametrize("m", M)
def test_bench_edit(benchmark, tiny, requests_pool, m):
    ed = _editor(tiny)
    reqs = requests_pool[:m]
    benchmark.extra_info.update(m=m, phase="edit")
    _run_measured(benchmark, lambda: ed.edit(reqs), tiny.device.type)


@pytest.mark.slow
@pytest.mark.parametrize("meta_grad", ["two_stage", "naive"])
@pytest.mark.parametrize("m", M)
def test_bench_meta_step(benchmark, tiny, requests_pool, m, meta_grad):
    ed = _editor(tiny)
    opt = ed.hparams.options()
    batch = MetaBatch.from_requests(requests_pool[:m], random.Random(0))
    frozen = [p for p in tiny.model.parameters()]
    for p in frozen:
        p.requires_grad_(False)

    def step():
        tuples = cache_for(tiny, batch, ed.modules, opt)
        ed.net.zero_grad(set_to_none=True)
        meta_backward(tiny, ed.net, tuples, batch, opt, meta_grad)
        benchmark.extra_info["n_tuples"] = tuples.n

    benchmark.extra_info.update(m=m, phase="meta_step", meta_grad=meta_grad)
    try:
        _run_measured(benchmark, step, tiny.device.type)
    finally:
        for p in frozen:
            p.requires_grad_(True)
