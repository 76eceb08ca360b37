"""Metric definitions checked on hand-made logits."""

import math

import pytest
import torch

from bench.evaluation.metrics import Evaluation, agreement, answer_token_hits, combine, relative_residual


def one_hot_logits(pred: list[list[int]], vocab: int = 5) -> torch.Tensor:
    """Logits whose argmax at (b, t) is pred[b][t]."""
    t = torch.tensor(pred)
    return torch.nn.functional.one_hot(t, vocab).float()


def test_token_accuracy_counts_only_answer_positions():
    # Example 0: answer tokens at positions 1, 2 -> targets 3, 4; predictions 3 (right), 0 (wrong).
    # Example 1: answer token at position 0 -> target 2; prediction 2 (right). Other positions ignored.
    logits = one_hot_logits([[1, 3, 0], [2, 4, 4]])
    labels = torch.tensor([[-100, 3, 4], [2, -100, -100]])
    acc, seq, pred = answer_token_hits(logits, labels)
    assert acc.tolist() == [0.5, 1.0]
    assert seq.tolist() == [0.0, 1.0]
    assert pred.tolist() == [[-100, 3, 0], [2, -100, -100]]


def test_padding_and_non_answer_positions_never_count():
    logits = one_hot_logits([[4, 4, 4, 4]])
    labels = torch.tensor([[-100, -100, 4, -100]])
    acc, seq, _ = answer_token_hits(logits, labels)
    assert acc.item() == 1.0 and seq.item() == 1.0


def test_example_without_answer_tokens_is_an_error():
    with pytest.raises(ValueError):
        answer_token_hits(one_hot_logits([[1, 2]]), torch.tensor([[-100, -100]]))


def test_ls_agree_is_mean_per_probe_fraction_of_unchanged_argmax():
    pre = [torch.tensor([1, 2, 3, 4]), torch.tensor([7])]
    post = [torch.tensor([1, 2, 0, 0]), torch.tensor([7])]
    assert agreement(pre, post) == pytest.approx((0.5 + 1.0) / 2)


def test_combine_prefixes_pre_metrics_and_adds_agreement():
    pre = Evaluation({"es": 0.1, "gs": 0.2, "ls": 0.9}, [torch.tensor([1])])
    post = Evaluation({"es": 0.95, "gs": 0.8, "ls": 0.85}, [torch.tensor([2])])
    out = combine(pre, post)
    assert out["es"] == 0.95 and out["pre_es"] == 0.1 and out["pre_ls"] == 0.9
    assert out["ls_agree"] == 0.0


def test_relative_residual_zero_for_exact_map_and_one_for_zero_map():
    torch.manual_seed(0)
    S = torch.randn(3, 4, dtype=torch.float64)
    U = torch.randn(6, 4, dtype=torch.float64)
    assert relative_residual(S, U, U @ S.T) < 1e-12
    assert math.isclose(relative_residual(torch.zeros(3, 4, dtype=torch.float64), U, U @ S.T), 1.0)
