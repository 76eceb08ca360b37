"""The phases of one run on a loaded model: prepare, then edit and evaluate each batch (or the lifelong
sequence), summed up as the row's metric, time, memory and info fields."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

import editors
from bench.core.measure import measure, per_device_fields
from bench.evaluation.eval_extra import ExtraOptions, combine_all, evaluate_all
from bench.evaluation.samples import sample_lines
from bench.models import EditableModel
from bench.runner.errors import UserError
from bench.runner.resolve import Resolved
from bench.runner.sequential import edit_in_sequence
from editors.base import EditorContext
from tasks.base import DataError


def set_seed(seed: int) -> None:
    """Seed every generator the run touches."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np


        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def run_phases(res: Resolved, em: EditableModel, cache: Path, progress: Any, log: Any) -> dict[str, Any]:
    cfg = res.cfg
    try:  # the model's context is known only now; beyond it the position embedding fails with an IndexError
        res.task.check_lengths(em.tokenizer, em.max_length, getattr(em.model.config, "max_position_embeddings", None))
    except DataError as e:
        raise UserError(f"bad data: {e}") from None
    ctx = EditorContext(
        results_dir=cache,
        seed=cfg.seed,
        task_name=cfg.task,
        task_key=res.task_key,
        model_key=em.key or cfg.model,
        n_edits=cfg.n_edits,
        progress=progress,
        log=log,
    )
    editor = res.editor_cls(em, res.hparams, ctx)
    if res.editor_cls.meta_trains and (note := res.task.data_info.get("train_note")):
        log(f"note: {note} (recorded in the row as config.data.train_note)")
    set_seed(cfg.seed)
    train = res.task.train_split()
    if res.editor_cls.meta_trains and not train:
        dropped = res.task.data_info.get("train_overlap_dropped")
        why = (f": all {dropped} of its training requests share a prompt with the evaluation data and were dropped"
               if dropped else "")
        raise UserError(f"editor '{cfg.editor}' meta-trains, but task '{cfg.task}' has no training requests{why}; "
                        "give --train-data FILE with requests that are not in --data")
    devices = em.devices  # where the weights are: a device map may spread them over several GPUs
    with measure(devices) as prep:
        editor.prepare(train)
    opts = ExtraOptions(generation=cfg.generation, cf_scores=cfg.cf_scores, fluency=cfg.fluency)
    if cfg.sequential:
        seq = edit_in_sequence(editor, em, res.task.sample_batches(cfg.n_edits, cfg.sequential, cfg.seed), opts,
                               devices, lambda: set_seed(cfg.seed), cfg.log_samples)
        out = phase_fields(res, editor, em, prep, seq.summary, seq.peak_measure, seq.first_info,
                            seq.samples if cfg.log_samples else None)
        out["times"]["pre_eval_s"] = out.pop("pre_eval_s")
        out["sequence"] = seq.steps
        return out
    batches = res.task.sample_batches(cfg.n_edits, res.config.get("batches", 1), cfg.seed)
    done, samples = [], []
    for b, requests in enumerate(batches):  # each batch is edited from the unedited model
        set_seed(cfg.seed)
        with measure(devices, interval_s=0.002) as ed:
            edit = editor.edit(requests)
            edit.check_finite()
        with measure(devices) as ev:
            pre, pre_x = evaluate_all(em, requests, opts)
            with edit.applied(em.model):
                post, post_x = evaluate_all(em, requests, opts)
        metrics = combine_all(pre, post, pre_x, post_x)
        done.append({"metrics": metrics, "edit_s": ed.seconds, "eval_s": ev.seconds,
                     "peak_mem_edit_bytes": ed.peak_bytes, "mean_residual": edit.mean_residual,
                     "edit_info": edit.info, "measure": ed})
        if cfg.log_samples:
            samples += sample_lines(b, requests, pre, post, pre_x, post_x)
    peak = max(done, key=lambda d: d["peak_mem_edit_bytes"] or 0)["measure"]
    return phase_fields(res, editor, em, prep, batch_summary(done), peak, done[0]["edit_info"],
                         samples if cfg.log_samples else None)


def phase_fields(res: Resolved, editor: editors.Editor, em: EditableModel, prep: Any, summary: dict[str, Any],
                  peak: Any, edit_info: dict[str, Any], samples: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The row fields of the prepare/edit/evaluate phases, from the edit protocol's summary (one batch, --batches
    or --sequential); `samples` (--log-samples) are written by the caller, which knows the run id."""
    out = dict(summary)
    out.update({
        "times": {"prepare_s": prep.seconds, "edit_s": out.pop("edit_s"), "eval_s": out.pop("eval_s")},
        "peak_mem_prepare_bytes": prep.peak_bytes,
        "mem_kind": peak.mem_kind,
        **per_device_fields(prep, peak),
        "n_skipped_records": res.task.n_skipped,
        "info": {"prepare": editor.prepare_info(), "edit": edit_info, "model": em.info, "data": res.task.data_info},
    })
    if samples is not None:
        out["samples"] = samples
    return out


def batch_summary(done: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch: its numbers as before. Several: the mean over batches, their std and each batch's numbers."""
    first = done[0]
    if len(done) == 1:
        return {"metrics": first["metrics"], "edit_s": first["edit_s"], "eval_s": first["eval_s"],
                "peak_mem_edit_bytes": first["peak_mem_edit_bytes"], "mean_residual": first["mean_residual"]}
    keys = list(first["metrics"])
    cols = {k: torch.tensor([d["metrics"][k] for d in done], dtype=torch.float64) for k in keys}
    peaks = [d["peak_mem_edit_bytes"] for d in done if d["peak_mem_edit_bytes"] is not None]
    res = [d["mean_residual"] for d in done if d["mean_residual"] is not None]
    return {
        "metrics": {k: float(v.mean()) for k, v in cols.items()},
        "metrics_std": {k: float(v.std(unbiased=True)) for k, v in cols.items()},
        "batches": [{k: d[k] for k in ("metrics", "edit_s", "eval_s", "peak_mem_edit_bytes", "mean_residual")}
                    for d in done],
        "edit_s": sum(d["edit_s"] for d in done) / len(done),  # per batch
        "eval_s": sum(d["eval_s"] for d in done) / len(done),
        "peak_mem_edit_bytes": max(peaks) if peaks else None,
        "mean_residual": sum(res) / len(res) if res else None,
    }
