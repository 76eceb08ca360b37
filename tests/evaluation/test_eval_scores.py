"""CounterFact probability scores, generation entropy and generation-based success."""

from __future__ import annotations

import math

import pytest
import torch

from bench.evaluation.counterfact_scores import (
    PairScores,
    answer_logprobs,
    answer_prob,
    generation_entropy,
    harmonic_mean,
    ngram_entropy,
    rome_scores,
)
from bench.evaluation.generation import generation_success, greedy_continuations, matches, normalise
from bench.evaluation.metrics import score_lm

V = 6


def logits_for(token_probs: list[tuple[int, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, T, V) logits and (1, T) labels: position t gives token `tok_t` probability `p_t`, the rest spread."""
    rows, labels = [], []
    for tok, p in token_probs:
        probs = torch.full((V,), (1 - p) / (V - 1))
        probs[tok] = p
        rows.append(probs.log())
        labels.append(tok)
    return torch.stack(rows)[None], torch.tensor([labels])


def pair(new: list[tuple[int, float]], true: list[tuple[int, float]], prob: str) -> tuple[float, float]:
    ln, yn = logits_for(new)
    lt, yt = logits_for(true)
    return float(answer_prob(*answer_logprobs(ln, yn), prob)), float(answer_prob(*answer_logprobs(lt, yt), prob))


def test_the_winner_is_decided_per_answer_sequence_not_per_token():
    # new: its first token is far likelier than true's (0.9 vs 0.3), its second far less (0.01 vs 0.3).
    # Token by token, new wins the first position; as sequences, true wins (0.009 < 0.09; 0.095 < 0.3).
    new, true = [(1, 0.9), (2, 0.01)], [(3, 0.3), (4, 0.3)]
    for prob in ("token_mean", "sequence"):
        p_new, p_true = pair(new, true, prob)
        s = PairScores(torch.tensor([p_new]), torch.tensor([p_true]), torch.tensor([0]))
        scores = rome_scores(s, s, s)
        assert scores["cf_es"] == 0.0 and scores["cf_ps"] == 0.0
        assert scores["cf_ns"] == 1.0  # the neighbourhood wants true to win
        assert scores["cf_em"] == pytest.approx(p_new - p_true) and scores["cf_em"] < 0
        assert scores["cf_score"] == 0.0  # harmonic mean with a zero


def test_token_mean_is_the_official_default_and_differs_from_the_sequence_probability():
    # new: one token at 0.3; true: two tokens at 0.5 each. Sequence: 0.3 > 0.25, new wins;
    # mean token NLL (kmeng01/rome test_batch_prediction): exp(mean log p) 0.3 < 0.5, true wins.
    new, true = [(1, 0.3)], [(3, 0.5), (4, 0.5)]
    p_new, p_true = pair(new, true, "sequence")
    assert p_new == pytest.approx(0.3) and p_true == pytest.approx(0.25)
    p_new, p_true = pair(new, true, "token_mean")
    assert p_new == pytest.approx(0.3) and p_true == pytest.approx(0.5)
    with pytest.raises(ValueError):
        answer_prob(torch.zeros(1), torch.ones(1), "per_token")


def test_cases_are_averaged_after_their_own_prompts():
    # case 0: one win, one loss; case 1: one win -> (0.5 + 1) / 2 = 0.75, not 2/3 over prompts
    s = PairScores(torch.tensor([0.6, 0.1, 0.7]), torch.tensor([0.2, 0.3, 0.1]), torch.tensor([0, 0, 1]))
    out = rome_scores(s, None, s)
    assert out["cf_es"] == pytest.approx(0.75)
    assert out["cf_em"] == pytest.approx(((0.4 - 0.2) / 2 + 0.6) / 2)
    assert out["cf_ns"] == pytest.approx(0.25)
    assert math.isnan(out["cf_ps"]) and math.isnan(out["cf_score"])


def test_harmonic_mean():
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
    assert harmonic_mean([1.0, 0.0, 0.5]) == 0.0


def test_ngram_entropy_by_hand_and_repetition_scores_lower():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("the the the the the the") < ngram_entropy("the cat sat on a warm mat today")
    assert math.isnan(generation_entropy([]))


def test_normalisation_and_matching():
    assert normalise("  Paris. ") == "paris"
    assert matches(" Paris, France", "Paris") and matches(" paris", "PARIS") and matches("Paris\nNext", "Paris")
    assert matches(" Paris is", "Paris") and matches(" St. Louis is", "St. Louis")
    assert not matches(" Parisian", "Paris") and not matches(" Par", "Paris") and not matches(" ", "Paris")
    assert not matches(" Lyon, Paris", "Paris") and not matches(" St Louis", "St. Louis")


def test_greedy_decoding_is_batch_invariant_and_can_disagree_with_teacher_forcing(tiny_gpt2, synthetic_task):
    em = tiny_gpt2
    reqs = synthetic_task.sample(6, seed=3)
    prompts = [r.prompt for r in reqs]
    one_by_one = [greedy_continuations(em, [p], ["x y"], margin=0)[0] for p in prompts]
    batched = greedy_continuations(em, prompts, ["x y"] * len(prompts), margin=0, batch_size=4)
    assert batched == one_by_one  # left padding does not change what is generated

    # Targets built from the model's own greedy words: the first generated word is a success both
    # ways; that word followed by a word it does not generate next is half right teacher-forced
    # (its first token is the argmax) but fails once the model generates freely.
    words = [c.split() for c in one_by_one]
    vocab = [w for w in em.tokenizer.get_vocab() if w.isalpha()]
    good = [w[0] for w in words]
    bad = [f"{w[0]} {next(v for v in vocab if v != w[1])}" for w in words]
    gen_good, _ = generation_success(em, prompts, good, margin=2)
    gen_bad, texts = generation_success(em, prompts, bad, margin=0)
    tf_bad = score_lm(em, prompts, bad)
    assert gen_good == [1.0] * len(prompts)
    assert gen_bad == [0.0] * len(prompts)
    assert all(a == pytest.approx(0.5) for a in tf_bad.acc)  # teacher forcing credits the first token
    assert all(t.split()[0] == w[0] for t, w in zip(texts, words, strict=True))
