"""Benchmark (pytest-benchmark; run with --benchmark-enable): MEMIT's z optimisation, the full forward every
Adam step (`z_cache=none`) beside the cached prefix (`z_cache=prefix`, the default) in one run, on
smollm2-135m (m = 16 zsRE requests) and tiny-gpt2 (m = 64 and 256 synthetic requests), one thread each
so the two paths see the same machine. Only `target_values` is timed; `extra_info` records the steps,
the final losses and the relative difference of z between the paths (computed in the prefix round).
"""

from __future__ import annotations

import pytest
import torch

from bench.core.threads import torch_threads
from editors.base import EditorContext, model_defaults
from editors.memit import MEMIT, MEMITHparams, block_name

Z: dict[tuple[str, int], torch.Tensor] = {}  # the full path's z per case, for the prefix path to compare


def run_z(benchmark, em, model: str, requests, z_cache: str, results):
    hp = MEMITHparams(**{**model_defaults("memit", model), "z_cache": z_cache})
    ed = MEMIT(em, hp, EditorContext(results_dir=results, seed=0))
    ed._contexts = ed.sample_contexts()
    last = block_name(em, ed.layer_names()[-1])
    got = {}

    def once():
        with torch_threads(1):
            got["z"], got["info"] = ed.target_values(requests, last)

    benchmark.pedantic(once, rounds=1, iterations=1, warmup_rounds=0)
    key = (model, len(requests))
    extra = {"model": model, "m": len(requests), "z_cache": z_cache, **got["info"]}
    if z_cache == "none":
        Z[key] = got["z"]
    elif key in Z:
        extra["z_rel_diff_vs_none"] = float((got["z"] - Z[key]).norm() / Z[key].norm())
    benchmark.extra_info.update(extra)


@pytest.mark.slow
@pytest.mark.parametrize("z_cache", ["none", "prefix"])
def test_bench_z_smollm2_16(benchmark, smollm2, results_cache, z_cache):
    from tasks import TASKS

    requests = TASKS["zsre"]().sample(16, 0)
    run_z(benchmark, smollm2, "smollm2-135m", requests, z_cache, results_cache)


@pytest.mark.slow
@pytest.mark.parametrize("m", [64, 256])
@pytest.mark.parametrize("z_cache", ["none", "prefix"])
def test_bench_z_tiny_gpt2(benchmark, tiny_gpt2, synthetic_task, results_cache, m, z_cache):
    run_z(benchmark, tiny_gpt2, "tiny-gpt2", synthetic_task.sample(m, 0), z_cache, results_cache)
