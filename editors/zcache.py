"""The δ-independent prefix of MEMIT's z optimisation, computed once per chunk.

MEMIT adds δ to the residual stream at one token (the subject's last, position p of a row) at the
output of one block. Causal attention means no token before p depends on δ, so the keys and values
of positions < p, in every layer, are the same at every Adam step. `PrefixCache` computes them once
(no grad) and each step runs the model only over each row's suffix, its positions p up to the last
one whose output is read, attending to the cached prefix; rows whose request already stopped are
left out of the step. The suffixes are aligned at p (column 0 of every step): the prefixes sit
left-padded in the cache and every token is given its position in the row, so rows with different
p share one forward. Rows are grouped by suffix length (at most `max_groups` groups, chosen by a
small dynamic programme minimising the columns run per step).

The blocks up to the one δ is added at do not depend on δ either, at any position: with
`UpperBlocks` (found for models whose blocks sit in one ModuleList of the base model: GPT-2, GPT-J,
Llama-style) that block's output over each group's suffixes is also computed once, and a step runs
only the blocks after it, fed that output plus δ as `inputs_embeds` (an absolute position embedding,
GPT-2's `wpe`, is zeroed during the step: the cached output already carries it).

Exact: the hidden states equal those of the full forward up to float rounding (a different batch
shape sums in another order); tests/editors/test_memit.py compares the resulting z with the full path."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.models import StopForward, cache_kwarg, output_cache


def _layers_kv(cache: object) -> list[tuple[Tensor, Tensor]]:
    """Per layer (keys, values) of a transformers Cache (layers API) or a legacy tuple cache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]  # legacy tuple of (k, v) per layer


def group_by_length(length: Tensor, max_groups: int) -> list[Tensor]:
    """Rows sorted by length, cut into <= max_groups contiguous groups minimising Σ_g |g| · (longest in g)."""
    order = torch.argsort(length, stable=True)
    values, counts = torch.unique_consecutive(length[order], return_counts=True)
    # rows of equal length never need to be apart: the programme runs over the distinct lengths
    v, c = values.tolist(), counts.tolist()
    n = len(v)
    inf = float("inf")
    # best[g][j]: the first j distinct lengths in g groups; a group's cost is its rows times its longest
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for g in range(1, max_groups + 1):
        for j in range(1, n + 1):
            rows = 0
            for i in range(j - 1, -1, -1):  # extend the last group leftwards
                rows += c[i]
                cost = best[g - 1][i] + rows * v[j - 1]
                if cost < best[g][j]:
                    best[g][j], cut[g][j] = cost, i
    g = min(range(1, max_groups + 1), key=lambda k: best[k][n])
    bounds = [0, *torch.tensor(c).cumsum(0).tolist()]
    groups, j = [], n
    while g > 0 and j > 0:
        i = cut[g][j]
        groups.append(order[bounds[i]:bounds[j]])
        j, g = i, g - 1
    return groups[::-1]


@dataclass(frozen=True)
class UpperBlocks:
    """The blocks after δ's insertion block, so a step can run only them."""

    attr: str  # the base model's ModuleList attribute holding the blocks ("h", "layers")
    first: int  # index of the first block after the insertion block
    insert: nn.Module  # the insertion block (its output over the suffix is cached)
    pos_embed: nn.Module | None  # an absolute position embedding added to inputs_embeds (GPT-2's wpe)


def upper_blocks(base: nn.Module, block: nn.Module) -> UpperBlocks | None:
    """`UpperBlocks` for insertion at `block`, or None when the blocks are not one ModuleList of `base`."""
    for name, child in base.named_children():
        if isinstance(child, nn.ModuleList):
            for i, b in enumerate(child):
                if b is block:
                    return UpperBlocks(name, i + 1, block, getattr(base, "wpe", None))
    return None


@contextlib.contextmanager
def only_upper(base: nn.Module, up: UpperBlocks) -> Iterator[None]:
    """Within the block, `base` runs only the blocks after the insertion block and adds no position embedding."""
    full = getattr(base, up.attr)
    hook = (up.pos_embed.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
            if up.pos_embed is not None else None)
    setattr(base, up.attr, nn.ModuleList(list(full)[up.first:]))  # the same modules; layer_idx unchanged
    try:
        yield
    finally:
        setattr(base, up.attr, full)
        if hook is not None:
            hook.remove()



@dataclass
class _Group:
    rows: Tensor  # global row indices
    ids: Tensor  # (|g|, S) each row's tokens from its split on (right-padded to the group's longest suffix)
    positions: Tensor  # (|g|, S) their positions in the row
    valid: Tensor  # (|g|, S) True up to each row's end (later columns are run but never read)
    mask: Tensor  # (|g|, P + S) the left-padded prefix's mask, then ones
    kv: list[tuple[Tensor, Tensor]] | None  # per layer prefix keys/values (None when no row has a prefix)
    h_in: Tensor | None = None  # with UpperBlocks: the insertion block's output over the suffix


class PrefixCache:
    """Run a causal LM repeatedly over positions >= split[row] of a fixed batch, the prefix cached once.

    Each row's suffix (its tokens from `split` up to `ends`, exclusive) starts at column 0 of a step:
    the prefixes are left-padded in the cache and every token gets its position in the row explicitly,
    so rows whose splits differ share a group without running tokens before their split. Rows are
    grouped by suffix length (`group_by_length`), so a step runs little more than the suffixes."""

    def __init__(self, base: nn.Module, input_ids: Tensor, attention_mask: Tensor, split: Tensor,
                 max_groups: int = 8, upper: UpperBlocks | None = None, ends: Tensor | None = None):
        from transformers import DynamicCache

        self.base, self.upper = base, upper
        self._kw = cache_kwarg(base)
        self._new_cache = DynamicCache
        # a row is run up to the last position whose output is read (`ends`, exclusive): causal attention
        # means later tokens change nothing before them
        lengths = attention_mask.sum(-1) if ends is None else torch.minimum(ends, attention_mask.sum(-1))
        lengths = torch.maximum(lengths, split + 1)  # the split token itself always runs: δ is added there
        self.groups: list[_Group] = []
        self.rows_now: Tensor | None = None
        self.width = T = input_ids.shape[1]
        with torch.no_grad():
            for rows in group_by_length((lengths - split).cpu(), max_groups):
                rows = rows.to(input_ids.device)
                sp, ln = split[rows], lengths[rows]
                P, S = int(sp.max()), int((ln - sp).max())
                ar_p = torch.arange(P, device=sp.device)
                pre_at = sp[:, None] - P + ar_p  # left padding: every prefix ends at column P - 1
                pre_ok = pre_at >= 0
                pre_at = pre_at.clamp_min(0)
                suf_at = sp[:, None] + torch.arange(S, device=sp.device)
                ids, attn = input_ids[rows], attention_mask[rows]
                pre_mask = torch.where(pre_ok, attn.gather(1, pre_at), 0)
                valid = suf_at < ln[:, None]
                suf_at = suf_at.clamp_max(T - 1)  # the unread columns past a short row's end repeat its last token
                group = _Group(rows, ids.gather(1, suf_at), suf_at, valid,
                               torch.cat([pre_mask, torch.ones_like(suf_at)], 1), None)
                if P > 0:
                    out = base(input_ids=ids.gather(1, pre_at), attention_mask=pre_mask, position_ids=pre_at,
                               use_cache=True)
                    group.kv = [(k.detach(), v.detach()) for k, v in _layers_kv(output_cache(out))]
                if upper is not None:
                    group.h_in = self._insertion_output(group)
                self.groups.append(group)

    def _kwargs(self, g: _Group, keep: Tensor | None = None) -> dict[str, object]:
        """The forward's mask, positions and (a fresh cache over) the prefix, for the group's rows `keep`."""
        sel = slice(None) if keep is None else keep
        kw: dict[str, object] = {"attention_mask": g.mask[sel], "position_ids": g.positions[sel],
                                 "use_cache": g.kv is not None}
        if g.kv is not None:
            kw[self._kw] = self._new_cache([(k[sel], v[sel]) for k, v in g.kv])
        return kw

    def _insertion_output(self, g: _Group) -> Tensor:
        """The insertion block's output over the group's suffix (it does not depend on δ)."""
        assert self.upper is not None
        got: list[Tensor] = []

        def grab(_m: nn.Module, _a: object, out: object) -> None:
            got.append((out[0] if isinstance(out, tuple) else out).detach())
            raise StopForward

        hook = self.upper.insert.register_forward_hook(grab)
        try:
            self.base(input_ids=g.ids, **self._kwargs(g))
        except StopForward:
            pass
        finally:
            hook.remove()
        return got[0]

    def run(self, live_rows: Tensor, hidden_size: int,
            inject: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
        """Last hidden states (R, T, d): filled from each live row's split to its end, zero elsewhere.

        A step's column 0 is each row's split token. With `UpperBlocks`, `inject(h, rows)` adds δ
        there to the cached insertion-block output `h` of `rows` before the blocks after it run;
        without, δ is added by the caller's hook on the insertion block (`rows_now` says which rows)."""
        R, T = live_rows.numel(), self.width
        hid = None
        for g in self.groups:
            keep = live_rows[g.rows]
            sel = g.rows[keep]
            if sel.numel() == 0:
                continue
            self.rows_now = sel
            kw = self._kwargs(g, keep)
            if g.h_in is not None:  # with UpperBlocks: only the blocks after the insertion block run
                h = g.h_in[keep]
                if inject is not None:
                    h = inject(h, sel)
                with only_upper(self.base, self.upper):
                    out = self.base(inputs_embeds=h, **kw).last_hidden_state
            else:
                out = self.base(input_ids=g.ids[keep], **kw).last_hidden_state
            if hid is None:
                hid = out.new_zeros(R, T, hidden_size)
            ok = g.valid[keep]
            hid = hid.index_put((sel[:, None].expand_as(ok)[ok], g.positions[keep][ok]), out[ok])
        self.rows_now = None
        if hid is None:
            hid = torch.zeros(R, T, hidden_size, device=live_rows.device)
        return hid
