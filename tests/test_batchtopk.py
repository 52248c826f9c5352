import json

import pytest
import torch

from batchtopk import aux_loss, batch_topk_mask, update_threshold
from conftest import random_tokens, tiny_cfg
from crosscoder import CrossCoder
from trainer import Trainer


def btk(tmp_path=None, **kw):
    return CrossCoder(tiny_cfg(tmp_path, architecture="batchtopk", k=4, **kw))


def test_training_keeps_exactly_k_times_batch_active_latents():
    cc = btk().train()
    with torch.no_grad():
        cc.b_enc.fill_(1.0)  # every latent has a positive score: the top-k alone decides
    x = torch.randn(32, 2, 32)
    _, acts, _ = cc.losses_and_acts(x)
    assert int((acts > 0).sum()) == 4 * 32
    # and they are the largest scores of the whole batch
    scores = torch.relu(cc.encode(x, apply_relu=False)) * cc.decoder_norms().sum(-1)
    assert scores[acts > 0].min() >= scores[acts == 0].max()


def test_selection_ranks_activations_weighted_by_the_summed_decoder_norms():
    """Latent 0 has the larger activation (2.0) but small decoders (norm sum 0.1, score 0.2);
    latent 1 activates at 1.0 with decoder norm sum 1.0 (score 1.0). With k = 1 the selection
    keeps latent 1: ranking activations alone would keep latent 0."""
    cc = CrossCoder(tiny_cfg(architecture="batchtopk", k=1, d_in=4, dict_size=2)).train()
    with torch.no_grad():
        cc.W_enc.zero_(), cc.W_dec.zero_()
        cc.W_enc[0, 0, 0], cc.W_enc[0, 1, 1] = 2.0, 1.0
        cc.W_dec[0, 0, 0], cc.W_dec[0, 1, 0] = 0.05, 0.05
        cc.W_dec[1, 0, 1], cc.W_dec[1, 1, 1] = 0.6, 0.4
    x = torch.zeros(1, 2, 4)
    x[0, 0, :2] = 1.0
    acts = cc.encode(x)
    assert acts[0].tolist() == [0.0, 1.0]


def test_threshold_inference_equals_training_selection_where_they_must_agree():
    cc = btk().train()
    x = torch.randn(64, 2, 32)
    train_acts = cc.encode(x)
    scores = torch.relu(cc.encode(x, apply_relu=False)) * cc.decoder_norms().sum(-1)
    kept, dropped = scores[train_acts > 0], scores[train_acts == 0]
    with torch.no_grad():  # a threshold between the smallest kept and the largest dropped score
        cc.threshold.fill_(float((kept.min() + dropped.max()) / 2))
    cc.eval()
    assert torch.equal(cc.encode(x), train_acts)
    # and single tokens no longer depend on their batch: the same latents fire, with the same
    # values up to rounding (a one-row matmul may take another BLAS kernel than a 64-row one)
    alone = cc.encode(x[:1])
    assert torch.equal(alone > 0, train_acts[:1] > 0)
    assert torch.allclose(alone, train_acts[:1], rtol=0, atol=1e-6)


def test_threshold_is_a_moving_average_of_the_smallest_kept_score():
    t = update_threshold(torch.tensor(-1.0), torch.tensor(2.0))
    assert t.item() == 2.0
    assert update_threshold(t, torch.tensor(4.0), decay=0.9).item() == pytest.approx(2.2)
    cc = btk().train()
    x = torch.randn(16, 2, 32)
    cc.losses_and_acts(x)
    scores = torch.relu(cc.encode(x, apply_relu=False)).detach() * cc.decoder_norms().sum(-1).detach()
    _, min_kept = batch_topk_mask(scores, 4)
    assert cc.threshold.item() == pytest.approx(min_kept.item(), rel=1e-5)


def test_aux_loss_is_zero_without_dead_latents_and_reconstructs_the_error_with_dead_ones():
    torch.manual_seed(0)
    err = torch.randn(8, 2, 5)
    pre = torch.randn(8, 6)
    W = torch.randn(6, 2, 5)
    assert aux_loss(err, pre, W, torch.zeros(6, dtype=torch.bool), aux_k=3).item() == 0.0
    dead = torch.tensor([True, False, True, False, False, False])
    # independent computation: only latents 0 and 2 may reconstruct, each with its ReLU'd pre-activation
    acts = torch.relu(pre) * dead
    expected = ((acts @ W.flatten(1)).view(8, 2, 5) - err).pow(2).sum((1, 2)).mean()
    assert aux_loss(err, pre, W, dead, aux_k=3).item() == pytest.approx(expected.item(), rel=1e-5)


def test_aux_loss_with_more_dead_latents_than_aux_k_uses_each_tokens_largest():
    """5 dead latents, aux_k = 2: per token only the two largest ReLU'd pre-activations among
    the dead latents reconstruct the error (checked token by token with Python sorting)."""
    g = torch.Generator().manual_seed(1)
    err, pre, W = torch.randn(6, 2, 3, generator=g), torch.randn(6, 8, generator=g), torch.randn(8, 2, 3, generator=g)
    dead = torch.tensor([True, True, False, True, True, False, True, False])
    total = 0.0
    for b in range(6):
        candidates = sorted(((max(float(pre[b, f]), 0.0), f) for f in range(8) if dead[f]), reverse=True)[:2]
        recon = sum(v * W[f] for v, f in candidates)
        total += float((recon - err[b]).pow(2).sum())
    assert aux_loss(err, pre, W, dead, aux_k=2).item() == pytest.approx(total / 6, rel=1e-5)
    assert aux_loss(err, pre, W, dead, aux_k=2).item() != pytest.approx(aux_loss(err, pre, W, dead, aux_k=5).item())


def test_save_load_keeps_the_threshold_and_uses_it(tmp_path):
    cc = btk(tmp_path).train()
    cc.losses_and_acts(torch.randn(32, 2, 32))
    cc.save()
    loaded = CrossCoder.load(tmp_path / "checkpoints" / "version_0")
    assert not loaded.training and loaded.architecture == "batchtopk"
    assert loaded.threshold.item() == cc.threshold.item() > 0
    x = torch.randn(5, 2, 32)
    assert torch.equal(loaded.encode(x), cc.eval().encode(x))


def test_an_old_checkpoint_without_architecture_loads_as_l1(tmp_path):
    cc = CrossCoder(tiny_cfg(tmp_path))
    cc.save()
    path = tmp_path / "checkpoints" / "version_0" / "0_cfg.json"
    cfg = json.loads(path.read_text())
    del cfg["architecture"]
    path.write_text(json.dumps(cfg))
    assert CrossCoder.load(path.parent).architecture == "l1"


def test_folding_a_batchtopk_crosscoder_keeps_its_selection():
    cc = btk().train()
    cc.losses_and_acts(torch.randn(64, 2, 32))
    cc.eval()
    s = torch.tensor([0.3, 2.0])
    x_raw = torch.randn(10, 2, 32) * 3
    expected = cc(x_raw * s[:, None]) / s[:, None]
    assert torch.allclose(cc.fold_normalisation(s)(x_raw), expected, atol=1e-5)


@pytest.mark.parametrize("architecture", ["l1", "batchtopk"])
def test_both_architectures_train_through_the_real_buffer(tmp_path, models, architecture):
    cfg = tiny_cfg(tmp_path, architecture=architecture, k=6, num_tokens=32 * 12)
    trainer = Trainer(cfg, models[0], models[1], random_tokens(300, cfg["seq_len"]))
    logs = [trainer.step() for _ in range(12)]
    assert float(logs[-1]["l2_loss"]) < float(logs[0]["l2_loss"])
    if architecture == "batchtopk":
        assert all(float(l["l0_loss"]) == pytest.approx(6.0) for l in logs)
        assert float(logs[-1]["threshold"]) > 0 and "aux_loss" in logs[-1]
        assert all(float(l["l1_coeff"]) == 0.0 for l in logs)
    trainer.save()
    loaded = CrossCoder.load(trainer.crosscoder.save_dir)
    assert loaded.architecture == architecture
