"""Hold out requests *and* locality probes of the synthetic training split, meta-train, then edit the held-out part.

    python -m bench.diagnostics.tune_heldout --editor malmen --model tiny-t5 --edits 64 --set loc_coef=3

`bench.diagnostics.tune` validates on held-out training requests whose locality probes come from the
same pool of probe facts the meta-training KL saw, so its LS is optimistic. Here the synthetic
training split's probe pool is cut in two: the meta-training requests take their probes from one
half and the held-out requests (`--val`, a seeded shuffle of the training facts) from the other,
as the evaluation split's probes are disjoint from the training split's. Meta-training runs the
editor's own schedule (the official one: final weights); the held-out requests are then edited in
full batches of `--edits`, each from the unedited model, and the mean ES / GS / LS / pre-LS /
ls_agree over the batches is printed as one JSON line. The evaluation split is never read.

Two diagnostics of what limits locality: `--probes seen` gives the held-out requests probes from the
meta-training half (LS on probes the locality term saw), `--probes mixed` adds the training half of the
other probe pool (the locality people's facts) to the meta-training probes. `--stacks encoder|decoder`
edits the last `last_n` blocks of one stack of an encoder-decoder model only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

import editors
from bench.diagnostics.tune import _parse_sets, split_sets
from bench.evaluation.metrics import combine, evaluate
from bench.models import LoadContext, load_model
from editors.base import EditorContext, hparams_from, model_defaults
from tasks.synthetic import SyntheticTask

PROBES = ("disjoint", "seen", "mixed")


def heldout_requests(task: SyntheticTask, n_val: int, seed: int, probes_mode: str = "disjoint") -> tuple[list, list]:
    """(meta-training, held-out) requests of the training split, their probes from disjoint halves of its pool."""
    world = task.world
    unrelated = task.config.locality == "unrelated"
    probes = world.unrelated_idx if unrelated else world.locality_idx
    pool = probes[: len(probes) // 2]  # the training split's half (tasks/synthetic.py World.requests)
    fit_probes, val_probes = pool[: len(pool) // 2], pool[len(pool) // 2:]
    if probes_mode == "seen":
        val_probes = fit_probes
    elif probes_mode == "mixed":
        other = world.locality_idx if unrelated else world.unrelated_idx
        fit_probes = fit_probes + other[: len(other) // 2]
    elif probes_mode != "disjoint":
        raise ValueError(f"probes must be one of {PROBES}, got {probes_mode!r}")
    facts = list(world.train_idx)
    rng = random.Random(f"tune-heldout:{seed}")
    rng.shuffle(facts)
    val, fit = facts[:n_val], facts[n_val:]
    return ([world.request(i, fit_probes[rng.randrange(len(fit_probes))]) for i in fit],
            [world.request(i, val_probes[rng.randrange(len(val_probes))]) for i in val])


def one_stack(em, stack: str) -> None:
    """Make `em.module_names` pick the last `last_n` blocks of the encoder or the decoder only."""
    full = em.module_names

    def names(which: str = "second_fc", blocks=None, last_n: int = 6) -> list[str]:
        return [n for n in full(which, blocks, 2 * last_n) if n.startswith(f"{stack}.")]
    em.module_names = names


def main(argv: list[str] | None = None) -> None:
    """Meta-train on part of the synthetic training split and print the held-out metrics."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--editor", default="malmen", choices=["malmen", "mend"])
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--edits", type=int, default=64, help="edits per meta-training step and per held-out batch")
    ap.add_argument("--val", type=int, default=256, help="held-out training requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=Path("results"), help="model cache folder")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--probes", choices=PROBES, default="disjoint", help="where the locality probes come from")
    ap.add_argument("--stacks", choices=("both", "encoder", "decoder"), default="both",
                    help="encoder-decoder models: which stacks are edited")
    a = ap.parse_args(argv)
    editor_cls = editors.EDITORS[a.editor]
    task_over, over = split_sets(SyntheticTask, editor_cls, {**_parse_sets(a.sets), "train_edits": a.edits})
    hp = hparams_from(editor_cls.hparams_cls, over, model_defaults(a.editor, a.model))
    task = SyntheticTask(hparams_from(SyntheticTask.config_cls, task_over, {}))
    fit, val = heldout_requests(task, a.val, a.seed, a.probes)
    em = load_model(LoadContext(a.model, a.results, "cpu", task.kind, a.seed, None))
    if a.stacks != "both":
        if not em.is_seq2seq:
            raise SystemExit(f"--stacks applies to encoder-decoder models; {a.model} has one stack")
        one_stack(em, a.stacks)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # no checkpoint kept: this is a measurement
        ctx = EditorContext(results_dir=Path(tmp), seed=a.seed, model_key=em.key or a.model, task_key="synthetic",
                            n_edits=a.edits, log=lambda s: None)
        ed = editor_cls(em, hp, ctx)
        ed.prepare(fit)
        train_s = time.perf_counter() - t0
        rows = []
        for b in range(len(val) // a.edits):
            batch = val[b * a.edits:(b + 1) * a.edits]
            edit = ed.edit(batch)
            pre = evaluate(em, batch)
            with edit.applied(em.model):
                post = evaluate(em, batch)
            rows.append(combine(pre, post))
    keys = ("es", "gs", "ls", "pre_es", "pre_ls", "ls_agree")
    mean = {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in keys}
    print(json.dumps({"editor": a.editor, "model": a.model, "edits": a.edits, "batches": len(rows),
                      "n_fit": len(fit), "set": _parse_sets(a.sets), "probes": a.probes, "stacks": a.stacks,
                      "modules": ed.modules, **mean,
                      "score": round((mean["es"] + mean["gs"] + mean["ls"]) / 3, 4),
                      "hparams": dataclasses.asdict(hp), "train_s": round(train_s, 1)}))


if __name__ == "__main__":
    main()
