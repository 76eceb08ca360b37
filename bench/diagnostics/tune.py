"""Measure a hyper-network editor's hyperparameters on the training split only (never the evaluation pool).

    python -m bench.diagnostics.tune --editor malmen --model tiny-gpt2 --task synthetic --edits 64 \\
        --steps 800 --every 100 --val 128 --set meta_lr=1e-4 --set edit_lr=1e-3

The task's training split is shuffled (seeded); `--val` requests are held out and edited in batches
of `--edits` every `--every` steps of meta-training on the rest (the `select` schedule), and the
held-out ES / GS / LS / mean residual are printed as one JSON line per validation, then a summary.
This is how the per-model files in editors/hparams/{malmen,mend}/ were chosen; their `_why` cites
the lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import editors
import tasks
from bench.models import LoadContext, load_model
from bench.runner.overrides import editor_keys, split_overrides, task_keys
from editors.base import EditorContext, hparams_from, model_defaults


def _parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise SystemExit(f"--set wants KEY=VALUE, got {it!r}")
        out[k] = v
    return out


def split_sets(task_cls: type, editor_cls: type, sets: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(task config, hparams) overrides of a tool's `--set` values, split as `bench run` splits them; SystemExit
    for a key that is neither."""
    task_over, editor_over, unknown = split_overrides(task_cls, editor_cls, sets)
    if unknown:
        raise SystemExit(f"unknown --set key(s) {unknown}; valid: editor {sorted(editor_keys(editor_cls))}, "
                         f"task {sorted(task_keys(task_cls))}")
    return task_over, editor_over


def main(argv: list[str] | None = None) -> None:
    """Meta-train on part of the training split and print the held-out validation curve."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--editor", default="malmen", choices=["malmen", "mend"])
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--task", default="synthetic")
    ap.add_argument("--edits", type=int, default=64, help="edits per step and per validation batch")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--val", type=int, default=128, help="held-out training requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=Path("results"), help="model cache folder")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    a = ap.parse_args(argv)
    editor_cls = editors.EDITORS[a.editor]
    task_cls = tasks.TASKS[a.task]
    task_over, over = split_sets(task_cls, editor_cls, {**_parse_sets(a.sets), "schedule": "select", "steps": a.steps,
                                                        "val_every": a.every, "n_val": a.val, "train_edits": a.edits})
    hp = hparams_from(editor_cls.hparams_cls, over, model_defaults(a.editor, a.model))
    task = task_cls(hparams_from(task_cls.config_cls, task_over, {}))
    em = load_model(LoadContext(a.model, a.results, "cpu", task.kind, a.seed, None))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # no checkpoint kept: this is a measurement
        ctx = EditorContext(results_dir=Path(tmp), seed=a.seed, model_key=em.key or a.model, task_key=a.task,
                            n_edits=a.edits, log=lambda s: None)
        ed = editor_cls(em, hp, ctx)
        ed.prepare(task.train_split())
        side = json.loads((Path(ed.prepare_info()["checkpoint"]) / "meta.json").read_text())
    for rec in side["history"]:
        if "score" in rec or "val_score" in rec:
            print(json.dumps({k.removeprefix("val_"): (round(v, 4) if isinstance(v, float) else v)
                              for k, v in rec.items() if k == "step" or k.startswith("val_") or "score" in rec}))
    print(json.dumps({"editor": a.editor, "model": a.model, "task": a.task, "edits": a.edits,
                      "hparams": {k: v for k, v in dataclasses.asdict(hp).items()},
                      "best_step": side["best_step"], "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
