"""Benchmark (pytest-benchmark; run with --benchmark-enable): one two-stage MALMEN meta-step on
smollm2-135m at m = 16 and 64 zsRE training requests, beside one forward + backward over the same
edit prompts, one thread, in the same run.

The meta-step is what one training step costs: cache the edit tuples, the shifts, stage 1 (the
equivalent and unrelated losses back-propagated to the shifts) and stage 2 (the proxy through g_θ).
The reference is a plain forward of the m edit prompts with the full output head and a backward of
their summed answer NLL to the weights the meta-step edits. `extra_info` holds both times and
their ratio (the target: meta-step <= 3.5x the forward + backward).
"""

from __future__ import annotations

import random
import time

import pytest
import torch
import torch.nn.functional as F

from bench.core.threads import torch_threads
from editors.base import EditorContext, model_defaults
from editors.malmen import MalmenEditor, MalmenHParams
from editors.meta import MetaBatch, cache_for, meta_backward


def _fwd_bwd(em, prompts, targets, weights) -> None:
    batch = em.encode(prompts, targets).to(em.device)
    logits = em.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100, reduction="sum")
    torch.autograd.grad(loss, weights)


@pytest.mark.slow
@pytest.mark.parametrize("m", [16, 64])
def test_bench_meta_step_smollm2(benchmark, smollm2, m):
    from tasks import TASKS

    hp = MalmenHParams(**{**model_defaults("malmen", "smollm2-135m"), "train_edits": m})
    ed = MalmenEditor(smollm2, hp, EditorContext(seed=0, n_edits=m))
    opt = hp.options()
    batch = MetaBatch.from_requests(TASKS["zsre"]().train_split()[:m], random.Random(0))
    edited = [smollm2.weight(n) for n in ed.modules]
    params = list(smollm2.model.parameters())
    for p in params:
        p.requires_grad_(False)
    for w in edited:
        w.requires_grad_(True)
    times: dict[str, float] = {}

    def meta_step() -> None:
        for w in edited:  # the LM is frozen while meta-training (MalmenEditor.prepare)
            w.requires_grad_(False)
        t0 = time.perf_counter()
        tuples = cache_for(smollm2, batch, ed.modules, opt)
        for n in ed.modules:
            ed.net.observe(n, tuples.keys[n], tuples.grads[n])
        ed.net.zero_grad(set_to_none=True)
        meta_backward(smollm2, ed.net, tuples, batch, opt, hp.meta_grad)
        times["meta_step_s"] = time.perf_counter() - t0
        for w in edited:
            w.requires_grad_(True)

    try:
        with torch_threads(1):
            prompts, targets = batch.edit
            _fwd_bwd(smollm2, prompts[:2], targets[:2], edited)  # warm-up
            t0 = time.perf_counter()
            _fwd_bwd(smollm2, prompts, targets, edited)
            times["fwd_bwd_s"] = time.perf_counter() - t0
            benchmark.pedantic(meta_step, rounds=1, iterations=1, warmup_rounds=0)
    finally:
        for p in params:
            p.requires_grad_(True)
    benchmark.extra_info.update(m=m, model="smollm2-135m", **times,
                                ratio=times["meta_step_s"] / times["fwd_bwd_s"])
    assert times["meta_step_s"] > 0 and times["fwd_bwd_s"] > 0
