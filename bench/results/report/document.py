"""`bench report`: index.md, index.html, figures/*.png, runs.csv and tables/*.csv of a result store."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pandas as pd

from bench.results.report.blocks import Doc
from bench.results.report.data import COST, PCT, aggregate, load_runs, ok_runs, run_context, sequence_frame
from bench.results.report.figures import figures, sequence_figures
from bench.results.report.tables import AGG_NOTE, ablation_tables, comparison_rows, sequence_table
from bench.store import ensure_dir

METRIC_DEFS = [
    ("ES", "edit success: mean token accuracy (teacher-forced argmax = answer token) of the edit targets on "
           "the edit prompts, after the edit (MALMEN's definition); classification: fraction of edit claims "
           "predicted as the new label."),
    ("GS", "generalization success: the same on the rephrased (equivalent) prompts."),
    ("LS", "locality success, gold: the same on unrelated prompts against their gold answers (MALMEN's "
           "definition); classification: accuracy on unrelated claims. This is the LS in every figure and table."),
    ("LS agree", "fraction of unrelated answer tokens whose post-edit argmax equals the pre-edit argmax "
                 "(EasyEdit's definition); shown only where labelled 'LS agree'."),
    ("pre ES, pre LS", "the same metrics of the unedited model on the same probes."),
    ("ES/GS/LS gen", "generation-based success: greedy decoding from the prompt alone (no teacher forcing) for "
                     "the answer's token count plus 3; success when the continuation begins with the answer as "
                     "whole words after normalising case, whitespace and punctuation."),
    ("CF ES/PS/NS, CF Score", "CounterFact only, ROME's definitions (official per-token-mean probabilities): "
                              "fraction of rewrite / paraphrase prompts with P(new) > P(true), of neighbourhood "
                              "prompts with P(true) > P(new), per case then averaged; CF Score is their "
                              "harmonic mean."),
    ("mean residual", "per edited layer, mean over edit keys u_i of ||ΔW u_i − d_i|| / ||d_i|| for the value "
                      "shifts d_i the editor aimed for, averaged over layers (MALMEN paper, Fig. 8); "
                      "fine-tuning has none."),
    ("times", "wall-clock seconds of the run's phases. 'prepare' is this run's prepare phase: meta-training "
              "or covariance statistics, or just loading them when a cached checkpoint/statistics file is "
              "reused (cells of one sweep share them); 'meta-train s' is the time the reused checkpoint took to "
              "train."),
    ("peak memory", "torch.cuda.max_memory_allocated on GPU; on CPU the sampled peak resident set above the "
                    "phase's baseline (the row's mem_kind)."),
]


def write_report(results_dir: str | Path, out: str | Path = "reports") -> dict[str, Any]:
    """Render index.md, index.html, figures/*.png, runs.csv and tables/*.csv; returns a summary."""
    results_dir, out = Path(results_dir), Path(out)
    if not results_dir.is_dir():
        raise ValueError(f"--results {results_dir}: the folder does not exist")
    df = load_runs(results_dir)
    if df.empty:
        raise ValueError(f"no runs stored in {results_dir / 'runs.jsonl'}")
    ensure_dir(out, "--out")  # StoreError now, not a traceback after the figures are drawn
    (out / "tables").mkdir(exist_ok=True)
    for old in (out / "figures").glob("*.png") if (out / "figures").exists() else []:
        old.unlink()  # figures of groups no longer in the store must not linger
    flat = df.drop(columns=["order"]).copy()
    for c in flat.columns:  # lists / dicts (e.g. per-layer info) as JSON text
        if flat[c].map(lambda v: isinstance(v, list | dict)).any():
            flat[c] = flat[c].map(lambda v: json.dumps(v) if isinstance(v, list | dict) else v)
    flat.to_csv(out / "runs.csv", index=False)

    ok, dropped = ok_runs(df)
    # Lifelong rows (--sequential) measure another protocol: their own section, never mixed into one-batch curves.
    is_seq = ok["sequence"].map(lambda v: isinstance(v, list)) if "sequence" in ok else pd.Series(False, ok.index)
    n_ok = len(ok)
    ok, seq = ok[~is_seq], ok[is_seq]
    n_failed = int((df["status"] != "ok").sum())
    doc = Doc()
    doc.h(1, "editbench report")
    doc.p(f"Generated {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} by `bench report` from "
          f"`{results_dir / 'runs.jsonl'}`: {len(df)} stored rows, {n_ok} ok runs used, {n_failed} failed "
          f"(listed at the end), {dropped} older reruns of an identical config ignored (newest kept). "
          "All rows flattened: runs.csv; aggregated numbers at full precision: tables/*.csv.")
    doc.h(2, "Metric definitions")
    doc.table(["name", "definition"], [[k, v] for k, v in METRIC_DEFS])
    doc.p("Grouping: runs whose configs differ only by the seed are aggregated; a different hparam, task "
          "setting, data file or device is a separate line, labelled by the settings that differ from the "
          "editor's defaults (paper defaults plus editors/hparams/<editor>/<model>.json). " + AGG_NOTE)
    if ok.empty:
        doc.p("No ok one-batch runs: no scaling curves.")
        agg = pd.DataFrame()
    else:
        agg = aggregate(ok, list(PCT) + list(COST))
        agg.to_csv(out / "tables" / "comparison.csv", index=False)
        figs = figures(ok, out)
        for (model, task), g in ok.groupby(["model", "task"]):
            doc.h(2, f"{model} / {task}")
            doc.p(f"Model {model}, task {task}, data {', '.join(sorted(g['data_id'].unique()))}, "
                  f"{run_context(g)}, editors {', '.join(sorted(g['editor'].unique()))}.")
            for path, caption in figs[(model, task)]:
                doc.img(path, caption)
                doc.p(caption)
            if not figs[(model, task)]:
                doc.p("Every variant here is measured at one m only: no curves, the tables below.")
            for m, a in agg[(agg["model"] == model) & (agg["task"] == task)].groupby("n_edits"):
                doc.h(3, f"Editor comparison: {model} / {task}, m = {m}")
                doc.table(*comparison_rows(a))
                doc.p(f"{model}, {task}, m = {m} edits in one batch; seeds {','.join(sorted(set(','.join(a['seeds']).split(',')), key=int))}; "
                      f"{int(a['n_runs'].sum())} runs. ES/GS/LS/LS agree in %, as defined above (LS = gold answers). "
                      + AGG_NOTE)
        doc.h(2, "MALMEN ablations")
        abl = ablation_tables(agg, doc)
        if not abl.empty:
            abl.to_csv(out / "tables" / "ablation.csv", index=False)
    if not seq.empty:
        frame = sequence_frame(seq)
        frame.to_csv(out / "tables" / "sequential.csv", index=False)
        doc.h(2, "Lifelong editing")
        for (model, task, m, t), path, caption in sequence_figures(frame, out):
            doc.h(3, f"{model} / {task}: {t} batches of m = {m}")
            doc.img(path, caption)
            doc.p(caption)
            sel = frame[(frame["model"] == model) & (frame["task"] == task) & (frame["n_edits"] == m) & (frame["T"] == t)]
            doc.table(*sequence_table(sel))
            doc.p(f"After the last of {t} batches ({t * m} edits). Batch-1 ES: the first batch's requests on the final "
                  "model. Edit s / batch: mean over batches and seeds (edit + what the editor remembers). " + AGG_NOTE)
    failed = df[df["status"] != "ok"]
    if len(failed):
        doc.h(2, "Failed runs")
        doc.table(["run", "started", "editor", "model / task", "m", "seed", "error"],
                  [[r["run_id"][:8], str(r["started_at"]), r["variant"], f"{r['model']} / {r['task']}",
                    str(r["n_edits"]), str(r["seed"]), str(r.get("error", ""))[:200]] for _, r in failed.iterrows()])
    (out / "index.md").write_text(doc.markdown(out), encoding="utf-8")
    (out / "index.html").write_text(doc.html("editbench report"), encoding="utf-8")
    return {"rows": len(df), "ok": n_ok, "failed": n_failed, "out": str(out),
            "figures": sorted(str(p) for p in (out / "figures").glob("*.png")), "aggregate": agg}
