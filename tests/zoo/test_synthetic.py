"""The synthetic fact world, its splits and requests, and the tiny GPT-2 trained on it."""

from __future__ import annotations

import time

import pytest
import torch

from bench.zoo.tiny import (
    TinyModelConfig,
    TinySpec,
    TinyTrainConfig,
    build_tokenizer,
    fact_accuracy,
    load_tiny,
    train_tiny,
)
from tasks import TASKS
from tasks.synthetic import SyntheticConfig, build_world


def test_world_is_deterministic_and_depends_on_its_seed():
    a, b = build_world(), build_world()
    assert a.facts == b.facts and a.train_idx == b.train_idx and a.eval_idx == b.eval_idx
    assert a.locality_idx == b.locality_idx
    assert build_world(SyntheticConfig(world_seed=1)).facts != a.facts


def test_world_shape_names_and_templates():
    w = build_world()
    cfg = SyntheticConfig()
    entities = [f.entity for f in w.facts]
    assert len(set(entities)) == cfg.n_entities + cfg.n_locality_entities + cfg.n_countries
    assert all(" " not in e for e in entities)
    assert len(w.templates) >= 4 and all(len(t) >= 3 for t in w.templates.values())
    assert all("{s}" in t for ts in w.templates.values() for t in ts)
    assert any(len(v.split()) == 2 for vs in w.values.values() for v in vs)  # multi-token answers
    assert len(w.corpus()) == len(w.facts) * 4
    p, a = w.render(w.facts[0], 2)
    assert w.facts[0].entity in p and a == w.facts[0].value and f"{p} {a}" in w.corpus()


def test_value_vocabularies_grow_with_n_values_and_16_keeps_the_listed_world():
    from tasks.synthetic import VALUES

    w = build_world()
    people = [f for f in w.facts if f.relation in VALUES]
    for r, listed in VALUES.items():
        assert len(set(w.values[r])) == SyntheticConfig().n_values and w.values[r][:16] == listed
        used = {f.value for f in people if f.relation == r}
        assert len(used) > 100  # answers are spread: about 5 people per value, not 40
    made_up = {v for r in VALUES for v in w.values[r][16:]}
    assert not made_up & {f.entity for f in w.facts}  # a value is never also a name
    small = build_world(SyntheticConfig(n_values=16))
    assert all(small.values[r] == VALUES[r] for r in VALUES)
    assert {f.value for f in small.facts if f.relation in VALUES} <= {v for vs in VALUES.values() for v in vs}
    assert "n_values" not in SyntheticConfig(n_values=16).world_key()  # the previous world keeps its key
    with pytest.raises(ValueError, match="n_values"):
        SyntheticConfig(n_values=8)


def test_splits_are_disjoint_large_enough_and_deterministic(synthetic_task):
    w = synthetic_task.world
    assert not set(w.train_idx) & set(w.eval_idx)
    assert not (set(w.train_idx) | set(w.eval_idx)) & (set(w.locality_idx) | set(w.unrelated_idx))
    assert len(w.eval_idx) >= 1024 and len(w.train_idx) > 0
    train, ev = synthetic_task.train_split(), synthetic_task.eval_split()
    assert len(ev) == len(w.eval_idx) and len(train) == len(w.train_idx)
    assert not {r.prompt for r in train} & {r.prompt for r in ev}
    assert not {r.locality_prompt for r in train} & {r.locality_prompt for r in ev}
    fresh = TASKS["synthetic"]()
    assert fresh.eval_split() == ev and fresh.train_split() == train
    assert synthetic_task.sample(1024, seed=3) == fresh.sample(1024, seed=3)
    assert synthetic_task.sample(32, seed=0) != synthetic_task.sample(32, seed=1)


def test_requests_are_filled_and_counterfactual(synthetic_task):
    w = synthetic_task.world
    truth = {w.render(f, 0)[0]: f.value for f in w.facts}
    edit_entities = {w.facts[i].entity for i in w.train_idx + w.eval_idx}
    for r in synthetic_task.eval_split() + synthetic_task.train_split():
        assert r.prompt and r.target and r.locality_prompt and r.locality_answer and r.subject
        assert r.target != truth[r.prompt]
        assert r.target.split()[0] != truth[r.prompt].split()[0]
        assert len(r.rephrases) == 3 and all(r.subject in p for p in (r.prompt, *r.rephrases))
        assert len(set(r.rephrases) | {r.prompt}) == 4
        assert r.subject not in r.locality_prompt.split()
        assert truth[r.locality_prompt] == r.locality_answer
        assert r.locality_prompt.split()[0] not in edit_entities
    # counterfactual targets spread over the value vocabulary
    assert len({r.target for r in synthetic_task.eval_split()}) >= 32


def test_locality_probes_are_unrelated_countries_or_neighbour_people(synthetic_task):
    w = synthetic_task.world
    by_prompt = {w.render(f, 0)[0]: f for f in w.facts}
    edit_rel = {w.facts[i].relation for i in w.eval_idx}
    unrel = [by_prompt[r.locality_prompt] for r in synthetic_task.eval_split()]
    # default: facts of countries, on relations no edit uses, with answers no edit targets
    assert {f.relation for f in unrel} == {"capital", "continent"} and not edit_rel & {"capital", "continent"}
    targets = {r.target for r in synthetic_task.eval_split()}
    assert not {f.value for f in unrel} & targets
    assert len({f.entity for f in unrel}) >= 32
    neigh = TASKS["synthetic"](SyntheticConfig(locality="neighbours"))
    near = [by_prompt[r.locality_prompt] for r in neigh.eval_split()]
    # neighbours: other (never edited) people asked the edited relations
    assert {f.relation for f in near} == edit_rel
    assert not {f.entity for f in near} & {w.facts[i].entity for i in w.eval_idx + w.train_idx}
    # the choice of probes changes neither the edits nor the world
    assert [r.prompt for r in neigh.eval_split()] == [r.prompt for r in synthetic_task.eval_split()]
    assert neigh.world.facts == w.facts
    with pytest.raises(ValueError, match="locality"):
        SyntheticConfig(locality="nearby")


def test_user_data_is_refused():
    with pytest.raises(ValueError, match="synthetic"):
        TASKS["synthetic"](SyntheticConfig(data="x.json"))


def test_tokenizer_knows_every_word_as_one_token():
    w = build_world()
    tok = build_tokenizer(w)
    ids = tok(w.corpus()[:200])["input_ids"]
    assert all(tok.unk_token_id not in row and row[0] == tok.bos_token_id for row in ids)
    assert all(len(tok(f.entity, add_special_tokens=False)["input_ids"]) == 1 for f in w.facts[:50])
    assert tok.unk_token_id in tok("Quixotic zebras")["input_ids"]


MICRO = TinySpec(world=SyntheticConfig(n_entities=6, n_locality_entities=4),
                 model=TinyModelConfig(n_layer=1, n_embd=32, n_head=2, n_inner=64, n_positions=32),
                 train=TinyTrainConfig(max_epochs=2, batch_size=16, warmup_steps=2))


def test_training_is_deterministic_for_a_seed():
    a, _ = train_tiny(MICRO)
    b, _ = train_tiny(MICRO)
    other, _ = train_tiny(TinySpec(MICRO.world, MICRO.model, TinyTrainConfig(**{**MICRO.train.__dict__, "seed": 1})))
    sa, sb, so = a.model.state_dict(), b.model.state_dict(), other.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], so[k]) for k in sa)
    assert MICRO.key() != TinySpec(world=SyntheticConfig(world_seed=1), model=MICRO.model, train=MICRO.train).key()


def test_cache_roundtrip_in_a_fresh_folder(tmp_path):
    first = load_tiny(tmp_path, MICRO)
    folder = tmp_path / "models" / f"tiny-gpt2-{MICRO.key()}"
    assert (folder / "model.safetensors").exists() and (folder / "tiny.json").exists()
    assert not list(folder.glob("*.bin"))  # safetensors only, no pickle
    t0 = time.perf_counter()
    again = load_tiny(tmp_path, MICRO)
    assert time.perf_counter() - t0 < 5  # no retraining
    assert again.key == first.key
    s1, s2 = first.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_tiny_gpt2_knows_its_facts(tiny_gpt2):
    acc = fact_accuracy(tiny_gpt2, build_world())
    assert acc["acc_template0"] >= 0.95
    assert acc["acc_rephrase"] >= 0.95
    assert acc["acc_counterfactual"] <= 0.2  # pre-edit the counterfactual targets are not predicted
    assert tiny_gpt2.arch == "gpt2" and tiny_gpt2.key.startswith("tiny-gpt2-")
    assert tiny_gpt2.info["acc_template0"] >= 0.95 and tiny_gpt2.info["train_s"] > 0


def test_tiny_gpt2_reload_reuses_the_cache(tiny_gpt2, results_cache):
    from bench.models import LoadContext, load_model

    t0 = time.perf_counter()
    again = load_model(LoadContext("tiny-gpt2", results_dir=results_cache))
    elapsed = time.perf_counter() - t0
    assert elapsed < 5  # training takes minutes; a cache hit is a file read
    assert again.key == tiny_gpt2.key
    s1, s2 = tiny_gpt2.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
