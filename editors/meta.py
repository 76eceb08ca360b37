"""Shift computation, meta-gradients and the meta-training loop shared by MALMEN and MEND.

Meta loss (MALMEN Eq. 1): L_meta = L_gen + λ_loc L_loc, where L_gen is -log p_W̃(y^e | x^e) over
the equivalent tuples and L_loc the KL(p_W(· | x^u) ‖ p_W̃(· | x^u)) at the answer positions of the
unrelated tuples (teacher-forced on the gold unrelated answer), each normalised as
editors/lossnorm.py says: `loss_norm=official` sums token means over LM batches of 32 (the
official code), `loss_norm=sum` takes the mean over examples of summed token losses (the paper's
Algorithm 1). For classifiers both are over the class distribution. One equivalent prompt is drawn
per edit (the request's own prompt when it has no rephrase) and its locality probe is the
unrelated tuple.

Two meta-gradients, equal up to rounding (tests/editors/test_malmen_grad.py):
- `two_stage` (Algorithm 2): S* is computed without a graph; the meta loss is back-propagated
  through the LM only, in micro-batches, giving ∇W̃ per layer (size independent of m); then
  M = ∇W̃ A⁻¹, ∇D = M U, dL/dλ = -tr(M S*ᵀ), and the proxy Σ tr(∇Dᵀ D) is back-propagated
  through g_θ in chunks of cached tuples. MEND's sum of shifts uses ∂L/∂S* = ∇W̃ directly and the
  proxy Σ tr(∇W̃ᵀ S*_chunk).
- `naive` (Figure 1): g_θ, the normal equation and the LM form one graph that is back-propagated
  end to end; memory grows with m.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.core.progress import open_progress
from bench.core.threads import torch_threads
from bench.evaluation.metrics import Evaluation, agreement, evaluate, relative_residual
from bench.models import EditableModel
from editors.base import Edit
from editors.caching import (
    PrefixReuse,
    Tuples,
    cache_tuples,
    full_precision,
    micro_batches,
    shifted,
    weighted_nll,
)
from editors.hypernet import HyperNet
from editors.lossnorm import LOSS_NORMS, cache_weights, loss_weights
from editors.solvers import (
    RidgeSolve,
    SolveStats,
    gram,
    require_finite,
    ridge_backward,
    ridge_shift,
    solve_spd,
    sum_shift,
    value_diffs,
)
from tasks.base import EditRequest

SHIFTS = ("normal", "sum")
REGS = ("ridge", "none")
META_GRADS = ("two_stage", "naive")
SCHEDULES = ("official", "select")


@dataclass
class Options:
    """The parts of an editor's hyperparameters the shift and gradient code needs."""

    shift: str = "normal"  # "normal": MALMEN's normal equation; "sum": MEND's sum of shifts
    reg: str = "ridge"  # "none": λ = 0, no regularisation term
    cache: str = "answer"
    loc_coef: float = 1.0
    micro_batch: int = 16  # prompts per LM forward (edit, equivalent and unrelated)
    chunk: int = 1024  # cached tuples per hyper-network forward
    loss_norm: str = "official"  # editors/lossnorm.py
    lm_batch: int = 32  # examples per LM batch for loss_norm=official

    def __post_init__(self) -> None:
        for name, val, ok in (("shift", self.shift, SHIFTS), ("reg", self.reg, REGS),
                              ("loss_norm", self.loss_norm, LOSS_NORMS)):
            if val not in ok:
                raise ValueError(f"{name} must be one of {ok}, got {val!r}")
        if self.micro_batch < 1 or self.chunk < 1 or self.lm_batch < 1:
            raise ValueError("micro_batch, chunk and lm_batch must be >= 1")


@dataclass
class LayerShift:
    """One layer's aggregated shift S* (d', d), with the keys, value differences and factorised Gram matrix."""

    shift: Tensor
    keys: Tensor
    diffs: Tensor
    solve: RidgeSolve | None  # the factorised normal equation, kept for the backward; None: sum of shifts / naive


@dataclass
class MetaBatch:
    """Edit, equivalent and unrelated prompt/answer lists of one training (or validation) step."""

    edit: tuple[list[str], list[str]]
    equiv: tuple[list[str], list[str]]
    unrel: tuple[list[str], list[str]]

    @classmethod
    def from_requests(cls, requests: Sequence[EditRequest], rng: random.Random) -> MetaBatch:
        """One random rephrase per request as its equivalent tuple; its locality probe as unrelated."""
        eq = [rng.choice(r.rephrases) if r.rephrases else r.prompt for r in requests]
        return cls(([r.prompt for r in requests], [r.target for r in requests]),
                   (eq, [r.target for r in requests]),
                   ([r.locality_prompt for r in requests], [r.locality_answer for r in requests]))

    def weights(self, em: EditableModel, opt: Options) -> tuple[Tensor, Tensor]:
        """Per-example loss weights (equivalent, unrelated) under `opt.loss_norm`."""
        return (loss_weights(em, *self.equiv, opt.loss_norm, opt.lm_batch),
                loss_weights(em, *self.unrel, opt.loss_norm, opt.lm_batch))


@dataclass
class StepResult:
    """Meta-loss values of one step (before the optimiser update)."""

    loss: float
    gen: float
    loc: float
    n_tuples: int
    solve: SolveStats = field(default_factory=SolveStats)


# ---------------------------------------------------------------------------------------------
# shifts


def _chunks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def layer_shift(net: HyperNet, name: str, keys: Tensor, grads: Tensor, opt: Options,
                stats: SolveStats | None = None) -> LayerShift:
    """S* of one layer from its cached tuples; differentiable w.r.t. θ, η, ρ when grad is enabled."""
    eta = net.eta(name)
    pk_parts, pg_parts = [], []
    for sl in _chunks(keys.shape[0], opt.chunk):
        pk, pg = net(name, keys[sl], grads[sl])
        pk_parts.append(pk)
        pg_parts.append(pg)
    pk, pg = torch.cat(pk_parts), torch.cat(pg_parts)
    diffs = value_diffs(keys, pk, pg, eta)
    if opt.shift == "sum":
        return LayerShift(sum_shift(pk, pg, eta), keys, diffs, None)
    lam = None if opt.reg == "none" else net.lam(name)
    if torch.is_grad_enabled():  # naive meta-gradient: autograd through the primal solve
        a = gram(keys, lam)  # float64, see solvers.gram
        require_finite(name, keys=keys, value_differences=diffs)
        rhs = keys.double().T @ diffs.double()
        return LayerShift(solve_spd(a, rhs, stats, layer=name).T.to(diffs.dtype), keys, diffs, None)
    shift, solve = ridge_shift(keys, diffs, lam, stats, layer=name)
    return LayerShift(shift, keys, diffs, solve)


def all_shifts(net: HyperNet, tuples: Tuples, opt: Options, stats: SolveStats | None = None) -> dict[str, LayerShift]:
    """S* for every cached layer."""
    return {n: layer_shift(net, n, tuples.keys[n], tuples.grads[n], opt, stats) for n in tuples.keys}


# ---------------------------------------------------------------------------------------------
# meta loss


def _kl(pre_logits: Tensor, post_logits: Tensor) -> Tensor:
    """KL(pre ‖ post) over the last dimension, per row."""
    pre = F.log_softmax(full_precision(pre_logits), -1)
    post = F.log_softmax(full_precision(post_logits), -1)
    return (pre.exp() * (pre - post)).sum(-1)


def _loc_kl(em: EditableModel, prompts: list[str], answers: list[str], shifts: dict[str, Tensor],
            weights: Tensor) -> Tensor:
    """Σ_i w_i KL_i: the locality KL of each unrelated example (over its answer positions), weighted.

    The edited forward reuses the unedited one's blocks below the first edited layer (PrefixReuse).
    """
    prefix = PrefixReuse(em, list(shifts))
    if em.kind == "cls":
        enc = em.encode_text(prompts)
        with torch.no_grad(), prefix.record():
            pre = em.logits(enc)
        with shifted(em, shifts), prefix.replay():
            post = em.logits(enc)
        kl = _kl(pre, post)
        return (kl * weights.to(device=kl.device, dtype=kl.dtype)).sum()
    batch = em.encode(prompts, answers).to(em.device)
    with torch.no_grad(), prefix.record():
        pre = em.answer_logits(batch)
    with shifted(em, shifts), prefix.replay():
        post = em.answer_logits(batch)
    kl = _kl(pre, post)  # one row per answer position
    mask = batch.answer_mask
    w = weights.to(device=kl.device, dtype=kl.dtype)[:, None].expand(mask.shape)[mask]
    return (kl * w).sum()


def meta_loss_parts(em: EditableModel, batch: MetaBatch, shifts: dict[str, Tensor], opt: Options
                    ) -> Iterator[tuple[Tensor, float, float]]:
    """Per micro-batch: (its share of L_meta, gen share, loc share); the shares sum to L_meta.

    Equivalent and unrelated micro-batches are visited separately, any sizes; each example carries
    its loss weight (editors/lossnorm.py), so accumulating gradients over the parts gives exactly
    ∇L_meta whatever the micro-batching.
    """
    (eq_p, eq_t), (un_p, un_a) = batch.equiv, batch.unrel
    w_e, w_u = batch.weights(em, opt)
    for idx in micro_batches(em, eq_p, eq_t, opt.micro_batch):
        with shifted(em, shifts):
            g, _ = weighted_nll(em, [eq_p[i] for i in idx], [eq_t[i] for i in idx], w_e[idx])
        yield g, float(g.detach()), 0.0
    for idx in micro_batches(em, un_p, un_a, opt.micro_batch):
        kl = _loc_kl(em, [un_p[i] for i in idx], [un_a[i] for i in idx], shifts, w_u[idx])
        yield opt.loc_coef * kl, 0.0, float(kl.detach())


# ---------------------------------------------------------------------------------------------
# meta-gradients


def _add_grad(p: torch.nn.Parameter, g: Tensor) -> None:
    if p.grad is None:
        p.grad = g.detach().clone()
    else:
        p.grad += g.detach()


def cache_edit_tuples(em: EditableModel, edit: tuple[list[str], list[str]], modules: Sequence[str],
                      opt: Options) -> Tuples:
    """Cache the tuples of a batch of edits, ∇v normalised as `opt.loss_norm` says."""
    w = cache_weights(em, *edit, opt.loss_norm, opt.lm_batch)
    return cache_tuples(em, *edit, modules, cache=opt.cache, micro_batch=opt.micro_batch, weights=w)


def cache_for(em: EditableModel, batch: MetaBatch, modules: Sequence[str], opt: Options) -> Tuples:
    """Cache the edit tuples of a meta batch."""
    return cache_edit_tuples(em, batch.edit, modules, opt)


def two_stage_backward(em: EditableModel, net: HyperNet, tuples: Tuples, batch: MetaBatch,
                       opt: Options) -> StepResult:
    """Algorithm 2: accumulate ∇_θ L_meta (and dL/dρ) into `.grad` without a graph through g_θ and the LM."""
    res = StepResult(0.0, 0.0, 0.0, tuples.n)
    with torch.no_grad():
        shifts = all_shifts(net, tuples, opt, res.solve)
    # Stage 1: back-propagate L_meta through the LM only, to the shifts (∇W̃ = ∇S* since W̃ = W + S*).
    leaves = {n: s.shift.detach().requires_grad_(True) for n, s in shifts.items()}
    grad_w = {n: torch.zeros_like(s) for n, s in leaves.items()}
    names = list(leaves)
    for part, gen, loc in meta_loss_parts(em, batch, leaves, opt):
        for n, g in zip(names, torch.autograd.grad(part, [leaves[n] for n in names]), strict=True):
            grad_w[n] += g
        res.loss += float(part.detach())
        res.gen += gen
        res.loc += loc
    # Stage 2: manual gradient through the aggregation, then the proxy through g_θ chunk by chunk.
    for n, ls in shifts.items():
        idx = net.index(n)
        keys, grads = tuples.keys[n], tuples.grads[n]
        if opt.shift == "normal":
            assert ls.solve is not None
            grad_d_all, dlam = ridge_backward(ls.solve, grad_w[n], ls.shift)
            if opt.reg != "none":  # λ = exp(ρ): dL/dρ = λ dL/dλ
                g_rho = torch.zeros_like(net.log_lam)
                g_rho[idx] = dlam * net.lam(n).detach()
                _add_grad(net.log_lam, g_rho)
        for sl in _chunks(keys.shape[0], opt.chunk):
            with torch.enable_grad():
                pk, pg = net(n, keys[sl], grads[sl])
                eta = net.eta(n)
                if opt.shift == "normal":
                    grad_d = grad_d_all[sl]  # ∇D for this chunk (Theorem 1), rows = tokens
                    proxy = (grad_d * value_diffs(keys[sl], pk, pg, eta)).sum()
                else:  # tr(∇W̃ᵀ S*_chunk) with S*_chunk = -η Σ_j ∇̃v_j ũ_jᵀ, without forming S*_chunk
                    proxy = -eta * ((pg @ grad_w[n]) * pk).sum()
            proxy.backward()
    return res


def naive_backward(em: EditableModel, net: HyperNet, tuples: Tuples, batch: MetaBatch,
                   opt: Options) -> StepResult:
    """End-to-end autograd through g_θ, the aggregation and the LM (Figure 1): one graph, one backward."""
    res = StepResult(0.0, 0.0, 0.0, tuples.n)
    params = [p for p in net.parameters() if p.requires_grad]
    with torch.enable_grad():
        shifts = {n: s.shift for n, s in all_shifts(net, tuples, opt, res.solve).items()}
        total = None
        for part, gen, loc in meta_loss_parts(em, batch, shifts, opt):
            total = part if total is None else total + part
            res.gen += gen
            res.loc += loc
        assert total is not None
        res.loss = float(total.detach())
        grads = torch.autograd.grad(total, params, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            _add_grad(p, g)
    return res


def meta_backward(em: EditableModel, net: HyperNet, tuples: Tuples, batch: MetaBatch, opt: Options,
                  meta_grad: str = "two_stage") -> StepResult:
    """Accumulate ∇L_meta into the hyper-network's `.grad` with the chosen method."""
    if meta_grad not in META_GRADS:
        raise ValueError(f"meta_grad must be one of {META_GRADS}, got {meta_grad!r}")
    fn = two_stage_backward if meta_grad == "two_stage" else naive_backward
    return fn(em, net, tuples, batch, opt)


# ---------------------------------------------------------------------------------------------
# editing and meta-training


def edit_from_shifts(em: EditableModel, shifts: dict[str, LayerShift], info: dict[str, Any]) -> Edit:
    """An Edit in the parameters' own layout, with the mean residual (Section 5.3) over layers."""
    deltas = {em.param_name(n): em.to_param_layout(n, s.shift.detach()) for n, s in shifts.items()}
    res = [relative_residual(s.shift.detach(), s.keys, s.diffs.detach()) for s in shifts.values()]
    return Edit(deltas=deltas, mean_residual=float(sum(res) / len(res)) if res else None,
                info={**info, "residual_per_layer": dict(zip(shifts, res, strict=True))})


def compute_edit(em: EditableModel, net: HyperNet, modules: Sequence[str], batch_edit: tuple[list[str], list[str]],
                 opt: Options) -> Edit:
    """Algorithm 1: cache tuples, run g_θ (statistics frozen), aggregate per layer."""
    stats = SolveStats()
    tuples = cache_edit_tuples(em, batch_edit, modules, opt)
    with torch.no_grad():
        shifts = all_shifts(net, tuples, opt, stats)
    info = {
        "n_tuples": tuples.n,
        "solve_fallbacks": stats.fallbacks,
        "eta": {n: float(net.eta(n).detach()) for n in modules},
    }
    if opt.shift == "normal" and opt.reg != "none":
        info["lambda"] = {n: float(net.lam(n).detach()) for n in modules}
    return edit_from_shifts(em, shifts, info)


@dataclass
class TrainConfig:
    """Meta-training schedule: the official one (epochs, final weights) or validate-and-select."""

    schedule: str = "official"
    epochs: int = 1  # official: passes over the training requests (the official n_epochs = 1)
    steps: int = 1000  # select: steps
    train_edits: int = 64
    val_every: int = 100  # select
    n_val: int = 256  # select: held-out training requests
    patience: int = 0  # select: stop after this many validations without improvement; 0 = never
    meta_lr: float = 1e-5
    max_grad_norm: float = 1.0
    meta_grad: str = "two_stage"
    threads: int = 0  # intra-op threads while training (0: leave torch's setting)
    val_batches: int = 0  # select: validation batches taken from the held-out pool (0: every full batch)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")


def validate(em: EditableModel, net: HyperNet, modules: Sequence[str], batches: Sequence[Sequence[EditRequest]],
             opt: Options, pre: Evaluation) -> dict[str, float]:
    """ES / GS / LS with the current g_θ, each batch edited at once and scored; score = their mean.

    Metrics are request-weighted means over the batches (all of the held-out pool, not one batch);
    `pre` is the unedited evaluation of the batches' requests in order (for ls_agree, reported only)."""
    net.eval()
    sums = {"es": 0.0, "gs": 0.0, "ls": 0.0, "mean_residual": 0.0, "ls_agree": 0.0}
    n = 0
    for requests in batches:
        edit = compute_edit(em, net, modules, ([r.prompt for r in requests], [r.target for r in requests]), opt)
        with edit.applied(em.model):
            ev = evaluate(em, requests)
        post = {k: (ev.metrics[k] if ev.metrics[k] == ev.metrics[k] else 0.0) for k in ("es", "gs", "ls")}
        post["mean_residual"] = edit.mean_residual or 0.0
        post["ls_agree"] = agreement(pre.loc_pred[n:n + len(requests)], ev.loc_pred)
        for k in sums:
            sums[k] += post[k] * len(requests)
        n += len(requests)
    out = {k: v / n for k, v in sums.items()}
    out["score"] = (out["es"] + out["gs"] + out["ls"]) / 3
    out["pre_es"], out["pre_ls"] = pre.metrics["es"], pre.metrics["ls"]
    return out


def meta_train(em: EditableModel, net: HyperNet, modules: Sequence[str], train: Sequence[EditRequest],
               opt: Options, cfg: TrainConfig, seed: int, progress: Any = None,
               log: Any = print) -> dict[str, Any]:
    """Meta-train g_θ with Adam and gradient clipping on the schedule `cfg.schedule`.

    `official` (ChenmienTan/malmen, editor/base.py and data/base.py): `epochs` passes over all
    training requests, each a fresh shuffle cut into floor(N / m) steps of m edits (the last
    partial batch dropped), the final weights kept, no validation.
    `select`: the first `n_val` requests of a seeded shuffle are held out and edited in batches of
    m every `val_every` of `steps` steps (a remainder smaller than m is left out); the weights with
    the best mean(ES, GS, LS) are kept. The normaliser observes the first training batch before
    step 0 is validated, so a g_θ restored from any step has statistics.
    Returns a summary (history, steps run, best step and its validation metrics) for the sidecar.
    """
    with torch_threads(cfg.threads):
        return _meta_train(em, net, modules, train, opt, cfg, seed, progress, log)


def _batches(n_trn: int, m: int, cfg: TrainConfig, rng: random.Random) -> Iterator[list[int]]:
    """Index lists of the steps: whole epochs without a partial batch (official), or `steps` draws (select)."""
    if cfg.schedule == "official":
        for _ in range(cfg.epochs):
            order = rng.sample(range(n_trn), n_trn)
            for i in range(0, n_trn - m + 1, m):
                yield order[i:i + m]
        return
    order: list[int] = []
    for _ in range(cfg.steps):
        if len(order) < m:  # next epoch(s): a fresh shuffle, continuing across the epoch boundary
            order += rng.sample(range(n_trn), n_trn)
        yield order[:m]
        del order[:m]


def _meta_train(em: EditableModel, net: HyperNet, modules: Sequence[str], train: Sequence[EditRequest],
                opt: Options, cfg: TrainConfig, seed: int, progress: Any, log: Any) -> dict[str, Any]:
    rng = random.Random(seed)
    pool = list(train)
    rng.shuffle(pool)
    n_val = min(cfg.n_val, len(pool) // 4) if cfg.schedule == "select" else 0
    val, trn = pool[:n_val], pool[n_val:]
    m = min(cfg.train_edits, len(trn))
    if m < cfg.train_edits:
        log(f"[meta] only {len(trn)} training requests: {m} edits per step instead of {cfg.train_edits}")
    total = (len(trn) // m) * cfg.epochs if cfg.schedule == "official" else cfg.steps
    size = max(1, min(m, n_val))
    val_batches = [val[i:i + size] for i in range(0, len(val) - size + 1, size)]
    if cfg.val_batches:
        val_batches = val_batches[:cfg.val_batches]
    val_req = [r for b in val_batches for r in b]
    pre = evaluate(em, val_req) if val_req else None
    adam = torch.optim.Adam(net.parameters(), lr=cfg.meta_lr)
    history: list[dict[str, Any]] = []

    def prepared(idx: list[int]) -> tuple[MetaBatch, Tuples]:
        batch = MetaBatch.from_requests([trn[i] for i in idx], rng)
        tuples = cache_for(em, batch, modules, opt)
        for n in modules:  # running input statistics move during meta-training only
            net.observe(n, tuples.keys[n], tuples.grads[n])
        return batch, tuples

    steps = _batches(len(trn), m, cfg, rng)
    first = next(steps, None)
    ready = prepared(first) if first is not None else None  # statistics exist before step 0 is validated
    best: dict[str, Any] = {"step": 0, "state": None, "val": None}
    bad = 0
    if val_req:
        best = {"step": 0, "state": _state_copy(net), "val": validate(em, net, modules, val_batches, opt, pre)}
        history.append({"step": 0, **best["val"]})
    step = 0
    with open_progress(progress) as bar:
        task = bar.add_task("meta-train", total=total, status="")
        while ready is not None:
            step += 1
            batch, tuples = ready
            net.train()
            adam.zero_grad(set_to_none=True)
            res = meta_backward(em, net, tuples, batch, opt, cfg.meta_grad)
            gnorm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm))
            adam.step()
            rec = {"step": step, "loss": res.loss, "gen": res.gen, "loc": res.loc, "grad_norm": gnorm}
            bar.update(task, advance=1, status=f"loss {res.loss:.3f} (gen {res.gen:.3f} loc {res.loc:.3f})")
            if val_req and (step % cfg.val_every == 0 or step == total):
                v = validate(em, net, modules, val_batches, opt, pre)
                rec.update({f"val_{k}": x for k, x in v.items()})
                if v["score"] > best["val"]["score"]:
                    best = {"step": step, "state": _state_copy(net), "val": v}
                    bad = 0
                else:
                    bad += 1
                bar.update(task, status=f"loss {res.loss:.3f} val es {v['es']:.2f} gs {v['gs']:.2f} "
                                        f"ls {v['ls']:.2f}")
                history.append(rec)
                if cfg.patience and bad >= cfg.patience:
                    log(f"[meta] early stop at step {step}: no validation gain in {bad} checks")
                    break
            elif step % 10 == 0 or step == total:
                history.append(rec)
            nxt = next(steps, None)
            ready = prepared(nxt) if nxt is not None else None
    if best["state"] is not None:  # select: restore the best validated weights
        net.load_state_dict(best["state"])
    else:  # official (or nothing to validate on): the final weights
        best = {"step": step, "state": None, "val": None}
    net.eval()
    return {"best_step": best["step"], "best_val": best["val"], "history": history, "steps": step,
            "schedule": cfg.schedule, "n_train_requests": len(trn), "n_val_requests": len(val_req),
            "train_edits": m}


def _state_copy(net: HyperNet) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}
