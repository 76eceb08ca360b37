"""CUDA smoke check: the five editors on tiny-gpt2 and on a random GPT-2-small, float32 and bfloat16, m = 16 and 256.

    python -m bench.diagnostics.cuda_smoke [--out DIR] [--cache-dir results] [--budget-s 540]     (or: nox -s cuda_smoke)

Every cell goes through `bench.runner.run.execute` (the path of `bench run --device cuda --dtype ...`) and
prints one line: ES/GS/LS, prepare and edit seconds and the CUDA peak memory of both phases (summed
over the devices the model uses), then a Markdown table for docs/scaling.md. Nothing is downloaded:
tiny-gpt2 is read from the cache (`--cache-dir`; trained there on first use, about 3 minutes on CPU),
and the GPT-2-small is `GPT2LMHeadModel(GPT2Config())` (124M parameters) with random weights, saved to a
folder and loaded by path through `from_pretrained(dtype=...)`; time and memory do not depend on the
weights, and its ES/GS/LS mean nothing beyond "the editor ran". It reads the synthetic world through
tiny-gpt2's word-level tokenizer (ids < 50257, so GPT-2's full vocabulary and head are exercised).

Meta-training is shortened so the whole grid fits in 10 minutes on one GPU (hyper-networks train 60
steps of 16 edits and serve both m; MEMIT's statistics of the random model use 2,000 sentences); cells
left when `--budget-s` has passed are listed, not run. Without a CUDA
device it prints why and exits with code 3, running nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NO_CUDA_EXIT = 3
EDITORS = ("malmen", "mend", "memit", "alphaedit", "ft")
DTYPES = ("float32", "bfloat16")
EDITS = (16, 256)
RANDOM_GPT2 = "gpt2-small-random"

# Shortened preparation (see the module docstring); everything else is the editors' defaults for the model.
# 60 meta-steps of 16 edits, validated on 64 held-out training requests every 30 (the best kept: at a
# meta-lr fit for a few steps a longer run can diverge; measured on tiny-gpt2, CPU: MEND at 1e-3 did)
META = {"train_edits": "16", "schedule": "select", "steps": "60", "val_every": "30", "n_val": "64"}
SETS: dict[str, dict[str, dict[str, str]]] = {
    # tiny-gpt2's MEND file trains 800 steps at meta-lr 1e-5; for 60 steps, its MALMEN file's 1e-3
    "tiny-gpt2": {"malmen": META, "mend": {**META, "meta_lr": "1e-3"}, "memit": {}, "alphaedit": {}, "ft": {}},
    RANDOM_GPT2: {"malmen": META, "mend": META, "memit": {"mom2_dataset": "synthetic", "mom2_n_samples": "2000"},
                  "alphaedit": {"mom2_dataset": "synthetic", "mom2_n_samples": "2000"}, "ft": {}},
}


def build_gpt2_small(device: str = "cpu", seed: int = 0) -> Any:
    """GPT-2 small as `GPT2Config()` defines it (12 blocks, 768 wide, 50,257 words: 124M parameters), randomly initialised."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    with torch.device(device):
        return GPT2LMHeadModel(GPT2Config())


def save_random_gpt2(folder: Path) -> Path:
    """The random GPT-2-small with tiny-gpt2's tokenizer, saved as a model folder (once; reused when present)."""
    from bench.zoo.tiny import build_tokenizer
    from tasks.synthetic import build_world

    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(build_world())
    model = build_gpt2_small()
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def cells(models: Sequence[str], dtypes: Sequence[str], editors: Sequence[str], edits: Sequence[int]
          ) -> list[tuple[str, str, str, int]]:
    """(model, dtype, editor, m) in run order: an editor's m = 16 first, so m = 256 reuses its preparation."""
    return [(mo, dt, ed, m) for mo in models for dt in dtypes for ed in editors for m in edits]


def mib(x: Any) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def table(rows: Sequence[dict[str, Any]], gpu: str) -> str:
    """The measured cells as a Markdown table (what docs/scaling.md shows)."""
    head = (f"Measured on {gpu}.\n\n| model | dtype | editor | m | pre-ES | ES | GS | LS | prepare s | edit s | "
            "peak prepare MiB | peak edit MiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['model_label']} | {r['dtype']} | {r['editor']} | {r['m']} | failed: "
                         f"{str(r.get('error', ''))[:80]} |||||||")
            continue
        m, t = r["metrics"], r["times"]
        lines.append(f"| {r['model_label']} | {r['dtype']} | {r['editor']} | {r['m']} | {100 * m['pre_es']:.1f} | "
                     f"{100 * m['es']:.1f} | {100 * m['gs']:.1f} | {100 * m['ls']:.1f} | {t['prepare_s']:.1f} | "
                     f"{t['edit_s']:.2f} | {mib(r.get('peak_mem_prepare_bytes'))} | {mib(r.get('peak_mem_edit_bytes'))} |")
    return "\n".join(lines)


def run(out: Path, cache: Path, budget_s: float, models: Sequence[str], dtypes: Sequence[str],
        editors: Sequence[str], edits: Sequence[int], device: str = "cuda") -> int:
    """Run the grid (on CUDA; `device="cpu"` only checks the wiring); 0 when every cell ran ok, 1 otherwise."""
    import torch

    from bench.core.config import RunConfig
    from bench.core.machine import cpu_model
    from bench.runner.run import RunFailed, UserError, execute

    where = (f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible)" if device == "cuda"
             else f"CPU {cpu_model()} (not a CUDA measurement)")
    gpu = f"{where}, torch {torch.__version__}"
    print(f"CUDA smoke check on {gpu}", flush=True)
    t_start = time.perf_counter()
    names = {"tiny-gpt2": "tiny-gpt2"}
    if RANDOM_GPT2 in models:
        names[RANDOM_GPT2] = str(save_random_gpt2(cache / "cuda-smoke" / RANDOM_GPT2))
    rows: list[dict[str, Any]] = []
    left: list[tuple[str, str, str, int]] = []
    for label, dtype, editor, m in cells(models, dtypes, editors, edits):
        if time.perf_counter() - t_start > budget_s:
            left.append((label, dtype, editor, m))
            continue
        cfg = RunConfig(editor=editor, model=names[label], task="synthetic", n_edits=m, device=device, dtype=dtype,
                        overrides=SETS[label][editor])
        t0 = time.perf_counter()
        try:
            row, _ = execute(cfg, out, cache_dir=cache, log=lambda s: None)
        except RunFailed as e:
            row = e.row
        except UserError as e:
            row = {"status": "failed", "error": str(e)}
        row.update(model_label=label, dtype=dtype, editor=editor, m=m)
        rows.append(row)
        if row.get("status") == "ok":
            mt = row["metrics"]
            print(f"{label:18s} {dtype:8s} {editor:6s} m={m:<4d} pre-ES {100 * mt['pre_es']:5.1f}  "
                  f"ES {100 * mt['es']:5.1f}  GS {100 * mt['gs']:5.1f}  LS {100 * mt['ls']:5.1f}  "
                  f"prepare {row['times']['prepare_s']:6.1f}s  edit {row['times']['edit_s']:6.2f}s  "
                  f"peak prepare {mib(row.get('peak_mem_prepare_bytes'))} MiB  edit {mib(row.get('peak_mem_edit_bytes'))} MiB"
                  f"  per device {row.get('peak_mem_per_device')}  ({time.perf_counter() - t0:.0f}s)", flush=True)
        else:
            print(f"{label:18s} {dtype:8s} {editor:6s} m={m:<4d} FAILED: {row.get('error')}", flush=True)
    md = table(rows, gpu)
    print("\n" + md)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s", flush=True)
    if left:
        print(f"budget of {budget_s:.0f} s spent; not run: {left}", flush=True)
    (out / "cuda_smoke.md").write_text(md + "\n")
    (out / "cuda_smoke.json").write_text(json.dumps(
        [{k: r.get(k) for k in ("model_label", "dtype", "editor", "m", "status", "error", "metrics", "times",
                                "peak_mem_prepare_bytes", "peak_mem_edit_bytes", "peak_mem_per_device")} for r in rows],
        indent=1))
    return 0 if not left and all(r.get("status") == "ok" for r in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options; exit 3 with a message when no CUDA device is present."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/cuda-smoke"), help="store of the smoke runs (fresh rows)")
    ap.add_argument("--cache-dir", type=Path, default=Path("results"), help="model / checkpoint / statistics cache")
    ap.add_argument("--budget-s", type=float, default=540.0, help="start no cell after this many seconds")
    ap.add_argument("--models", default=f"tiny-gpt2,{RANDOM_GPT2}")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--editors", default=",".join(EDITORS))
    ap.add_argument("--edits", default=",".join(map(str, EDITS)))
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}, cuda build: {torch.version.cuda}): the CUDA smoke check "
              "needs a GPU machine with a CUDA build of torch; nothing was run", file=sys.stderr)
        return NO_CUDA_EXIT
    split = [x.strip() for x in args.models.split(",") if x.strip()]
    unknown = [m for m in split if m not in SETS]
    if unknown:
        ap.error(f"unknown --models {unknown}; choose from {sorted(SETS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if (args.out / "runs.jsonl").exists():  # fresh measurements, never an old row skipped as stored
        (args.out / "runs.jsonl").unlink()
    return run(args.out, args.cache_dir, args.budget_s, split, args.dtypes.split(","), args.editors.split(","),
               [int(x) for x in args.edits.split(",")])


if __name__ == "__main__":
    sys.exit(main())
