"""CounterFact's probability scores and generation entropy, as ROME and MEMIT define them.

Definitions (ROME, NeurIPS 2022, Section 3 and Appendix; checked against kmeng01/rome @ 0874014,
`experiments/py/eval_utils_counterfact.py` and `experiments/summarize.py`):

- Each prompt is scored with both answers, `target_new` and `target_true`, teacher-forced.
  The official code compares the *mean per-token* negative log-likelihood of each answer
  (`prob="token_mean"`, the default here, so the numbers match the published ones); the paper's
  text speaks of P(answer), the probability of the whole sequence (`prob="sequence"`). Both
  decide per answer sequence, never per token.
- Efficacy Score: fraction of rewrite prompts with P(new) > P(true); Efficacy Magnitude: mean
  P(new) - P(true). Paraphrase Score/Magnitude: the same on the paraphrase prompts.
  Neighborhood Score/Magnitude: P(true) > P(new) and P(true) - P(new) on the neighbourhood
  prompts. Each case first averages over its own prompts, then cases are averaged.
- Score: the harmonic mean of the three scores.
- Generation Entropy (fluency): per generated text, the weighted mean of its bi- and tri-gram
  entropies (weights 2/3 and 4/3, base 2), averaged over texts.
- Reference Score needs TF-IDF statistics of Wikipedia that are not available offline: not computed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

PROB_KINDS = ("token_mean", "sequence")

# ROME tokenises generations with nltk's word_tokenize; this regex splits words and punctuation
# the same way for plain text (contractions and some abbreviations split differently).
_WORD_RE = re.compile(r"\w+|[^\w\s]")


def answer_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per example: (sum of the answer tokens' log-probabilities, number of answer tokens).

    `labels[:, t]` is the target of `logits[:, t]`, -100 where not an answer token.
    """
    mask = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1), mask.sum(-1)


def answer_prob(sum_logprob: Tensor, n_tokens: Tensor, prob: str = "token_mean") -> Tensor:
    """P(answer): exp(mean token log-prob) (official ROME code) or exp(sum) (whole sequence)."""
    if prob == "token_mean":
        return torch.exp(sum_logprob / n_tokens.clamp_min(1))
    if prob == "sequence":
        return torch.exp(sum_logprob)
    raise ValueError(f"unknown prob {prob!r}; choose {', '.join(PROB_KINDS)}")


@dataclass
class PairScores:
    """P(new) and P(true) of every prompt of one probe kind, with the case each prompt belongs to."""

    p_new: Tensor
    p_true: Tensor
    case: Tensor  # (n,) case index of each prompt


def _per_case_mean(values: Tensor, case: Tensor) -> float:
    """Mean over cases of the mean over each case's prompts."""
    cases = torch.unique(case)
    return float(torch.stack([values[case == c].float().mean() for c in cases]).mean())


def probe_scores(s: PairScores, new_should_win: bool) -> tuple[float, float]:
    """(score, magnitude) of one probe kind: how often and by how much the wanted answer wins."""
    diff = (s.p_new - s.p_true) if new_should_win else (s.p_true - s.p_new)
    return _per_case_mean((diff > 0).float(), s.case), _per_case_mean(diff, s.case)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (as scipy.stats.hmean), NaN when any is NaN."""
    if any(math.isnan(v) for v in values):
        return float("nan")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def rome_scores(rewrite: PairScores, paraphrase: PairScores | None, neighborhood: PairScores) -> dict[str, float]:
    """Efficacy, Paraphrase and Neighborhood Score and Magnitude, and their harmonic mean `cf_score`."""
    out: dict[str, float] = {}
    out["cf_es"], out["cf_em"] = probe_scores(rewrite, new_should_win=True)
    if paraphrase is not None and len(paraphrase.case):
        out["cf_ps"], out["cf_pm"] = probe_scores(paraphrase, new_should_win=True)
    else:
        out["cf_ps"] = out["cf_pm"] = float("nan")
    out["cf_ns"], out["cf_nm"] = probe_scores(neighborhood, new_should_win=False)
    out["cf_score"] = harmonic_mean([out["cf_es"], out["cf_ps"], out["cf_ns"]])
    return out


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency of one text: mean over n of weight_n * entropy (bits) of its n-gram distribution."""
    words = _WORD_RE.findall(text)
    parts = []
    for n, w in zip(ns, weights, strict=True):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


def generation_entropy(texts: Sequence[str]) -> float:
    """Mean n-gram entropy over generated texts (ROME's `ngram_entropy`, arithmetic mean)."""
    if not texts:
        return float("nan")
    return sum(ngram_entropy(t) for t in texts) / len(texts)
