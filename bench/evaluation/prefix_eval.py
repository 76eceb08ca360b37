"""Score many answers and a greedy continuation of each prompt while running the prompt only once.

A model state's evaluation asks three things of the same prompt: the teacher-forced token hits of
its answer, CounterFact's probabilities of two answers (target_new and target_true), and a greedy
continuation. As separate padded forwards, each of them recomputes the prompt, which is most of every
sequence (zsRE and CounterFact answers are one to three tokens). Here each batch of prompts is run
once, left-padded with explicit positions, and every answer and the greedy decode continue from its
key/value cache (cropped back to the prompt in between). It is the same causal computation, so the
scores equal the separate passes to float rounding (tests/evaluation/test_prefix_eval.py); the output head is
applied only where a token is scored.

Decoder-only language models only; `fits` says when a call would need the prompt truncation of
`EditableModel.encode` (prompt + answer beyond `max_length`), and then callers use the separate passes.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.evaluation.counterfact_scores import answer_logprobs
from bench.evaluation.metrics import answer_token_hits
from bench.models import EditableModel, cache_kwarg, output_cache
from tasks.base import answer_text


@dataclass
class AnswerScores:
    """Teacher-forced scores of one answer per prompt: token accuracy, all-right flag, predictions, log-probs."""

    acc: list[float]
    seq: list[float]
    pred: list[Tensor]  # per prompt: argmax at the answer positions
    sum_logprob: Tensor  # (n,) sum of the answer tokens' log-probabilities
    n_tokens: Tensor  # (n,) answer length in tokens


@dataclass
class _Encoded:
    prompts: list[list[int]]
    answers: list[list[list[int]]]  # per answer set, per prompt
    budgets: list[int] | None  # greedy tokens per prompt


def supported(em: EditableModel) -> bool:
    """Whether the shared-prefix path applies: a decoder-only LM (encoder-decoders score the answer in the decoder)."""
    return em.kind == "lm" and not em.is_seq2seq


def _encode(em: EditableModel, prompts: Sequence[str], answer_sets: Sequence[Sequence[str]],
            gen_answers: Sequence[str] | None, margin: int) -> _Encoded:
    tok = em.tokenizer
    p_ids = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    sets = []
    for answers in answer_sets:
        ids = [tok(answer_text(p, a), add_special_tokens=False)["input_ids"] for p, a in zip(prompts, answers, strict=True)]
        if any(not a for a in ids):
            bad = next(a for a, i in zip(answers, ids, strict=True) if not i)
            raise ValueError(f"answer {bad!r} tokenises to nothing")
        sets.append(ids)
    budgets = None
    if gen_answers is not None:
        budgets = [len(tok(answer_text(p, a), add_special_tokens=False)["input_ids"]) + margin
                   for p, a in zip(prompts, gen_answers, strict=True)]
    return _Encoded(p_ids, sets, budgets)


def fits(em: EditableModel, enc: _Encoded) -> bool:
    """Whether no row would be truncated: every prompt + answer (or + greedy budget) within `max_length`."""
    for j, p in enumerate(enc.prompts):
        longest = max([len(s[j]) for s in enc.answers] + ([enc.budgets[j]] if enc.budgets else []))
        if len(p) + longest > em.max_length:
            return False
    return True


class _Prefix:
    """One batch of left-padded prompts run once; answers and greedy steps continue its cache."""

    def __init__(self, em: EditableModel, prompts: list[list[int]]) -> None:
        self.em, self.head = em, em.plain_head()
        self.net = em.model if self.head is None else em.model.base_model  # base_model: the head runs where scored
        self.kw = cache_kwarg(self.net)
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, P), em.pad_id, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding: every prompt ends at column P - 1
            ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[b, P - len(p):] = 1
        self.P, self.mask = P, mask.to(em.device)
        self.lengths = self.mask.sum(-1)
        positions = (self.mask.cumsum(-1) - 1).clamp_min(0)
        out = self._forward(ids.to(em.device), self.mask, positions, cache=None)
        self.cache = out[1]
        self.last = self._logits(out[0][:, -1])  # (B, V): the logits that predict each prompt's first answer token

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: object | None) -> tuple[Tensor, object]:
        kw = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": True, self.kw: cache}
        out = self.net(**kw)
        return (out.logits if self.head is None else out.last_hidden_state), output_cache(out)

    def _rewind(self) -> None:
        """Drop what answers or greedy steps appended: the cache holds the prompts again."""
        extra = self.cache.get_seq_length() - self.P
        if extra > 0:
            self.cache.crop(-extra)

    def _logits(self, hidden: Tensor) -> Tensor:
        return hidden if self.head is None else self.head(hidden)

    def score(self, answers: list[list[int]]) -> tuple[Tensor, Tensor]:
        """(logits (B, A, V), labels (B, A)): logits[:, t] scores answer token t (-100 labels on padding)."""
        B, A = len(answers), max(len(a) for a in answers)
        ids = torch.full((B, A), self.em.pad_id, dtype=torch.long)
        labels = torch.full((B, A), -100, dtype=torch.long)
        amask = torch.zeros((B, A), dtype=torch.long)
        for b, a in enumerate(answers):
            ids[b, : len(a)] = labels[b, : len(a)] = torch.tensor(a, dtype=torch.long)
            amask[b, : len(a)] = 1
        logits = self.last.unsqueeze(1)
        if A > 1:  # the last answer token predicts nothing that is scored: feed only the first A - 1
            dev = self.em.device
            positions = self.lengths.unsqueeze(1) + torch.arange(A - 1, device=dev)
            hidden, _ = self._forward(ids[:, : A - 1].to(dev), torch.cat([self.mask, amask[:, : A - 1].to(dev)], 1),
                                      positions, self.cache)
            logits = torch.cat([logits, self._logits(hidden)], 1)
            self._rewind()
        return logits, labels.to(logits.device)

    def greedy(self, budgets: list[int], eos: int | None) -> list[list[int]]:
        """Greedy token ids per prompt, `budgets[b]` long at most, cut at the end-of-sequence token."""
        n = max(budgets)
        cur = self.last.argmax(-1)
        steps, mask = [cur], self.mask
        done = cur == eos if eos is not None else torch.zeros_like(cur, dtype=torch.bool)
        for t in range(1, n):
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            hidden, _ = self._forward(cur.unsqueeze(1), mask, (self.lengths + t - 1).unsqueeze(1), self.cache)
            cur = self._logits(hidden[:, -1]).argmax(-1)
            steps.append(cur)
            if eos is not None:
                done |= cur == eos
        self._rewind()
        gen = torch.stack(steps, 1).cpu().tolist()
        out = []
        for b, budget in enumerate(budgets):
            ids = gen[b][:budget]
            out.append(ids[: ids.index(eos)] if eos is not None and eos in ids else ids)
        return out

    def sample(self, budgets: list[int], top_k: int, generator: torch.Generator) -> list[list[int]]:
        """Top-k sampled token ids per prompt, `budgets[b]` long, not stopped at end-of-sequence (as ROME's)."""
        n = max(budgets)
        steps, mask, logits = [], self.mask, self.last
        for t in range(n):
            if t:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                hidden, _ = self._forward(steps[-1].unsqueeze(1), mask, (self.lengths + t - 1).unsqueeze(1), self.cache)
                logits = self._logits(hidden[:, -1])
            probs, idx = torch.softmax(logits.float(), -1).topk(top_k, -1)
            pick = torch.multinomial((probs / probs.sum(-1, keepdim=True)).cpu(), 1, generator=generator)
            steps.append(idx.gather(1, pick.to(idx.device)).squeeze(1))
        self._rewind()
        gen = torch.stack(steps, 1).cpu().tolist() if steps else [[] for _ in budgets]
        return [gen[b][:budget] for b, budget in enumerate(budgets)]


@torch.no_grad()
def score_prompts(em: EditableModel, prompts: Sequence[str], answer_sets: Sequence[Sequence[str]],
                  gen_answers: Sequence[str] | None = None, margin: int = 3,
                  batch_size: int = 32) -> tuple[list[AnswerScores], list[str] | None] | None:
    """Per answer set its teacher-forced scores and, with `gen_answers`, each prompt's greedy continuation
    (`len(answer tokens) + margin` tokens, as bench.evaluation.generation); None when a row would be truncated."""
    enc = _encode(em, prompts, answer_sets, gen_answers, margin)
    if not fits(em, enc):
        return None
    n = len(prompts)
    order = sorted(range(n), key=lambda j: len(enc.prompts[j]))  # batch prompts of similar length: less padding
    acc = [[0.0] * n for _ in answer_sets]
    seq = [[0.0] * n for _ in answer_sets]
    pred: list[list[Tensor | None]] = [[None] * n for _ in answer_sets]
    slp = [torch.zeros(n) for _ in answer_sets]
    ntok = [torch.zeros(n, dtype=torch.long) for _ in answer_sets]
    texts: list[str] | None = [""] * n if enc.budgets is not None else None
    eos = em.tokenizer.eos_token_id
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        prefix = _Prefix(em, [enc.prompts[j] for j in idx])
        if texts is not None and enc.budgets is not None:
            for j, ids in zip(idx, prefix.greedy([enc.budgets[j] for j in idx], eos), strict=True):
                texts[j] = em.tokenizer.decode(ids, skip_special_tokens=True)
        for s, answers in enumerate(enc.answers):
            logits, labels = prefix.score([answers[j] for j in idx])
            a, q, p = answer_token_hits(logits, labels)
            lp, nt = answer_logprobs(logits, labels)
            for k, j in enumerate(idx):
                acc[s][j], seq[s][j] = float(a[k]), float(q[k])
                pred[s][j] = p[k][p[k] != -100].cpu()
            slp[s][idx], ntok[s][idx] = lp.float().cpu(), nt.cpu()
    scores = [AnswerScores(acc[s], seq[s], pred[s], slp[s], ntok[s]) for s in range(len(answer_sets))]  # type: ignore[arg-type]
    return scores, texts


@torch.no_grad()
def sampled_texts(em: EditableModel, prompts: Sequence[str], max_out_len: int = 100, top_k: int = 5, seed: int = 0,
                  batch_size: int = 64) -> list[str]:
    """ROME's fluency generations: each prompt continued by top-k sampling to `max_out_len` tokens in all (prompt
    included, capped at the model's `max_length`), decoded with the prompt; seeded, so both model states draw alike."""
    tok = em.tokenizer
    total = min(max_out_len, em.max_length)
    ids = [tok(p, add_special_tokens=True)["input_ids"][-max(1, total - 1):] for p in prompts]
    gen = torch.Generator().manual_seed(seed)
    texts = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda j: len(ids[j]))
    for i in range(0, len(prompts), batch_size):
        idx = order[i : i + batch_size]
        budgets = [total - len(ids[j]) for j in idx]
        for j, new in zip(idx, _Prefix(em, [ids[j] for j in idx]).sample(budgets, top_k, gen), strict=True):
            text = tok.decode(ids[j] + new, skip_special_tokens=True)
            texts[j] = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    return texts
