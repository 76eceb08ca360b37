"""The report's data: stored rows as frames (flattened, grouped by variant, newest ok row per config),
seed aggregates, the lifelong curves, and the metric and cost columns the figures and tables show."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.results.variants import cell_key, data_id, variant_diff, variant_key, variant_label
from bench.store import ResultStore
from bench.store.schema import Row

PCT = {"metrics.pre_es": "pre ES", "metrics.es": "ES", "metrics.gs": "GS", "metrics.pre_ls": "pre LS",
       "metrics.ls": "LS", "metrics.ls_agree": "LS agree", "metrics.es_seq": "ES seq", "metrics.gs_seq": "GS seq",
       # the extended evaluation (bench/evaluation/eval_extra.py); columns appear only where rows have them
       "metrics.es_gen": "ES gen", "metrics.gs_gen": "GS gen", "metrics.ls_gen": "LS gen",
       "metrics.pre_cf_score": "pre CF Score", "metrics.cf_es": "CF ES", "metrics.cf_ps": "CF PS",
       "metrics.cf_ns": "CF NS", "metrics.cf_score": "CF Score"}
# The CPU peak is sampled RSS (bench/core/measure.py): a phase shorter than the sampling period, or one that
# reuses memory freed earlier in the process, reads a fraction of a MiB, which is not a measurement.
MEM_FLOOR_MIB = 1.0
COST = {"times.edit_s": "edit s", "times.prepare_s": "prepare s", "info.prepare.meta_train_s": "meta-train s",
        "peak_edit_mib": "peak edit MiB", "peak_prepare_mib": "peak prepare MiB", "mean_residual": "mean residual"}
# A phase that does nothing (fine-tuning's prepare) times in microseconds: the clock's overhead.
TIME_FLOOR_S = 1e-3
# Below these a value is shown as "< floor" in tables and not drawn in figures.
FLOORS = {"peak_edit_mib": MEM_FLOOR_MIB, "peak_prepare_mib": MEM_FLOOR_MIB, "peak_prepare_fresh_mib": MEM_FLOOR_MIB,
          "times.edit_s": TIME_FLOOR_S, "times.prepare_s": TIME_FLOOR_S, "prepare_fresh_s": TIME_FLOOR_S}
MEM_COLS = ("peak_edit_mib", "peak_prepare_mib")



def load_runs(results_dir: str | Path) -> pd.DataFrame:
    """Every stored row flattened with `pd.json_normalize`, plus grouping columns (variant, cell, data id)."""
    rows: list[Row] = list(ResultStore(results_dir).rows())
    if not rows:
        return pd.DataFrame()
    df = pd.json_normalize(rows)
    df["variant_key"] = [variant_key(r["config"]) for r in rows]
    df["cell_key"] = [cell_key(r["config"]) for r in rows]
    df["data_id"] = [data_id(r["config"]) for r in rows]
    df["variant_diff"] = [json.dumps(variant_diff(r["config"]), sort_keys=True) for r in rows]
    df["variant"] = [variant_label(r["editor"], variant_diff(r["config"])) for r in rows]
    df["device"] = [r["config"].get("device", "") for r in rows]
    df["order"] = range(len(df))
    for c in ("peak_mem_edit_bytes", "peak_mem_prepare_bytes", "mean_residual", "info.prepare.meta_train_s"):
        if c not in df:
            df[c] = np.nan
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df["peak_edit_mib"] = df["peak_mem_edit_bytes"] / 2**20
    df["peak_prepare_mib"] = df["peak_mem_prepare_bytes"] / 2**20
    # The prepare phase of a run that loaded a cached checkpoint or statistics measures the load, not the work.
    reused = [any(v is True for k, v in (r.get("info", {}).get("prepare") or {}).items() if k.endswith("reused"))
              for r in rows]
    fresh = ~pd.Series(reused, index=df.index)
    df["prepare_fresh_s"] = df["times.prepare_s"].where(fresh) if "times.prepare_s" in df else np.nan
    df["peak_prepare_fresh_mib"] = df["peak_prepare_mib"].where(fresh)
    return disambiguate(df)


def disambiguate(df: pd.DataFrame) -> pd.DataFrame:
    """Make labels unique per (model, task): add data id, then device, then a key prefix where still shared."""
    df = df.copy()
    for (_model, _task), g in df.groupby(["model", "task"]):
        for _label, h in g.groupby("variant"):
            if h["variant_key"].nunique() == 1:
                continue
            new = h["variant"].copy()
            if h["data_id"].nunique() > 1:
                new = new + " [data " + h["data_id"] + "]"
            if h["device"].nunique() > 1:
                new = new + " [" + h["device"] + "]"
            merged = pd.DataFrame({"label": new, "key": h["variant_key"]})
            if merged.groupby("label")["key"].nunique().max() > 1:  # differs in something unnamed: show the key
                new = new + " #" + h["variant_key"].str[:6]
            df.loc[h.index, "variant"] = new
    return df


def ok_runs(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Only `ok` rows, newest per config hash; also returns how many older reruns were dropped."""
    if df.empty:
        return df, 0
    ok = df[df["status"] == "ok"].sort_values("order")
    newest = ok.drop_duplicates("config_hash", keep="last")
    return newest, len(ok) - len(newest)


def aggregate(ok: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Mean and sample std over seeds of `columns` per (model, task, variant, n_edits) cell."""
    keys = ["model", "task", "editor", "variant", "variant_key", "variant_diff", "data_id", "n_edits"]
    cols = [c for c in columns if c in ok]
    recs = []
    for k, g in ok.groupby(keys, sort=True):
        rec: dict[str, Any] = dict(zip(keys, k, strict=True))
        rec["n_runs"] = len(g)
        rec["seeds"] = ",".join(str(s) for s in sorted(g["seed"].unique()))
        for c in cols:
            vals = pd.to_numeric(g[c], errors="coerce").dropna().to_numpy(dtype=float)
            rec[f"{c}:mean"] = float(vals.mean()) if len(vals) else np.nan
            rec[f"{c}:std"] = float(vals.std(ddof=1)) if len(vals) > 1 else np.nan
            rec[f"{c}:n"] = len(vals)
        recs.append(rec)
    return pd.DataFrame(recs)


def run_context(g: pd.DataFrame) -> str:
    """'seeds 0,1,2; 9 runs' of the rows `g` (figure titles and captions, section headers)."""
    seeds = ",".join(str(s) for s in sorted(g["seed"].unique()))
    return f"seeds {seeds}; {len(g)} runs"


def sequence_frame(seq: pd.DataFrame) -> pd.DataFrame:
    """One line per (run, step) of `--sequential` rows: the curve in percent, the batch's edit time."""
    recs = []
    for _, r in seq.iterrows():
        for s in r["sequence"]:
            m, first, pre = s["metrics"], s.get("first_batch", {}), s.get("pre", {})
            recs.append({"model": r["model"], "task": r["task"], "n_edits": r["n_edits"], "T": len(r["sequence"]),
                         "variant": r["variant"], "seed": r["seed"], "n_edited": s["n_edited"],
                         **{k: 100 * m[k] for k in ("es", "gs", "ls", "ls_agree") if k in m},
                         "first_es": 100 * first.get("es", np.nan),
                         **{f"pre_{k}": 100 * pre[k] for k in ("es", "gs", "ls") if k in pre},
                         "edit_s": s["edit_s"]})
    return pd.DataFrame(recs)
