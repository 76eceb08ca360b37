"""`tiny-t5`: a small T5 v1.1 (encoder-decoder, gated-GELU FFN) trained from scratch on the synthetic fact world.

The encoder-decoder counterpart of `tiny-gpt2` (bench/zoo/tiny.py), for editing T5 as the MALMEN
paper edits T5-XL (google/t5-xl-ssm-nq, a T5 v1.1 model, so the FFN is gated: `wo(gelu(wi_0 x) * wi_1 x)`).
A plain `T5ForConditionalGeneration` with the world's word-level tokenizer, closing every prompt
with [EOS] as T5's tokenizer closes its inputs with </s>; the decoder starts from [PAD] (T5's
decoder start token). It is trained on every fact in every template: prompt -> encoder, answer
followed by [EOS] -> decoder (the [EOS] teaches generation to stop; `EditableModel.encode` labels
the answer tokens only, as the official MALMEN code does). Cached like tiny-gpt2, by a hash of the
world, model and training configs, in `<results>/models/tiny-t5-<hash>/` (one verified cache entry,
bench/core/cachefs.py); training uses a fixed seed of its own, never the run seed.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.models import EditableModel, LoadContext
from bench.models.pinned import child_progress
from bench.zoo.tiny import (
    _one_thread,
    build_tokenizer,
    fact_accuracy,
    load_or_train,
    provenance,
)
from bench.zoo.training import train_loop
from tasks.synthetic import SyntheticConfig, build_world

# Bump when the training code changes what a given config produces. 2: trained in a child process under
# the pinned numerics (bench/models/pinned.py), the same bits on every x86-64 machine.
FORMAT = 2
META = "tiny.json"  # the training record (sidecar) of a cached model
NAME = "tiny-t5"


@dataclass(frozen=True)
class TinyT5ModelConfig:
    """T5 shape: 4 encoder and 4 decoder blocks, so the default edit (last 3 of each) leaves a block below."""

    d_model: int = 128
    # 512 as tiny-gpt2's n_inner: the width of the keys an FFN edit writes to. With d_ff = 256, an edit of
    # 64 facts caches ~240 encoder keys per layer (every prompt token), nearly spanning the key space, and
    # MALMEN moved unrelated facts (docs/t5.md).
    d_ff: int = 512
    num_layers: int = 4
    num_decoder_layers: int = 4
    num_heads: int = 4
    d_kv: int = 32
    feed_forward_proj: str = "gated-gelu"  # T5 v1.1, as the paper's T5-XL; "relu" gives the original T5 FFN


@dataclass(frozen=True)
class TinyT5TrainConfig:
    """Optimiser and schedule: AdamW with warmup + cosine over `max_epochs`, loss on decoder tokens."""

    # Measured on the shared 2-core machine (one thread, default world): batch 64 at lr 3e-3 knows every
    # fact after 6 epochs (226 s); batch 128 at lr 4e-3 after 8 (207 s, epochs are cheaper) with first-token
    # margins of median 7.8-9.6 / 10th percentile 5.4-6.3 nats per relation, capitals 8.8 / 5.5 (tiny-gpt2:
    # 8.7 / 8.0). Batch 128, lr 6e-3, 6 epochs was faster (134 s) but left facts wrong (template-0
    # accuracy 0.997, some margins negative), which any edit would then be blamed for.
    seed: int = 0
    lr: float = 4e-3
    weight_decay: float = 0.01
    batch_size: int = 128
    max_epochs: int = 8
    warmup_steps: int = 100


@dataclass(frozen=True)
class TinyT5Spec:
    """Everything the weights depend on."""

    world: SyntheticConfig = field(default_factory=SyntheticConfig)
    model: TinyT5ModelConfig = field(default_factory=TinyT5ModelConfig)
    train: TinyT5TrainConfig = field(default_factory=TinyT5TrainConfig)

    def key(self) -> str:
        """Short hash of the world, model and training configs."""
        blob = json.dumps({"format": FORMAT, "arch": "t5", "world": self.world.world_key(),
                           "model": asdict(self.model), "train": asdict(self.train)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def t5_config(mc: TinyT5ModelConfig, tok: Any) -> Any:
    """The transformers T5Config of `mc` over tokenizer `tok` (dropout off: the point is memorisation)."""
    from transformers import T5Config

    return T5Config(vocab_size=len(tok), d_model=mc.d_model, d_ff=mc.d_ff, d_kv=mc.d_kv, num_layers=mc.num_layers,
                    num_decoder_layers=mc.num_decoder_layers, num_heads=mc.num_heads,
                    feed_forward_proj=mc.feed_forward_proj, dropout_rate=0.0,
                    tie_word_embeddings=mc.feed_forward_proj == "relu",  # v1.1 unties the output head
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    decoder_start_token_id=tok.pad_token_id)


def t5_tokenizer(world: Any) -> Any:
    """The world's word-level tokenizer, closing each text with [EOS] (T5 closes its inputs with </s>)."""
    return build_tokenizer(world, single="$A [EOS]")


def _wrap(model: nn.Module, tok: Any, key: str, info: dict[str, Any]) -> EditableModel:
    from bench.models import arch_of

    return EditableModel(model=model, tokenizer=tok, name=NAME, arch=arch_of(model.config), key=f"{NAME}-{key}",
                         info=info)


def train_tiny_t5(spec: TinyT5Spec, progress: Any = None, log: Any = None) -> tuple[EditableModel, dict[str, Any]]:
    """Train a fresh tiny T5 on `spec.world`; returns the model and the training record."""
    with _one_thread():
        return _train(spec, progress, log)


def _train(spec: TinyT5Spec, progress: Any, log: Any) -> tuple[EditableModel, dict[str, Any]]:
    from transformers import T5ForConditionalGeneration

    t0, c0 = time.perf_counter(), time.process_time()
    world = build_world(spec.world)
    tok = t5_tokenizer(world)
    torch.manual_seed(spec.train.seed)
    model = T5ForConditionalGeneration(t5_config(spec.model, tok))
    em = _wrap(model, tok, spec.key(), {})

    pairs = world.pairs()
    batch = em.encode([p for p, _ in pairs], [a for _, a in pairs])
    ids, attn = batch.input_ids, batch.attention_mask
    assert batch.decoder_input_ids is not None
    # decoder: [start] + answer -> answer + [EOS]: append the last answer token to the inputs, [EOS] to the targets
    n_ans = batch.answer_mask.sum(1)
    rows = torch.arange(len(n_ans))
    pad = torch.full((len(n_ans), 1), tok.pad_token_id, dtype=torch.long)
    dec_in = torch.cat([batch.decoder_input_ids, pad], 1)
    dec_in[rows, n_ans] = batch.labels[rows, n_ans - 1]
    targets = torch.cat([batch.labels, torch.full_like(pad, -100)], 1)
    targets[rows, n_ans] = tok.eos_token_id
    ans = nn.functional.pad(batch.answer_mask, (0, 1))  # the [EOS] column is no answer token

    tc = spec.train
    lengths = attn.sum(-1)

    def batch_loss(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        t_max, u_max = int(lengths[b].max()), int(n_ans[b].max()) + 1  # drop padding beyond the batch's longest
        logits = model(input_ids=ids[b, :t_max], attention_mask=attn[b, :t_max],
                       decoder_input_ids=dec_in[b, :u_max], use_cache=False).logits
        tgt = targets[b, :u_max]
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
        return loss, logits, tgt, ans[b, :u_max]

    result = train_loop(model, lengths, tc, batch_loss, NAME, progress, log, clock=(t0, c0))
    record: dict[str, Any] = {
        "key": spec.key(), "world": spec.world.world_key(), "model": asdict(spec.model), "train": asdict(tc),
        "epochs": result.epochs, "steps": result.epochs * result.steps_per_epoch,
        "final_epoch_answer_acc": result.final_epoch_answer_acc,
        "train_s": round(time.perf_counter() - t0, 2), "train_cpu_s": round(time.process_time() - c0, 2),
        **provenance(model, tok),
    }
    record.update(fact_accuracy(em, world))
    return em, record


def model_dir(results_dir: Path, spec: TinyT5Spec) -> Path:
    """Cache folder of the model `spec` describes."""
    return Path(results_dir) / "models" / f"{NAME}-{spec.key()}"


def load_tiny_t5_spec(results_dir: Path, spec: TinyT5Spec | None = None, progress: Any = None) -> EditableModel:
    """Load the tiny T5 of `spec` from the cache, training and saving it first if missing or broken."""
    from transformers import T5ForConditionalGeneration

    spec = spec or TinyT5Spec()
    model, tok, info = load_or_train(model_dir(results_dir, spec), f"{NAME} ({spec.key()})",
                                     partial(train_tiny_t5, spec, child_progress(progress)),
                                     T5ForConditionalGeneration)
    return _wrap(model, tok, spec.key(), info)


def tiny_t5_folder(results_dir: Path) -> Path:
    """Cache entry of the `tiny-t5` alias under `results_dir` (computed without training)."""
    return model_dir(results_dir, TinyT5Spec())


def load_tiny_t5(ctx: LoadContext) -> EditableModel:
    """Model alias `tiny-t5` (default world, model and training configs)."""
    return load_tiny_t5_spec(ctx.results_dir, TinyT5Spec(), ctx.progress)
