"""The metrics beside teacher-forced accuracy: generation-based success and CounterFact's probability scores.

`extra_metrics` scores one model state, as `bench.evaluation.metrics.evaluate` does, and returns flat metric
keys for the row plus the per-probe records that `--log-samples` writes:

- `es_gen`, `gs_gen`, `ls_gen` (every LM task): greedy decoding from the prompt alone
  (bench/evaluation/generation.py), success when the continuation begins with the answer after normalisation.
- `cf_es`, `cf_em`, `cf_ps`, `cf_pm`, `cf_ns`, `cf_nm`, `cf_score` (requests that carry `target_true`,
  i.e. CounterFact): ROME's probability comparisons (bench/evaluation/counterfact_scores.py), the official
  per-token-mean probabilities.
- `cf_fluency` (opt-in, `--fluency`; decoder-only LMs, requests that carry generation prompts): ROME's
  Generation Entropy of top-k sampled continuations (bench/evaluation/prefix_eval.py `sampled_texts`).

`evaluate_all` (what runs use) computes them with the teacher-forced metrics from one pass per batch of
prompts (bench/evaluation/prefix_eval.py); `extra_metrics` is the separate-pass path (one padded forward or one
`generate` call per batch), kept for encoder-decoders and over-long rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.evaluation.counterfact_scores import (
    PairScores,
    answer_logprobs,
    answer_prob,
    generation_entropy,
    rome_scores,
)
from bench.evaluation.generation import generation_success, matches
from bench.evaluation.metrics import Evaluation, combine, evaluate, probes
from bench.evaluation.prefix_eval import AnswerScores, sampled_texts, score_prompts, supported
from bench.models import EditableModel
from tasks.base import EditRequest

GEN_KEYS = ("es_gen", "gs_gen", "ls_gen")
CF_KEYS = ("cf_es", "cf_em", "cf_ps", "cf_pm", "cf_ns", "cf_nm", "cf_score")


@dataclass(frozen=True)
class ExtraOptions:
    """Which extra metrics a run computes (both on by default; each can be switched off)."""

    generation: bool = True
    cf_scores: bool = True
    fluency: bool = False  # ROME's Generation Entropy: 100 sampled tokens per generation prompt, so opt-in


@dataclass
class ExtraEval:
    """Extra metrics of one model state and, per probe kind, the greedy continuations (for samples)."""

    metrics: dict[str, float] = field(default_factory=dict)
    continuations: dict[str, list[str]] = field(default_factory=dict)
    gen_hits: dict[str, list[float]] = field(default_factory=dict)


@torch.no_grad()
def answer_probs(em: EditableModel, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """P(answer | prompt) per prompt (mean token log-prob, as ROME's code), one padded forward per batch."""
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = em.encode(prompts[i : i + batch_size], answers[i : i + batch_size])
        logits = em.logits(batch)
        out.append(answer_prob(*answer_logprobs(logits, batch.labels.to(logits.device))).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def pair_scores(em: EditableModel, prompts: Sequence[str], new: Sequence[str], true: Sequence[str],
                case: Sequence[int]) -> PairScores:
    """P(target_new) and P(target_true) of every prompt; both answers of a prompt in one forward pass."""
    n = len(prompts)
    p = answer_probs(em, list(prompts) * 2, list(new) + list(true))
    return PairScores(p[:n], p[n:], torch.tensor(list(case), dtype=torch.long))


def counterfact_scores(em: EditableModel, requests: Sequence[EditRequest]) -> dict[str, float]:
    """ROME's Efficacy / Paraphrase / Neighborhood Score and Magnitude and their harmonic mean."""
    def kind(prompts_of: Any) -> PairScores:
        rows = [(p, r.target, r.target_true, c) for c, r in enumerate(requests) for p in prompts_of(r)]
        return pair_scores(em, [x[0] for x in rows], [x[1] for x in rows], [x[2] for x in rows], [x[3] for x in rows])

    rewrite = kind(lambda r: (r.prompt,))
    paraphrase = kind(lambda r: r.rephrases) if any(r.rephrases for r in requests) else None
    neighborhood = kind(lambda r: r.neighborhood_prompts or (r.locality_prompt,))
    return rome_scores(rewrite, paraphrase, neighborhood)


def combine_all(pre: Evaluation, post: Evaluation, pre_x: ExtraEval, post_x: ExtraEval) -> dict[str, float]:
    """`bench.evaluation.metrics.combine` plus the extra metrics of both states (`pre_` for the unedited one): one row's metrics."""
    out = combine(pre, post)
    out.update(post_x.metrics)
    out.update({f"pre_{k}": v for k, v in pre_x.metrics.items()})
    return out


def extra_metrics(em: EditableModel, requests: Sequence[EditRequest], opts: ExtraOptions) -> ExtraEval:
    """The extra metrics `opts` asks for that apply to this model and these requests (none for classifiers)."""
    out = ExtraEval()
    if em.kind != "lm":
        return out
    if opts.generation:
        for key, (prompts, answers) in probes(requests).items():
            if not prompts:
                out.metrics[f"{key}_gen"] = float("nan")
                continue
            hits, texts = generation_success(em, prompts, answers)
            out.metrics[f"{key}_gen"] = sum(hits) / len(hits)
            out.continuations[key], out.gen_hits[key] = texts, hits
    if opts.cf_scores and requests and all(r.target_true for r in requests):
        out.metrics.update(counterfact_scores(em, requests))
    return out


def evaluate_all(em: EditableModel, requests: Sequence[EditRequest], opts: ExtraOptions) -> tuple[Evaluation, ExtraEval]:
    """`bench.evaluation.metrics.evaluate` and `extra_metrics` of one model state, each prompt run once where the model allows
    (bench/evaluation/prefix_eval.py); otherwise, or when a row would be truncated, the two separate passes."""
    shared = _evaluate_shared(em, requests, opts) if supported(em) else None
    ev, ex = shared if shared is not None else (evaluate(em, requests), extra_metrics(em, requests, opts))
    if opts.fluency and supported(em) and requests and all(r.generation_prompts for r in requests):
        ex.metrics["cf_fluency"] = generation_entropy(sampled_texts(em, [p for r in requests for p in r.generation_prompts]))
    return ev, ex


def _evaluate_shared(em: EditableModel, requests: Sequence[EditRequest],
                     opts: ExtraOptions) -> tuple[Evaluation, ExtraEval] | None:
    cf = opts.cf_scores and bool(requests) and all(r.target_true for r in requests)
    es_case = list(range(len(requests)))
    gs_case = [c for c, r in enumerate(requests) for _ in r.rephrases]
    nb = [(p, c) for c, r in enumerate(requests) for p in (r.neighborhood_prompts or (r.locality_prompt,))]
    ls_prompts = [r.locality_prompt for r in requests]
    nb_on_ls = [p for p, _ in nb] == ls_prompts  # no separate neighbourhood prompts: score them with the LS probes
    new = [r.target for r in requests]
    true = [r.target_true or "" for r in requests]
    ev, ex, pairs = Evaluation({}, []), ExtraEval(), {}
    for key, (prompts, answers) in probes(requests).items():
        if not prompts:
            ev.metrics[key] = ev.metrics[f"{key}_seq"] = float("nan")
            if opts.generation:
                ex.metrics[f"{key}_gen"] = float("nan")
            continue
        case = {"es": es_case, "gs": gs_case, "ls": es_case}[key]
        sets = [answers]
        if cf and key in ("es", "gs"):  # their answer is target_new: one more set, target_true
            sets.append([true[c] for c in case])
        if cf and key == "ls" and nb_on_ls:
            sets += [[new[c] for c in case], [true[c] for c in case]]
        got = score_prompts(em, prompts, sets, answers if opts.generation else None)
        if got is None:
            return None
        scores, texts = got
        s = scores[0]
        ev.metrics[key] = sum(s.acc) / len(s.acc)
        ev.metrics[f"{key}_seq"] = sum(s.seq) / len(s.seq)
        ev.hits[key] = s.acc
        if key == "ls":
            ev.loc_pred = s.pred
        if texts is not None:
            hits = [float(matches(t, a)) for t, a in zip(texts, answers, strict=True)]
            ex.metrics[f"{key}_gen"] = sum(hits) / len(hits)
            ex.continuations[key], ex.gen_hits[key] = texts, hits
        if cf and key in ("es", "gs"):
            pairs[key] = _pair(scores[0], scores[1], case)
        if cf and key == "ls" and nb_on_ls:
            pairs["nb"] = _pair(scores[1], scores[2], case)
    if cf:
        if "nb" not in pairs:
            got = score_prompts(em, [p for p, _ in nb], [[new[c] for _, c in nb], [true[c] for _, c in nb]])
            if got is None:
                return None
            pairs["nb"] = _pair(got[0][0], got[0][1], [c for _, c in nb])
        ex.metrics.update(rome_scores(pairs["es"], pairs.get("gs"), pairs["nb"]))
    return ev, ex


def _pair(new: AnswerScores, true: AnswerScores, case: Sequence[int]) -> PairScores:
    """CounterFact's P(new) and P(true) per prompt (official per-token mean) from two answer sets' log-probs."""
    return PairScores(answer_prob(new.sum_logprob, new.n_tokens), answer_prob(true.sum_logprob, true.n_tokens),
                      torch.tensor(list(case), dtype=torch.long))
