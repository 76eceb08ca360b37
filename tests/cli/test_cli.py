"""The `bench` CLI end to end on the tiny model: rows, skipping, --force determinism, bad input."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()

ROW_FIELDS = {
    "run_id", "started_at", "config", "config_hash", "editor", "model", "task", "n_edits", "seed", "metrics",
    "times", "peak_mem_prepare_bytes", "peak_mem_edit_bytes", "mem_kind", "mean_residual", "env", "status",
}
METRICS = {"es", "gs", "ls", "ls_agree", "es_seq", "gs_seq", "ls_seq", "pre_es", "pre_gs", "pre_ls",
           "pre_es_seq", "pre_gs_seq", "pre_ls_seq"}


def bench(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


@pytest.fixture
def ft_args(tmp_path, tiny_gpt2):
    """`bench run` arguments for fine-tuning the tiny model; the model cache is the repo's."""
    return ["run", "--editor", "ft", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "32",
            "--seed", "0", "--results", str(tmp_path), "--cache-dir", str(REPO / "results"), "--json"]


def test_ft_row_skip_and_force_determinism(ft_args, tmp_path):
    r = bench(*ft_args)
    assert r.exit_code == 0, r.output
    row = last_json(r.output)
    assert ROW_FIELDS <= set(row)
    assert METRICS <= set(row["metrics"])
    assert set(row["times"]) == {"prepare_s", "edit_s", "eval_s"}
    assert row["status"] == "ok" and row["mean_residual"] is None
    assert {"python", "torch", "transformers", "device", "git_commit", "git_dirty"} <= set(row["env"])
    assert isinstance(row["env"]["git_dirty"], bool)  # the test runs inside the repo checkout
    # hparams recorded after the per-model defaults file (editors/hparams/ft/tiny-gpt2.json)
    from editors.base import model_defaults

    assert row["config"]["hparams"]["lr"] == model_defaults("ft", "tiny-gpt2")["lr"]
    assert row["metrics"]["es"] >= 0.9, row["metrics"]
    assert row["metrics"]["pre_es"] <= 0.2, row["metrics"]

    again = bench(*ft_args)
    assert again.exit_code == 0
    assert "skipped" in again.output
    assert last_json(again.output)["run_id"] == row["run_id"]
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 1

    forced = bench(*ft_args, "--force")
    assert forced.exit_code == 0
    row2 = last_json(forced.output)
    assert row2["run_id"] != row["run_id"]
    assert row2["metrics"] == row["metrics"]  # same seed on CPU: identical numbers
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--editor", "nope"], "unknown editor 'nope'; choices:"),
        (["--task", "nope"], "unknown task 'nope'; choices:"),
        (["--set", "no_such_key=1"], "unknown --set key"),
        (["--set", "noequals"], "--set expects key=value"),
        (["--edits", "0"], "--edits must be at least 1"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    base = ["run", "--editor", "ft", "--model", "tiny-gpt2", "--task", "synthetic", "--results", str(tmp_path)]
    r = runner.invoke(app, base + args)
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "runs.jsonl").exists()


def test_unknown_model_names_the_embedded_choices(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = runner.invoke(app, ["run", "--editor", "ft", "--model", "no-such-model-xyz", "--task", "synthetic",
                            "--results", str(tmp_path)])
    assert r.exit_code == 2
    assert "tiny-gpt2" in r.output and "smollm2-135m" in r.output


def test_list_shows_registries():
    r = bench("list")
    assert r.exit_code == 0
    for name in ("ft", "synthetic", "tiny-gpt2"):
        assert name in r.output


def test_failed_run_is_stored_with_its_error_and_exits_1(tmp_path, tiny_gpt2, monkeypatch):
    """An editor producing NaN shifts fails the run; the row says why and earlier rows stay intact."""
    import torch

    import editors
    from editors.base import Edit, Editor
    from editors.finetune import FTHparams

    class NaNEditor(Editor):
        name = "nan"
        hparams_cls = FTHparams

        def edit(self, requests):
            m = self.model.module_names("second_fc")[0]
            return Edit({self.model.param_name(m): torch.full_like(self.model.module(m).weight, float("nan"))})

    monkeypatch.setitem(editors.EDITORS, "nan", NaNEditor)
    store = tmp_path / "runs.jsonl"
    store.write_text('{"config_hash": "earlier", "status": "ok"}\n')
    r = runner.invoke(app, ["run", "--editor", "nan", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "4",
                            "--results", str(tmp_path), "--cache-dir", str(REPO / "results")])
    assert r.exit_code == 1
    assert "non-finite" in r.output
    lines = store.read_text().splitlines()
    assert lines[0] == '{"config_hash": "earlier", "status": "ok"}'
    failed = json.loads(lines[1])
    assert failed["status"] == "failed" and "FloatingPointError" in failed["error"]


def test_meta_training_without_training_requests_is_a_clear_error(tmp_path, tiny_gpt2):
    """--data equal to the shipped zsRE file: every training request overlaps it and is dropped, so
    MALMEN has nothing to meta-train on; the error says why (exit 2) and nothing is stored."""
    shipped = REPO / "tasks" / "data" / "zsre" / "zsre_mend_train-1k.json"
    r = runner.invoke(app, ["run", "--editor", "malmen", "--model", "tiny-gpt2", "--task", "zsre", "--edits", "2",
                            "--data", str(shipped), "--results", str(tmp_path), "--cache-dir", str(REPO / "results")])
    assert r.exit_code == 2, r.output
    assert "no training requests" in r.output and "dropped" in r.output and "--train-data" in r.output
    assert not (tmp_path / "runs.jsonl").exists() or "malmen" not in (tmp_path / "runs.jsonl").read_text()


def test_model_of_the_wrong_kind_is_exit_2_and_not_stored(tmp_path, tiny_gpt2):
    r = runner.invoke(app, ["run", "--editor", "ft", "--model", "tiny-gpt2", "--task", "fever", "--edits", "2",
                            "--results", str(tmp_path), "--cache-dir", str(REPO / "results")])
    assert r.exit_code == 2, r.output
    assert "is a causal LM, but task 'fever' needs a classifier" in r.output
    assert not (tmp_path / "runs.jsonl").exists()
