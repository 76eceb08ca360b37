"""The held-out tuning tool's probe pools and stack selection (bench/diagnostics/tune_heldout.py)."""

from __future__ import annotations

import pytest

from bench.diagnostics.tune_heldout import heldout_requests, one_stack
from tasks.synthetic import SyntheticTask


def _probes(reqs) -> set[str]:
    return {r.locality_prompt for r in reqs}


def test_probe_pools_are_disjoint_seen_or_mixed():
    task = SyntheticTask()
    fit, val = heldout_requests(task, 128, 0)
    assert len(val) == 128 and len(fit) == len(task.world.train_idx) - 128
    assert not _probes(fit) & _probes(val)  # the default: held-out probes never seen in meta-training
    eval_probes = _probes(task.eval_split())
    assert not (_probes(fit) | _probes(val)) & eval_probes  # the evaluation split is never read

    fit_s, val_s = heldout_requests(task, 128, 0, "seen")
    assert _probes(val_s) <= _probes(fit_s)
    assert [r.prompt for r in val_s] == [r.prompt for r in val]  # same requests, other probes

    fit_m, val_m = heldout_requests(task, 128, 0, "mixed")
    assert not _probes(fit_m) & _probes(val_m)
    people = {task.world.render(task.world.facts[i])[0] for i in task.world.locality_idx}
    assert _probes(fit_m) & people and not _probes(fit) & people
    assert not _probes(fit_m) & eval_probes
    with pytest.raises(ValueError, match="probes must be one of"):
        heldout_requests(task, 128, 0, "all")


class _TwoStacks:
    def module_names(self, which="second_fc", blocks=None, last_n=6):
        enc = last_n // 2
        return ([f"encoder.block.{i}.{which}" for i in range(4 - enc, 4)]
                + [f"decoder.block.{i}.{which}" for i in range(4 - (last_n - enc), 4)])


def test_one_stack_keeps_last_n_blocks_of_one_stack():
    em = _TwoStacks()
    one_stack(em, "decoder")
    assert em.module_names(last_n=3) == [f"decoder.block.{i}.second_fc" for i in (1, 2, 3)]
    em = _TwoStacks()
    one_stack(em, "encoder")
    assert em.module_names("first_fc", last_n=2) == ["encoder.block.2.first_fc", "encoder.block.3.first_fc"]
