"""MALMEN (Tan et al., ICLR 2024): hyper-network shifts aggregated by the normal equation.

Edit (Algorithm 1): cache (u_j, ∇v_j) of each edited linear for the answer tokens, map them with
g_θ to (ũ_j, ∇̃v_j), form d_j = -η (ũ_jᵀ u_j) ∇̃v_j and set S* = D Uᵀ (U Uᵀ + λ I)⁻¹ per layer
(editors/solvers.py). Meta-training (Algorithm 2) uses the two-stage memory-economic gradient
(editors/meta.py). λ_ℓ = exp(ρ_ℓ) is learnt per layer (positive parameterisation), λ₀ = 1.

Defaults are the official code's (ChenmienTan/malmen, config/editor/malmen.yaml, nets.py,
editor/base.py), which produced the paper's numbers and agree with Appendix A.6: rank 1920,
2 blocks, η₀ = 1e-6, meta-lr 1e-5, λ_loc = 1, gradient norm ≤ 1, second FFN linear of the last 6
blocks, the official block and initialisation (editors/hypernet.py), token-mean losses per LM batch
of 32 length-sorted examples (`loss_norm=official`), one epoch over the training split at the
edited m with the final weights kept (`schedule=official`), and `train_edits` = `--edits`.
The paper's printed normalisation (`loss_norm=sum`) and a validate-and-select schedule for CPU
budgets (`schedule=select`) are options. Per-model overrides live in
`editors/hparams/malmen/<model>.json` with their measured reason. Ablations (Table 1):
`shift=sum`, `reg=none`, `layers=first_fc`, `cache=all`; `meta_grad=naive` back-propagates end to
end. Point-by-point comparison with the official code: docs/malmen.md.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from editors.base import Edit, Editor, delta_dtype, register_editor
from editors.caching import CACHE_MODES
from editors.checkpoint import (
    checkpoint_dir,
    checkpoint_key,
    load_checkpoint,
    requests_digest,
    save_checkpoint,
)
from editors.hypernet import BLOCKS, HyperNet
from editors.lossnorm import LOSS_NORMS
from editors.meta import META_GRADS, REGS, SCHEDULES, SHIFTS, Options, TrainConfig, compute_edit, meta_train
from editors.ranges import Range, at_least, non_negative, one_of, positive
from tasks.base import EditRequest


@dataclass
class MalmenHParams:
    """MALMEN hyperparameters; the official code's values as defaults (they match Appendix A.6)."""

    layers: str = "second_fc"  # edited linear: FFN output ("first_fc": Table 1 ablation)
    last_n: int = 6  # edit the last 6 transformer blocks
    rank: int = 1920  # rank of the low-rank blocks of g_θ
    n_blocks: int = 2
    block: str = "official"  # "inner_relu": an earlier variant, see editors/hypernet.py
    edit_lr: float = 1e-6  # initial per-layer edit learning rate η
    lam_init: float = 1.0  # initial λ (λ = exp(ρ), ρ learnt)
    meta_lr: float = 1e-5
    loc_coef: float = 1.0  # λ_loc
    max_grad_norm: float = 1.0
    shift: str = "normal"  # "sum": sum of shifts (MEND-style, Table 1 ablation)
    reg: str = "ridge"  # "none": λ = 0, no regularisation term (Table 1 ablation)
    cache: str = "answer"  # "all": cache every token (Table 1 ablation; MEND's default)
    meta_grad: str = "two_stage"  # "naive": end-to-end back-propagation (Figure 1 / 9)
    loss_norm: str = "official"  # token means per LM batch of `lm_batch`; "sum": Algorithm 1 as printed
    lm_batch: int = 32  # examples per LM batch for loss_norm=official (config/data/zsre.yaml)
    train_edits: int | None = None  # edits per meta-training step; None: the run's --edits
    schedule: str = "official"  # epochs over the train split, final weights; "select": validate and keep the best
    epochs: int = 1  # schedule=official: passes over the training split (the official n_epochs)
    steps: int = 1000  # schedule=select: meta-training steps
    val_every: int = 100  # schedule=select
    n_val: int = 256  # schedule=select: held-out training requests for validation
    val_batches: int = 0  # schedule=select: batches of train_edits validated each time (0: all)
    patience: int = 0  # schedule=select: early stop after this many validations without gain; 0 = never
    # intra-op threads while meta-training; 0 keeps torch's setting. A fixed count makes the checkpoint
    # the same on every machine (float reductions split differently across threads, and on tiny-gpt2
    # 1 vs 2 threads gave checkpoints whose m = 64 ES differed by 0.08).
    meta_threads: int = 0
    micro_batch: int = 16  # prompts per LM forward (memory only: results do not depend on it)
    chunk: int = 1024  # cached tuples per hyper-network forward (the official editor.batch_size)

    # valid values, checked by editors.base.hparams_from (editors/ranges.py); last_n above the model's depth: bench.runner.run.check_depth
    RANGES: ClassVar[dict[str, Range]] = {
        "layers": one_of("second_fc", "first_fc"), "last_n": at_least(1), "rank": at_least(1),
        "n_blocks": at_least(1), "block": one_of(*BLOCKS), "edit_lr": positive(), "lam_init": positive(),
        "meta_lr": positive(), "loc_coef": non_negative(), "max_grad_norm": positive(), "shift": one_of(*SHIFTS),
        "reg": one_of(*REGS), "cache": one_of(*CACHE_MODES), "meta_grad": one_of(*META_GRADS),
        "loss_norm": one_of(*LOSS_NORMS), "lm_batch": at_least(1),
        "train_edits": at_least(1).or_none("the run's --edits"), "schedule": one_of(*SCHEDULES),
        "epochs": at_least(1), "steps": at_least(1), "val_every": at_least(1), "n_val": at_least(0),
        "val_batches": at_least(0), "patience": at_least(0), "meta_threads": at_least(0),
        "micro_batch": at_least(1), "chunk": at_least(1),
    }

    def __post_init__(self) -> None:
        if self.layers not in ("second_fc", "first_fc"):
            raise ValueError(f"layers must be second_fc or first_fc, got {self.layers!r}")
        for name, val, ok in (("cache", self.cache, CACHE_MODES), ("meta_grad", self.meta_grad, META_GRADS),
                              ("block", self.block, BLOCKS), ("loss_norm", self.loss_norm, LOSS_NORMS),
                              ("schedule", self.schedule, SCHEDULES)):
            if val not in ok:
                raise ValueError(f"{name} must be one of {ok}, got {val!r}")
        if self.lam_init <= 0:
            raise ValueError("lam_init must be > 0 (λ = exp(ρ))")
        if self.train_edits is not None and self.train_edits < 1:
            raise ValueError("train_edits must be >= 1 (or unset: the run's --edits)")
        if self.epochs < 1 or self.lm_batch < 1:
            raise ValueError("epochs and lm_batch must be >= 1")
        self.options()  # validates shift / reg / sizes

    def options(self) -> Options:
        return Options(shift=self.shift, reg=self.reg, cache=self.cache, loc_coef=self.loc_coef,
                       micro_batch=self.micro_batch, chunk=self.chunk, loss_norm=self.loss_norm,
                       lm_batch=self.lm_batch)

    def train_config(self, train_edits: int) -> TrainConfig:
        return TrainConfig(schedule=self.schedule, epochs=self.epochs, steps=self.steps, train_edits=train_edits,
                           val_every=self.val_every, n_val=self.n_val, patience=self.patience,
                           meta_lr=self.meta_lr, max_grad_norm=self.max_grad_norm, meta_grad=self.meta_grad,
                           threads=self.meta_threads, val_batches=self.val_batches)


@register_editor("malmen")
class MalmenEditor(Editor):
    """Hyper-network editor; `prepare` meta-trains (or reuses a cached checkpoint), `edit` is Alg. 1."""

    meta_trains = True

    hparams_cls = MalmenHParams

    def __init__(self, model: Any, hparams: Any = None, ctx: Any = None):
        super().__init__(model, hparams, ctx)
        self.modules = self.model.module_names(which=self.hparams.layers, last_n=self.hparams.last_n)
        self.net = self._build_net()
        self._info: dict[str, Any] = {"trained": False}

    def _build_net(self) -> HyperNet:
        hp = self.hparams
        dims = {n: self.model.layer_dims(n) for n in self.modules}
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(self.ctx.seed)
            net = HyperNet(dims, hp.rank, hp.n_blocks, hp.edit_lr, hp.lam_init, hp.block)
        p = next(self.model.model.parameters())
        # g_θ runs in float32 for a bfloat16/float16 LM (its tuples are cast up in editors/caching.py)
        net.to(device=p.device, dtype=delta_dtype(p.dtype))
        for norm in (m for m in net.modules() if hasattr(m, "m2")):  # statistics stay float64
            norm.to(torch.float64)
        return net.eval()

    def train_edits(self) -> int:
        """Edits per meta-training step: the hparams' value, else the run's --edits (the official code's rule)."""
        if self.hparams.train_edits is not None:
            return self.hparams.train_edits
        if self.ctx.n_edits < 1:
            raise ValueError(f"{self.name}: train_edits is unset and the context names no --edits")
        return self.ctx.n_edits

    def checkpoint_key(self, train: Sequence[EditRequest]) -> str:
        """Hash of model, task, training data, hyperparameters (train_edits resolved) and seed."""
        hp = {**dataclasses.asdict(self.hparams), "train_edits": self.train_edits()}
        return checkpoint_key(editor=self.name, model=self.ctx.model_key or self.model.key or self.model.name,
                              task=self.ctx.task_key, train=requests_digest(train), hparams=hp,
                              seed=self.ctx.seed, modules=self.modules)

    def prepare(self, train: Sequence[EditRequest]) -> None:
        """Load the checkpoint for this configuration, or meta-train g_θ and save it."""
        key = self.checkpoint_key(train)
        path = checkpoint_dir(self.ctx.results_dir, key)
        m = self.train_edits()
        shared = {"train_edits": m, "train_edits_from": "--edits" if self.hparams.train_edits is None else "hparams",
                  "train_edits_shared": bool(self.ctx.n_edits) and m != self.ctx.n_edits}
        found = load_checkpoint(path)
        if found is not None:
            state, side = found
            self.net.load_state_dict(state)
            if self.net.has_statistics():
                self.net.eval()
                self._info = {"trained": True, "checkpoint": str(path), "reused": True,
                              "meta_train_s": side.get("meta_train_s"), "best_step": side.get("best_step"),
                              "best_val": side.get("best_val"), "steps": side.get("steps"), **shared}
                self.ctx.log(f"[{self.name}] reusing meta-trained checkpoint {path}")
                return
            self.ctx.log(f"[{self.name}] checkpoint {path} has no normaliser statistics; meta-training again")
            shutil.rmtree(path, ignore_errors=True)  # so the new checkpoint takes its place
            self.net = self._build_net()
        if not train:
            raise ValueError(f"{self.name} needs training requests to meta-train its hyper-network")
        t0 = time.perf_counter()
        frozen = [p for p in self.model.model.parameters() if p.requires_grad]
        for p in frozen:  # the LM is never trained; skip its weight gradients
            p.requires_grad_(False)
        try:
            summary = meta_train(self.model, self.net, self.modules, train, self.hparams.options(),
                                 self.hparams.train_config(m), self.ctx.seed, self.ctx.progress, self.ctx.log)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        secs = time.perf_counter() - t0
        side = {"editor": self.name, "hparams": dataclasses.asdict(self.hparams), "model": self.ctx.model_key,
                "task": self.ctx.task_key, "seed": self.ctx.seed, "modules": self.modules,
                "meta_train_s": secs, **summary}
        if not self.net.has_statistics():  # never store a g_θ whose normaliser saw nothing
            raise RuntimeError(f"{self.name}: meta-training ended without normaliser statistics")
        save_checkpoint(path, self.net.state_dict(), side)
        self._info = {"trained": True, "checkpoint": str(path), "reused": False, "meta_train_s": secs,
                      "best_step": summary["best_step"], "best_val": summary["best_val"],
                      "steps": summary["steps"], **shared}

    def edit(self, requests: Sequence[EditRequest]) -> Edit:
        """One batch edit of all requests (Algorithm 1); statistics of g_θ stay frozen."""
        self.net.eval()
        batch = ([r.prompt for r in requests], [r.target for r in requests])
        edit = compute_edit(self.model, self.net, self.modules, batch, self.hparams.options())
        edit.info["trained"] = self._info.get("trained", False)
        return edit

    def prepare_info(self) -> dict[str, Any]:
        return dict(self._info)
