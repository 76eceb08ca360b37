"""`bench sweep --executor ray`: the same rows as the serial sweep, resumption after a kill, the executor registry.

Ray starts in about 10-20 s on the shared 2-core machine, so there are two Ray tests: one local
`ray.init(num_cpus=2)` sweep compared with the serial one, and one CLI sweep killed after its first
row and restarted. Both use the shared tiny-gpt2 (tests/conftest.py) through `--cache-dir`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from bench.core.config import RunConfig
from bench.core.threads import torch_threads
from bench.executors import EXECUTORS, ExecutorOptions, ExecutorUnavailable, get_executor
from bench.executors.sweep import grid, run_sweep

pytestmark = pytest.mark.ray  # `-m ray` selects them; they run by default (CI installs the extra: .ci/run)

EDITORS, EDITS = ["ft", "memit"], [8, 16]


def _cells() -> list[RunConfig]:
    return grid(EDITORS, EDITS, [0], model="tiny-gpt2", task="synthetic", device="cpu")


def _rows(results: Path) -> list[dict]:
    path = results / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.fixture
def local_ray():
    """A local Ray instance of 2 CPUs for one test, shut down afterwards."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_sweep_stores_the_metrics_of_the_serial_sweep(local_ray, tiny_gpt2, results_cache, tmp_path):
    """2 editors x 2 edit counts as Ray tasks: one row per cell, written by the driver, metrics equal to the serial sweep's."""
    from bench.executors.ray_exec import run_ray_sweep

    cfgs = _cells()
    ray_res = run_ray_sweep(cfgs, tmp_path / "ray", cache_dir=results_cache, show_progress=False)
    assert [r.status for r in ray_res] == ["ok"] * 4, [r.error for r in ray_res]
    assert [r.cfg for r in ray_res] == cfgs  # grid order, as the local executor returns them
    with torch_threads(1):  # a Ray task of 1 CPU runs torch on 1 thread; the same here, so sums add up alike
        serial = run_sweep(cfgs, tmp_path / "serial", cache_dir=results_cache, show_progress=False)
    assert [r.status for r in serial] == ["ok"] * 4
    by_ray = {r["config_hash"]: r for r in _rows(tmp_path / "ray")}
    by_serial = {r["config_hash"]: r for r in _rows(tmp_path / "serial")}
    assert len(_rows(tmp_path / "ray")) == 4 and by_ray.keys() == by_serial.keys()
    for h, row in by_ray.items():
        assert row["metrics"] == by_serial[h]["metrics"], (row["editor"], row["n_edits"])
        assert row["env"]["threads"] == 1
    assert all(r["metrics"]["es"] > r["metrics"]["pre_es"] + 0.5 for r in by_ray.values())
    memit = sorted((r for r in by_ray.values() if r["editor"] == "memit"), key=lambda r: r["n_edits"])
    # the group's first cell ran first, so the second reused its statistics
    assert memit[1]["info"]["prepare"]["stats_reused"] is True
    again = run_ray_sweep(cfgs, tmp_path / "ray", cache_dir=results_cache, show_progress=False)
    assert [r.status for r in again] == ["skipped"] * 4 and len(_rows(tmp_path / "ray")) == 4


def test_ray_sweep_killed_midway_resumes_without_rerunning_or_duplicating(tiny_gpt2, results_cache, tmp_path):
    """Kill the CLI sweep (and its local Ray) once its first row lands; the rerun adds only the missing cells."""
    results = tmp_path / "res"
    cmd = [str(Path(sys.executable).parent / "bench"), "sweep", "--editors", ",".join(EDITORS), "--model", "tiny-gpt2",
           "--task", "synthetic", "--edits", ",".join(map(str, EDITS)), "--device", "cpu", "--results", str(results),
           "--cache-dir", str(results_cache), "--executor", "ray"]
    log = tmp_path / "first.log"
    env = {**os.environ, "COLUMNS": "200"}  # the summary's title on one line
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 600
        while not _rows(results):
            assert proc.poll() is None, f"the sweep ended before storing a row:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no row after 10 minutes"
            time.sleep(0.2)
    finally:  # the whole session: the driver, its Ray processes and workers (they run in the driver's group)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {r["config_hash"]: r["run_id"] for r in _rows(results)}
    # memit m=16 waits for memit m=8 (its group's statistics), which is still running when ft's first row lands
    assert 1 <= len(before) < 4
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = _rows(results)
    counts = Counter(r["config_hash"] for r in rows)
    assert len(counts) == 4 and set(counts.values()) == {1}, counts  # every cell, none twice
    assert all(r["status"] == "ok" for r in rows)
    kept = {r["config_hash"]: r["run_id"] for r in rows if r["config_hash"] in before}
    assert kept == before  # the rows stored before the kill are the ones there now: nothing was rerun
    assert f"{len(before)} already stored" in done.stdout


def test_executor_registry_and_local_options():
    """`local` and `ray` are registered; ray-only options are refused by `local`; unknown names list the choices."""
    assert set(EXECUTORS) == {"local", "ray"}
    with pytest.raises(ValueError, match="choices: local, ray"):
        get_executor("slurm")
    with pytest.raises(ValueError, match="options of --executor ray"):
        get_executor("local")(_cells(), "unused", options=ExecutorOptions(address="ray://head:10001"))


def test_ray_executor_without_ray_says_how_to_install(monkeypatch, tmp_path):
    """Without Ray installed, `--executor ray` fails with the one-line install command and runs nothing."""
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ExecutorUnavailable, match=r"pip install -e '\.\[ray\]'"):
        get_executor("ray")(_cells(), tmp_path)
    assert not (tmp_path / "runs.jsonl").exists()


def test_cli_ray_without_ray_exits_2(tmp_path):
    """The CLI turns the missing extra into exit code 2 with the install line (a fresh process without Ray)."""
    code = ("import sys; sys.modules['ray'] = None; from bench.cli import app; "
            "app(['sweep', '--editors', 'ft', '--model', 'tiny-gpt2', '--task', 'synthetic', '--edits', '8', "
            f"'--results', {str(tmp_path)!r}, '--executor', 'ray'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "pip install -e '.[ray]'" in done.stdout + done.stderr
