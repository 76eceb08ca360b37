"""The shared-prefix evaluation (bench/evaluation/prefix_eval.py) gives what the separate passes give, to float rounding."""

from __future__ import annotations

import dataclasses
import math

import pytest

from bench.evaluation.eval_extra import ExtraOptions, _evaluate_shared, evaluate_all, extra_metrics
from bench.evaluation.generation import greedy_continuations
from bench.evaluation.metrics import evaluate, score_lm
from bench.evaluation.prefix_eval import score_prompts


def _counterfact_like(reqs, with_neighbourhood: bool):
    """Synthetic requests with a target_true (another request's answer) and, optionally, neighbourhood prompts."""
    out = []
    for k, r in enumerate(reqs):
        other = reqs[(k + 1) % len(reqs)]
        extra = dict(neighborhood_prompts=(other.prompt, other.locality_prompt)) if with_neighbourhood else {}
        out.append(dataclasses.replace(r, target_true=other.target, **extra))
    return out


def _separate(em, reqs, opts):
    return evaluate(em, reqs), extra_metrics(em, reqs, opts)


def _assert_same(a, b):
    (ev_a, ex_a), (ev_b, ex_b) = a, b
    assert ev_a.metrics.keys() == ev_b.metrics.keys() and ex_a.metrics.keys() == ex_b.metrics.keys()
    for k in ev_a.metrics:
        assert ev_a.metrics[k] == pytest.approx(ev_b.metrics[k], abs=1e-9, nan_ok=True), k
    assert ev_a.hits == ev_b.hits
    assert [p.tolist() for p in ev_a.loc_pred] == [p.tolist() for p in ev_b.loc_pred]
    for k in ex_a.metrics:  # CounterFact magnitudes are probabilities: equal to rounding
        assert ex_a.metrics[k] == pytest.approx(ex_b.metrics[k], abs=1e-5, nan_ok=True), k
    assert ex_a.continuations == ex_b.continuations and ex_a.gen_hits == ex_b.gen_hits


@pytest.mark.parametrize("neighbourhood", [False, True])
def test_shared_prefix_equals_separate_passes_on_tiny_gpt2(tiny_gpt2, synthetic_task, neighbourhood):
    reqs = _counterfact_like(synthetic_task.sample(40, seed=5), neighbourhood)
    opts = ExtraOptions()
    shared = _evaluate_shared(tiny_gpt2, reqs, opts)
    assert shared is not None  # the fast path ran
    _assert_same(shared, _separate(tiny_gpt2, reqs, opts))
    assert {"cf_es", "cf_ps", "cf_ns", "cf_score", "es_gen"} <= shared[1].metrics.keys()


def test_options_off_and_no_counterfact_fields(tiny_gpt2, synthetic_task):
    reqs = synthetic_task.sample(12, seed=1)
    for opts in (ExtraOptions(), ExtraOptions(generation=False), ExtraOptions(generation=False, cf_scores=False)):
        shared = _evaluate_shared(tiny_gpt2, reqs, opts)
        assert shared is not None
        _assert_same(shared, _separate(tiny_gpt2, reqs, opts))
    assert not any(k.startswith("cf_") for k in shared[1].metrics)


def test_scores_and_greedy_match_the_padded_forward_and_generate(tiny_gpt2, synthetic_task):
    """Per prompt: teacher-forced hits equal `score_lm`'s, log-probs equal the padded forward's, greedy equals `generate`."""
    reqs = synthetic_task.sample(20, seed=2)
    prompts, answers = [r.prompt for r in reqs], [r.target for r in reqs]
    (s,), texts = score_prompts(tiny_gpt2, prompts, [answers], answers, margin=3, batch_size=7)
    ref = score_lm(tiny_gpt2, prompts, answers)
    assert s.acc == ref.acc and s.seq == ref.seq
    assert texts == greedy_continuations(tiny_gpt2, prompts, answers, margin=3)
    assert all(math.isfinite(x) and x <= 0 for x in s.sum_logprob.tolist())


def test_a_row_that_would_be_truncated_takes_the_separate_passes(tiny_gpt2, synthetic_task):
    reqs = synthetic_task.sample(4, seed=0)
    long = [dataclasses.replace(reqs[0], prompt=" ".join([reqs[0].prompt] * 60))] + reqs[1:]
    assert score_prompts(tiny_gpt2, [r.prompt for r in long], [[r.target for r in long]]) is None
    _assert_same(evaluate_all(tiny_gpt2, long, ExtraOptions()), _separate(tiny_gpt2, long, ExtraOptions()))


def test_encoder_decoder_models_take_the_separate_passes(tiny_t5, synthetic_task):
    reqs = synthetic_task.sample(8, seed=0)
    _assert_same(evaluate_all(tiny_t5, reqs, ExtraOptions()), _separate(tiny_t5, reqs, ExtraOptions()))


@pytest.mark.slow
def test_shared_prefix_equals_separate_passes_on_smollm2_counterfact(smollm2):
    from tasks import TASKS

    task = TASKS["counterfact"](TASKS["counterfact"].config_cls(source="shipped"))
    reqs = task.sample(32, 0)
    shared = _evaluate_shared(smollm2, reqs, ExtraOptions())
    assert shared is not None
    _assert_same(shared, _separate(smollm2, reqs, ExtraOptions()))


def test_fluency_is_opt_in_seeded_and_rome_shaped(tiny_gpt2, synthetic_task):
    """ROME's Generation Entropy: top-k samples to a fixed total length, prompt included; same seed, same texts."""
    from bench.evaluation.counterfact_scores import generation_entropy
    from bench.evaluation.prefix_eval import sampled_texts

    reqs = [dataclasses.replace(r, generation_prompts=(r.prompt, r.locality_prompt)) for r in synthetic_task.sample(6, 4)]
    prompts = [p for r in reqs for p in r.generation_prompts]
    texts = sampled_texts(tiny_gpt2, prompts, max_out_len=24, seed=0, batch_size=5)
    assert texts == sampled_texts(tiny_gpt2, prompts, max_out_len=24, seed=0, batch_size=5)
    assert texts != sampled_texts(tiny_gpt2, prompts, max_out_len=24, seed=1, batch_size=5)
    tok = tiny_gpt2.tokenizer
    for p, t in zip(prompts, texts, strict=True):
        assert t.startswith(p) and len(tok(t)["input_ids"]) > len(tok(p)["input_ids"])
    assert "cf_fluency" not in evaluate_all(tiny_gpt2, reqs, ExtraOptions())[1].metrics
    got = evaluate_all(tiny_gpt2, reqs, ExtraOptions(fluency=True))[1].metrics["cf_fluency"]
    assert got == pytest.approx(generation_entropy(sampled_texts(tiny_gpt2, prompts)))
    assert 0 < got < 20


def test_fluency_enters_the_config_only_when_on(tiny_gpt2):
    from bench.core.config import RunConfig
    from bench.runner.run import resolve

    base = resolve(RunConfig(editor="ft", model="tiny-gpt2", task="synthetic", n_edits=16))
    on = resolve(RunConfig(editor="ft", model="tiny-gpt2", task="synthetic", n_edits=16, fluency=True))
    assert "eval" not in base.config and on.config["eval"] == {"fluency": True}
    assert on.config_hash != base.config_hash


def test_models_without_a_plain_head_use_the_full_forward(tiny_gpt2, synthetic_task, monkeypatch):
    reqs = _counterfact_like(synthetic_task.sample(10, seed=6), False)
    monkeypatch.setattr(type(tiny_gpt2), "plain_head", lambda self: None)
    shared = _evaluate_shared(tiny_gpt2, reqs, ExtraOptions())
    assert shared is not None
    _assert_same(shared, _separate(tiny_gpt2, reqs, ExtraOptions()))
