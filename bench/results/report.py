"""`bench report`: scaling curves, cost curves, residuals and tables rendered straight from the result store.

Runs are grouped by `variant_key` (the config without seed and number of edits, see bench/results/variants.py):
rows that differ only by seed are aggregated (mean, sample std), anything else (hparams, task
config, data file, device) is a separate curve / table line with its own label. Only `ok` rows are
aggregated; when a config was rerun with `--force` the newest row is used. Nothing is hand-edited.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from bench.results.variants import cell_key, data_id, fmt_value, variant_diff, variant_key, variant_label  # noqa: E402
from bench.store import ResultStore, ensure_dir  # noqa: E402

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


# ---------------------------------------------------------------- data


def load_runs(results_dir: str | Path) -> pd.DataFrame:
    """Every stored row flattened with `pd.json_normalize`, plus grouping columns (variant, cell, data id)."""
    rows = list(ResultStore(results_dir).rows())
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


def fmt_cell(mean: float, std: float, scale: float = 1.0, digits: int = 1) -> str:
    """'mean ± std' (std omitted for one run, '–' for no value)."""
    if mean is None or np.isnan(mean):
        return "–"
    if abs(mean * scale) >= 1e4 or (0 < abs(mean * scale) < 10 ** -digits):
        m, s = f"{mean * scale:.3g}", f"{std * scale:.2g}"
    else:
        m, s = f"{mean * scale:.{digits}f}", f"{std * scale:.{digits}f}"
    return m if std is None or np.isnan(std) else f"{m} ± {s}"


# ---------------------------------------------------------------- document blocks


def _markdown() -> Any:
    """The renderer of the blocks' Markdown (code, emphasis, links) for index.html; raw HTML in text is escaped."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False, "breaks": True})


@dataclass
class Doc:
    """A report as a list of blocks, rendered both to Markdown and to self-contained HTML."""

    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append((f"h{level}", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def img(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", (path, alt)))

    def markdown(self, base: Path) -> str:
        out = []
        for kind, x in self.blocks:
            if kind.startswith("h"):
                out.append("#" * int(kind[1]) + " " + x)
            elif kind == "p":
                out.append(x)
            elif kind == "table":
                header, rows = x
                esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
                out.append("\n".join(["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
                                     + ["| " + " | ".join(r) + " |" for r in esc[1:]]))
            elif kind == "img":
                path, alt = x
                out.append(f"![{alt}]({path.relative_to(base).as_posix()})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
               "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
               "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
               "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style></head><body>"]
        md = _markdown()
        for kind, x in self.blocks:
            if kind.startswith("h"):
                out.append(f"<{kind}>{md.renderInline(x)}</{kind}>")
            elif kind == "p":
                out.append(md.render(x).strip())
            elif kind == "table":
                header, rows = x
                out.append("<table><tr>" + "".join(f"<th>{md.renderInline(c)}</th>" for c in header) + "</tr>"
                           + "".join("<tr>" + "".join(f"<td>{md.renderInline(c)}</td>" for c in r) + "</tr>"
                                     for r in rows) + "</table>")
            elif kind == "img":
                path, alt = x
                data = base64.b64encode(path.read_bytes()).decode()
                out.append(f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'></p>")
        out.append("</body></html>")
        return "\n".join(out)


# ---------------------------------------------------------------- figures


def _slug(*parts: Any) -> str:
    return "_".join("".join(ch if ch.isalnum() or ch in "-." else "-" for ch in str(p)) for p in parts)


def _log2_x(ax: Any, ms: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(ms)
    ax.set_xticklabels([str(m) for m in ms])
    ax.minorticks_off()
    ax.set_xlabel("number of edits m (log2 scale)")


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
DASHES = ["", (4, 2), (1, 1.5), (6, 2, 1, 2), (3, 3), (8, 2)]


def _styles(variants: list[str]) -> dict[str, dict[str, Any]]:
    """Colour, marker and dash per variant, so lines that coincide stay distinguishable."""
    colours = sns.color_palette("tab10", n_colors=10)
    return {v: {"color": colours[i % 10], "marker": MARKERS[i % len(MARKERS)], "dashes": DASHES[i % len(DASHES)]}
            for i, v in enumerate(variants)}


def _log_y(ax: Any) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    lo, hi = ax.get_ylim()
    # minor labels only when the axis spans less than a decade (else they crowd the major ones)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if hi / lo < 10 else NullFormatter())


def _panels(data: pd.DataFrame, specs: list[tuple[str, str, str]], title: str, footnote: str,
            path: Path) -> None:
    """Line plots (x = n_edits, one line per variant), mean with a ±1 sd band over seeds, one legend on the right.

    Each spec is (column, y label, y kind): "pct" (0-100 %), "log" (log axis, non-positive values
    dropped) or "lin".
    """
    ms = sorted(data["n_edits"].unique())
    variants = sorted(data["variant"].unique())
    style = _styles(variants)
    ncols = 2 if len(specs) > 1 else 1
    nrows = (len(specs) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols + (2 if ncols == 1 else 0), 3.9 * nrows),
                             squeeze=False)
    for ax, (col, ylabel, ykind) in zip(axes.flat, specs, strict=False):
        d = data[["n_edits", "variant", "seed", col]].dropna(subset=[col])
        if ykind == "log":
            d = d[d[col] > 0]
        if d.empty:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        for v, dv in d.groupby("variant"):
            sns.lineplot(data=dv, x="n_edits", y=col, errorbar="sd", ax=ax, legend=False, color=style[v]["color"],
                         marker=style[v]["marker"], dashes=style[v]["dashes"], markersize=6, alpha=0.9)
        pre_col = col.replace("metrics.", "metrics.pre_", 1) if col.startswith("metrics.") else None
        if ykind == "pct" and pre_col in data:  # the unedited model on the same probes: a grey dashed baseline
            pre = data[["n_edits", pre_col]].dropna().groupby("n_edits")[pre_col].mean()
            if not pre.empty:
                ax.plot(pre.index, pre.to_numpy(), color="0.45", linestyle="--", linewidth=1.2, marker="_",
                        markersize=16, zorder=1)
        _log2_x(ax, ms)
        if ykind == "log" and not d.empty:
            _log_y(ax)
        elif ykind == "pct":
            ax.set_ylim(-3, 103)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(specs):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=style[v]["color"], marker=style[v]["marker"],
                          linestyle=(0, style[v]["dashes"]) if style[v]["dashes"] else "-",
                          label=textwrap.fill(v, 48, subsequent_indent="  ")) for v in variants]
    if any(ykind == "pct" for _, _, ykind in specs):
        handles.append(plt.Line2D([], [], color="0.45", linestyle="--", marker="_", label="pre-edit (unedited model)"))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.93), frameon=False, fontsize=8.5,
               title="editor (variant = settings\nthat differ from its defaults)", title_fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.04 * (4 - nrows) / 2 + 0.05, 1, 0.95))
    fig.text(0.01, 0.0, textwrap.fill(footnote, 80 + 40 * (ncols - 1)), fontsize=7.5, va="bottom")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _context(g: pd.DataFrame) -> str:
    seeds = ",".join(str(s) for s in sorted(g["seed"].unique()))
    return f"seeds {seeds}; {len(g)} runs"


def figures(ok: pd.DataFrame, out: Path) -> dict[tuple[str, str], list[tuple[Path, str]]]:
    """Scaling, cost and residual figures per (model, task), of the variants measured at two or more m."""
    made: dict[tuple[str, str], list[tuple[Path, str]]] = {}
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.85)
    for (model, task), g in ok.groupby(["model", "task"]):
        made[(model, task)] = []
        # a variant measured at one m (an ablation, a single comparison) is a point, not a curve: it is in the tables
        g = g[g.groupby("variant")["n_edits"].transform("nunique") >= 2].copy()
        if g.empty:
            continue
        for c in dict.fromkeys([*PCT, *(k.replace("metrics.", "metrics.pre_", 1) for k in PCT if "pre_" not in k)]):
            if c in g:
                g[c] = 100 * pd.to_numeric(g[c], errors="coerce")
        files: list[tuple[Path, str]] = []
        band = "line = mean over seeds, band = ±1 sample sd"
        p = out / "figures" / f"scaling_{_slug(model, task)}.png"
        _panels(g, [("metrics.es", "ES: edit success (%)", "pct"), ("metrics.gs", "GS: generalization (%)", "pct"),
                    ("metrics.ls", "LS: locality, gold answers (%)", "pct"),
                    ("metrics.ls_agree", "LS agree: unchanged by the edit (%)", "pct")],
                f"{model} / {task}: editing success vs number of edits\n({band}; {_context(g)})",
                "ES/GS/LS: token accuracy of the answer on edit / rephrased / unrelated prompts after the edit "
                "(LS against gold answers). LS agree: unrelated tokens whose argmax is unchanged by the edit. "
                "Grey dashed: the unedited model on the same probes.", p)
        files.append((p, f"Scaling: ES, GS, LS (gold) and LS agree against m on {model} / {task} ({_context(g)}); "
                         "grey dashed: pre-edit; variants measured at one m only are in the tables."))
        ext = [(c, lab, "pct") for c, lab in (("metrics.es_gen", "ES gen: greedy decoding (%)"),
                                              ("metrics.gs_gen", "GS gen: greedy decoding (%)"),
                                              ("metrics.ls_gen", "LS gen: greedy decoding (%)"),
                                              ("metrics.cf_score", "CounterFact Score (%)"))
               if c in g and g[c].notna().any()]
        if ext:
            p = out / "figures" / f"generation_{_slug(model, task)}.png"
            _panels(g, ext, f"{model} / {task}: generation-based success vs number of edits\n({band}; {_context(g)})",
                    "gen: greedy continuation of the prompt alone begins with the answer (normalised), no teacher "
                    "forcing. " + ("CounterFact Score: harmonic mean of ROME's Efficacy, Paraphrase and Neighborhood "
                                   "Scores. " if any(c == "metrics.cf_score" for c, _, _ in ext) else "")
                    + "Grey dashed: the unedited model.", p)
            files.append((p, f"Generation-based success (and CounterFact Score) against m on {model} / {task}."))
        kinds = ",".join(sorted(str(k) for k in g["mem_kind"].dropna().unique())) or "?"
        p = out / "figures" / f"cost_{_slug(model, task)}.png"
        cost = [("times.edit_s", "edit time (s, log scale)", "log")]
        if g["info.prepare.meta_train_s"].notna().any():
            cost.append(("info.prepare.meta_train_s", "meta-training of the checkpoint (s, log scale)", "log"))
        cost += [("prepare_fresh_s", "prepare phase, nothing reused (s, log scale)", "log"),
                 ("peak_edit_mib", f"peak memory, edit (MiB, {kinds})", "lin"),
                 ("peak_prepare_fresh_mib", f"peak memory, prepare, nothing reused (MiB, {kinds})", "lin")]
        floored = g.assign(**{c: g[c].where(g[c] >= FLOORS[c]) for c in
                              ("peak_edit_mib", "peak_prepare_fresh_mib", "prepare_fresh_s")})
        _panels(floored, cost, f"{model} / {task}: cost vs number of edits\n({band}; {_context(g)})",
                "meta-training = the time the hyper-network checkpoint took to train, also when a run reused it; "
                "prepare phase = meta-training or statistics done by the run itself (runs that loaded them from "
                f"the cache, and phases under {TIME_FLOOR_S * 1e3:g} ms, are not drawn); memory = peak above the phase's baseline "
                "(cuda_max_allocated on GPU, sampled RSS on CPU; CPU peaks under "
                f"{MEM_FLOOR_MIB:g} MiB are below what the sampler resolves and are not drawn).", p)
        files.append((p, f"Cost: edit time, meta-training time, prepare phase of runs that reused nothing and peak "
                         f"memory against m on {model} / {task} ({_context(g)})."))
        r = g[g["mean_residual"].notna() & (g["mean_residual"] > 0)]
        if not r.empty:
            p = out / "figures" / f"residual_{_slug(model, task)}.png"
            _panels(r, [("mean_residual", "mean residual ||ΔW u − d|| / ||d|| (log scale)", "log")],
                    f"{model} / {task}: cancellation effect\n({band}; {_context(r)})",
                    "Residual of the aggregated shift on the edit keys, mean over layers and keys (MALMEN "
                    "Fig. 8); sum of shifts = mend / malmen (shift=sum).", p)
            files.append((p, f"Mean residual (log y) against m on {model} / {task}: the normal equation vs the sum of "
                             f"shifts, as in the MALMEN paper's Fig. 8 ({_context(r)})."))
        made[(model, task)] = files
    return made


SEQ_PANELS = [("es", "ES over all edited requests (%)"), ("gs", "GS over all edited requests (%)"),
              ("ls", "LS: locality, gold answers (%)"), ("first_es", "ES of batch 1 (retention, %)"),
              ("ls_agree", "LS agree: unchanged by the edits (%)"), ("edit_s", "edit time of the batch (s)")]


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


def sequence_figures(frame: pd.DataFrame, out: Path) -> list[tuple[tuple[str, str, int, int], Path, str]]:
    """Retention curves of lifelong editing: ES, GS, LS, batch 1's ES, LS agree and time against edits applied."""
    made = []
    for (model, task, m, t), g in frame.groupby(["model", "task", "n_edits", "T"]):
        variants = sorted(g["variant"].unique())
        style = _styles(variants)
        fig, axes = plt.subplots(3, 2, figsize=(10.4, 11.7), squeeze=False)
        for ax, (col, ylabel) in zip(axes.flat, SEQ_PANELS, strict=True):
            for v, dv in g.groupby("variant"):
                sns.lineplot(data=dv, x="n_edited", y=col, errorbar="sd", ax=ax, legend=False, color=style[v]["color"],
                             marker=style[v]["marker"], dashes=style[v]["dashes"], markersize=5)
            pre = {"first_es": "pre_es"}.get(col, f"pre_{col}")
            if pre in g and g[pre].notna().any():
                base = g.groupby("n_edited")[pre].mean()
                ax.plot(base.index, base.to_numpy(), color="0.45", linestyle="--", linewidth=1.2, zorder=1)
            if col != "edit_s":
                ax.set_ylim(-3, 103)
            ax.set_xlabel("edits applied (batches of m, one after another)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        handles = [plt.Line2D([], [], color=style[v]["color"], marker=style[v]["marker"], label=v) for v in variants]
        handles.append(plt.Line2D([], [], color="0.45", linestyle="--", label="pre-edit (unedited model)"))
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.93), frameon=False, fontsize=8.5)
        seeds = ",".join(str(s) for s in sorted(g["seed"].unique()))
        fig.suptitle(f"{model} / {task}: lifelong editing, {t} batches of m = {m}\n(line = mean over seeds {seeds}, "
                     "band = ±1 sample sd)", fontsize=11)
        fig.tight_layout(rect=(0, 0.03, 1, 0.96))
        p = out / "figures" / f"sequential_{_slug(model, task, m, t)}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=100, bbox_inches="tight")
        plt.close(fig)
        made.append(((model, task, m, t), p,
                     f"Lifelong editing on {model} / {task}: {t} batches of {m} edits applied one after another without "
                     "restoring. After each batch: ES and GS over every request edited so far, LS and LS agree over "
                     "their unrelated probes, ES of the first batch alone, and that batch's edit time; grey dashed: "
                     f"the unedited model on the same probes (seeds {seeds})."))
    return made


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


# ---------------------------------------------------------------- tables


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
                  f"{_context(g)}, editors {', '.join(sorted(g['editor'].unique()))}.")
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
