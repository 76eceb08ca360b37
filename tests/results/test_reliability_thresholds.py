"""Every malformed thresholds file is a ThresholdError with the reason, and `bench check` exits 2 on it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.results.thresholds import ThresholdError, load_thresholds

REPO = Path(__file__).resolve().parents[2]
ENTRY = 'task = "synthetic"\nmodel = "tiny-gpt2"\neditor = "ft"\nedits = 4\n'
GOOD = f"[[threshold]]\n{ENTRY}min = {{ es = 0.5 }}\n"
RATIO = ('[[ratio]]\ntask = "synthetic"\nmodel = "tiny-gpt2"\nedits = 4\nquantity = "edit_s"\n'
         'numerator = { editor = "ft", edits = 8 }\ndenominator = { editor = "ft" }\n')


def check_exit(path: Path, tmp_path: Path):
    return CliRunner().invoke(app, ["check", "--thresholds", str(path), "--results", str(tmp_path)],
                              catch_exceptions=False)


def rejected(tmp_path: Path, content: str | bytes, reason: str) -> None:
    """load_thresholds raises ThresholdError matching `reason`, and `bench check` exits 2 saying it."""
    p = tmp_path / "thresholds.toml"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ThresholdError, match=reason):
        load_thresholds(p)
    r = check_exit(p, tmp_path)
    assert r.exit_code == 2 and "Traceback" not in r.output and str(p) in r.output, r.output
    assert re.search(reason, r.output), r.output  # the reason, printed literally


MALFORMED = {
    "single table": (f"[threshold]\n{ENTRY}min = {{ es = 0.5 }}\n", r"'threshold' must be an array of tables"),
    "number": ("threshold = 5\n", r"'threshold' must be an array of tables"),
    "string": ('threshold = "es > 0.5"\n', r"'threshold' must be an array of tables"),
    "list of numbers": ("threshold = [1, 2]\n", r"threshold #1 must be a table"),
    "ratio table": (RATIO.replace("[[ratio]]", "[ratio]") + "max = 2.0\n", r"'ratio' must be an array of tables"),
    "non-UTF-8": (GOOD.encode().replace(b"synthetic", b"synth\xe9tic"), r"not UTF-8"),
    "schema string": ('schema = "1"\n' + GOOD, r"unsupported schema '1'"),
    "min number": (f"[[threshold]]\n{ENTRY}min = 0.5\n", r"'min' has the wrong type"),
    "set list": (f"[[threshold]]\n{ENTRY}set = [1]\nmin = {{ es = 0.5 }}\n", r"'set' must be a table"),
    "edits zero": (GOOD.replace("edits = 4", "edits = 0"), r"'edits' must be at least 1"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_exits_2_with_the_reason(tmp_path: Path, case: str) -> None:
    rejected(tmp_path, *MALFORMED[case])


def test_directory_exits_2(tmp_path: Path) -> None:
    d = tmp_path / "dir.toml"
    d.mkdir()
    with pytest.raises(ThresholdError, match="is a directory"):
        load_thresholds(d)
    assert check_exit(d, tmp_path).exit_code == 2


@pytest.mark.parametrize("value", ["nan", "+nan", "inf", "-inf"])
def test_nan_and_infinite_bounds_are_rejected(tmp_path: Path, value: str) -> None:
    rejected(tmp_path, f"[[threshold]]\n{ENTRY}min = {{ es = {value} }}\n", r"min\.es .*finite")
    rejected(tmp_path, f"[[threshold]]\n{ENTRY}max = {{ edit_s = {value} }}\n", r"max\.edit_s .*finite")
    rejected(tmp_path, RATIO + f"max = {value}\n", r"'max' .*finite")


def test_unknown_set_key_is_named(tmp_path: Path) -> None:
    rejected(tmp_path, f"[[threshold]]\n{ENTRY}set = {{ epochz = 1 }}\nmin = {{ es = 0.5 }}\n",
             r"threshold #1: unknown 'set' key 'epochz' for editor 'ft' / task 'synthetic'")
    rejected(tmp_path, RATIO.replace('denominator = { editor = "ft" }',
                                     'denominator = { editor = "ft", set = { shift = "sum" } }') + "max = 2.0\n",
             r"ratio #1 denominator: unknown 'set' key 'shift'")
    rejected(tmp_path, f"[[threshold]]\n{ENTRY}set = {{ data = 'x.json' }}\nmin = {{ es = 0.5 }}\n",
             r"'data' .*not a variant")


def test_unknown_editor_and_task_are_named(tmp_path: Path) -> None:
    rejected(tmp_path, GOOD.replace('editor = "ft"', 'editor = "fine-tune"'), r"unknown editor 'fine-tune'; choices:")
    rejected(tmp_path, GOOD.replace('task = "synthetic"', 'task = "zsre2"'), r"unknown task 'zsre2'; choices:")
    rejected(tmp_path, RATIO.replace('{ editor = "ft" }', '{ editor = "rome" }') + "max = 2.0\n",
             r"ratio #1 denominator: unknown editor 'rome'")


def test_hparam_and_task_field_set_keys_are_accepted(tmp_path: Path) -> None:
    p = tmp_path / "t.toml"
    p.write_text(f"[[threshold]]\n{ENTRY}set = {{ epochs = 1, locality = 'neighbours' }}\nmin = {{ es = 0.5 }}\n"
                 + RATIO.replace('{ editor = "ft" }', '{ editor = "malmen", set = { shift = "sum" } }') + "max = 2.0\n")
    (t,), (r,) = load_thresholds(p)
    assert t.sel.set == {"epochs": 1, "locality": "neighbours"} and r.den.set == {"shift": "sum"}


def test_repo_thresholds_file_is_valid() -> None:
    ths, ratios = load_thresholds(REPO / "thresholds.toml")
    assert ths and ratios


def test_keys_that_would_be_ignored_are_named(tmp_path: Path) -> None:
    rejected(tmp_path, f"[[threshold]]\n{ENTRY}quantity = 'es'\nmin = {{ es = 0.5 }}\n", r"unknown key\(s\) \['quantity'\]")
    rejected(tmp_path, RATIO.replace('{ editor = "ft" }', '{ editor = "ft", max = 3 }') + "max = 2.0\n",
             r"ratio #1 denominator: unknown key\(s\) \['max'\]")
    rejected(tmp_path, RATIO + "maxx = 2.0\n", r"ratio #1: unknown key\(s\) \['maxx'\]")
