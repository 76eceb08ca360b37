"""The report's tables: the editor comparison per (model, task, m), the MALMEN ablations in the shape
of the paper's Table 1, and the final state of lifelong editing."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from bench.results.report.blocks import Doc
from bench.results.report.data import COST, FLOORS, MEM_COLS, MEM_FLOOR_MIB, PCT
from bench.results.variants import fmt_value

AGG_NOTE = ("Numbers are mean ± sample standard deviation (ddof=1) over seeds; 'runs' counts stored ok rows; "
            "percentages are of the stored fractions.")

# Table 1 of the MALMEN paper: the ablation flags and their names there.
ABLATIONS = {
    "shift=sum": "Sum param. shifts",
    "reg=none": "No regularization",
    "layers=first_fc": "Edit first FC in FFN",
    "cache=all": "Cache all tokens",
}
ABLATION_KEYS = {flag.split("=")[0] for flag in ABLATIONS}


def fmt_cell(mean: float, std: float, scale: float = 1.0, digits: int = 1) -> str:
    """'mean ± std' (std omitted for one run, '–' for no value)."""
    if mean is None or np.isnan(mean):
        return "–"
    if abs(mean * scale) >= 1e4 or (0 < abs(mean * scale) < 10 ** -digits):
        m, s = f"{mean * scale:.3g}", f"{std * scale:.2g}"
    else:
        m, s = f"{mean * scale:.{digits}f}", f"{std * scale:.{digits}f}"
    return m if std is None or np.isnan(std) else f"{m} ± {s}"



def comparison_rows(agg: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Editor-comparison table of one (model, task, m): one line per variant."""
    cols = [c for c in list(PCT) + list(COST) if f"{c}:mean" in agg and agg[f"{c}:n"].sum() > 0]
    # memory columns where no run reached the sampler's floor are noise, not a measurement
    cols = [c for c in cols if c not in MEM_COLS or (agg[f"{c}:mean"] >= MEM_FLOOR_MIB).any()]
    header = ["variant"] + [PCT[c] + " %" if c in PCT else COST[c] for c in cols] + ["seeds", "runs"]
    rows = []
    for _, a in agg.sort_values("variant").iterrows():
        cells = [f"< {FLOORS[c]:g}" if c in FLOORS and a[f"{c}:mean"] < FLOORS[c] else
                 fmt_cell(a[f"{c}:mean"], a[f"{c}:std"], 100.0 if c in PCT else 1.0, 1 if c in PCT else 3)
                 for c in cols]
        rows.append([a["variant"], *cells, a["seeds"], str(a["n_runs"])])
    return header, rows


def ablation_name(diff: dict[str, Any]) -> str:
    """The paper's name of a MALMEN ablation from its flags ('MALMEN' when none)."""
    if not diff:
        return "MALMEN"
    flags = [f"{k}={fmt_value(v)}" for k, v in sorted(diff.items())]
    names = [ABLATIONS.get(f, f) for f in flags]
    return f"{' + '.join(names)} ({', '.join(flags)})"


def common_settings(diffs: list[dict[str, Any]]) -> dict[str, Any]:
    """The settings every variant shares (e.g. a smaller rank for a small model): the table's baseline."""
    items = [{(k, json.dumps(v, sort_keys=True)) for k, v in d.items()} for d in diffs]
    shared = set.intersection(*items) if items else set()
    return {k: json.loads(v) for k, v in shared}


def ablation_tables(agg: pd.DataFrame, doc: Doc) -> pd.DataFrame:
    """Table 1 of the MALMEN paper: MALMEN and each ablation; columns ES/GS/LS per (task, model); one per m.

    Settings shared by every MALMEN variant of a table (e.g. `rank=32` for a tiny model) are the
    baseline: stated under the table, and each line is named by what it changes on top of them.
    """
    mal = agg[agg["editor"] == "malmen"]
    if mal["variant_diff"].nunique() < 2:
        doc.p("No MALMEN ablation runs are stored (e.g. `bench sweep --editors malmen --set shift=sum`).")
        return pd.DataFrame()
    recs = []
    for m, g in mal.groupby("n_edits"):
        diffs = {d: json.loads(d) for d in g["variant_diff"].unique()}
        base = common_settings(list(diffs.values()))
        own = {d: {k: v for k, v in diff.items() if k not in base} for d, diff in diffs.items()}
        # only MALMEN and its Table-1 flags: another setting (e.g. train_edits) is a variant, not an ablation
        own = {d: o for d, o in own.items() if set(o) <= ABLATION_KEYS}
        if len(own) < 2:  # MALMEN alone at this m: nothing ablated, no table
            continue
        g = g[g["variant_diff"].isin(list(own))]
        # a (task, model) with MALMEN alone has nothing ablated: no columns of dashes
        g = g[g.groupby(["task", "model"])["variant_diff"].transform("nunique") >= 2]
        groups = sorted({(t, mo) for t, mo in zip(g["task"], g["model"], strict=True)})
        header = ["variant"] + [f"{t} / {mo}: {x} %" for t, mo in groups for x in ("ES", "GS", "LS")] + ["seeds", "runs"]
        order = sorted(own, key=lambda d: (not own[d], ablation_name(own[d])))  # MALMEN last, as in the paper
        rows = []
        for d in order:
            name = ablation_name(own[d])
            cells, seeds, runs = [], set(), []
            for t, mo in groups:
                a = g[(g["variant_diff"] == d) & (g["task"] == t) & (g["model"] == mo)]
                if len(a) != 1:  # absent, or several data files: never mixed, shown as missing
                    cells += ["–"] * 3
                    continue
                a = a.iloc[0]
                cells += [fmt_cell(a[f"{c}:mean"], a[f"{c}:std"], 100.0) for c in
                          ("metrics.es", "metrics.gs", "metrics.ls")]
                seeds |= set(a["seeds"].split(","))
                runs.append(str(a["n_runs"]))
                recs.append({"n_edits": m, "task": t, "model": mo, "variant": name, "baseline": json.dumps(base),
                             **{k: a[k] for k in a.index if k.split(":")[0] in ("metrics.es", "metrics.gs", "metrics.ls")},
                             "seeds": a["seeds"], "n_runs": a["n_runs"]})
            rows.append([name, *cells, ",".join(sorted(seeds, key=int)), "/".join(runs)])
        doc.h(3, f"Ablation (MALMEN paper Table 1 shape), m = {m}")
        doc.table(header, rows)
        shared = ", ".join(f"{k}={fmt_value(v)}" for k, v in sorted(base.items()))
        doc.p(f"MALMEN with one flag changed at a time, m = {m} edits, {', '.join(f'{t} / {mo}' for t, mo in groups)}; "
              + (f"every line also has {shared} (differs from the defaults). " if shared else "")
              + "ES/GS/LS as defined above (LS = gold answers). " + AGG_NOTE
              + " A '–' means no run, or runs on different data files, which are not mixed.")
    return pd.DataFrame(recs)


# ---------------------------------------------------------------- the report


def sequence_table(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The state after the last batch per variant: retention, locality, time per batch."""
    last = frame[frame["n_edited"] == frame.groupby(["variant", "seed"])["n_edited"].transform("max")]
    header = ["variant", "ES %", "GS %", "LS %", "LS agree %", "batch-1 ES %", "pre LS %", "edit s / batch", "seeds"]
    rows = []
    for v, g in last.groupby("variant"):
        per = frame[frame["variant"] == v]
        cells = [fmt_cell(g[c].mean(), g[c].std(ddof=1) if len(g) > 1 else np.nan)
                 for c in ("es", "gs", "ls", "ls_agree", "first_es", "pre_ls")]
        rows.append([v, *cells, fmt_cell(per["edit_s"].mean(), np.nan, 1.0, 3),
                     ",".join(str(s) for s in sorted(g["seed"].unique()))])
    return header, rows

