"""The report's figures: scaling, generation, cost and residual curves against the number of edits per
(model, task), and the retention curves of lifelong editing."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from bench.results.report.data import FLOORS, MEM_FLOOR_MIB, PCT, TIME_FLOOR_S, run_context  # noqa: E402


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
                f"{model} / {task}: editing success vs number of edits\n({band}; {run_context(g)})",
                "ES/GS/LS: token accuracy of the answer on edit / rephrased / unrelated prompts after the edit "
                "(LS against gold answers). LS agree: unrelated tokens whose argmax is unchanged by the edit. "
                "Grey dashed: the unedited model on the same probes.", p)
        files.append((p, f"Scaling: ES, GS, LS (gold) and LS agree against m on {model} / {task} ({run_context(g)}); "
                         "grey dashed: pre-edit; variants measured at one m only are in the tables."))
        ext = [(c, lab, "pct") for c, lab in (("metrics.es_gen", "ES gen: greedy decoding (%)"),
                                              ("metrics.gs_gen", "GS gen: greedy decoding (%)"),
                                              ("metrics.ls_gen", "LS gen: greedy decoding (%)"),
                                              ("metrics.cf_score", "CounterFact Score (%)"))
               if c in g and g[c].notna().any()]
        if ext:
            p = out / "figures" / f"generation_{_slug(model, task)}.png"
            _panels(g, ext, f"{model} / {task}: generation-based success vs number of edits\n({band}; {run_context(g)})",
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
        _panels(floored, cost, f"{model} / {task}: cost vs number of edits\n({band}; {run_context(g)})",
                "meta-training = the time the hyper-network checkpoint took to train, also when a run reused it; "
                "prepare phase = meta-training or statistics done by the run itself (runs that loaded them from "
                f"the cache, and phases under {TIME_FLOOR_S * 1e3:g} ms, are not drawn); memory = peak above the phase's baseline "
                "(cuda_max_allocated on GPU, sampled RSS on CPU; CPU peaks under "
                f"{MEM_FLOOR_MIB:g} MiB are below what the sampler resolves and are not drawn).", p)
        files.append((p, f"Cost: edit time, meta-training time, prepare phase of runs that reused nothing and peak "
                         f"memory against m on {model} / {task} ({run_context(g)})."))
        r = g[g["mean_residual"].notna() & (g["mean_residual"] > 0)]
        if not r.empty:
            p = out / "figures" / f"residual_{_slug(model, task)}.png"
            _panels(r, [("mean_residual", "mean residual ||ΔW u − d|| / ||d|| (log scale)", "log")],
                    f"{model} / {task}: cancellation effect\n({band}; {run_context(r)})",
                    "Residual of the aggregated shift on the edit keys, mean over layers and keys (MALMEN "
                    "Fig. 8); sum of shifts = mend / malmen (shift=sum).", p)
            files.append((p, f"Mean residual (log y) against m on {model} / {task}: the normal equation vs the sum of "
                             f"shifts, as in the MALMEN paper's Fig. 8 ({run_context(r)})."))
        made[(model, task)] = files
    return made


SEQ_PANELS = [("es", "ES over all edited requests (%)"), ("gs", "GS over all edited requests (%)"),
              ("ls", "LS: locality, gold answers (%)"), ("first_es", "ES of batch 1 (retention, %)"),
              ("ls_agree", "LS agree: unchanged by the edits (%)"), ("edit_s", "edit time of the batch (s)")]


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
