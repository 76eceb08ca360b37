"""Benchmark (pytest-benchmark; run with --benchmark-enable): one model state's evaluation on smollm2-135m,
CounterFact, m = 64, seed 0, in one run: the teacher-forced metrics alone as separate padded forwards
(`bench.evaluation.metrics.evaluate`, the evaluation before the extra metrics existed), the same plus generation-based
success and CounterFact's scores as separate passes, and what `bench run` does, `evaluate_all` (each prompt
run once, bench/evaluation/prefix_eval.py) with everything on and with the extras off. A run evaluates twice (pre and
post), so the ratios are those of the eval phases.
"""

from __future__ import annotations

import pytest

from bench.evaluation.eval_extra import ExtraOptions, evaluate_all, extra_metrics
from bench.evaluation.metrics import evaluate
from tasks import TASKS

M = 64


@pytest.fixture(scope="module")
def cf_requests():
    task = TASKS["counterfact"](TASKS["counterfact"].config_cls(source="shipped"))
    return task.sample(M, 0)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["teacher_forced", "with_generation", "with_generation_and_cf", "shared_all",
                                  "shared_teacher_forced"])
def test_bench_eval_smollm2_counterfact(benchmark, smollm2, cf_requests, what):
    shared = {"shared_all": ExtraOptions(), "shared_teacher_forced": ExtraOptions(generation=False, cf_scores=False)}
    separate = {"teacher_forced": None, "with_generation": ExtraOptions(cf_scores=False),
                "with_generation_and_cf": ExtraOptions()}

    def once():
        if what in shared:
            evaluate_all(smollm2, cf_requests, shared[what])
            return
        evaluate(smollm2, cf_requests)
        if separate[what] is not None:
            extra_metrics(smollm2, cf_requests, separate[what])

    benchmark.pedantic(once, rounds=2, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(model="smollm2-135m", task="counterfact", m=M, what=what)
