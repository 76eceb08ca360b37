"""Benchmark (pytest-benchmark; run with --benchmark-enable): one model state's evaluation on smollm2-135m,
CounterFact, m = 64, seed 0: the teacher-forced metrics alone (today's evaluation) beside the same plus
generation-based success and CounterFact's scores (bench/eval_extra.py), in one run. A run evaluates twice
(pre and post), so the ratio of the two is the ratio of the eval phases.
"""

from __future__ import annotations

import pytest

from bench.eval_extra import ExtraOptions, extra_metrics
from bench.metrics import evaluate
from tasks import TASKS

M = 64


@pytest.fixture(scope="module")
def cf_requests():
    task = TASKS["counterfact"](TASKS["counterfact"].config_cls(source="shipped"))
    return task.sample(M, 0)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["teacher_forced", "with_generation", "with_generation_and_cf"])
def test_bench_eval_smollm2_counterfact(benchmark, smollm2, cf_requests, what):
    opts = {"teacher_forced": None, "with_generation": ExtraOptions(cf_scores=False),
            "with_generation_and_cf": ExtraOptions()}[what]

    def once():
        evaluate(smollm2, cf_requests)
        if opts is not None:
            extra_metrics(smollm2, cf_requests, opts)

    benchmark.pedantic(once, rounds=2, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(model="smollm2-135m", task="counterfact", m=M, what=what)
