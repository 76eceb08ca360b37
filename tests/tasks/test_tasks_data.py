"""zsRE and CounterFact read the shipped data and users' files in every accepted format."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tasks.base import DataError
from tasks.counterfact import CounterFact, CounterFactConfig
from tasks.zsre import Zsre, ZsreConfig, as_question


def zsre_rec(i: int) -> dict:
    return {"subject": f"Entity{i}", "src": f"What is the capital of Entity{i}?", "pred": "x",
            "rephrase": f"Which city is the capital of Entity{i}?", "alt": f"Alt{i}", "answers": [f"Town{i}"],
            "loc": f"nq question: who wrote book number {i}", "loc_ans": f"Author{i}", "cond": "x"}


def cf_easyedit_rec(i: int) -> dict:
    return {"case_id": i, "prompt": f"Person{i} plays the", "target_new": "piano", "subject": f"Person{i}",
            "ground_truth": "guitar", "rephrase_prompt": f"Person{i} is great at the",
            "locality_prompt": f"Other{i} plays the", "locality_ground_truth": "guitar"}


def cf_rome_rec(i: int) -> dict:
    return {"case_id": i, "pararel_idx": 7,
            "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                  "target_new": {"str": "English", "id": "Q1860"},
                                  "target_true": {"str": "French", "id": "Q150"}, "subject": f"Person{i}"},
            "paraphrase_prompts": [f"Person{i} was born in Paris. Person{i} speaks", f"Person{i} mostly speaks"],
            "neighborhood_prompts": [f"Neighbour{i}a is a native speaker of", f"Neighbour{i}b speaks"],
            "attribute_prompts": [f"Someone{i} speaks"], "generation_prompts": ["g"]}


def write_json(path: Path, recs: list) -> Path:
    path.write_text(json.dumps(recs))
    return path


def write_jsonl(path: Path, recs: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


# -- accepted formats --------------------------------------------------------------------------

def test_zsre_json_array(tmp_path: Path) -> None:
    f = write_json(tmp_path / "z.json", [zsre_rec(i) for i in range(5)])
    task = Zsre(ZsreConfig(data=str(f)))
    pool = task.eval_split()
    assert len(pool) == 5  # the whole file is the evaluation pool
    r = pool[2]
    assert (r.prompt, r.target, r.rephrases, r.subject) == (
        "What is the capital of Entity2?", "Town2", ("Which city is the capital of Entity2?",), "Entity2")
    assert r.locality_prompt == "Who wrote book number 2?" and r.locality_answer == "Author2"
    assert task.data_info["eval_format"] == "mend" and task.data_info["eval_source"] == "user"


def test_zsre_jsonl_and_target_alt(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "z.jsonl", [zsre_rec(i) for i in range(4)])
    pool = Zsre(ZsreConfig(data=str(f), target="alt")).eval_split()
    assert [r.target for r in pool] == ["Alt0", "Alt1", "Alt2", "Alt3"]


def test_zsre_target_alt_on_shipped_data() -> None:
    ans, alt = Zsre().eval_split(), Zsre(ZsreConfig(target="alt")).eval_split()
    assert len(ans) == len(alt) == 600
    assert [r.prompt for r in ans] == [r.prompt for r in alt]
    assert sum(a.target != b.target for a, b in zip(ans, alt, strict=True)) > 500


def test_zsre_rejects_unknown_target() -> None:
    with pytest.raises(ValueError, match="target"):
        Zsre(ZsreConfig(target="pred"))


def test_as_question() -> None:
    assert as_question("nq question: who voiced gaston") == "Who voiced gaston?"
    assert as_question("nq question: is it?") == "Is it?"


def test_counterfact_easyedit(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "cf.jsonl", [cf_easyedit_rec(i) for i in range(3)])
    task = CounterFact(CounterFactConfig(data=str(f)))
    r = task.eval_split()[1]
    assert (r.prompt, r.target, r.rephrases, r.locality_prompt, r.locality_answer, r.subject) == (
        "Person1 plays the", "piano", ("Person1 is great at the",), "Other1 plays the", "guitar", "Person1")
    assert task.data_info["eval_format"] == "easyedit"


def test_counterfact_rome_schema(tmp_path: Path) -> None:
    f = write_json(tmp_path / "counterfact.json", [cf_rome_rec(i) for i in range(3)])
    task = CounterFact(CounterFactConfig(data=str(f)))
    r = task.eval_split()[0]
    assert r.prompt == "The mother tongue of Person0 is" and r.target == "English" and r.subject == "Person0"
    assert r.rephrases == ("Person0 was born in Paris. Person0 speaks", "Person0 mostly speaks")
    assert (r.locality_prompt, r.locality_answer) == ("Neighbour0a is a native speaker of", "French")
    assert task.data_info["eval_format"] == "rome"


def test_counterfact_train_data_user_file(tmp_path: Path) -> None:
    tr = write_json(tmp_path / "train.json", [cf_rome_rec(i) for i in range(4)])
    task = CounterFact(CounterFactConfig(train_data=str(tr)))
    assert len(task.train_split()) == 4 and task.data_info["train_source"] == "user"
    assert task.data_info["eval_source"] == "shipped" and len(task.eval_split()) == 1919


def test_data_without_train_data_uses_shipped_train(tmp_path: Path) -> None:
    f = write_json(tmp_path / "z.json", [zsre_rec(i) for i in range(3)])
    task = Zsre(ZsreConfig(data=str(f)))
    assert task.data_info["train_source"] == "shipped" and "train_note" in task.data_info
    assert len(task.train_split()) == 400


def test_train_overlapping_eval_is_dropped(tmp_path: Path) -> None:
    ev = write_json(tmp_path / "ev.json", [zsre_rec(i) for i in range(3)])
    tr = write_json(tmp_path / "tr.json", [zsre_rec(i) for i in range(2, 6)])
    task = Zsre(ZsreConfig(data=str(ev), train_data=str(tr)))
    assert [r.subject for r in task.train_split()] == ["Entity3", "Entity4", "Entity5"]
    assert task.data_info["train_overlap_dropped"] == 1


# -- provenance --------------------------------------------------------------------------------

def test_sha256_and_count_in_data_info(tmp_path: Path) -> None:
    recs = [zsre_rec(i) for i in range(7)]
    f = write_jsonl(tmp_path / "z.jsonl", recs)
    info = Zsre(ZsreConfig(data=str(f))).data_info
    assert info["eval_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert info["eval_records"] == 7 and info["eval_requests"] == 7
    recs[0]["loc_ans"] = "Somebody else"  # any change of the content changes the hash
    write_jsonl(f, recs)
    assert Zsre(ZsreConfig(data=str(f))).data_info["eval_sha256"] != info["eval_sha256"]


# -- malformed records -------------------------------------------------------------------------

ZSRE_BAD = [
    ("missing field", lambda r: r.pop("rephrase"), "rephrase", "missing field"),
    ("wrong type", lambda r: r.update(answers="Town"), "answers", "list of strings"),
    ("empty answer", lambda r: r.update(answers=[""]), "answers", "empty"),
    ("empty loc answer", lambda r: r.update(loc_ans="  "), "loc_ans", "empty"),
]


@pytest.mark.parametrize(("case", "breaker", "field", "problem"), ZSRE_BAD, ids=[c[0] for c in ZSRE_BAD])
def test_zsre_malformed_record(tmp_path: Path, case: str, breaker, field: str, problem: str) -> None:
    recs = [zsre_rec(i) for i in range(5)]
    breaker(recs[3])
    f = write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(DataError) as ei:
        Zsre(ZsreConfig(data=str(f)))
    e = ei.value
    assert (e.path, e.index, e.field_name) == (str(f), 3, field)
    assert problem in e.problem
    assert str(f) in str(e) and "record 3" in str(e) and f"'{field}'" in str(e)
    task = Zsre(ZsreConfig(data=str(f), skip_bad=True))
    assert task.n_skipped == 1 and len(task.eval_split()) == 4
    assert task.data_info["eval_skipped"] == 1 and task.data_info["eval_records"] == 5
    assert "Entity3" not in {r.subject for r in task.eval_split()}


CF_BAD = [
    ("easyedit", "missing field", lambda r: r.pop("locality_prompt"), "locality_prompt"),
    ("easyedit", "wrong type", lambda r: r.update(rephrase_prompt=["a"]), "rephrase_prompt"),
    ("easyedit", "empty answer", lambda r: r.update(target_new=""), "target_new"),
    ("rome", "missing field", lambda r: r["requested_rewrite"].pop("subject"), "requested_rewrite.subject"),
    ("rome", "wrong type", lambda r: r["requested_rewrite"].update(target_new="English"),
     "requested_rewrite.target_new"),
    ("rome", "empty answer", lambda r: r["requested_rewrite"]["target_new"].update(str=" "),
     "requested_rewrite.target_new.str"),
    ("rome", "no placeholder", lambda r: r["requested_rewrite"].update(prompt="Lang is"),
     "requested_rewrite.prompt"),
    ("rome", "empty paraphrases", lambda r: r.update(paraphrase_prompts=[]), "paraphrase_prompts"),
]


@pytest.mark.parametrize(("fmt", "case", "breaker", "field"), CF_BAD, ids=[f"{c[0]}-{c[1]}" for c in CF_BAD])
def test_counterfact_malformed_record(tmp_path: Path, fmt: str, case: str, breaker, field: str) -> None:
    make = cf_rome_rec if fmt == "rome" else cf_easyedit_rec
    recs = [make(i) for i in range(4)]
    breaker(recs[2])
    f = write_json(tmp_path / "bad.json", recs)
    with pytest.raises(DataError) as ei:
        CounterFact(CounterFactConfig(data=str(f)))
    assert (ei.value.path, ei.value.index, ei.value.field_name) == (str(f), 2, field)
    task = CounterFact(CounterFactConfig(data=str(f), skip_bad=True))
    assert task.n_skipped == 1 and len(task.eval_split()) == 3


def test_malformed_train_data_is_named(tmp_path: Path) -> None:
    recs = [cf_easyedit_rec(i) for i in range(3)]
    recs[1]["case_id"] = "one"
    f = write_json(tmp_path / "train.json", recs)
    with pytest.raises(DataError, match=r"record 1, field 'case_id'"):
        CounterFact(CounterFactConfig(train_data=str(f)))


@pytest.mark.parametrize("content", ["", "  \n\n", "[]"], ids=["empty", "blank", "empty-array"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    f = tmp_path / "empty.json"
    f.write_text(content)
    with pytest.raises(DataError, match="empty|no records") as ei:
        Zsre(ZsreConfig(data=str(f)))
    assert str(f) in str(ei.value)


def test_all_records_bad_with_skip_bad(tmp_path: Path) -> None:
    recs = [zsre_rec(i) for i in range(2)]
    for r in recs:
        r["answers"] = []
    f = write_json(tmp_path / "z.json", recs)
    with pytest.raises(DataError, match="no valid records"):
        Zsre(ZsreConfig(data=str(f), skip_bad=True))


def test_wrong_task_file_is_named(tmp_path: Path) -> None:
    f = write_json(tmp_path / "cf.json", [cf_easyedit_rec(0)])
    with pytest.raises(DataError, match="not a zsre file"):
        Zsre(ZsreConfig(data=str(f)))


def test_invalid_json_line_is_named(tmp_path: Path) -> None:
    f = tmp_path / "z.jsonl"
    f.write_text(json.dumps(zsre_rec(0)) + "\n{not json\n")
    with pytest.raises(DataError, match="record 1"):
        Zsre(ZsreConfig(data=str(f)))


# -- shipped splits ----------------------------------------------------------------------------

@pytest.mark.parametrize(("cls", "n_train", "n_eval"), [(Zsre, 400, 600), (CounterFact, None, 1919)])
def test_shipped_splits_deterministic_and_disjoint(cls, n_train: int | None, n_eval: int) -> None:
    a, b = cls(), cls()
    assert a.train_split() == b.train_split() and a.eval_split() == b.eval_split()
    train, ev = a.train_split(), a.eval_split()
    assert len(ev) == n_eval and (n_train is None or len(train) == n_train)
    assert not {r.prompt for r in train} & {r.prompt for r in ev}
    assert a.n_skipped == 0
    assert a.data_info["eval_sha256"] == hashlib.sha256(
        (Path(__file__).parents[2] / "tasks" / "data" / a.data_info["eval_path"]).read_bytes()).hexdigest()


def test_sample_is_seeded_and_within_eval() -> None:
    task = Zsre()
    s0, s0b, s1 = task.sample(16, 0), task.sample(16, 0), task.sample(16, 1)
    assert s0 == s0b and s0 != s1 and len(set(s0)) == 16
    assert set(s0) <= set(task.eval_split())
