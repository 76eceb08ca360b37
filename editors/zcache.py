"""The δ-independent prefix of MEMIT's z optimisation, computed once per chunk.

MEMIT adds δ to the residual stream at one token (the subject's last, position p of a row) at the
output of one block. Causal attention means no token before p depends on δ, so the keys and values
of positions < p, in every layer, are the same at every Adam step. `PrefixCache` computes them once
(no grad) and each step runs the model only over positions >= p, attending to the cached prefix;
rows whose request already stopped are left out of the step. Rows are grouped by p (at most
`max_groups` groups, chosen by a small dynamic programme over the rows sorted by p, minimising the
tokens run per step) because one cache holds one prefix length.

The blocks up to the one δ is added at do not depend on δ either, at any position: with
`UpperBlocks` (found for models whose blocks sit in one ModuleList of the base model: GPT-2, GPT-J,
Llama-style) that block's output over each group's suffix is also computed once, and a step runs
only the blocks after it, fed that output plus δ as `inputs_embeds` (an absolute position embedding,
GPT-2's `wpe`, is zeroed during the step: the cached output already carries it).

Exact: the hidden states equal those of the full forward up to float rounding (a different batch
shape sums in another order); tests/test_memit.py compares the resulting z with the full path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.models import StopForward, cache_kwarg


def _layers_kv(cache: object) -> list[tuple[Tensor, Tensor]]:
    """Per layer (keys, values) of a transformers Cache (layers API) or a legacy tuple cache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]  # legacy tuple of (k, v) per layer


def group_by_split(split: Tensor, length: Tensor, max_groups: int) -> list[Tensor]:
    """Rows sorted by split, cut into <= max_groups contiguous groups minimising Σ_g |g| · (max len − min split)."""
    order = torch.argsort(split, stable=True)
    s, ln = split[order].tolist(), length[order].tolist()
    n = len(s)
    inf = float("inf")
    # cost(i, j): rows i..j-1 in one group; best[g][j]: the first j rows in g groups
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for g in range(1, max_groups + 1):
        for j in range(1, n + 1):
            longest = 0
            for i in range(j - 1, -1, -1):  # extend the last group leftwards
                longest = max(longest, ln[i])
                c = best[g - 1][i] + (j - i) * (longest - s[i])
                if c < best[g][j]:
                    best[g][j], cut[g][j] = c, i
    g = min(range(1, max_groups + 1), key=lambda k: best[k][n])
    groups, j = [], n
    while g > 0 and j > 0:
        i = cut[g][j]
        groups.append(order[i:j])
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
    rows: Tensor  # global row indices, sorted by split
    start: int  # first position run at each step (the group's smallest split)
    end: int  # one past the group's longest row
    kv: list[tuple[Tensor, Tensor]] | None  # per layer prefix keys/values (None when start == 0)
    h_in: Tensor | None = None  # with UpperBlocks: the insertion block's output over [start, end)


class PrefixCache:
    """Run a causal LM repeatedly over positions >= split[row] of a fixed batch, the prefix cached once."""

    def __init__(self, base: nn.Module, input_ids: Tensor, attention_mask: Tensor, split: Tensor,
                 max_groups: int = 8, upper: UpperBlocks | None = None, ends: Tensor | None = None):
        from transformers import DynamicCache

        self.base, self.ids, self.attn, self.upper = base, input_ids, attention_mask, upper
        self._kw = cache_kwarg(base)
        self._new_cache = DynamicCache
        # a row is run up to the last position whose output is read (`ends`, exclusive): causal attention
        # means later tokens change nothing before them
        lengths = attention_mask.sum(-1) if ends is None else torch.minimum(ends, attention_mask.sum(-1))
        self.groups: list[_Group] = []
        with torch.no_grad():
            for rows in group_by_split(split.cpu(), lengths.cpu(), max_groups):
                rows = rows.to(input_ids.device)
                start, end = int(split[rows].min()), int(lengths[rows].max())
                kv = None
                if start > 0:
                    out = base(input_ids=input_ids[rows, :start], attention_mask=attention_mask[rows, :start],
                               use_cache=True)
                    cache = getattr(out, self._kw, None) or getattr(out, "past_key_values", None)
                    kv = [(k.detach(), v.detach()) for k, v in _layers_kv(cache)]
                group = _Group(rows, start, end, kv)
                if upper is not None:
                    group.h_in = self._insertion_output(group)
                self.groups.append(group)
        self.current: _Group | None = None  # the group being run, for hooks (`offset`, `rows_now`)
        self.rows_now: Tensor | None = None

    def _insertion_output(self, g: _Group) -> Tensor:
        """The insertion block's output over the group's suffix (it does not depend on δ)."""
        assert self.upper is not None
        got: list[Tensor] = []

        def grab(_m: nn.Module, _a: object, out: object) -> None:
            got.append((out[0] if isinstance(out, tuple) else out).detach())
            raise StopForward

        hook = self.upper.insert.register_forward_hook(grab)
        kwargs = {} if g.kv is None else {self._kw: self._new_cache([(k, v) for k, v in g.kv])}
        try:
            self.base(input_ids=self.ids[g.rows, g.start:g.end], attention_mask=self.attn[g.rows, :g.end],
                      use_cache=g.kv is not None, **kwargs)
        except StopForward:
            pass
        finally:
            hook.remove()
        return got[0]

    @property
    def offset(self) -> int:
        """Position of the first token of the current forward within its rows."""
        return 0 if self.current is None else self.current.start

    def run(self, live_rows: Tensor, hidden_size: int,
            inject: Callable[[Tensor, Tensor, int], Tensor] | None = None) -> Tensor:
        """Last hidden states (R, T, d): filled at positions >= each group's start for live rows, zero elsewhere.

        With `UpperBlocks`, `inject(h, rows, offset)` adds δ to the cached insertion-block output `h`
        of `rows` (whose first position is `offset`) before the blocks after it run; without, δ is
        added by the caller's hook on the insertion block (`rows_now` and `offset` say where)."""
        R, T = self.ids.shape
        hid = None
        for g in self.groups:
            keep = live_rows[g.rows]
            sel = g.rows[keep]
            if sel.numel() == 0:
                continue
            self.current, self.rows_now = g, sel
            kwargs = {}
            if g.kv is not None:
                kwargs[self._kw] = self._new_cache([(k[keep], v[keep]) for k, v in g.kv])
            if self.upper is not None and g.h_in is not None:
                h = g.h_in[keep]
                if inject is not None:
                    h = inject(h, sel, g.start)
                with only_upper(self.base, self.upper):
                    out = self.base(inputs_embeds=h, attention_mask=self.attn[sel, :g.end],
                                    use_cache=g.kv is not None, **kwargs).last_hidden_state
            else:
                out = self.base(input_ids=self.ids[sel, g.start:g.end], attention_mask=self.attn[sel, :g.end],
                                use_cache=g.kv is not None, **kwargs).last_hidden_state
            if hid is None:
                hid = out.new_zeros(R, T, hidden_size)
            cols = torch.arange(g.start, g.end, device=out.device)
            hid = hid.index_put((sel[:, None], cols[None, :]), out)
        self.current, self.rows_now = None, None
        if hid is None:
            hid = torch.zeros(R, T, hidden_size, device=self.ids.device)
        return hid
