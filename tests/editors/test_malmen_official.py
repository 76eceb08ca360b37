"""The hyper-network editors run as the official MALMEN code runs them (ChenmienTan/malmen).

Block and initialisation, MEND's all-token cache, training at the edited m, the two loss
normalisations against hand-computed losses, the official schedule, and normaliser statistics.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from editors.base import EditorContext
from editors.caching import shifted
from editors.hypernet import HyperNet, LowRankBlock
from editors.lossnorm import lm_batches, loss_weights
from editors.malmen import MalmenEditor, MalmenHParams
from editors.mend import MendEditor, MendHParams
from editors.meta import MetaBatch, Options, TrainConfig, cache_edit_tuples, meta_loss_parts, meta_train
from tests.hyper_util import lm_requests, random_gpt2


@pytest.fixture(scope="module")
def gpt2():
    return random_gpt2(n_layer=2, dtype=torch.float64)


def test_default_block_is_identity_at_init_and_its_gradient_reaches_b():
    torch.manual_seed(0)
    block = LowRankBlock(dim=48, rank=24, n_layers=2).double()
    h = torch.randn(10, 48, dtype=torch.float64)
    out = block(h, 1)
    assert torch.equal(out, h)
    out.pow(2).sum().backward()
    # max(hAB + b, 0) at B = 0 is clamp(0, min=0): the clamp passes the gradient at 0, ReLU would not.
    assert float(block.up.grad.abs().max()) > 1.0
    assert float(block.up_bias.grad.abs().max()) > 0.0
    relu = LowRankBlock(dim=48, rank=24, n_layers=2, kind="inner_relu").double()
    relu(h, 1).pow(2).sum().backward()
    assert float(relu.up.grad.abs().max()) > 0  # the variant trains B through its inner ReLU


def test_a_is_standard_normal_unscaled_and_b_zero():
    torch.manual_seed(0)
    block = LowRankBlock(dim=640, rank=256, n_layers=1)
    a = block.down.detach()
    b, b_bias = block.up.detach(), block.up_bias.detach()
    assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - 1.0) < 0.01  # N(0, 1), 163,840 draws
    assert float(b.abs().max()) == 0 and float(b_bias.abs().max()) == 0
    assert float(block.scale.detach().min()) == 1 and float(block.shift.detach().abs().max()) == 0
    variant = LowRankBlock(dim=640, rank=256, n_layers=1, kind="inner_relu").down.detach()
    assert abs(float(variant.std()) * 640 ** 0.5 - 1.0) < 0.01  # the variant's N(0, 1/dim)
    with pytest.raises(ValueError, match="block"):
        LowRankBlock(dim=8, rank=2, n_layers=1, kind="relu")


def test_mend_caches_every_token_and_malmen_the_answer_tokens(gpt2):
    reqs = lm_requests(6)
    batch = gpt2.encode([r.prompt for r in reqs], [r.target for r in reqs])
    assert MendHParams().cache == "all" and MalmenHParams().cache == "answer"
    mend = MendEditor(gpt2, MendHParams(rank=8), EditorContext(seed=0)).edit(reqs)
    malmen = MalmenEditor(gpt2, MalmenHParams(rank=8), EditorContext(seed=0)).edit(reqs)
    assert mend.info["n_tuples"] == int(batch.attention_mask.sum())  # one tuple per token
    assert malmen.info["n_tuples"] == int(batch.answer_mask.sum())
    assert mend.info["n_tuples"] > malmen.info["n_tuples"]


def test_train_edits_follow_the_runs_edits_and_enter_the_checkpoint_key(gpt2):
    train = lm_requests(12)

    def editor(n_edits: int, **hp) -> MalmenEditor:
        return MalmenEditor(gpt2, MalmenHParams(rank=8, **hp), EditorContext(seed=0, n_edits=n_edits))

    assert editor(512).train_edits() == 512 and editor(64).train_edits() == 64
    assert editor(512).checkpoint_key(train) != editor(64).checkpoint_key(train)
    # an explicit train_edits shares one checkpoint across m
    assert editor(512, train_edits=16).checkpoint_key(train) == editor(64, train_edits=16).checkpoint_key(train)
    with pytest.raises(ValueError, match="train_edits"):
        MalmenEditor(gpt2, MalmenHParams(rank=8), EditorContext(seed=0)).train_edits()


def test_prepare_meta_trains_at_the_runs_edits_by_default(gpt2, tmp_path, monkeypatch):
    seen = {}
    real = meta_train

    def spy(em, net, modules, train, opt, cfg, *args):
        seen["train_edits"] = cfg.train_edits
        return real(em, net, modules, train, opt, cfg, *args)

    monkeypatch.setattr("editors.malmen.meta_train", spy)
    ctx = EditorContext(results_dir=tmp_path, seed=0, n_edits=5, log=lambda s: None)
    ed = MalmenEditor(gpt2, MalmenHParams(rank=8), ctx)
    ed.prepare(lm_requests(12))
    info = ed.prepare_info()
    assert seen["train_edits"] == 5
    assert (info["train_edits"], info["train_edits_from"], info["train_edits_shared"]) == (5, "--edits", False)
    assert info["steps"] == 12 // 5  # one epoch, the partial batch dropped


def _per_token_nll(em, prompts, targets):
    """Per example: the answer tokens' NLL, computed with a plain full forward."""
    batch = em.encode(prompts, targets)
    logits = em.logits(batch)
    nll = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100,
                          reduction="none").view(batch.labels.shape)
    return [nll[i][batch.answer_mask[i]] for i in range(len(prompts))]


def test_loss_norms_against_a_hand_computed_two_batch_example(gpt2):
    """Three examples, LM batches of 2: official = Σ_batches token means; sum = mean of summed NLL."""
    reqs = [lm_requests(6)[i] for i in (0, 4, 2)]  # answers of 1, 3 and 3 tokens
    prompts, targets = [r.prompt for r in reqs], [r.target for r in reqs]
    tok = _per_token_nll(gpt2, prompts, targets)
    lengths = gpt2.encode(prompts, targets).attention_mask.sum(1).tolist()
    groups = lm_batches(lengths, 2)
    assert [len(g) for g in groups] == [2, 1] and lengths[groups[0][0]] >= lengths[groups[1][0]]
    official = sum(torch.cat([tok[i] for i in g]).mean() for g in groups)
    summed = sum(t.sum() for t in tok) / 3
    assert not torch.allclose(official, summed)
    batch = MetaBatch((prompts, targets), (prompts, targets), (prompts, targets))
    zero = {n: torch.zeros_like(gpt2.weight(n)) for n in gpt2.module_names(last_n=2)}
    for norm, want in (("official", official), ("sum", summed)):
        opt = Options(loss_norm=norm, lm_batch=2, micro_batch=2)  # micro-batches cut across LM batches
        got = sum(float(p.detach()) for p, _, _ in meta_loss_parts(gpt2, batch, zero, opt))
        assert got == pytest.approx(float(want.detach()), rel=1e-10), norm
    # the locality KL is weighted the same way: Σ_b mean over b's answer positions
    shift = {n: 0.3 * torch.randn_like(gpt2.weight(n)) for n in gpt2.module_names(last_n=2)}
    enc = gpt2.encode(prompts, targets)
    with torch.no_grad():
        pre = gpt2.logits(enc).log_softmax(-1)
        with shifted(gpt2, shift):
            post = gpt2.logits(enc).log_softmax(-1)
    kl_tok = (pre.exp() * (pre - post)).sum(-1)
    per = [kl_tok[i][enc.answer_mask[i]] for i in range(3)]
    want_kl = sum(torch.cat([per[i] for i in g]).mean() for g in groups)
    opt = Options(loss_norm="official", lm_batch=2, micro_batch=3, loc_coef=1.0)
    got_kl = sum(loc for _, _, loc in meta_loss_parts(gpt2, batch, shift, opt))
    assert got_kl == pytest.approx(float(want_kl), rel=1e-9)


def test_official_value_gradients_are_the_batch_means(gpt2):
    reqs = lm_requests(5)
    edit = ([r.prompt for r in reqs], [r.target for r in reqs])
    modules = gpt2.module_names(last_n=2)
    plain = cache_edit_tuples(gpt2, edit, modules, Options(loss_norm="sum"))
    official = cache_edit_tuples(gpt2, edit, modules, Options(loss_norm="official", lm_batch=2))
    w = loss_weights(gpt2, *edit, "official", 2)
    rows = gpt2.encode(*edit).answer_mask.sum(1).tolist()
    w_rows = torch.repeat_interleave(w, torch.tensor(rows))
    for n in modules:
        assert torch.allclose(official.keys[n], plain.keys[n])
        assert torch.allclose(official.grads[n], plain.grads[n] * w_rows[:, None], rtol=1e-10, atol=1e-14)


def _net(em, modules):
    torch.manual_seed(0)
    return HyperNet({n: em.layer_dims(n) for n in modules}, rank=4, n_blocks=1, lr_init=1e-3, lam_init=1.0).double()


def test_official_schedule_runs_whole_epochs_and_keeps_the_final_weights(gpt2, monkeypatch):
    modules = gpt2.module_names(last_n=2)
    net = _net(gpt2, modules)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    monkeypatch.setattr("editors.meta._state_copy", lambda net: pytest.fail("official keeps no copies"))
    cfg = TrainConfig(schedule="official", epochs=2, train_edits=3, meta_lr=1e-2)
    out = meta_train(gpt2, net, modules, lm_requests(10), Options(), cfg, seed=0, log=lambda s: None)
    assert out["steps"] == 2 * (10 // 3) and out["best_step"] == out["steps"] and out["best_val"] is None
    assert out["n_val_requests"] == 0 and out["n_train_requests"] == 10
    assert any(not torch.equal(v, init[k]) for k, v in net.state_dict().items() if "norm" not in k)


def test_select_schedule_restoring_step_0_still_has_normaliser_statistics(gpt2, monkeypatch):
    modules = gpt2.module_names(last_n=2)
    net = _net(gpt2, modules)
    scores = iter([0.9, 0.1, 0.1])  # step 0 is never beaten
    monkeypatch.setattr("editors.meta.validate", lambda *a, **k: {"score": next(scores), "es": 0, "gs": 0, "ls": 0})
    cfg = TrainConfig(schedule="select", steps=2, val_every=1, n_val=4, train_edits=3)
    out = meta_train(gpt2, net, modules, lm_requests(16), Options(), cfg, seed=0, log=lambda s: None)
    assert out["best_step"] == 0
    assert net.has_statistics()


def test_a_checkpoint_without_statistics_is_never_trusted(gpt2, tmp_path):
    from editors.checkpoint import checkpoint_dir, save_checkpoint

    logs: list[str] = []
    ctx = EditorContext(results_dir=tmp_path, seed=0, n_edits=4, log=logs.append)
    ed = MalmenEditor(gpt2, MalmenHParams(rank=8), ctx)
    train = lm_requests(8)
    save_checkpoint(checkpoint_dir(tmp_path, ed.checkpoint_key(train)), ed.net.state_dict(), {})
    ed.prepare(train)
    assert ed.prepare_info()["reused"] is False and any("no normaliser statistics" in s for s in logs)
    assert ed.net.has_statistics()
    again = MalmenEditor(gpt2, MalmenHParams(rank=8), ctx)
    again.prepare(train)
    assert again.prepare_info()["reused"] is True and again.net.has_statistics()


def _rand_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.models import EditableModel
    from tests.hyper_util import word_tokenizer

    tok = word_tokenizer()
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      bos_token_id=2, eos_token_id=0, pad_token_id=0)
    return EditableModel(model=LlamaForCausalLM(cfg).double().eval(), tokenizer=tok, name="rand-llama",
                         arch="llama", key="rand-llama-official")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prefix_reuse_gives_the_full_edited_forward(arch):
    """The locality pass's edited forward, with the unedited blocks replayed, equals a full edited forward."""
    from editors.caching import PrefixReuse

    em = random_gpt2(n_layer=4, dtype=torch.float64) if arch == "gpt2" else _rand_llama()
    modules = em.module_names(last_n=2)
    reqs = lm_requests(5)
    batch = em.encode([r.locality_prompt for r in reqs], [r.locality_answer for r in reqs])
    shift = {n: 0.5 * torch.randn_like(em.weight(n)) for n in modules}
    prefix = PrefixReuse(em, modules)
    assert prefix.first == 2
    with torch.no_grad():
        with prefix.record():
            pre = em.answer_logits(batch)
        with shifted(em, shift), prefix.replay():
            post = em.answer_logits(batch)
        with shifted(em, shift):
            full = em.answer_logits(batch)
        plain = em.logits(batch)[batch.answer_mask]
    assert torch.allclose(pre, plain, rtol=1e-12, atol=1e-12)  # answer-position head = full head, rows aligned
    assert torch.allclose(post, full, rtol=1e-12, atol=1e-12) and not torch.allclose(post, pre)
    assert all(not type(b).__name__.startswith("_Replay") for b in prefix.blocks)  # blocks restored
