"""Lifelong editing (`--sequential T`): T batches of m requests applied one after another to one model.

Batch t is edited on the model that already carries batches 1..t-1 (each editor computes from the
weights as they are; AlphaEdit also remembers the earlier batches' keys: `Editor.remember`), its
shift is added for good, and the model is evaluated:

- `metrics`: ES / GS (teacher-forced, `_seq`, and the generation-based and CounterFact numbers the
  run computes) over all t·m requests edited so far — retention — and LS / `ls_agree` over their
  locality probes (facts no edit asked to change);
- `first_batch`: ES / GS of batch 1 alone, how the first edits hold up under later ones;
- `pre`: ES / GS / LS of the same requests on the unedited model (evaluated once, before batch 1);
- the batch's edit time (edit + remember), peak memory and mean residual.

Every weight an edit touched is saved before its first change and copied back at the end, so the
model leaves bit-exactly as it came, also when a batch fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.core.measure import PhaseStats, measure
from bench.evaluation.eval_extra import ExtraEval, ExtraOptions, combine_all, evaluate_all
from bench.evaluation.metrics import Evaluation, agreement
from bench.evaluation.samples import sample_lines
from bench.models import EditableModel
from editors.base import Edit, Editor, add_delta_
from tasks.base import EditRequest


@dataclass
class SequenceOutcome:
    """What `edit_in_sequence` hands the run loop: the summary fields of the row, the curve, and samples."""

    summary: dict[str, Any]
    steps: list[dict[str, Any]]
    first_info: dict[str, Any]
    peak_measure: PhaseStats
    samples: list[dict[str, Any]] = field(default_factory=list)


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def leading_hits(ev: Evaluation, requests: Sequence[EditRequest], n: int) -> dict[str, float]:
    """ES / GS / LS token accuracy of `ev` restricted to the first `n` of the `requests` it scored."""
    n_reph = sum(len(r.rephrases) for r in requests[:n])
    cut = {"es": n, "gs": n_reph, "ls": n}
    return {k: _mean(ev.hits[k][:c]) for k, c in cut.items() if k in ev.hits}


class _Kept:
    """The shifts kept in the model so far, with the original of every weight they touched."""

    def __init__(self, model: torch.nn.Module):
        self.params = dict(model.named_parameters())
        self.saved: dict[str, torch.Tensor] = {}

    def add(self, edit: Edit) -> None:
        missing = [n for n in edit.deltas if n not in self.params]
        if missing:
            raise KeyError(f"edit names parameters the model does not have: {missing}")
        for n, d in edit.deltas.items():
            if n not in self.saved:  # exact copy: subtracting the shifts again would not restore bit-exactly
                self.saved[n] = self.params[n].detach().clone()
            add_delta_(self.params[n], d)

    @torch.no_grad()
    def restore(self) -> None:
        for n, w in self.saved.items():
            self.params[n].copy_(w)
        self.saved.clear()


def edit_in_sequence(editor: Editor, em: EditableModel, batches: Sequence[Sequence[EditRequest]],
                     opts: ExtraOptions, devices: Any, reseed: Callable[[], None],
                     log_samples: bool = False) -> SequenceOutcome:
    """Apply `batches` one after another, evaluating after each; the model is restored at the end."""
    everything = [r for b in batches for r in b]
    m1 = len(batches[0])
    with measure(devices) as pre_ev:
        pre, pre_x = evaluate_all(em, everything, opts)
    kept = _Kept(em.model)
    steps: list[dict[str, Any]] = []
    measures: list[PhaseStats] = []
    infos: list[dict[str, Any]] = []
    done: list[EditRequest] = []
    post: Evaluation | None = None
    post_x: ExtraEval | None = None
    try:
        for t, requests in enumerate(batches, 1):
            reseed()
            with measure(devices, interval_s=0.002) as ed:
                edit = editor.edit(requests)
                edit.check_finite()
                kept.add(edit)
                editor.remember(requests)
            done.extend(requests)
            with measure(devices) as ev:
                post, post_x = evaluate_all(em, done, opts)
            n = len(done)
            metrics = dict(post.metrics)
            metrics["ls_agree"] = agreement(pre.loc_pred[:n], post.loc_pred)
            metrics.update(post_x.metrics)
            steps.append({"step": t, "n_edited": n, "metrics": metrics,
                          "first_batch": leading_hits(post, done, m1), "pre": leading_hits(pre, everything, n),
                          "edit_s": ed.seconds, "eval_s": ev.seconds, "peak_mem_edit_bytes": ed.peak_bytes,
                          "mean_residual": edit.mean_residual})
            measures.append(ed)
            infos.append(edit.info)
    finally:
        kept.restore()
    assert post is not None and post_x is not None
    final = combine_all(pre, post, pre_x, post_x)
    peaks = [s["peak_mem_edit_bytes"] for s in steps if s["peak_mem_edit_bytes"] is not None]
    res = [s["mean_residual"] for s in steps if s["mean_residual"] is not None]
    summary = {
        "metrics": final,
        "edit_s": _mean([s["edit_s"] for s in steps]),  # per batch, as with --batches
        "eval_s": _mean([s["eval_s"] for s in steps]),
        "pre_eval_s": pre_ev.seconds,
        "peak_mem_edit_bytes": max(peaks) if peaks else None,
        "mean_residual": _mean(res) if res else None,
    }
    samples = []
    if log_samples:  # the final state: every request with all T batches applied
        for line in sample_lines(0, everything, pre, post, pre_x, post_x):
            line["batch"], line["request"] = divmod(line["request"], m1)
            samples.append(line)
    peak = max(measures, key=lambda m: m.peak_bytes or 0)
    return SequenceOutcome(summary, steps, infos[0], peak, samples)
