"""Generation-based success: greedy decoding from the prompt alone, no teacher forcing.

Teacher-forced token accuracy feeds the model the gold answer's earlier tokens; an edit can score
well that way and still fail once the model generates freely ("The Mirage of Model Editing",
2025). Here each prompt is decoded greedily for the answer's token count plus `margin` tokens,
one `generate` call (with its key/value cache) per batch, and the continuation succeeds when,
after normalisation (case, surrounding whitespace and punctuation), it begins with the target as
whole words: "Paris" succeeds on " Paris, France" and " Paris is", fails on " Parisian" and " Par".
Models rarely stop right after a short answer, so demanding the continuation to end there would
score the margin, not the edit; the price is that "Paris" also succeeds on " Paris Hilton".
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import torch

from bench.models import EditableModel
from tasks.base import answer_text

_STRIP = string.whitespace + string.punctuation


def normalise(text: str) -> str:
    """Lower-case, collapse inner whitespace, strip surrounding whitespace and punctuation."""
    return " ".join(text.lower().split()).strip(_STRIP)


def matches(continuation: str, target: str) -> bool:
    """Whether a greedy continuation begins with `target` as whole words (see the module docstring)."""
    want = normalise(target)
    got = " ".join(continuation.lower().split()).lstrip(_STRIP)
    if not want or not got.startswith(want):
        return False
    rest = got[len(want):]
    return rest == "" or rest[0] in _STRIP  # the target ends at a word boundary, not inside a word


@torch.no_grad()
def greedy_continuations(em: EditableModel, prompts: Sequence[str], answers: Sequence[str], margin: int = 3,
                         batch_size: int = 32) -> list[str]:
    """Greedy continuation of each prompt, `len(answer tokens) + margin` tokens long, batched and left-padded."""
    tok = em.tokenizer
    pad_id = em.pad_id
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        ps, ans = prompts[i : i + batch_size], answers[i : i + batch_size]
        p_ids = [tok(p, add_special_tokens=True)["input_ids"] for p in ps]
        budgets = [len(tok(answer_text(p, a), add_special_tokens=False)["input_ids"]) + margin
                   for p, a in zip(ps, ans, strict=True)]
        p_ids = [ids[-max(1, em.max_length - b):] for ids, b in zip(p_ids, budgets, strict=True)]
        T = max(len(ids) for ids in p_ids)
        input_ids = torch.full((len(ps), T), pad_id, dtype=torch.long)
        attn = torch.zeros((len(ps), T), dtype=torch.long)
        for b, ids in enumerate(p_ids):  # left padding: every row's next token sits at the same column
            input_ids[b, T - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attn[b, T - len(ids):] = 1
        gen = em.model.generate(input_ids=input_ids.to(em.device), attention_mask=attn.to(em.device),
                                max_new_tokens=max(budgets), do_sample=False, num_beams=1, pad_token_id=pad_id,
                                eos_token_id=tok.eos_token_id)
        # a decoder-only model returns prompt + continuation; an encoder-decoder one its decoder start + continuation
        new = (gen[:, 1:] if em.is_seq2seq else gen[:, T:]).cpu()
        for b, budget in enumerate(budgets):
            ids = new[b, :budget].tolist()
            if tok.eos_token_id is not None and tok.eos_token_id in ids:
                ids = ids[: ids.index(tok.eos_token_id)]
            out.append(tok.decode(ids, skip_special_tokens=True))
    return out


def generation_success(em: EditableModel, prompts: Sequence[str], answers: Sequence[str], margin: int = 3,
                       batch_size: int = 32) -> tuple[list[float], list[str]]:
    """Per prompt: 1.0 when the greedy continuation is the answer, else 0.0; and the continuations."""
    texts = greedy_continuations(em, prompts, answers, margin, batch_size)
    return [float(matches(t, a)) for t, a in zip(texts, answers, strict=True)], texts
