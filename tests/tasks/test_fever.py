"""FEVER task: readers, rephrasings, split, classification metrics, classifier cache, editing a classifier."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench.core.threads import torch_threads
from bench.evaluation.metrics import combine, evaluate
from bench.models import EditableModel, LoadContext, ModelLoadError
from bench.zoo.classifier import MINILM_PIP, load_tiny_bert, minilm_dir
from editors.base import EditorContext
from tasks.base import DataError, EditRequest
from tasks.fever import LABELS, FeverConfig, FeverTask, flip
from tasks.rephrase import WRAPPERS, move_time_phrase, rephrase
from tasks.synthetic_cls import SyntheticClsTask

REPO = Path(__file__).resolve().parents[2]
NEGATIONS = re.compile(r"\b(not|no|never|none|nobody|nothing|neither|nor|without|only)\b|n't", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# user files


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


MALMEN_RECORDS = [
    {"prompt": "Tilda Swinton is a vegan.", "equiv_prompt": ["Tilda Swinton eats no animal products.",
                                                             "Swinton is vegan."],
     "alt": "SUPPORTS", "unrel_prompt": "Paris is in France.", "unrel_ans": "SUPPORTS"},
    {"prompt": "The Moon is made of cheese.", "equiv_prompt": ["Cheese makes up the Moon."],
     "alt": "refutes", "unrel_prompt": "Water boils at 10 C at sea level.", "unrel_ans": "REFUTES"},
]


def test_malmen_reader_takes_alt_equiv_and_unrelated(tmp_path):
    path = _write(tmp_path / "fever_eval.json", json.dumps(MALMEN_RECORDS))
    task = FeverTask(FeverConfig(data=str(path)))
    reqs = task.eval_split()
    assert reqs[0] == EditRequest("Tilda Swinton is a vegan.", "SUPPORTS",
                                  ("Tilda Swinton eats no animal products.", "Swinton is vegan."),
                                  "Paris is in France.", "SUPPORTS")
    assert reqs[1].target == "REFUTES" and reqs[1].locality_answer == "REFUTES"  # label case normalised
    info = task.data_info["data"]
    assert info["format"] == "malmen" and info["records"] == 2
    assert info["sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    assert task.data_info["gs_source"].startswith("file")
    # the shipped meta-training part still serves train_split
    assert len(task.train_split()) == task.data_info["split_sizes"]["meta_train"]


def _kilt(inp: str, gold, alts, reph) -> str:
    return json.dumps({"id": inp[:5], "input": inp, "output": [{"answer": gold}], "prediction": gold,
                       "alternatives": alts, "filtered_rephrases": reph, "logit": 1.0})


def test_kilt_reader_maps_booleans_drops_like_mend_and_pairs_locality(tmp_path):
    lines = [
        _kilt("Claim one is right.", "SUPPORTS", ["REFUTES"], ["Claim one holds."]),
        _kilt("Claim two is wrong.", False, [True], ["Claim two fails.", "Two is wrong."]),
        _kilt("Claim three has no rephrase.", "SUPPORTS", ["REFUTES"], []),
        _kilt("Claim four is a locality claim.", True, [False], ["Four is local."]),
    ]
    path = _write(tmp_path / "fever-dev-kilt.jsonl", "\n".join(lines) + "\n")
    task = FeverTask(FeverConfig(data=str(path)))
    reqs = task.eval_split()
    info = task.data_info["data"]
    assert info["format"] == "kilt" and info["records"] == 4 and info["dropped_like_mend"] == 1
    # 3 usable records: the first two are edits, the third is their locality claim (gold label)
    assert [r.prompt for r in reqs] == ["Claim one is right.", "Claim two is wrong."]
    assert [r.target for r in reqs] == ["REFUTES", "SUPPORTS"]  # alternatives[0]; True -> SUPPORTS
    assert reqs[1].rephrases == ("Claim two fails.", "Two is wrong.")
    assert {r.locality_prompt for r in reqs} == {"Claim four is a locality claim."}
    assert {r.locality_answer for r in reqs} == {"SUPPORTS"}


def test_bad_record_names_file_record_and_field(tmp_path):
    bad = [dict(MALMEN_RECORDS[0]), dict(MALMEN_RECORDS[1], alt="MAYBE"), dict(MALMEN_RECORDS[0])]
    del bad[2]["unrel_prompt"]
    path = _write(tmp_path / "bad.json", json.dumps(bad))
    with pytest.raises(DataError) as e:
        FeverTask(FeverConfig(data=str(path)))
    assert e.value.index == 1 and e.value.field_name == "alt" and "bad.json" in str(e.value)
    task = FeverTask(FeverConfig(data=str(path), skip_bad=True))
    assert len(task.eval_split()) == 1 and task.n_skipped == 2 and task.data_info["data"]["skipped"] == 2


def test_kilt_label_error_and_unknown_format(tmp_path):
    path = _write(tmp_path / "k.jsonl", _kilt("A claim.", "SUPPORTS", ["REFUTES"], ["x"]) + "\n"
                  + _kilt("B claim.", "YES", ["REFUTES"], ["y"]) + "\n")
    with pytest.raises(DataError) as e:
        FeverTask(FeverConfig(data=str(path)))
    assert e.value.index == 1 and e.value.field_name == "output[0].answer"
    other = _write(tmp_path / "o.json", json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(DataError, match="unrecognised FEVER file format"):
        FeverTask(FeverConfig(train_data=str(other)))


# ---------------------------------------------------------------------------------------------
# rephrasings


def test_rephrase_examples():
    assert move_time_phrase("In 1986, Tatum O'Neal got married.") == "Tatum O'Neal got married in 1986."
    assert move_time_phrase("On April 4, 1935, Trevor Griffiths was born.") == "Trevor Griffiths was born on April 4, 1935."
    assert move_time_phrase("In The 100, adults return to Earth.") is None  # a title, not a date
    assert move_time_phrase("Tilda Swinton is a vegan.") is None
    out = rephrase("The Beatles were a band.", n=len(WRAPPERS))
    assert len(set(out)) == len(WRAPPERS)
    assert "It is true that the Beatles were a band." in out  # function word lowered inside a frame
    assert rephrase("In 1951, Lalla Ward was born.", 1) == ("Lalla Ward was born in 1951.",)


def _words(s: str) -> list[str]:
    return re.findall(r"[\w']+", s.lower())


def test_rephrasings_preserve_claim_words_and_negations_on_all_shipped_claims():
    task = FeverTask()
    claims = [r.prompt for r in task.eval_split()] + [r.prompt for r in task.train_split()]
    frame_words = {w for t in WRAPPERS for w in _words(t.replace("{c}", ""))}
    for c in claims:
        for r in rephrase(c, n=len(WRAPPERS) + 1):
            assert r != c
            assert len(NEGATIONS.findall(r)) == len(NEGATIONS.findall(c)), (c, r)
            cw, rw = _words(c), _words(r)
            if sorted(cw) == sorted(rw):  # the reordering: same words, the date phrase moved as a unit
                continue
            # a frame: the claim's words appear unchanged and in order, only frame words are added
            body = " ".join(cw)
            assert body in " ".join(rw), (c, r)
            assert set(rw) - set(cw) <= frame_words, (c, r)


def test_rephrase_is_deterministic_across_processes():
    claims = ["Tilda Swinton is a vegan.", "In 1986, Tatum O'Neal got married.", "Paris is not in Spain."]
    here = [list(rephrase(c, 3)) for c in claims]
    code = ("import json,sys; from tasks.rephrase import rephrase; "
            f"print(json.dumps([list(rephrase(c, 3)) for c in {claims!r}]))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                             env={"PYTHONHASHSEED": seed, "PATH": ""})
        assert json.loads(out.stdout) == here


# ---------------------------------------------------------------------------------------------
# shipped split


def test_split_sizes_are_disjoint_and_targets_are_flipped():
    task = FeverTask()
    sizes = task.data_info["split_sizes"]
    cls, meta, ev = task.classifier_split(), task.train_split(), task.eval_split()
    assert len(cls.train) == sizes["classifier_train"] == 2600 and len(cls.val) == sizes["classifier_val"] == 400
    assert len(meta) == sizes["meta_train"] == 1500 and len(ev) == sizes["eval_edit"]
    n_claims = task.data_info["shipped"]["claims_after_dropping_nei_and_conflicts"]
    assert sum(sizes.values()) == n_claims
    parts = [{c for c, _ in cls.train}, {c for c, _ in cls.val}, {r.prompt for r in meta},
             {r.prompt for r in ev}, {r.locality_prompt for r in ev}]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == n_claims  # pairwise disjoint, no NEI lost
    assert all(r.locality_prompt != r.prompt for r in meta)
    gold = {c: y for c, y in cls.train + cls.val}
    assert all(y in LABELS for y in gold.values())
    # targets are the flipped gold labels: read the gold label back from the shipped file
    shipped = {}
    for line in (REPO / "tasks/data/fever/paper_dev.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["label"] != "NOT ENOUGH INFO":  # a claim also annotated NEI keeps its evidenced label
            shipped.setdefault(rec["claim"].strip(), set()).add(rec["label"])
    assert all(shipped[r.prompt] == {flip(r.target)} for r in ev + meta)
    assert all(shipped[r.locality_prompt] == {r.locality_answer} for r in ev)
    assert all(len(r.rephrases) == 2 for r in ev)
    assert task.sample(64, 0) == task.sample(64, 0) != task.sample(64, 1)


# ---------------------------------------------------------------------------------------------
# classification metrics on a stub classifier


class _LookupTokenizer:
    """Turns each text into one token: its index in a fixed table."""

    def __init__(self, texts: list[str]):
        self.ids = {t: i for i, t in enumerate(texts)}

    def __call__(self, texts, **_: object) -> dict[str, torch.Tensor]:
        ids = torch.tensor([[self.ids[t]] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _LookupClassifier(nn.Module):
    """Logits read from a per-text table (rows = texts, columns = SUPPORTS, REFUTES)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)
        self.config = SimpleNamespace(num_hidden_layers=1)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def _stub(preds: dict[str, str]) -> EditableModel:
    texts = list(preds)
    table = torch.tensor([[1.0, 0.0] if preds[t] == "SUPPORTS" else [0.0, 1.0] for t in texts])
    return EditableModel(model=_LookupClassifier(table), tokenizer=_LookupTokenizer(texts), name="stub",
                         arch="bert", kind="cls", labels=LABELS)


def test_classification_metrics_on_stub_model():
    reqs = [EditRequest("a", "REFUTES", ("a1", "a2"), "u", "SUPPORTS"),
            EditRequest("b", "SUPPORTS", ("b1",), "v", "REFUTES")]
    before = {"a": "SUPPORTS", "a1": "SUPPORTS", "a2": "SUPPORTS", "b": "REFUTES", "b1": "SUPPORTS",
              "u": "SUPPORTS", "v": "SUPPORTS"}
    after = dict(before, a="REFUTES", a1="REFUTES", b="SUPPORTS", u="REFUTES")
    pre, post = evaluate(_stub(before), reqs), evaluate(_stub(after), reqs)
    # ES/GS: fraction predicted as the target label; GS averages over all 3 rephrases
    assert pre.metrics["es"] == 0.0 and pre.metrics["gs"] == pytest.approx(1 / 3)
    assert post.metrics["es"] == 1.0 and post.metrics["gs"] == pytest.approx(2 / 3)
    # LS: accuracy against gold; ls_agree: agreement with the pre-edit prediction
    assert pre.metrics["ls"] == 0.5 and post.metrics["ls"] == 0.0
    row = combine(pre, post)
    assert row["ls_agree"] == 0.5 and row["pre_es"] == 0.0 and row["pre_ls"] == 0.5
    assert row["es_seq"] == row["es"]  # one decision per claim: the sequence variant is the same


# ---------------------------------------------------------------------------------------------
# classifiers


@pytest.fixture(scope="module")
def tiny_bert() -> EditableModel:
    """tiny-bert from the repo's shared results/ cache (trained there once, ~30 s on one core)."""
    return load_tiny_bert(LoadContext(name="tiny-bert", results_dir=REPO / "results", task_kind="cls"))


def test_tiny_bert_is_cached_and_reused(tiny_bert):
    again = load_tiny_bert(LoadContext(name="tiny-bert", results_dir=REPO / "results", task_kind="cls"))
    assert again.info["classifier_cached"] is True and again.key == tiny_bert.key
    folder = REPO / "results" / "models" / tiny_bert.key
    assert (folder / "model.safetensors").exists()
    sidecar = json.loads((folder / "classifier.json").read_text())
    assert sidecar["val_accuracy"] == again.info["classifier_accuracy"] >= 0.95
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt")) and not list(folder.glob("*.pkl"))
    texts = ["Lekrun lives in Paris.", "Something about a FEVER claim, with unknown words."]
    with torch.no_grad():
        a, b = tiny_bert.logits(tiny_bert.encode_text(texts)), again.logits(again.encode_text(texts))
    assert a.shape == (2, 2) and torch.equal(a, b)


def test_tiny_bert_layout_and_pre_edit_behaviour(tiny_bert):
    assert tiny_bert.kind == "cls" and tiny_bert.labels == LABELS and tiny_bert.arch == "bert"
    assert tiny_bert.module_names("second_fc") == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    pre = evaluate(tiny_bert, SyntheticClsTask().sample(32, 0)).metrics
    assert pre["es"] <= 0.1 and pre["gs"] <= 0.15 and pre["ls"] >= 0.9  # it knows the facts before editing
    # FEVER-shaped requests run through it too (unknown words are [UNK])
    assert set(evaluate(tiny_bert, FeverTask().sample(8, 0)).metrics) >= {"es", "gs", "ls"}


def test_ft_flips_tiny_bert_labels(tiny_bert):
    from editors import EDITORS
    from editors.finetune import FTHparams

    reqs = SyntheticClsTask().sample(16, 0)
    # The paper's lr 5e-4 moves the confident from-scratch tiny BERT too little in 10 steps (measured:
    # es stays 0.0); 2e-3 flips it (es 0.94, and, as the paper warns for FT on FEVER, ls collapses).
    hp = FTHparams(lr=2e-3)
    ed = EDITORS["ft"](tiny_bert, hp, EditorContext(results_dir=REPO / "results", log=lambda s: None))
    edit = ed.edit(reqs)
    pre = evaluate(tiny_bert, reqs)
    with edit.applied(tiny_bert.model):
        post = evaluate(tiny_bert, reqs)
    assert post.metrics["es"] >= pre.metrics["es"] + 0.5


def test_memit_refuses_classifiers(tiny_bert):
    from editors import EDITORS
    from editors.base import UnsupportedTask

    with pytest.raises(UnsupportedTask, match="causal language models only"):
        EDITORS["memit"](tiny_bert, None, EditorContext(results_dir=REPO / "results"))


def test_minilm_missing_package_error_names_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=re.escape(MINILM_PIP)):
        minilm_dir()


def test_malmen_edits_tiny_bert_through_cls_token(tiny_bert, tmp_path):
    from editors.malmen import MalmenEditor, MalmenHParams

    task = SyntheticClsTask()
    # a short schedule for a 2-layer model meta-trained on 48 requests (~20 s); measured es 0.03 -> 0.69
    hp = MalmenHParams(rank=64, edit_lr=1e-3, meta_lr=1e-3, train_edits=16, schedule="select", steps=100,
                       val_every=25, n_val=16)
    ctx = EditorContext(results_dir=tmp_path, task_key="synthetic-cls", model_key=tiny_bert.key, log=lambda s: None)
    ed = MalmenEditor(tiny_bert, hp, ctx)
    assert ed.modules == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    # one intra-op thread: on a loaded 2-core machine the default two made this 20x slower (measured 414 s vs 18 s)
    with torch_threads(1):
        ed.prepare(task.train_split())
    reqs = task.sample(32, 0)
    edit = ed.edit(reqs)
    pre = evaluate(tiny_bert, reqs)
    with edit.applied(tiny_bert.model):
        post = evaluate(tiny_bert, reqs)
    assert post.metrics["es"] >= pre.metrics["es"] + 0.3 and post.metrics["gs"] >= pre.metrics["gs"] + 0.3
    assert edit.mean_residual is not None


def test_hf_encoder_folder_is_fine_tuned_as_fever_classifier(tmp_path):
    """The `--model <id or folder> --task fever` path, on a tiny random BERT saved as a local folder."""
    from transformers import BertConfig, BertModel

    from bench.models import load_model
    from bench.zoo.classifier import ClassifierTrainConfig, build_word_tokenizer, fever_classifier

    task = FeverTask()
    tok = build_word_tokenizer([c for c, _ in task.classifier_split().train[:200]])
    folder = tmp_path / "tiny-encoder"
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    ctx = LoadContext(name=str(folder), results_dir=tmp_path / "results", task_kind="cls")
    em = fever_classifier(ctx, str(folder), str(folder), {"path": str(folder)},
                          ClassifierTrainConfig(lr=1e-3, max_epochs=1, batch_size=128))
    assert em.kind == "cls" and em.info["classifier_epochs"] == 1 and em.info["classifier_val_claims"] == 400
    assert em.module_names("second_fc", last_n=1) == ["bert.encoder.layer.1.output.dense"]
    assert list((tmp_path / "results" / "models").glob("*/model.safetensors"))
    with pytest.raises(ModelLoadError):  # an unreachable id fails with the offline advice, not a stack trace
        load_model(LoadContext(name=str(tmp_path / "missing"), results_dir=tmp_path / "r2", task_kind="cls"))
