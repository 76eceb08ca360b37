"""Second-moment statistics C = E[k kᵀ] of edited layers' inputs over a text corpus, cached on disk.

MEMIT (Meng et al., ICLR 2023, Eq. 14) regularises each layer's update with the uncentred second
moment of the keys the layer already stores, estimated over generic text (the MEMIT repository
uses 100,000 Wikipedia samples). Here every non-padding token of every corpus text contributes
one key; the sum of outer products is accumulated in float64 and divided by the token count.

Cache layout (never pickle, never downloaded): one cache entry (bench/core/cachefs.py) per layer,
`<results_dir>/stats/<model-key-sanitised>/<layer>/<corpus>-<n>/`, holding `mom2.safetensors`
(`mom2`, float32 as MEMIT's `mom2_dtype`), a JSON sidecar `mom2.json` naming the model key, layer,
corpus digest, text count, token count and truncation length, and the manifest with both files'
sha256. Tensor and sidecar appear together in one rename; an entry is reused only when it verifies
and the sidecar matches all of the settings, and is replaced when computed with other settings.

Corpora:
- `synthetic`: the tiny GPT-2's own training text (`tasks.synthetic.build_world(...).corpus()`):
  its word-level tokenizer cannot read English.
- `shipped`: English text that ships with the project: FEVER claims (`tasks/data/fever`) and
  NQ-open questions (`tasks/data/nq_open`) — short sentences, not edit prompts of zsRE/CounterFact.
- `wikitext`: WikiText-103 (raw) train split through `datasets.load_dataset` (needs network).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from bench.core.cachefs import check_entry, move_aside, write_entry
from bench.core.progress import open_progress
from bench.models import EditableModel, StopForward
from tasks.base import DATA_DIR, read_records

# Bump when the way statistics are computed changes. The lean pass (float32 per batch, stopping after
# the last edited layer) gives the same C as the full float64 pass to ~1e-7, so it kept format 1.
FORMAT = 1


@dataclass(frozen=True)
class Corpus:
    """Texts for the statistics, with a short name for file names and a digest for cache checks."""

    name: str
    texts: tuple[str, ...]

    def digest(self) -> str:
        """sha256 over the texts (order matters: the first n texts are used)."""
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()


def synthetic_corpus(em: EditableModel) -> Corpus:
    """The synthetic world's sentences, the text the tiny GPT-2 was trained on."""
    from tasks.synthetic import SyntheticConfig, build_world

    world_cfg = em.info.get("world")  # a loader may record a non-default world; default otherwise
    cfg = SyntheticConfig(**world_cfg) if isinstance(world_cfg, dict) else SyntheticConfig()
    return Corpus(f"synthetic-w{cfg.world_seed}", tuple(build_world(cfg).corpus()))


def shipped_corpus() -> Corpus:
    """FEVER claims followed by NQ-open questions, as shipped in `tasks/data/` (English, offline)."""
    fever = [r["claim"] for r in read_records(DATA_DIR / "fever" / "paper_dev.jsonl")]
    nq = [r["question"] for r in read_records(DATA_DIR / "nq_open" / "NQ-open.dev.jsonl")]
    return Corpus("shipped", tuple(t.strip() for t in fever + nq if t.strip()))


def wikitext_corpus(n: int) -> Corpus:
    """The first `n` non-empty lines of WikiText-103 (raw) train, via `datasets` (online)."""
    from datasets import load_dataset

    ds = load_dataset("wikitext", "wikitext-103-raw-v1", split="train", streaming=True)
    texts: list[str] = []
    for rec in ds:
        t = rec["text"].strip()
        if t and not t.startswith("="):  # skip blank lines and section headings
            texts.append(t)
            if len(texts) >= n:
                break
    return Corpus("wikitext103", tuple(texts))


def corpus_for(name: str, em: EditableModel, n: int) -> Corpus:
    """Resolve a corpus option: auto | synthetic | shipped | wikitext."""
    if name == "auto":
        name = "synthetic" if em.name == "tiny-gpt2" else "shipped"
    if name == "synthetic":
        return synthetic_corpus(em)
    if name == "shipped":
        return shipped_corpus()
    if name == "wikitext":
        return wikitext_corpus(n)
    raise ValueError(f"unknown statistics corpus {name!r}; choose auto, synthetic, shipped or wikitext")


def sanitise(text: str) -> str:
    """A file-name-safe version of a model key."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


TENSOR = "mom2.safetensors"
SIDECAR = "mom2.json"


def stats_entry(results_dir: Path, model_key: str, layer: str, corpus: str, n: int) -> Path:
    """The cache entry (bench/core/cachefs.py) holding the statistics of one layer."""
    return Path(results_dir) / "stats" / sanitise(model_key) / layer / f"{corpus}-{n}"


def stats_path(results_dir: Path, model_key: str, layer: str, corpus: str, n: int) -> Path:
    """The statistics file of one layer (inside its entry; the sidecar is the same stem with `.json`)."""
    return stats_entry(results_dir, model_key, layer, corpus, n) / TENSOR


@dataclass
class LayerStats:
    """C = E[k kᵀ] of one layer plus how it was obtained."""

    mom2: Tensor  # (d_in, d_in) float32
    n_tokens: int
    reused: bool
    path: Path  # the cache entry (folder) it was read from or written to


def _sidecar(em: EditableModel, layer: str, corpus: Corpus, n: int, max_length: int) -> dict[str, Any]:
    return {"format": FORMAT, "model_key": em.key or em.name, "layer": layer, "corpus": corpus.name,
            "corpus_sha256": Corpus(corpus.name, corpus.texts[:n]).digest(), "n_texts": n,
            "max_length": max_length, "stat": "uncentred second moment E[k k^T] of the layer input"}


def _matching_meta(entry: Path, expect: dict[str, Any]) -> dict[str, Any] | None:
    """The sidecar of a verified entry if it was computed with the settings `expect`; else None."""
    if not check_entry(entry, required=(TENSOR, SIDECAR)):  # absent, or broken and moved aside
        return None
    try:
        meta = json.loads((entry / SIDECAR).read_text())
    except (OSError, ValueError) as e:  # an entry without a manifest is only checked for parseable JSON
        meta, why = None, f"{SIDECAR}: {e}"
    else:
        why = f"{SIDECAR} is not an object with an integer n_tokens"
    n_tokens = meta.get("n_tokens") if isinstance(meta, dict) else None
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool):  # broken: moved aside and rebuilt
        move_aside(entry, why)
        return None
    return meta if all(meta.get(k) == v for k, v in expect.items()) else None


def _try_load(entry: Path, expect: dict[str, Any]) -> LayerStats | None:
    meta = _matching_meta(entry, expect)
    if meta is None:
        return None
    return LayerStats(load_file(entry / TENSOR)["mom2"], int(meta["n_tokens"]), True, entry)


def _save(entry: Path, mom2: Tensor, meta: dict[str, Any], expect: dict[str, Any]) -> None:
    """Write tensor and sidecar as one entry (one rename); an entry of other settings is replaced."""

    def fill(tmp: Path) -> None:
        save_file({"mom2": mom2.contiguous()}, str(tmp / TENSOR))
        (tmp / SIDECAR).write_text(json.dumps(meta, indent=1))

    # an entry with these settings written meanwhile by a parallel run is equivalent and kept
    write_entry(entry, fill, replace=_matching_meta(entry, expect) is None)



@torch.no_grad()
def compute_second_moments(em: EditableModel, layers: Sequence[str], texts: Sequence[str], batch_size: int,
                           max_length: int, progress: Callable[[], Any] | None = None,
                           lean: bool = True) -> tuple[dict[str, Tensor], int]:
    """Sum of k kᵀ over all non-padding tokens, for all `layers` in one pass; returns (float64 sums, tokens).

    `lean` (the default) stops each forward once every edited layer has seen its input and forms each
    batch's xᵀx in float32 before adding it to the float64 total; `lean=False` runs the whole model
    and accumulates in float64 throughout (the reference path: the same C to ~1e-7 relative)."""
    tok = em.tokenizer
    sums: dict[str, Tensor] = {}
    mask_holder: dict[str, Tensor] = {}
    seen: set[str] = set()
    wanted = set(layers)

    def hook(name: str) -> Callable[..., None]:
        def fn(_mod: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0][mask_holder["m"]]  # (tokens, d_in): padding rows dropped
            xtx = (x.float().T @ x.float()).double() if lean else x.double().T @ x.double()
            sums[name] = sums[name] + xtx if name in sums else xtx
            seen.add(name)
            if lean and seen == wanted:
                raise StopForward

        return fn

    handles = [em.module(n).register_forward_pre_hook(hook(n)) for n in layers]
    n_tokens = 0
    # Longest texts first so the slowest batches show up early in the ETA.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    try:
        with open_progress(progress) as prog:
            bar = prog.add_task("MEMIT key statistics", total=len(texts), status="")
            for s in range(0, len(order), batch_size):
                chunk = [texts[i] for i in order[s : s + batch_size]]
                enc = tok(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                          padding_side="right")
                ids, attn = enc["input_ids"].to(em.device), enc["attention_mask"].to(em.device)
                mask_holder["m"] = attn.bool()
                seen.clear()
                try:
                    em.model(input_ids=ids, attention_mask=attn)
                except StopForward:  # lean: the blocks after the last edited layer and the LM head are skipped
                    pass
                if seen != wanted:
                    raise RuntimeError(f"the statistics pass never reached layer(s) {sorted(wanted - seen)}")
                n_tokens += int(attn.sum())
                prog.update(bar, advance=len(chunk), status=f"{n_tokens} tokens")
    finally:
        for h in handles:
            h.remove()
    return sums, n_tokens


def layer_second_moments(em: EditableModel, layers: Sequence[str], corpus: Corpus, n_samples: int,
                         results_dir: Path, batch_size: int = 32, max_length: int = 128,
                         progress: Callable[[], Any] | None = None) -> dict[str, LayerStats]:
    """C for each layer: read from the cache where a matching file exists, else computed (one pass) and saved."""
    n = min(n_samples, len(corpus.texts))
    if n == 0:
        raise ValueError(f"statistics corpus '{corpus.name}' is empty")
    key = em.key or em.name
    out: dict[str, LayerStats] = {}
    missing: list[str] = []
    for layer in layers:
        entry = stats_entry(results_dir, key, layer, corpus.name, n)
        hit = _try_load(entry, _sidecar(em, layer, corpus, n, max_length))
        if hit is None:
            missing.append(layer)
        else:
            out[layer] = hit
    if missing:
        sums, n_tokens = compute_second_moments(em, missing, corpus.texts[:n], batch_size, max_length, progress)
        for layer in missing:
            mom2 = (sums[layer] / n_tokens).float().cpu()
            entry = stats_entry(results_dir, key, layer, corpus.name, n)
            expect = _sidecar(em, layer, corpus, n, max_length)
            _save(entry, mom2, {**expect, "n_tokens": n_tokens}, expect)
            out[layer] = LayerStats(mom2, n_tokens, False, entry)
    return {layer: out[layer] for layer in layers}
