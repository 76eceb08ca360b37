"""Measure MEMIT's z settings and mom2_update_weight on the training split only (never the evaluation pool).

    python -m bench.diagnostics.tune_memit --model smollm2-135m --task zsre --n 32

`--n` requests are sampled (seed 0) from the task's training split. For each z setting the target
values z are optimised once; every w of the grid then only re-solves the layer updates, so the grid
costs one z optimisation per z setting. One JSON line per (z setting, w): ES, GS, ls_agree, LS and
the mean residual on those requests. This is how `editors/hparams/memit/smollm2-135m.json` was chosen;
its `_why` cites the lines (results/published/tuning/memit-smollm2-zsre-train32.jsonl).

`--editor alphaedit` keeps the model file's z settings and grids the null-space threshold
(`--threshold`) and λ (`--l2`) instead: z is optimised once, every pair only re-projects and re-solves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

import editors
import tasks
from bench.diagnostics.tune import split_sets
from bench.evaluation.metrics import combine, evaluate
from bench.models import LoadContext, load_model
from editors.base import EditorContext, hparams_from, model_defaults

# MEMIT's GPT-J z settings and EasyEdit's Llama ones (editors/memit.py Z_DEFAULT, Z_RULES).
Z_SETTINGS = {"gptj-z": {"clamp_norm_factor": "0.75", "v_weight_decay": "0.5"},
              "easyedit-llama-z": {"clamp_norm_factor": "4", "v_weight_decay": "1e-3"}}


def _memo_targets(editor: Any) -> None:
    """Make `editor.target_values` compute z once and return it for every later edit of the same requests."""
    memo: dict[str, Any] = {}
    compute = editor.target_values

    def once(requests: Any, last_block: str) -> Any:
        if "z" not in memo:
            memo["z"] = compute(requests, last_block)
        return memo["z"]

    editor.target_values = once


def main(argv: list[str] | None = None) -> None:
    """Print held-out ES / GS / ls_agree for every z setting x w on sampled training requests."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="zsre")
    ap.add_argument("--n", type=int, default=32, help="training requests edited in one batch")
    ap.add_argument("--w", default="15000,4800,1406.25,500,150", help="comma-separated mom2_update_weight grid")
    ap.add_argument("--results", type=Path, default=Path("results"), help="model and statistics cache folder")
    ap.add_argument("--editor", default="memit", choices=["memit", "alphaedit"])
    ap.add_argument("--threshold", default="2e-2,1e-1,5e-1", help="alphaedit: nullspace_threshold grid")
    ap.add_argument("--l2", default="10,1,0.1", help="alphaedit: L2 grid")
    ap.add_argument("--z", default=",".join(Z_SETTINGS), help="memit: comma-separated z settings to run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a further setting for every grid point (repeatable), e.g. layers=2,3,4,5,6,7,8,9")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    task_cls = tasks.TASKS[a.task]
    task_over, extra = split_sets(task_cls, editors.EDITORS[a.editor], dict(kv.split("=", 1) for kv in a.set))
    task = task_cls(hparams_from(task_cls.config_cls, task_over, {}))
    requests = random.Random(0).sample(task.train_split(), a.n)
    em = load_model(LoadContext(a.model, a.results, "cpu", task.kind, 0, None))
    pre = evaluate(em, requests)
    if a.editor == "alphaedit":
        _grid_alphaedit(a, extra, em, requests, pre)
        return
    for zname in a.z.split(","):
        ed = _prepared("memit", {**Z_SETTINGS[zname], **extra}, a, em)
        t0 = time.perf_counter()
        for w in (float(x) for x in a.w.split(",")):
            ed.hparams = dataclasses.replace(ed.hparams, mom2_update_weight=w)
            edit, scores = _edit_and_score(ed, em, requests, pre)
            print(json.dumps({"task": a.task, "n": a.n, "z": zname, "w": w, **extra, **scores,
                              "v_loss_mean": round(edit.info.get("v_loss_mean", float("nan")), 4),
                              "s_since_z_start": round(time.perf_counter() - t0, 1)}), flush=True)


def _prepared(editor: str, sets: dict[str, str], a: argparse.Namespace, em: Any) -> Any:
    """The editor with the model file's settings plus `sets`, prepared, its z computed once for every later edit."""
    cls = editors.EDITORS[editor]
    hp = hparams_from(cls.hparams_cls, sets, model_defaults(editor, a.model))
    ctx = EditorContext(results_dir=a.results, seed=0, task_name=a.task, task_key=a.task, model_key=em.key,
                        n_edits=a.n, progress=None, log=lambda s: None)
    ed = cls(em, hp, ctx)
    ed.prepare([])
    _memo_targets(ed)
    return ed


def _edit_and_score(ed: Any, em: Any, requests: list[Any], pre: Any) -> tuple[Any, dict[str, float]]:
    """Edit `requests`, evaluate them with the edit applied: (edit, the printed metrics and residual)."""
    edit = ed.edit(requests)
    with edit.applied(em.model):
        post = evaluate(em, requests)
    m = combine(pre, post)
    return edit, {**{k: round(m[k], 4) for k in ("es", "gs", "ls_agree", "ls", "pre_ls", "pre_es")},
                  "residual": round(edit.mean_residual, 4)}


def _grid_alphaedit(a: argparse.Namespace, extra: dict[str, str], em: Any, requests: list[Any], pre: Any) -> None:
    """One JSON line per (nullspace_threshold, L2) on the model file's z settings."""
    from editors.alphaedit import null_space_projector

    ed = _prepared("alphaedit", extra, a, em)
    t0 = time.perf_counter()
    for thr in (float(x) for x in a.threshold.split(",")):
        ed._proj = {n: null_space_projector(s.mom2, thr) for n, s in ed._stats.items()}
        dims = [round(float(p.trace())) for p in ed._proj.values()]
        for lam in (float(x) for x in a.l2.split(",")):
            ed.hparams = dataclasses.replace(ed.hparams, nullspace_threshold=thr, L2=lam)
            _, scores = _edit_and_score(ed, em, requests, pre)
            print(json.dumps({"editor": "alphaedit", "task": a.task, "n": a.n, "threshold": thr, "L2": lam,
                              "null_dims": dims, **scores,
                              "s_since_z_start": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
