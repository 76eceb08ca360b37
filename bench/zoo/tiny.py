"""`tiny-gpt2`: a small GPT-2 trained from scratch on the synthetic fact world, cached by hash.

The model is a plain `GPT2LMHeadModel` (Conv1D layers, so editors exercise GPT-2's weight
layout) with a word-level tokenizer over the world's vocabulary (one token per word; words
outside it map to `[UNK]`, which is what the zsRE path sees). It is trained on every fact in
every template for the whole cosine schedule (`max_epochs`; `target_acc` can stop it early), then
scored with `bench.evaluation.metrics.score_lm`. Weights (safetensors), tokenizer and a JSON sidecar live in
`<results>/models/tiny-gpt2-<hash>/` (one cache entry, bench/core/cachefs.py: verified on load, moved
aside and retrained when broken), where the hash covers the world, model and training configs; a
second load reuses them. Training uses a fixed seed of its own (not the run seed), so
every run of every seed edits the same model.

Training choices (measured on the shared 2-core machine, see `TinyTrainConfig`): next-token loss
on every token with answer tokens weighted 4x (the prompt tokens teach the templates, the answer
tokens are what is scored), AdamW with warmup + cosine, batches of similar-length sequences
(the templates differ in length, and padding to the longest one cost 1.7x compute), one
intra-op thread, dropout off (the point is memorisation). The loop itself (bench/zoo/training.py) is
shared with `tiny-t5`; this module supplies the weighted per-batch loss.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.core.cachefs import ensure_entry
from bench.core.machine import cpu_env
from bench.core.threads import torch_threads
from bench.models import EditableModel, LoadContext
from bench.models.pinned import NUMERICS, child_progress, state_sha256, train_pinned
from bench.zoo.training import train_loop
from tasks.synthetic import SyntheticConfig, World, build_world

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
# Bump when the training code changes what a given config produces. 3: trained in a child process under
# the pinned numerics (bench/models/pinned.py), the same bits on every x86-64 machine.
FORMAT = 3
META = "tiny.json"  # the training record (sidecar) of a cached model


@dataclass(frozen=True)
class TinyModelConfig:
    """GPT-2 shape; `n_positions` covers the harness's 128-token prompts (zsRE through tiny-gpt2)."""

    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_inner: int = 512
    n_positions: int = 128


@dataclass(frozen=True)
class TinyTrainConfig:
    """Optimiser and stopping rule; loss on every token, answer tokens weighted `answer_weight`."""

    seed: int = 0
    lr: float = 1.5e-3
    weight_decay: float = 0.01
    batch_size: int = 32  # measured: 32 reaches 99% in 9 epochs, 64 in 14, 128 in > 20 (CPU s/epoch similar)
    max_epochs: int = 16  # length of the cosine schedule; training stops earlier only at `target_acc`
    warmup_steps: int = 100
    answer_weight: float = 4.0
    # Stop once an epoch's running answer-token accuracy reaches this; None trains the whole schedule.
    # Measured on the default world: stopping at 0.99 (8 epochs) left the rare facts barely known (a
    # capital, seen in 4 sentences, had a median first-token margin of 4.2 nats, 10th percentile 2.1;
    # mean NLL 0.15), so any edit knocked some of them off (MEMIT m = 64: 28 of 128 capitals). The
    # full 16 epochs give 8.7 / 8.0 nats (NLL 0.002): a model that knows its facts, as the probes assume.
    target_acc: float | None = None


@dataclass(frozen=True)
class TinySpec:
    """Everything the weights depend on."""

    world: SyntheticConfig = field(default_factory=SyntheticConfig)
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    train: TinyTrainConfig = field(default_factory=TinyTrainConfig)

    def key(self) -> str:
        """Short hash of the world, model and training configs."""
        blob = json.dumps({"format": FORMAT, "world": self.world.world_key(), "model": asdict(self.model),
                           "train": asdict(self.train)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_tokenizer(world: World, single: str = "[BOS] $A") -> Any:
    """Word-level tokenizer over the world's words; `single` places the specials ([BOS] in front by default)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for text in world.corpus() for w, _ in pre.pre_tokenize_str(text)})
    vocab = {t: i for i, t in enumerate(list(SPECIALS) + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, vocab[t]) for t in SPECIALS if t in single.split()])
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def _wrap(model: nn.Module, tok: Any, key: str, info: dict[str, Any]) -> EditableModel:
    return EditableModel(model=model, tokenizer=tok, name="tiny-gpt2", arch="gpt2", key=f"tiny-gpt2-{key}",
                         info=info)


def fact_accuracy(em: EditableModel, world: World) -> dict[str, float]:
    """Answer-token accuracy on all facts: template 0, rephrase templates, and counterfactual targets."""
    with _one_thread():
        return _fact_accuracy(em, world)


def _fact_accuracy(em: EditableModel, world: World) -> dict[str, float]:
    from bench.evaluation.metrics import score_lm

    out: dict[str, float] = {}
    p0 = [world.render(f, 0) for f in world.facts]
    out["acc_template0"] = score_lm(em, [p for p, _ in p0], [a for _, a in p0], batch_size=256).mean()[0]
    reph = [world.render(f, k) for f in world.facts for k in range(1, len(world.templates[f.relation]))]
    out["acc_rephrase"] = score_lm(em, [p for p, _ in reph], [a for _, a in reph], batch_size=256).mean()[0]
    edit = world.train_idx + world.eval_idx
    cf = score_lm(em, [world.render(world.facts[i], 0)[0] for i in edit], [world.counterfactual(i) for i in edit],
                  batch_size=256)
    out["acc_counterfactual"], out["acc_counterfactual_seq"] = cf.mean()
    return out


def _one_thread():
    """One intra-op thread: the matrices are too small to gain from threads, oversubscribed shared
    cores make OpenMP spin (10x slower measured at load 14 on 2 cores), and a fixed thread count
    keeps the weights identical across machines."""
    return torch_threads(1)


def train_tiny(spec: TinySpec, progress: Any = None, log: Any = None) -> tuple[EditableModel, dict[str, Any]]:
    """Train a fresh tiny GPT-2 on `spec.world`; returns the model and the training record."""
    with _one_thread():
        return _train(spec, progress, log)


def _train(spec: TinySpec, progress: Any, log: Any) -> tuple[EditableModel, dict[str, Any]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    t0, c0 = time.perf_counter(), time.process_time()
    world = build_world(spec.world)
    tok = build_tokenizer(world)
    torch.manual_seed(spec.train.seed)
    mc = spec.model
    config = GPT2Config(vocab_size=len(tok), n_positions=mc.n_positions, n_embd=mc.n_embd, n_layer=mc.n_layer,
                        n_head=mc.n_head, n_inner=mc.n_inner, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(config)
    em = _wrap(model, tok, spec.key(), {})

    pairs = world.pairs()
    batch = em.encode([p for p, _ in pairs], [a for _, a in pairs])
    ids, attn, ans = batch.input_ids, batch.attention_mask, batch.answer_mask
    # next-token targets for every real token; answer positions weighted more
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = torch.where(attn[:, 1:].bool(), ids[:, 1:], -100)
    weights = torch.where(ans, spec.train.answer_weight, 1.0) * (targets != -100)

    tc = spec.train
    lengths = attn.sum(-1)

    def batch_loss(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        t_max = int(lengths[b].max())  # drop padding beyond this batch's longest sequence
        logits = model(input_ids=ids[b, :t_max], attention_mask=attn[b, :t_max]).logits
        tgt, w = targets[b, :t_max], weights[b, :t_max]
        nll = nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten().clamp_min(0), reduction="none")
        return (nll * w.flatten()).sum() / w.sum(), logits, tgt, ans[b, :t_max]

    result = train_loop(model, lengths, tc, batch_loss, "tiny-gpt2", progress, log, clock=(t0, c0))
    train_s = time.perf_counter() - t0
    record: dict[str, Any] = {
        "key": spec.key(), "world": spec.world.world_key(), "model": asdict(spec.model), "train": asdict(tc),
        "epochs": result.epochs, "steps": result.epochs * result.steps_per_epoch,
        "final_epoch_answer_acc": result.final_epoch_answer_acc,
        "train_s": round(train_s, 2), "train_cpu_s": round(time.process_time() - c0, 2),
        **provenance(model, tok),
    }
    record.update(fact_accuracy(em, world))
    return em, record


def provenance(model: nn.Module, tok: Any) -> dict[str, Any]:
    """What a trained tiny model's record says about its size and the machine and versions that trained it."""
    import tokenizers
    import transformers

    return {
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tok), "torch_threads": torch.get_num_threads(),
        "machine": cpu_env(),  # the kernels that produced these weights (bench/core/machine.py)
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
    }


def model_dir(results_dir: Path, spec: TinySpec) -> Path:
    """Cache folder of the model `spec` describes."""
    return Path(results_dir) / "models" / f"tiny-gpt2-{spec.key()}"


def load_tiny(results_dir: Path, spec: TinySpec | None = None, progress: Any = None) -> EditableModel:
    """Load the tiny GPT-2 of `spec` from the cache, training and saving it first if missing or broken."""
    from transformers import GPT2LMHeadModel

    spec = spec or TinySpec()
    model, tok, info = load_or_train(model_dir(results_dir, spec), f"tiny-gpt2 ({spec.key()})",
                                     partial(train_tiny, spec, child_progress(progress)), GPT2LMHeadModel)
    return _wrap(model, tok, spec.key(), info)


INFO_KEYS = ("acc_template0", "acc_rephrase", "acc_counterfactual", "train_s", "train_cpu_s", "epochs", "n_params")


def _fill(train: Callable[[], tuple[EditableModel, dict[str, Any]]], tmp: Path) -> None:
    """Train (in the pinned child) and write the entry's files: weights, tokenizer, sidecar with their digest."""
    em, record = train()
    record.update({"weights_sha256": state_sha256(em.model), "numerics": NUMERICS})
    em.model.save_pretrained(tmp, safe_serialization=True)
    em.tokenizer.save_pretrained(tmp)
    (tmp / META).write_text(json.dumps(record, indent=1, sort_keys=True))


def load_or_train(out: Path, label: str, train: Callable[[], tuple[EditableModel, dict[str, Any]]],
                  model_cls: Any) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Model, tokenizer and info of the cache entry `out`, training and saving it first if missing or broken.

    `train` must be picklable (a `functools.partial` of a module-level function): it runs in a child
    process under the pinned numerics (bench/models/pinned.py).
    """
    from transformers import PreTrainedTokenizerFast

    def fill(tmp: Path) -> None:
        print(f"Training {label} on the synthetic world (pinned numerics, one thread); cached in {out}")
        train_pinned(partial(_fill, train), tmp, label)

    ensure_entry(out, fill, required=(META, "model.safetensors"))  # locked: parallel processes train once
    record = json.loads((out / META).read_text())
    model = model_cls.from_pretrained(out, dtype=torch.float32)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    return model, tok, {k: record[k] for k in INFO_KEYS}


def tiny_gpt2_folder(results_dir: Path) -> Path:
    """Cache entry of the `tiny-gpt2` alias under `results_dir` (computed without training)."""
    return model_dir(results_dir, TinySpec())


def load_tiny_gpt2(ctx: LoadContext) -> EditableModel:
    """Model alias `tiny-gpt2` (default world, model and training configs)."""
    return load_tiny(ctx.results_dir, TinySpec(), ctx.progress)
