"""Bad data files fail with one line naming file, record and field, or are skipped with --skip-bad.

Covers: encodings other than UTF-8, a directory given as --data, JSON nested too deeply, invalid
JSONL lines under skip_bad, strings of invisible characters, and requests too long for the model
(checked against the model's positions before the run, by `Task.check_lengths`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from tasks import TASKS
from tasks.base import DataError, Field, check_record, is_blank
from tasks.counterfact import CounterFact, CounterFactConfig
from tasks.fever import FeverConfig, FeverTask
from tasks.zsre import Zsre, ZsreConfig
from tests.tasks.test_tasks_data import cf_easyedit_rec, cf_rome_rec, write_json, write_jsonl, zsre_rec


def jsonl_bytes(recs: list) -> bytes:
    return ("\n".join(json.dumps(r) for r in recs) + "\n").encode()


def raises_data_error(cfg) -> DataError:
    with pytest.raises(DataError) as ei:
        Zsre(cfg)
    msg = str(ei.value)
    assert "\n" not in msg and cfg.data in msg
    return ei.value


# -- encodings --------------------------------------------------------------------------------

def test_latin1_file_is_named_with_line(tmp_path: Path) -> None:
    recs = [zsre_rec(i) for i in range(3)]
    recs[1]["subject"] = "Montréal"
    f = tmp_path / "latin1.json"
    f.write_bytes(json.dumps(recs, ensure_ascii=False, indent=1).encode("latin-1"))
    e = raises_data_error(ZsreConfig(data=str(f)))
    assert "UTF-8" in e.problem and "0xe9" in e.problem and "line" in e.problem


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_utf16_and_utf32_files_are_named(tmp_path: Path, encoding: str) -> None:
    f = tmp_path / "wide.jsonl"
    f.write_bytes(jsonl_bytes([zsre_rec(i) for i in range(3)]).decode().encode(encoding))
    e = raises_data_error(ZsreConfig(data=str(f), skip_bad=True))
    assert "UTF-8" in e.problem


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes([zsre_rec(i) for i in range(3)]))
    assert len(Zsre(ZsreConfig(data=str(f))).eval_split()) == 3


def test_stray_byte_in_jsonl_line_is_named_or_skipped(tmp_path: Path) -> None:
    lines = jsonl_bytes([zsre_rec(i) for i in range(4)]).split(b"\n")
    lines[2] = lines[2].replace(b"Entity2", b"Entity\xff2")
    f = tmp_path / "stray.jsonl"
    f.write_bytes(b"\n".join(lines))
    e = raises_data_error(ZsreConfig(data=str(f)))
    assert e.index == 2 and "line 3" in e.problem and "0xff" in e.problem and "UTF-8" in e.problem
    task = Zsre(ZsreConfig(data=str(f), skip_bad=True))
    assert task.n_skipped == 1 and [r.subject for r in task.eval_split()] == ["Entity0", "Entity1", "Entity3"]


# -- not a file, nesting, invalid lines ----------------------------------------------------------

def test_directory_as_data_is_named(tmp_path: Path) -> None:
    e = raises_data_error(ZsreConfig(data=str(tmp_path)))
    assert "directory" in e.problem


def test_unreadable_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = write_json(tmp_path / "z.json", [zsre_rec(0)])

    def denied(self: Path) -> bytes:  # what a mode-000 file gives a user other than root
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    e = raises_data_error(ZsreConfig(data=str(f)))
    assert "cannot read the file: Permission denied" in e.problem


def test_deeply_nested_json_array_is_named(tmp_path: Path) -> None:
    f = tmp_path / "deep.json"
    f.write_text("[" + "[" * 100_000 + "]" * 100_001)
    e = raises_data_error(ZsreConfig(data=str(f)))
    assert "nested too deeply" in e.problem


def test_deeply_nested_jsonl_line_is_named_or_skipped(tmp_path: Path) -> None:
    f = tmp_path / "deep.jsonl"
    f.write_text(json.dumps(zsre_rec(0)) + "\n" + '{"src": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
                 + json.dumps(zsre_rec(2)) + "\n")
    e = raises_data_error(ZsreConfig(data=str(f)))
    assert e.index == 1 and "nested too deeply" in e.problem and "line 2" in e.problem
    task = Zsre(ZsreConfig(data=str(f), skip_bad=True))
    assert task.n_skipped == 1 and len(task.eval_split()) == 2


def test_invalid_jsonl_line_is_skipped_with_skip_bad(tmp_path: Path) -> None:
    f = tmp_path / "z.jsonl"
    f.write_text("\n".join([json.dumps(zsre_rec(0)), "{not json", json.dumps(zsre_rec(2)), "",
                            json.dumps(zsre_rec(3))]) + "\n")
    e = raises_data_error(ZsreConfig(data=str(f)))
    assert e.index == 1 and "line 2" in e.problem
    task = Zsre(ZsreConfig(data=str(f), skip_bad=True))
    assert task.n_skipped == 1 and task.data_info["eval_skipped"] == 1
    assert [r.subject for r in task.eval_split()] == ["Entity0", "Entity2", "Entity3"]
    assert task.data_info["eval_records"] == 4  # blank lines are not records


def test_invalid_first_jsonl_line_is_skipped_with_skip_bad(tmp_path: Path) -> None:
    f = tmp_path / "z.jsonl"
    f.write_text("{oops\n" + "\n".join(json.dumps(zsre_rec(i)) for i in range(1, 3)) + "\n")
    task = Zsre(ZsreConfig(data=str(f), skip_bad=True))
    assert task.n_skipped == 1 and len(task.eval_split()) == 2


def test_invalid_jsonl_line_in_fever_file_is_skipped(tmp_path: Path) -> None:
    recs = [{"claim": f"Claim number {i} holds.", "label": "SUPPORTS" if i % 2 else "REFUTES"} for i in range(6)]
    f = tmp_path / "fever.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs[:3]) + "\n{bad\n" + "\n".join(json.dumps(r) for r in recs[3:]))
    with pytest.raises(DataError, match="line 4"):
        FeverTask(FeverConfig(data=str(f)))
    task = FeverTask(FeverConfig(data=str(f), skip_bad=True))
    assert task.n_skipped == 1 and task.data_info["data"]["skipped"] == 1 and len(task.eval_split()) == 3


# -- invisible strings --------------------------------------------------------------------------

INVISIBLE = ["\u200b", "\u200c\u200d", "\u2060", "\ufeff", " \u200b\t\n", "\u00a0\u3000"]


@pytest.mark.parametrize("s", INVISIBLE, ids=[ascii(s) for s in INVISIBLE])
def test_invisible_strings_count_as_empty(tmp_path: Path, s: str) -> None:
    assert is_blank(s) and not is_blank("a" + s)
    recs = [zsre_rec(i) for i in range(4)]
    recs[1]["loc_ans"] = s
    recs[2]["answers"] = [s]
    f = write_jsonl(tmp_path / "z.jsonl", recs)
    e = raises_data_error(ZsreConfig(data=str(f)))
    assert (e.index, e.field_name) == (1, "loc_ans") and "empty" in e.problem
    assert Zsre(ZsreConfig(data=str(f), skip_bad=True)).n_skipped == 2


def test_invisible_nq_question_list_item_and_rome_subject(tmp_path: Path) -> None:
    recs = [zsre_rec(i) for i in range(2)]
    recs[0]["loc"] = "nq question: \u200b"
    e = raises_data_error(ZsreConfig(data=str(write_json(tmp_path / "z.json", recs))))
    assert (e.index, e.field_name) == (0, "loc")
    with pytest.raises(DataError, match=r"record 0, field 'x'.*empty"):
        check_record("f.json", 0, {"x": ["ok", "\u200b"]}, [Field("x", "str_list")])
    rome = [cf_rome_rec(i) for i in range(2)]
    rome[1]["requested_rewrite"]["subject"] = "\u2060"
    with pytest.raises(DataError, match=r"record 1, field 'requested_rewrite.subject'"):
        CounterFact(CounterFactConfig(data=str(write_json(tmp_path / "cf.json", rome))))


# -- lengths against the model ------------------------------------------------------------------

class WordTokenizer:
    """One token per whitespace-separated word, plus a BOS token with special tokens (like tiny-gpt2)."""

    def __call__(self, text, add_special_tokens: bool = True):
        def ids(t: str) -> list[int]:
            return ([0] if add_special_tokens else []) + [1] * len(t.split())
        return {"input_ids": [ids(t) for t in text] if isinstance(text, list) else ids(text)}


LONG = " ".join(["word"] * 300)


def test_long_answer_is_named_before_the_run(tmp_path: Path) -> None:
    recs = [zsre_rec(i) for i in range(5)]
    recs[2]["answers"] = [LONG]
    f = write_jsonl(tmp_path / "z.jsonl", recs)
    task = Zsre(ZsreConfig(data=str(f)))  # fits no model yet: the limit is the model's
    with pytest.raises(DataError) as ei:
        task.check_lengths(WordTokenizer(), max_length=128, positions=128)
    e = ei.value
    assert (e.path, e.index, e.field_name) == (str(f), 2, "answers[0]") and "128" in e.problem
    task.check_lengths(WordTokenizer(), max_length=128, positions=1024)  # a model with more positions takes it


def test_long_answer_is_skipped_with_skip_bad(tmp_path: Path) -> None:
    recs = [zsre_rec(i) for i in range(5)]
    recs[1]["loc_ans"] = LONG
    f = write_jsonl(tmp_path / "z.jsonl", recs)
    task = Zsre(ZsreConfig(data=str(f), skip_bad=True))
    task.check_lengths(WordTokenizer(), max_length=128, positions=128)
    assert task.n_skipped == 1 and [r.subject for r in task.eval_split()] == ["Entity0", "Entity2", "Entity3", "Entity4"]
    assert {r.subject for r in task.sample(4, 0)} == {"Entity0", "Entity2", "Entity3", "Entity4"}
    assert task.data_info["eval_too_long"] == 1


def test_long_prompt_matters_only_past_the_model_positions(tmp_path: Path) -> None:
    recs = [cf_easyedit_rec(i) for i in range(3)]
    recs[1]["rephrase_prompt"] = LONG
    f = write_json(tmp_path / "cf.json", recs)
    task = CounterFact(CounterFactConfig(data=str(f)))
    task.check_lengths(WordTokenizer(), max_length=128, positions=128)  # the prompt's end is kept: fits
    with pytest.raises(DataError, match=r"record 1, field 'rephrase_prompt'"):
        task.check_lengths(WordTokenizer(), max_length=128, positions=64)


def test_long_rome_target_and_train_record_are_named(tmp_path: Path) -> None:
    ev = [cf_rome_rec(i) for i in range(3)]
    ev[0]["requested_rewrite"]["target_true"]["str"] = LONG
    f = write_json(tmp_path / "cf.json", ev)
    with pytest.raises(DataError, match=r"record 0, field 'requested_rewrite.target_true.str'"):
        CounterFact(CounterFactConfig(data=str(f))).check_lengths(WordTokenizer(), 128, 128)
    tr = [cf_easyedit_rec(i) for i in range(3)]
    tr[2]["target_new"] = LONG
    g = write_json(tmp_path / "train.json", tr)
    with pytest.raises(DataError) as ei:
        CounterFact(CounterFactConfig(train_data=str(g))).check_lengths(WordTokenizer(), 128, 128)
    assert (ei.value.path, ei.value.index, ei.value.field_name) == (str(g), 2, "target_new")


def test_answer_that_tokenises_to_nothing_is_named(tmp_path: Path) -> None:
    recs = [zsre_rec(i) for i in range(2)]
    recs[1]["loc_ans"] = "-"  # one character our word tokenizer drops
    f = write_json(tmp_path / "z.json", recs)

    class DropDash(WordTokenizer):
        def __call__(self, text, add_special_tokens=True):
            text = [t.replace("-", "") for t in text] if isinstance(text, list) else text.replace("-", "")
            return super().__call__(text, add_special_tokens)

    with pytest.raises(DataError, match=r"record 1, field 'loc_ans'.*no tokens"):
        Zsre(ZsreConfig(data=str(f))).check_lengths(DropDash(), 128, 128)


def _fingerprint(reqs) -> str:
    blob = json.dumps([[r.prompt, r.target, list(r.rephrases), r.locality_prompt, r.locality_answer] for r in reqs])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# sample(32, seed 0) of each task as the code before these checks drew it: stored results depend on it
SAMPLES = {"zsre": "d2ea203934996478", "counterfact": "600986d074edbae8", "fever": "469d2df54bd408d3",
           "synthetic": "bec5feb3edfbe351"}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_samples_of_shipped_data_are_unchanged(name: str) -> None:
    task = TASKS[name]()
    task.check_lengths(WordTokenizer(), max_length=128, positions=128)
    assert task.n_skipped == 0 and _fingerprint(task.sample(32, 0)) == SAMPLES[name]


def test_run_reports_a_too_long_answer_as_bad_data(tmp_path: Path) -> None:
    """Through the run loop with a real GPT-2 of 128 positions: a bad-data error, not an IndexError."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench.core.config import RunConfig
    from bench.models import EditableModel
    from bench.runner.phases import run_phases
    from bench.runner.run import UserError, resolve
    from bench.zoo.tiny import build_tokenizer
    from tasks.synthetic import SyntheticConfig, build_world

    tok = build_tokenizer(build_world(SyntheticConfig()))
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=16, n_layer=1, n_head=2,
                                       n_inner=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    em = EditableModel(model.eval(), tok, "tiny-test", "gpt2", key="tiny-test")
    recs = [zsre_rec(i) for i in range(4)]
    recs[3]["answers"] = [LONG]
    f = write_jsonl(tmp_path / "z.jsonl", recs)
    cfg = RunConfig(editor="ft", model="tiny-gpt2", task="zsre", n_edits=2, device="cpu", data=str(f),
                    overrides={"epochs": "1"})
    with pytest.raises(UserError, match=rf"bad data: {f}, record 3, field 'answers\[0\]'"):
        run_phases(resolve(cfg), em, tmp_path, None, lambda *a: None)
    out = run_phases(resolve(dataclasses.replace(cfg, skip_bad=True, n_edits=3)), em, tmp_path, None,
                      lambda *a: None)
    assert out["n_skipped_records"] == 1


def test_no_request_fitting_the_model_is_named_even_with_skip_bad(tmp_path: Path) -> None:
    recs = [zsre_rec(i) for i in range(2)]
    for r in recs:
        r["answers"] = [LONG]
    f = write_json(tmp_path / "z.json", recs)
    with pytest.raises(DataError, match="no request fits the model's 128 positions"):
        Zsre(ZsreConfig(data=str(f), skip_bad=True)).check_lengths(WordTokenizer(), 128, 128)
