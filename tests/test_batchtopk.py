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
