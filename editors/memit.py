"""MEMIT (Meng et al., ICLR 2023, "Mass-Editing Memory in a Transformer"), name `memit`.

Causal LMs only. One batch edit of m requests:

1. **Context prefixes** (MEMIT's context templates): the bare prompt plus `len(context_starts)`
   prefixes the model itself samples (top-k 5, `context_len` tokens including the start word,
   seeded by the run seed), each followed by `context_sep`. MEMIT starts them from "The",
   "Therefore", "Because", "I", "You"; start words the tokenizer does not know are dropped, so a
   model with a closed vocabulary (tiny-gpt2) samples its prefixes from its own vocabulary.
2. **Target values z_i** (Sec. 4.2 / `compute_z` of the MEMIT code): a vector δ_i is added to the
   residual stream at the output of the *last* edited block, at the subject's last token, in every
   context-prefixed prompt and in the KL prompt `kl_template` ("{subject} is a"). Adam
   (`v_lr`) minimises the mean over prefixes of the target answer's NLL (per-token mean), plus
   `kl_factor` · KL(edited ‖ original) of the next-token distribution at the subject in the KL
   prompt (keeps the subject's "essence"), plus `v_weight_decay` · ||δ|| / ||h||². After each step
   ||δ|| is clamped to `clamp_norm_factor` · ||h|| (h = the original hidden state at that position).
   As in the MEMIT code: at most `v_num_grad_steps` forward passes (one fewer optimiser step), and a
   request stops early once its loss is below `v_loss_stop`. z_i = h_i + δ_i. Each step runs only the
   positions δ can reach, over the requests still optimising (`z_cache=prefix`, `editors/zcache.py`);
   `z_cache=none` runs the whole batch every step, as the MEMIT code does.
3. **Keys** k_i^l: the input of the FFN output linear of block l at the subject's last token,
   averaged first within each context type and then across types (bare prompt; sampled
   prefixes), as the MEMIT code does.
4. **Spread** (Alg. 1): for each edited layer l in increasing order, on the model with the
   earlier layers' updates already applied, the residual r_i = (z_i − h_i^L) / (#layers left)
   (h^L recomputed on the bare prompt) and ΔW = R Kᵀ (w·C + K Kᵀ)⁻¹ with C = E[k kᵀ] the uncentred
   second moment of the layer's keys over a corpus (`editors.stats`) and w = `mom2_update_weight`.
   Solved in float64 with a Cholesky solve (`editors.solvers.solve_spd`, float64 least-squares
   fallback with a warning); no explicit inverse.
5. `mean_residual`: per layer mean_i ||ΔW k_i − r_i|| / ||r_i||, averaged over layers.

`fact_token=last` (an option of the MEMIT code) uses the last prompt token instead of the
subject's last token for keys and δ; the tiny GPT-2 needs it (see its hparams file).

Where a request has no subject (`EditRequest.subject is None`) or the subject does not occur
in its prompt, the last prompt token is used as the "subject token" and the KL term is
dropped for that request (there is no subject whose essence to keep); the counts are reported in
`Edit.info`.

Deviations from the paper/code, all deliberate:
- Requests' δ_i are optimised together in chunks of `v_batch_requests` (one batched forward per
  step) instead of one request at a time. The losses are summed, so each δ_i gets exactly its own
  gradient, and Adam acts per coordinate; early stopping and clamping are per request, so the
  result equals the sequential procedure up to floating-point order.
- Default statistics corpus: offline text shipped with the project instead of 100,000 Wikipedia
  samples (see `editors.stats`); `mom2_dataset=wikitext` uses WikiText-103 through `datasets`.
- The second moment is accumulated in float64 and stored as float32 (MEMIT: float32 throughout).

Hyperparameter defaults are MEMIT's for GPT-J (repo `hparams/MEMIT/EleutherAI_gpt-j-6B.json`), with
`layers=None` meaning the same relative depth as GPT-J's blocks 3–8 of 28. Per-model files in
`editors/hparams/memit/` override them (GPT-2 XL and GPT-J from the MEMIT repository; tiny-gpt2 and
smollm2-135m chosen here, justified in their "_why").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from bench.core.progress import open_progress
from bench.evaluation.metrics import relative_residual
from bench.models import EditableModel, LMBatch, StopForward
from editors.base import (
    Edit,
    Editor,
    UnsupportedTask,
    add_delta_,
    delta_dtype,
    register_editor,
    seq2seq_refusal,
)
from editors.caching import full_precision
from editors.ranges import Range, at_least, int_list, non_negative, one_of, positive, text, text_list
from editors.solvers import SolveStats, require_finite, solve_spd
from editors.stats import LayerStats, corpus_for, layer_second_moments
from editors.zcache import PrefixCache, upper_blocks
from tasks.base import EditRequest


@dataclass
class MEMITHparams:
    """MEMIT's hyperparameters; defaults are the MEMIT repository's GPT-J values."""

    layers: list[int] | None = None  # edited blocks; None = GPT-J's 3..8 of 28 scaled to the model's depth
    fact_token: str = "subject_last"  # subject_last | last (the last prompt token; an option of MEMIT's code)
    clamp_norm_factor: float | None = None  # None: `model_rules` (0.75 as MEMIT's GPT-J; 4 on Llama, EasyEdit)
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float | None = None  # None: `model_rules` (0.5 as MEMIT's GPT-J; 1e-3 on Llama, EasyEdit)
    kl_factor: float = 0.0625
    v_loss_stop: float = 5e-2  # MEMIT's early stop of the z optimisation
    mom2_update_weight: float | None = None  # None: the width rule, `model_rules` (GPT-J: 15000)
    mom2_dataset: str = "auto"  # auto | synthetic | shipped | wikitext (online)
    mom2_n_samples: int = 100000  # texts (MEMIT: 100,000 Wikipedia samples); capped by the corpus size
    mom2_max_length: int = 128  # tokens per text for the statistics
    mom2_batch_size: int = 32
    context_starts: list[str] = field(default_factory=lambda: ["The", "Therefore", "Because", "I", "You"])
    context_len: int = 10  # tokens per sampled prefix, start word included (MEMIT: 10)
    context_top_k: int = 5
    context_sep: str = ". "
    kl_template: str = "{} is a"
    batch_size: int = 64  # sequences per forward when reading keys / hidden states
    v_batch_requests: int = 16  # requests whose δ are optimised together
    # prefix: each Adam step runs only the positions δ can reach, the prefix's keys/values cached once
    # (editors/zcache.py; exact up to float rounding); none: the whole batch every step (the reference)
    z_cache: str = "prefix"

    # valid values, checked by editors.base.hparams_from (editors/ranges.py); block indices against the
    # model's depth: bench.runner.run.check_depth
    RANGES: ClassVar[dict[str, Range]] = {
        "layers": int_list(0).or_none("GPT-J's blocks scaled to the model's depth"),
        "fact_token": one_of("subject_last", "last"),
        "clamp_norm_factor": positive().or_none("the model's rule"), "v_num_grad_steps": at_least(1),
        "v_lr": positive(), "v_weight_decay": non_negative().or_none("the model's rule"), "kl_factor": non_negative(),
        "v_loss_stop": non_negative(), "mom2_update_weight": positive().or_none("the width rule"),
        "mom2_dataset": one_of("auto", "synthetic", "shipped", "wikitext"), "mom2_n_samples": at_least(1),
        "mom2_max_length": at_least(1), "mom2_batch_size": at_least(1), "context_starts": text_list(),
        "context_len": at_least(1), "context_top_k": at_least(1), "context_sep": text(), "kl_template": text("{}"),
        "batch_size": at_least(1), "v_batch_requests": at_least(1), "z_cache": one_of("prefix", "none"),
    }


def kl_edited_from_original(logp_edited: Tensor, logp_original: Tensor) -> Tensor:
    """Per row KL(edited ‖ original) = Σ p_edited (log p_edited − log p_original), from log-probabilities.

    The direction of the MEMIT code's `kl_div(init, current, log_target=True)` and of ROME's Eq. 4: the
    expectation is under the edited distribution."""
    return (logp_edited.exp() * (logp_edited - logp_original)).sum(-1)



# GPT-J's published w (kmeng01/memit hparams/MEMIT/EleutherAI_gpt-j-6B.json) at its edited layers'
# input width. For keys distributed like the corpus E[kᵀ C⁻¹ k] = d_in, so the same w regularises
# harder the narrower the layer; the rule keeps GPT-J's ratio w / d_in for models without a file.
GPTJ_W, GPTJ_D_IN = 15000.0, 16384
# z-optimisation settings by architecture for models without a file: MEMIT's GPT-J values, and
# EasyEdit's for Llama-style models (zjunlp/EasyEdit hparams/MEMIT/llama-7b.yaml, llama3.2-1b.yaml:
# clamp_norm_factor 4, v_weight_decay 1e-3).
Z_RULES = {"llama": {"clamp_norm_factor": 4.0, "v_weight_decay": 1e-3}}
Z_DEFAULT = {"clamp_norm_factor": 0.75, "v_weight_decay": 0.5}


def model_rules(hp: MEMITHparams, arch: str, d_in: int) -> dict[str, float]:
    """Values for the hparams left at None: the width rule for w, the architecture's z settings."""
    out: dict[str, float] = {}
    if hp.mom2_update_weight is None:
        out["mom2_update_weight"] = GPTJ_W * d_in / GPTJ_D_IN
    for k, v in Z_RULES.get(arch, Z_DEFAULT).items():
        if getattr(hp, k) is None:
            out[k] = v
    return out


def default_blocks(n_layers: int) -> list[int]:
    """GPT-J's MEMIT blocks 3..8 (of 28) at the same relative depth of an `n_layers` model."""
    lo = min(n_layers - 1, round(n_layers * 3 / 28))
    hi = min(n_layers - 1, max(lo, round(n_layers * 8 / 28)))
    return list(range(lo, hi + 1))


def block_name(em: EditableModel, module_name: str) -> str:
    """The transformer block holding the FFN output linear `module_name` (its output = residual stream)."""
    suffix = em.spec.second_fc.split("{i}", 1)[1]
    if not module_name.endswith(suffix):
        raise ValueError(f"{module_name} is not a second FFN linear of {em.name}")
    return module_name[: -len(suffix)]


def subject_end(prompt: str, subject: str | None) -> int | None:
    """Character offset just past the first occurrence of `subject` in `prompt` (case-insensitive), or None."""
    if not subject:
        return None
    i = prompt.find(subject)
    if i < 0:
        i = prompt.lower().find(subject.lower())
    return None if i < 0 else i + len(subject)


def _first_output(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace_output(out: Any, h: Tensor) -> Any:
    return (h, *out[1:]) if isinstance(out, tuple) else h


@dataclass
class Rows:
    """Tokenised prompt+answer rows with the position of each row's subject token."""

    batch: LMBatch
    pos: Tensor  # (R,) token index of the subject's last token (or the last prompt token)


def encode_rows(em: EditableModel, prompts: Sequence[str], answers: Sequence[str],
                ends: Sequence[int | None]) -> Rows:
    """`em.encode` the rows and locate each row's subject token (character end `ends[r]`, None = last prompt token)."""
    batch = em.encode(prompts, answers)
    tok = em.tokenizer
    full = [len(x) for x in tok(list(prompts), add_special_tokens=True)["input_ids"]]
    cut = [p[:e] if e is not None else p for p, e in zip(prompts, ends, strict=True)]
    upto = [len(x) for x in tok(cut, add_special_tokens=True)["input_ids"]]
    # em.encode keeps the end of over-long prompts: shift by what it dropped.
    kept = batch.answer_mask.float().argmax(-1) + 1  # first answer label sits at n_prompt - 1
    pos = torch.tensor(upto) - 1 - (torch.tensor(full) - kept)
    return Rows(batch, pos.clamp_min(0))


def _average_contexts(k: Tensor) -> Tensor:
    """MEMIT's key of a request: the mean within each context type, then across types (bare; sampled prefixes)."""
    return k[:, 0] if k.shape[1] == 1 else 0.5 * (k[:, 0] + k[:, 1:].mean(1))


@register_editor("memit")
class MEMIT(Editor):
    """Locate-and-edit mass editing of the FFN output linears (MEMIT)."""

    hparams_cls = MEMITHparams
    supported_kinds = frozenset({"lm"})  # the value optimisation needs next-token answers
    edits_seq2seq = False  # keys and z live in one residual stream read by the next token (decoder-only)

    def __init__(self, model: EditableModel, hparams: Any = None, ctx: Any = None):
        if model.kind != "lm":
            raise UnsupportedTask(
                f"MEMIT edits causal language models only; '{model.name}' is a {model.kind} model "
                "(use malmen, mend or ft for classification tasks)")
        if model.is_seq2seq:  # a Hugging Face T5: refused after loading, before any statistics
            raise UnsupportedTask(seq2seq_refusal("memit", model.name))
        super().__init__(model, hparams, ctx)
        # Hparams left at None take the model's rules; the row's config keeps None (= "by rule") and
        # `prepare_info` records the values used.
        d_in = model.layer_dims(self.layer_names()[-1])[0]
        self.rules = model_rules(self.hparams, model.arch, d_in)
        self.hparams = dataclasses.replace(self.hparams, **self.rules)
        self._stats: dict[str, LayerStats] | None = None
        self._contexts: list[str] | None = None
        self._corpus_name = ""

    # -- configuration ----------------------------------------------------------------------
    def layer_names(self) -> list[str]:
        """The edited FFN output linears, shallowest first."""
        blocks = self.hparams.layers if self.hparams.layers is not None else default_blocks(self.model.n_layers)
        names = self.model.module_names("second_fc", blocks=sorted(blocks))
        if len(set(names)) != len(names):
            raise ValueError(f"MEMIT layers contain duplicates: {self.hparams.layers}")
        return names

    def _fact_end(self, prompt: str, subject: str | None) -> int | None:
        """Character end of the fact token's text (None = the last prompt token)."""
        if self.hparams.fact_token == "last":
            return None
        if self.hparams.fact_token != "subject_last":
            raise ValueError(f"unknown fact_token {self.hparams.fact_token!r}; choose subject_last or last")
        return subject_end(prompt, subject)

    # -- prepare: statistics and context prefixes --------------------------------------------
    def prepare(self, train: Sequence[EditRequest] = ()) -> None:
        """Load or compute C = E[k kᵀ] for every edited layer, and sample the context prefixes."""
        hp, em = self.hparams, self.model
        corpus = corpus_for(hp.mom2_dataset, em, hp.mom2_n_samples)
        self._corpus_name = corpus.name
        self._stats = layer_second_moments(em, self.layer_names(), corpus, hp.mom2_n_samples, self.ctx.results_dir,
                                           hp.mom2_batch_size, hp.mom2_max_length, self.ctx.progress)
        self._contexts = self.sample_contexts()

    def prepare_info(self) -> dict[str, Any]:
        if self._stats is None:
            return {}
        first = next(iter(self._stats.values()))
        return {"rules": self.rules,
                "stats_reused": all(s.reused for s in self._stats.values()), "stats_corpus": self._corpus_name,
                "stats_tokens": first.n_tokens, "stats_dir": str(first.path.parent.parent),
                "contexts": self._contexts}

    @torch.no_grad()
    def sample_contexts(self) -> list[str]:
        """["", p_1 + sep, ...]: the bare prompt plus prefixes the model samples from each start word."""
        hp, em = self.hparams, self.model
        tok = em.tokenizer
        gen = torch.Generator().manual_seed(self.ctx.seed)
        out = [""]
        for start in hp.context_starts:
            ids = [i for i in tok(start, add_special_tokens=True)["input_ids"] if i != tok.unk_token_id]
            if not ids:
                ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
            n_special = len(tok("", add_special_tokens=True)["input_ids"])
            seq = torch.tensor([ids], device=em.device)
            # Autoregressive sampling is sequential by nature: one forward per new token (10 at most).
            while seq.shape[1] - n_special < hp.context_len:
                logits = em.model(input_ids=seq).logits[0, -1].float().cpu()
                top = logits.topk(hp.context_top_k)
                pick = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=gen)]
                seq = torch.cat([seq, pick.view(1, 1).to(seq.device)], dim=1)
            text = tok.decode(seq[0].tolist(), skip_special_tokens=True)
            out.append(text.replace("{", " ").replace("}", " ").strip() + hp.context_sep)
        return out

    # -- forward helpers ---------------------------------------------------------------------
    def _capture(self, rows: Rows, inputs_of: Sequence[str], outputs_of: Sequence[str]) -> dict[str, Tensor]:
        """Module inputs / outputs at each row's subject token, stopping the forward once all are read."""
        em = self.model
        got: dict[str, Tensor] = {}
        idx = torch.arange(rows.pos.numel(), device=em.device)
        pos = rows.pos.to(em.device)
        need = len(inputs_of) + len(outputs_of)

        def grab(key: str, h: Tensor) -> None:
            got[key] = h[idx.to(h.device), pos.to(h.device)].detach().clone()  # device map: h's own device
            if len(got) == need:
                raise StopForward

        hooks = [em.module(n).register_forward_pre_hook(lambda _m, a, n=n: grab("in:" + n, a[0]))
                 for n in inputs_of]
        hooks += [em.module(n).register_forward_hook(lambda _m, _a, o, n=n: grab("out:" + n, _first_output(o)))
                  for n in outputs_of]
        b = rows.batch.to(em.device)
        try:
            em.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        except StopForward:
            pass
        finally:
            for h in hooks:
                h.remove()
        return got

    def _context_rows(self, requests: Sequence[EditRequest]) -> tuple[list[str], list[str], list[int | None]]:
        """Rows request-major: for each request, each context prefix + its prompt."""
        prompts, answers, ends = [], [], []
        for r in requests:
            e = self._fact_end(r.prompt, r.subject)
            for c in self._contexts or [""]:
                prompts.append(c + r.prompt)
                answers.append(r.target)
                ends.append(None if e is None else len(c) + e)
        return prompts, answers, ends

    @torch.no_grad()
    def _context_reads(self, requests: Sequence[EditRequest], inputs_of: Sequence[str],
                       outputs_of: Sequence[str]) -> dict[str, Tensor]:
        """Module inputs/outputs at the subject token of every context row, (m, n_ctx, d) each, float32."""
        hp = self.hparams
        prompts, answers, ends = self._context_rows(requests)
        n_ctx = len(self._contexts or [""])
        parts: dict[str, list[Tensor]] = {}
        step = max(n_ctx, hp.batch_size // n_ctx * n_ctx)  # whole requests per chunk
        for s in range(0, len(prompts), step):
            rows = encode_rows(self.model, prompts[s : s + step], answers[s : s + step], ends[s : s + step])
            for key, got in self._capture(rows, inputs_of, outputs_of).items():
                parts.setdefault(key, []).append(got)
        # float32 before averaging whatever the LM's dtype (bfloat16 keeps 8 bits of mantissa)
        # (and on the first device: a device map puts the layers elsewhere)
        return {key: full_precision(torch.cat(got)).to(self.model.device).view(len(requests), n_ctx, -1)
                for key, got in parts.items()}

    def keys_and_hidden(self, requests: Sequence[EditRequest], layer: str, last_block: str) -> tuple[Tensor, Tensor]:
        """Context-averaged keys of `layer` (m, d_in) and the bare-prompt output of `last_block` (m, d)."""
        got = self._context_reads(requests, [layer], [last_block])
        return _average_contexts(got["in:" + layer]), got["out:" + last_block][:, 0]

    def layer_keys(self, requests: Sequence[EditRequest], layers: Sequence[str]) -> dict[str, Tensor]:
        """Context-averaged keys of several layers, read in one forward per chunk from the model as it is now."""
        got = self._context_reads(requests, layers, [])
        return {layer: _average_contexts(got["in:" + layer]) for layer in layers}

    # -- target values -------------------------------------------------------------------------
    def target_values(self, requests: Sequence[EditRequest], last_block: str) -> tuple[Tensor, dict[str, float]]:
        """z_i = h_i + δ_i at the last edited block (m, d), δ optimised per MEMIT's `compute_z`."""
        zs, steps, losses = [], [], []
        with open_progress(self.ctx.progress) as prog:
            bar = prog.add_task("MEMIT target values", total=len(requests), status="")
            for s in range(0, len(requests), self.hparams.v_batch_requests):
                chunk = requests[s : s + self.hparams.v_batch_requests]
                z, st, lo = self._optimise_chunk(chunk, last_block)
                zs.append(z)
                steps.append(st)
                losses.append(lo)
                prog.update(bar, advance=len(chunk), status=f"loss {float(lo.mean()):.3f}")
        st, lo = torch.cat(steps).float(), torch.cat(losses)
        return torch.cat(zs), {"v_steps_mean": float(st.mean()), "v_loss_mean": float(lo.mean()),
                               "v_loss_max": float(lo.max())}

    def _optimise_chunk(self, requests: Sequence[EditRequest], last_block: str) -> tuple[Tensor, Tensor, Tensor]:
        hp, em = self.hparams, self.model
        dev = em.device
        n_ctx = len(self._contexts or [""])
        prompts, answers, ends = self._context_rows(requests)
        owner = [j for j in range(len(requests)) for _ in range(n_ctx)]
        kl_owner = []
        for j, r in enumerate(requests):
            if subject_end(r.prompt, r.subject) is not None:  # no subject, no essence to keep: no KL row
                p = hp.kl_template.format(r.subject)
                prompts.append(p)
                answers.append(r.target)  # only to tokenise; its labels are ignored
                ends.append(self._fact_end(p, r.subject))
                kl_owner.append(j)
        rows = encode_rows(em, prompts, answers, ends)
        b = rows.batch.to(dev)
        n_rw = len(owner)
        m = len(requests)
        row_owner = torch.tensor(owner + kl_owner, device=dev)
        pos = rows.pos.to(dev)
        ridx = torch.arange(len(prompts), device=dev)

        labels = b.labels[:n_rw]
        tok_r, tok_t = (labels != -100).nonzero(as_tuple=True)  # rewriting rows' answer positions
        tok_y = labels[tok_r, tok_t]
        n_tok = torch.zeros(n_rw, device=dev).index_add_(0, tok_r, torch.ones(tok_r.shape, device=dev))
        kl_rows = torch.arange(n_rw, len(prompts), device=dev)
        kl_own = torch.tensor(kl_owner, device=dev, dtype=torch.long)

        d = em.model.config.hidden_size
        delta = torch.zeros(m, d, device=dev, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        state: dict[str, Tensor] = {}

        if hp.z_cache not in ("prefix", "none"):
            raise ValueError(f"z_cache must be 'prefix' or 'none', got {hp.z_cache!r}")
        base, head = em.model.base_model, em.model.get_output_embeddings()
        prefix: PrefixCache | None = None
        if hp.z_cache == "prefix":
            # MEMIT's target_init (the original state, bare prompt = row 0 of each request), then the
            # δ-independent prefix of every row, both once per chunk.
            with torch.no_grad():  # h0 in float32: z = h0 + δ is a float32 target whatever the LM's dtype
                state["h0"] = full_precision(self._capture(rows, [], [last_block])["out:" + last_block][:n_rw:n_ctx]).to(dev)
                # and, where the blocks are one ModuleList, the last edited block's output over each suffix:
                # a step then runs only the blocks after it
                # outputs are read at the answer positions of rewriting rows and the subject token of KL
                # rows, so neither the last answer token nor a KL row's tail is run
                cols = torch.arange(labels.shape[1], device=dev)
                ends = pos + 1
                ends[:n_rw] = torch.maximum(ends[:n_rw], torch.where(labels != -100, cols, -1).amax(-1) + 1)
                prefix = PrefixCache(base, b.input_ids, b.attention_mask, pos,
                                     upper=upper_blocks(base, em.module(last_block)), ends=ends)

        def inject(h: Tensor, rows_now: Tensor) -> Tensor:
            """δ added to the cached output of the last edited block over `rows_now`'s suffixes (column 0: the subject token)."""
            add = torch.zeros_like(h)
            add[:, 0] = delta[row_owner[rows_now]].to(device=h.device, dtype=h.dtype)
            return h + add

        def add_delta(_mod: torch.nn.Module, _args: Any, out: Any) -> Any:
            h = _first_output(out)
            if "h0" not in state:  # z_cache=none: MEMIT's target_init, read in the first forward
                at0 = (ridx[:n_rw:n_ctx].to(h.device), pos[:n_rw:n_ctx].to(h.device))
                state["h0"] = full_precision(h[at0].detach().clone()).to(dev)
            # δ stays float32 (Adam's state with it); what enters the stream is cast to the block's
            # dtype and device (a device map may put the block on another GPU than δ)
            if prefix is not None and prefix.rows_now is not None:  # a step over one group's suffixes
                return _replace_output(out, inject(h, prefix.rows_now))
            add = delta[row_owner].to(device=h.device, dtype=h.dtype)
            h = h.index_put((ridx.to(h.device), pos.to(h.device)), add, accumulate=True)
            return _replace_output(out, h)

        params = list(em.model.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        done = torch.zeros(m, dtype=torch.bool, device=dev)
        steps = torch.zeros(m, dtype=torch.long, device=dev)
        loss_j = torch.zeros(m, device=dev)
        kl_init: Tensor | None = None
        hook = em.module(last_block).register_forward_hook(add_delta)
        try:
            for it in range(hp.v_num_grad_steps):
                if prefix is None:
                    hid = base(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
                else:  # only live requests' rows, only the positions δ reaches
                    hid = prefix.run((~done)[row_owner], d, inject)
                hid = hid.to(dev)  # a device map leaves the last block's output on the last GPU
                # Logits only where needed: answer positions of rewriting rows, subject token of KL rows.
                logp = torch.log_softmax(full_precision(head(hid[tok_r, tok_t])), -1)
                tok_nll = -logp.gather(1, tok_y[:, None]).squeeze(1)
                row_nll = tok_nll.new_zeros(n_rw).index_add(0, tok_r, tok_nll) / n_tok
                nll = row_nll.new_zeros(m).index_add(0, row_owner[:n_rw], row_nll) / n_ctx
                kl = nll.new_zeros(m)
                if len(kl_owner):
                    kl_logp = torch.log_softmax(full_precision(head(hid[kl_rows, pos[kl_rows]])), -1)
                    if kl_init is None:
                        kl_init = kl_logp.detach()
                    kl_row = kl_edited_from_original(kl_logp, kl_init)
                    kl = kl.index_add(0, kl_own, kl_row)
                h0n = state["h0"].norm(dim=-1)
                wd = hp.v_weight_decay * delta.norm(dim=-1) / h0n**2
                loss = nll + hp.kl_factor * kl + wd
                live = ~done
                loss_j = torch.where(live, loss.detach(), loss_j)
                steps = steps + live.long()
                done = done | (loss.detach() < hp.v_loss_stop)
                if it == hp.v_num_grad_steps - 1 or bool(done.all()):
                    break
                opt.zero_grad(set_to_none=True)
                loss[~done].sum().backward()
                keep = delta.detach()[done].clone()
                opt.step()
                with torch.no_grad():
                    delta[done] = keep  # finished requests stay where they stopped (Adam momentum would move them)
                    cap = hp.clamp_norm_factor * h0n
                    norm = delta.norm(dim=-1)
                    scale = torch.where(norm > cap, cap / norm.clamp_min(1e-12), torch.ones_like(norm))
                    delta.mul_(scale[:, None])
        finally:
            hook.remove()
            for p, f in zip(params, flags, strict=True):
                p.requires_grad_(f)
        return (state["h0"] + delta.detach()), steps.cpu(), loss_j.cpu()

    # -- the edit ------------------------------------------------------------------------------
    def edit(self, requests: Sequence[EditRequest]) -> Edit:
        """MEMIT's batch update of all edited layers for `requests`."""
        if self._stats is None or self._contexts is None:
            self.prepare([])
        assert self._stats is not None
        hp, em = self.hparams, self.model
        layers = self.layer_names()
        last_block = block_name(em, layers[-1])
        was_training = em.model.training
        em.model.eval()
        params = dict(em.model.named_parameters())
        names = [em.param_name(n) for n in layers]
        saved = {n: params[n].detach().clone() for n in names}
        stats = SolveStats()
        info: dict[str, Any] = {"layers": layers}
        deltas: dict[str, Tensor] = {}
        residuals: list[float] = []
        try:
            z, zinfo = self.target_values(requests, last_block)
            info.update(zinfo)
            with open_progress(self.ctx.progress) as prog:
                bar = prog.add_task("MEMIT layer updates", total=len(layers), status="")
                for i, layer in enumerate(layers):
                    k, h = self.keys_and_hidden(requests, layer, last_block)
                    r = (z - h).double() / (len(layers) - i)
                    dw = self.layer_update(k.double(), r, self._stats[layer].mom2, hp.mom2_update_weight, stats,
                                           layer=layer)
                    residuals.append(relative_residual(dw, k.double(), r))
                    # Later layers' keys and residuals are read on the model with this update applied. A
                    # half-precision weight's shift stays float32 (rounded once, when added: add_delta_).
                    deltas[names[i]] = em.to_param_layout(layer, dw.to(delta_dtype(params[names[i]].dtype)))
                    add_delta_(params[names[i]], deltas[names[i]])
                    prog.update(bar, advance=1, status=f"residual {residuals[-1]:.3g}")
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    params[n].copy_(w)
            em.model.train(was_training)
        info.update({"layer_residuals": residuals, "solver_fallbacks": stats.fallbacks,
                     "no_subject_token": sum(subject_end(r.prompt, r.subject) is None for r in requests)})
        return Edit(deltas=deltas, mean_residual=sum(residuals) / len(residuals), info=info)

    @staticmethod
    def layer_update(keys: Tensor, resid: Tensor, mom2: Tensor, weight: float,
                     stats: SolveStats | None = None, layer: str = "") -> Tensor:
        """ΔW = R Kᵀ (w·C + K Kᵀ)⁻¹ (d_out, d_in) for keys (m, d_in) and residuals (m, d_out), in float64.

        NaN/Inf in keys, residuals or statistics raise NonFiniteInputError naming `layer`."""
        require_finite(layer, keys=keys, residuals=resid, key_statistics=mom2)
        k = keys.double()
        a = weight * mom2.to(device=k.device, dtype=torch.float64) + k.T @ k
        x = solve_spd(a, k.T, stats, layer=layer)  # (d_in, m) = A⁻¹ Kᵀ (A symmetric)
        return resid.to(device=k.device, dtype=torch.float64).T @ x.T  # the layer's device under a device map

