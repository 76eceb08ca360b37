"""The report's cost columns: meta-training apart from cache reuse, and CPU memory below the sampler's floor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bench.core.config import RunConfig
from bench.results.report import MEM_FLOOR_MIB, TIME_FLOOR_S, comparison_rows, load_runs
from bench.runner.run import resolve
from bench.store import ResultStore


def _row(seed: int, prepare: dict, prepare_s: float, edit_bytes: int) -> dict:
    res = resolve(RunConfig(editor="malmen", model="tiny-gpt2", task="synthetic", n_edits=4, seed=seed))
    return {"run_id": f"r{seed}", "status": "ok", "config": res.config, "config_hash": res.config_hash,
            "editor": "malmen", "model": "tiny-gpt2", "task": "synthetic", "n_edits": 4, "seed": seed,
            "metrics": {"es": 1.0}, "times": {"prepare_s": prepare_s, "edit_s": 0.1},
            "info": {"prepare": prepare}, "peak_mem_edit_bytes": edit_bytes, "peak_mem_prepare_bytes": 2**30,
            "mem_kind": "cpu_rss_sampled"}


def test_prepare_time_of_a_reused_checkpoint_is_not_the_work_and_meta_training_is_kept(tmp_path):
    store = ResultStore(tmp_path)
    store.append(_row(0, {"reused": False, "meta_train_s": 120.0}, 121.0, 3 * 2**20))
    store.append(_row(1, {"reused": True, "meta_train_s": 120.0}, 0.02, 70_000))
    store.append(_row(2, {"stats_reused": True}, 0.5, 70_000))
    df = load_runs(tmp_path).sort_values("seed")
    assert df["prepare_fresh_s"].tolist()[0] == 121.0 and np.isnan(df["prepare_fresh_s"].tolist()[1:]).all()
    assert df["info.prepare.meta_train_s"].tolist()[:2] == [120.0, 120.0]
    assert df["peak_prepare_fresh_mib"].tolist()[0] == 1024 and df["peak_prepare_fresh_mib"].isna().sum() == 2


def _agg(edit_mib: list[float], prepare_mib: list[float]) -> pd.DataFrame:
    recs = []
    for i, (e, p) in enumerate(zip(edit_mib, prepare_mib, strict=True)):
        recs.append({"variant": f"v{i}", "seeds": "0", "n_runs": 1,
                     "metrics.es:mean": 0.5, "metrics.es:std": np.nan, "metrics.es:n": 1,
                     "times.prepare_s:mean": 7e-6 if i == 0 else 12.5, "times.prepare_s:std": np.nan,
                     "times.prepare_s:n": 1,
                     "peak_edit_mib:mean": e, "peak_edit_mib:std": np.nan, "peak_edit_mib:n": 1,
                     "peak_prepare_mib:mean": p, "peak_prepare_mib:std": np.nan, "peak_prepare_mib:n": 1})
    return pd.DataFrame(recs)


def test_memory_and_time_below_their_floor_are_not_printed_as_numbers():
    header, rows = comparison_rows(_agg([0.066, 0.5], [0.2, 300.0]))
    assert "peak edit MiB" not in header  # every value below the floor: a column of noise, dropped
    i = header.index("peak prepare MiB")
    assert [r[i] for r in rows] == [f"< {MEM_FLOOR_MIB:g}", "300.000"]
    j = header.index("prepare s")  # a phase that did nothing reads the clock's overhead
    assert [r[j] for r in rows] == [f"< {TIME_FLOOR_S:g}", "12.500"]


def test_ablation_table_holds_malmen_and_its_table_1_flags_only():
    """A MALMEN variant with another setting (train_edits) is not an ablation; a model with MALMEN alone gets no columns."""
    import json

    import pandas as pd

    from bench.results.report import Doc, ablation_tables

    def cell(diff, model="m1", es=0.9):
        return {"model": model, "task": "t", "editor": "malmen", "variant": json.dumps(diff), "variant_key": "",
                "variant_diff": json.dumps(diff), "data_id": "d", "n_edits": 32, "n_runs": 3, "seeds": "0,1,2",
                **{f"metrics.{k}:{s}": (es if s == "mean" else 0.01) for k in ("es", "gs", "ls") for s in ("mean", "std")}}

    agg = pd.DataFrame([cell({}), cell({"shift": "sum"}, es=0.5), cell({"train_edits": 32}), cell({}, model="m2")])
    doc = Doc()
    recs = ablation_tables(agg, doc)
    assert sorted(recs["variant"]) == ["MALMEN", "Sum param. shifts (shift=sum)"]
    assert set(recs["model"]) == {"m1"}
    text = doc.markdown(Path("."))
    assert "train_edits" not in text and "m2" not in text
