"""`bench report`: scaling curves, cost curves, residuals and tables rendered straight from the result store.

Runs are grouped by `variant_key` (the config without seed and number of edits, see bench/results/variants.py):
rows that differ only by seed are aggregated (mean, sample std), anything else (hparams, task
config, data file, device) is a separate curve / table line with its own label. Only `ok` rows are
aggregated; when a config was rerun with `--force` the newest row is used. Nothing is hand-edited.

The modules: `data` (rows into frames, seed aggregates, the columns shown), `figures`, `tables`,
`blocks` (the document as Markdown / HTML blocks) and `document` (`write_report`: index.md, index.html
and the files beside them).
"""

from bench.results.report.blocks import Doc
from bench.results.report.data import (
    COST,
    FLOORS,
    MEM_COLS,
    MEM_FLOOR_MIB,
    PCT,
    TIME_FLOOR_S,
    aggregate,
    disambiguate,
    load_runs,
    ok_runs,
    sequence_frame,
)
from bench.results.report.document import METRIC_DEFS, write_report
from bench.results.report.figures import figures, sequence_figures
from bench.results.report.tables import (
    ABLATIONS,
    AGG_NOTE,
    ablation_name,
    ablation_tables,
    common_settings,
    comparison_rows,
    fmt_cell,
    sequence_table,
)

__all__ = ["ABLATIONS", "AGG_NOTE", "COST", "FLOORS", "MEM_COLS", "MEM_FLOOR_MIB", "METRIC_DEFS", "PCT",
           "TIME_FLOOR_S", "Doc", "ablation_name", "ablation_tables", "aggregate", "common_settings",
           "comparison_rows", "disambiguate", "figures", "fmt_cell", "load_runs", "ok_runs", "sequence_figures",
           "sequence_frame", "sequence_table", "write_report"]
