"""Benchmark (pytest-benchmark; run with --benchmark-enable): MEMIT's statistics pass, the lean path
(stop after the last edited layer, float32 per batch) beside the full float64 pass over the whole model,
in one run, on tiny-gpt2 (its world's corpus) and on smollm2-135m (the shipped English corpus, the first
`N_SMOLLM2` texts). Only the pass is timed, not the cache; `extra_info` names the path and the model.
"""

from __future__ import annotations

import pytest

from editors.base import model_defaults
from editors.memit import MEMIT, MEMITHparams
from editors.stats import compute_second_moments, corpus_for

N_SMOLLM2 = 512  # texts: enough for a stable time, small enough for CPU


def stats_case(em, model: str, n: int):
    hp = MEMITHparams(**model_defaults("memit", model))
    layers = MEMIT(em, hp).layer_names()
    texts = corpus_for(hp.mom2_dataset, em, n).texts[:n]
    return layers, texts, hp


@pytest.mark.slow
@pytest.mark.parametrize("lean", [False, True], ids=["full", "lean"])
def test_bench_stats_tiny_gpt2(benchmark, tiny_gpt2, lean):
    layers, texts, hp = stats_case(tiny_gpt2, "tiny-gpt2", 100_000)
    benchmark.pedantic(lambda: compute_second_moments(tiny_gpt2, layers, texts, hp.mom2_batch_size,
                                                      hp.mom2_max_length, lean=lean),
                       rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(model="tiny-gpt2", path="lean" if lean else "full", texts=len(texts), layers=layers)


@pytest.mark.slow
@pytest.mark.parametrize("lean", [False, True], ids=["full", "lean"])
def test_bench_stats_smollm2(benchmark, smollm2, lean):
    layers, texts, hp = stats_case(smollm2, "smollm2-135m", N_SMOLLM2)
    benchmark.pedantic(lambda: compute_second_moments(smollm2, layers, texts, hp.mom2_batch_size,
                                                      hp.mom2_max_length, lean=lean),
                       rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(model="smollm2-135m", path="lean" if lean else "full", texts=len(texts),
                                layers=layers)
