"""Bad hyperparameter, seed and `bench keys` values: one-line errors, exit 2, before any model loads and no row stored.

The ranges are declared next to each hyperparameter dataclass (`RANGES`, editors/ranges.py) and
checked by `editors.base.hparams_from`; the model's depth (bench/runner/depth.py) bounds an explicit
`last_n` and MEMIT's block indices in `bench.runner.resolve.resolve`.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from typer.testing import CliRunner

import bench.models
import bench.runner.checks
import bench.runner.errors
import bench.runner.model_cache
import bench.runner.resolve
import bench.runner.run
import editors
import editors.base
from bench.cli import app
from bench.runner.depth import ALIAS_DEPTHS, config_depth, model_depth
from editors.base import HPARAMS_DIR, hparams_from, model_defaults
from editors.ranges import BadValue, bad_fields, ranges_of

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def one_error_line(r) -> str:
    """The run's only error line (asserting there is exactly one and no traceback)."""
    lines = [s for s in r.stderr.splitlines() if s.strip()]
    errors = [s for s in lines if s.startswith("error:")]
    assert len(errors) == 1 and len(lines) == 1, r.output
    assert "Traceback" not in r.output
    return errors[0]


def assert_no_row(results):
    rows = results / "runs.jsonl"
    assert not rows.exists() or rows.read_text().strip() == ""


# (editor, --set, text the error must hold besides key=value)
BAD_SETS = [
    ("ft", "lr=nan", "a finite number > 0"),
    ("ft", "lr=inf", "a finite number > 0"),
    ("ft", "lr=-1", "a finite number > 0"),
    ("ft", "batch_size=0", "an integer >= 1"),
    ("ft", "last_n=0", "an integer >= 1"),
    ("ft", "layers=bogus", "one of ffn, second_fc, first_fc"),
    ("ft", "epochs=0", "an integer >= 1"),
    ("ft", "epochs=-3", "an integer >= 1"),
    ("ft", "epochs=2.5", "an integer >= 1"),
    ("ft", "last_n=99", "more than the 4 blocks of model 'tiny-gpt2'"),
    ("malmen", "steps=-4", "an integer >= 1"),
    ("malmen", "lam_init=nan", "a finite number > 0"),
    ("malmen", "last_n=5", "more than the 4 blocks"),
    ("malmen", "layers=bogus", "one of second_fc, first_fc"),
    ("malmen", "train_edits=0", "an integer >= 1, or none"),
    ("mend", "shift=normal", "one of sum"),
    ("memit", "mom2_n_samples=0", "an integer >= 1"),
    ("memit", "mom2_update_weight=nan", "a finite number > 0"),
    ("memit", "layers=bogus", "list of integers >= 0"),
    ("memit", "layers=1,9", "has blocks 0 to 3"),
    ("memit", "kl_template=is a", "a text containing {}"),
    ("alphaedit", "L2=inf", "a finite number > 0"),
]


@pytest.mark.parametrize("editor,setting,range_text", BAD_SETS, ids=[f"{e}-{s}" for e, s, _ in BAD_SETS])
def test_bad_set_value_is_exit_2_before_load(no_model_load, tmp_path, editor, setting, range_text):
    r = cli("run", "--editor", editor, "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "8",
            "--set", setting, "--results", str(tmp_path))
    assert r.exit_code == 2, r.output
    line = one_error_line(r)
    assert line.startswith("error: bad --set value: ") and setting in line and range_text in line, line
    assert_no_row(tmp_path)


@pytest.mark.parametrize("seed", ["18446744073709551616", "4294967296", "-1"])
def test_seed_out_of_range_is_exit_2_before_load(no_model_load, tmp_path, seed):
    r = cli("run", "--editor", "ft", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "8",
            "--seed", seed, "--results", str(tmp_path))
    assert r.exit_code == 2, r.output
    line = one_error_line(r)
    assert f"--seed {seed}" in line and "0 to 4294967295" in line, line
    assert_no_row(tmp_path)


@pytest.mark.parametrize("editor,settings", [
    ("ft", ["lr=1e-3", "last_n=4", "layers=second_fc", "weight_decay=0"]),
    ("malmen", ["train_edits=none", "last_n=4", "n_val=0", "loc_coef=0"]),
    ("memit", ["layers=0,3", "mom2_update_weight=none", "context_starts=The,A"]),
    ("alphaedit", ["L2=3", "nullspace_threshold=0.1"]),
])
def test_valid_values_still_pass(no_model_load, tmp_path, editor, settings):
    sets = [a for s in settings for a in ("--set", s)]
    r = cli("run", "--editor", editor, "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "8",
            "--seed", str(2**32 - 1), *sets, "--results", str(tmp_path), "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout.strip().splitlines()[-1])
    assert plan["action"] == "run" and plan["seed"] == 2**32 - 1


def test_default_last_n_above_the_depth_still_edits_every_block(no_model_load, tmp_path):
    """MALMEN's default last_n (6) on the 4-block tiny-gpt2 is not the user's choice: accepted, as before."""
    r = cli("run", "--editor", "malmen", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "8",
            "--results", str(tmp_path), "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["hparams"]["last_n"] == 6


def test_bad_value_in_the_per_model_file_names_the_file(no_model_load, tmp_path, monkeypatch):
    hp_dir = tmp_path / "repo" / "editors" / "hparams"
    (hp_dir / "ft").mkdir(parents=True)
    (hp_dir / "ft" / "tiny-gpt2.json").write_text('{"_why": "test", "lr": NaN, "epochs": 10}')
    monkeypatch.setattr(editors.base, "HPARAMS_DIR", hp_dir)
    monkeypatch.setattr(bench.runner.resolve, "HPARAMS_DIR", hp_dir)
    r = cli("run", "--editor", "ft", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "8",
            "--results", str(tmp_path / "res"))
    assert r.exit_code == 2, r.output
    line = one_error_line(r)
    assert "bad value in editors/hparams/ft/tiny-gpt2.json: lr=nan is not a finite number > 0" in line, line
    assert_no_row(tmp_path / "res")
    # a --set value replaces the file's: the run is then valid
    ok = cli("run", "--editor", "ft", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "8",
             "--set", "lr=1e-3", "--results", str(tmp_path / "res"), "--dry-run")
    assert ok.exit_code == 0, ok.output
    (hp_dir / "ft" / "tiny-gpt2.json").write_text('{"last_n": 7}')
    r = cli("run", "--editor", "ft", "--model", "tiny-gpt2", "--task", "synthetic", "--edits", "8",
            "--results", str(tmp_path / "res"))
    assert r.exit_code == 2, r.output
    assert "bad value in editors/hparams/ft/tiny-gpt2.json: last_n=7 is more than the 4 blocks" in one_error_line(r)


# ------------------------------------------------------------------ the declarations themselves


@pytest.mark.parametrize("name", sorted(editors.EDITORS))
def test_every_field_declares_a_range_that_holds_its_default(name):
    cls = editors.EDITORS[name].hparams_cls
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(ranges_of(cls)) == fields, f"{name}: fields without a range {fields - set(ranges_of(cls))}"
    assert bad_fields(cls, [(k, getattr(cls(), k)) for k in sorted(fields)]) == []
    assert "RANGES" not in fields  # a ClassVar: not recorded in rows, not hashed


def test_every_shipped_per_model_value_is_in_range():
    for path in sorted(HPARAMS_DIR.glob("*/*.json")):
        cls = editors.EDITORS[path.parent.name].hparams_cls
        values = model_defaults(path.parent.name, path.stem.replace("__", "/"))
        assert bad_fields(cls, sorted(values.items())) == [], path


def test_hparams_from_checks_overrides_and_defaults():
    ft = editors.EDITORS["ft"].hparams_cls
    assert hparams_from(ft, {"lr": "2e-3"}).lr == 2e-3
    with pytest.raises(BadValue, match=r"^bad --set value: lr=nan is not a finite number > 0$"):
        hparams_from(ft, {"lr": "nan"})
    with pytest.raises(BadValue, match=r"^bad value in f.json: epochs=0 is not an integer >= 1$"):
        hparams_from(ft, {}, {"epochs": 0}, "f.json")
    with pytest.raises(BadValue, match=r"batch_size=many is not an integer >= 1"):  # unparsable: the range, not int()'s words
        hparams_from(ft, {"batch_size": "many"})
    with pytest.raises(BadValue, match=r"epochs=True"):  # a JSON boolean is not a count
        hparams_from(ft, {}, {"epochs": True})


def test_depths_known_before_loading():
    assert set(ALIAS_DEPTHS) == set(bench.models.MODEL_ALIASES)  # a new alias adds its depth
    assert model_depth("tiny-gpt2") == 4 and model_depth("tiny-t5") == 8 and model_depth("tiny-bert") == 2
    assert config_depth({"n_layer": 12}) == 12
    assert config_depth({"num_layers": 6, "num_decoder_layers": None, "is_encoder_decoder": True}) == 12
    assert config_depth({"hidden_size": 8}) is None


def test_depth_of_a_local_folder_comes_from_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 3}))
    assert model_depth(str(tmp_path)) == 3
    with pytest.raises(bench.runner.errors.UserError, match=r"last_n=5 is more than the 3 blocks"):
        bench.runner.checks.check_depth(str(tmp_path), editors.EDITORS["ft"].hparams_cls(last_n=5), {"last_n": "--set value"})
    bench.runner.checks.check_depth(str(tmp_path), editors.EDITORS["ft"].hparams_cls(last_n=5), {})  # the default: not checked


# ------------------------------------------------------------------ bench keys

BAD_KEYS = [
    (["--lam", "nan"], "--lam needs finite positive values", "got nan"),
    (["--lam", "inf"], "--lam needs finite positive values", "got inf"),
    (["--lam", "0.1,-1"], "--lam needs finite positive values", "got 0.1,-1"),
    (["--last-n", "0"], "--last-n must be at least 1", "got 0"),
    (["--edits", "0"], "--edits must be at least 1", "got 0"),
    (["--last-n", "999"], "--last-n 999 is more than the 4 blocks of model 'tiny-gpt2'", "choose 1 to 4"),
    (["--seed", "18446744073709551616"], "--seed 18446744073709551616 is out of range", "0 to 4294967295"),
    (["--layers", "bogus"], "--layers bogus", "second_fc or first_fc"),
]


@pytest.mark.parametrize("args,what,detail", BAD_KEYS, ids=[" ".join(a) for a, _, _ in BAD_KEYS])
def test_bench_keys_bad_input_is_exit_2_before_load(no_model_load, tmp_path, args, what, detail):
    r = cli("keys", "--model", "tiny-gpt2", "--task", "synthetic", "--device", "cpu", "--results", str(tmp_path),
            *args)
    assert r.exit_code == 2, r.output
    line = one_error_line(r)
    assert what in line and detail in line, line


def test_ranges_refuse_non_finite_and_booleans():
    from editors.ranges import at_least, positive

    assert not positive()(math.nan) and not positive()(-math.inf) and positive()(3)
    assert not at_least(1)(True) and not at_least(1)(2.0) and at_least(1)(2)
