import json

import pytest
import torch

from batchtopk import aux_loss, batch_topk_mask, geometric_median, k_at, update_threshold
from conftest import random_tokens, tiny_cfg
from crosscoder import CrossCoder
from objective import training_loss
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
    assert update_threshold(t, torch.tensor(4.0)).item() == pytest.approx(0.999 * 2 + 0.001 * 4)  # the authors' decay
    cc = btk().train()
    x = torch.randn(16, 2, 32)
    cc.losses_and_acts(x)
    scores = torch.relu(cc.encode(x, apply_relu=False)).detach() * cc.decoder_norms().sum(-1).detach()
    _, min_kept = batch_topk_mask(scores, 4)
    assert cc.threshold.item() == pytest.approx(min_kept.item(), rel=1e-5)


def test_the_threshold_tracks_the_smallest_positive_kept_score_not_a_kept_zero():
    """3 positive scores in a batch that keeps 4: the fourth kept score is 0, and the authors
    take the smallest positive one (0.5); with no positive score at all, 0."""
    scores = torch.tensor([[0.0, 2.0, 0.0], [0.5, 0.0, 1.0]])
    mask, min_kept = batch_topk_mask(scores, 2)
    assert int(mask.sum()) == 4 and min_kept.item() == 0.5
    assert batch_topk_mask(torch.zeros(2, 3), 2)[1].item() == 0.0


def test_k_is_annealed_linearly_from_k_max_then_held():
    assert [k_at(s, 10, 50, 4) for s in range(6)] == [50, 40, 30, 20, 10, 10]
    assert k_at(0, 10) == k_at(99, 10, None, 100) == k_at(3, 10, 50, 0) == 10


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
    assert aux_loss(err, pre, W, dead, aux_k=3, normalise=False).item() == pytest.approx(expected.item(), rel=1e-5)
    # normalised by the error's variance over the batch (Gao et al.): E_b ||e_b - mean e||^2
    variance = sum(float((err[b] - err.mean(0)).pow(2).sum()) for b in range(8)) / 8
    assert aux_loss(err, pre, W, dead, aux_k=3).item() == pytest.approx(expected.item() / variance, rel=1e-5)


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
    assert aux_loss(err, pre, W, dead, aux_k=2, normalise=False).item() == pytest.approx(total / 6, rel=1e-5)
    assert aux_loss(err, pre, W, dead, aux_k=2).item() != pytest.approx(aux_loss(err, pre, W, dead, aux_k=5).item())


def test_aux_loss_chooses_dead_latents_by_decoder_norm_scaled_activation_but_decodes_the_plain_one():
    """Dead latent 0 activates at 2.0 with decoder norm sum 0.1 (score 0.2), dead latent 1 at 1.0
    with norm sum 3.0 (score 3.0): with aux_k = 1 the authors' AuxK uses latent 1, at value 1.0."""
    err = torch.randn(1, 2, 3)
    pre = torch.tensor([[2.0, 1.0]])
    W = torch.zeros(2, 2, 3)
    W[0, :, 0], W[1, :, 1] = 0.05, 1.5
    dead = torch.ones(2, dtype=torch.bool)
    got = aux_loss(err, pre, W, dead, aux_k=1, norms_F=W.norm(dim=-1).sum(-1), normalise=False)
    assert got.item() == pytest.approx(float((1.0 * W[1] - err[0]).pow(2).sum()), rel=1e-6)
    by_activation = aux_loss(err, pre, W, dead, aux_k=1, normalise=False)
    assert by_activation.item() == pytest.approx(float((2.0 * W[0] - err[0]).pow(2).sum()), rel=1e-6)


def test_geometric_median_minimises_the_summed_distances_per_model():
    """Weiszfeld's estimate against a direct check: no nearby point has a smaller sum of
    distances, and a far outlier moves it much less than it moves the mean."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 2, 4, generator=g, dtype=torch.float64)
    x[0] = 1000.0  # an outlier in both models
    median = geometric_median(x).double()

    def cost(y_MD):
        return (x - y_MD).norm(dim=-1).sum(0)  # [M]

    for _ in range(20):
        nudged = median + 1e-2 * torch.randn(2, 4, generator=g, dtype=torch.float64)
        assert (cost(nudged) >= cost(median) - 1e-6).all()
    assert median.norm(dim=-1).max() < 0.5 < x.mean(0).norm(dim=-1).min()


def test_training_starts_b_dec_at_the_first_batchs_geometric_median_and_the_threshold_after_its_start(tmp_path):
    batch = torch.randn(32, 2, 32) + 3.0

    class Source:
        def next(self):
            return batch

    cfg = tiny_cfg(tmp_path, architecture="batchtopk", k=4, num_tokens=32 * 4, threshold_start_step=2)
    trainer = Trainer(cfg, buffer=Source())
    b_dec_before = []
    orig = trainer.crosscoder.losses_and_acts

    def spy(*args, **kwargs):
        b_dec_before.append(trainer.crosscoder.b_dec.detach().clone())
        return orig(*args, **kwargs)

    trainer.crosscoder.losses_and_acts = spy
    thresholds = [float(trainer.step()["threshold"]) for _ in range(4)]
    torch.testing.assert_close(b_dec_before[0], geometric_median(batch))
    assert thresholds[:3] == [-1.0, -1.0, -1.0] and thresholds[3] > 0  # updated only when step > 2
    zeros = Trainer(dict(cfg, b_dec_init="zeros", checkpoint_dir=str(tmp_path / "z")), buffer=Source())
    zeros.step()
    assert float(zeros.crosscoder.b_dec.detach().abs().max()) < 1e-2  # one Adam step from zero


def test_a_latent_counts_dead_for_auxk_after_dead_tokens_without_firing(tmp_path):
    cfg = tiny_cfg(tmp_path, architecture="batchtopk", k=4, dead_tokens=32 * 3 - 1)
    trainer = Trainer(cfg, buffer=type("S", (), {"next": lambda self: torch.randn(32, 2, 32)})())
    assert trainer._dead_window() == 3  # ceil(95 / 32) batches of 32 tokens
    trainer.steps_since_fired[:5] = torch.tensor([0, 2, 3, 4, 100])
    assert trainer.dead_fraction().item() == pytest.approx(3 / cfg["dict_size"])


def test_the_norm_reconstruction_loss_is_the_mean_l2_norm_per_token_and_model():
    cc = btk().train()
    x = torch.randn(16, 2, 32)
    losses, _, terms = cc.losses_and_acts(x)
    acts = cc.encode(x)
    err = x - cc.decode(acts)
    want = sum(float(err[b, m].detach().norm()) for b in range(16) for m in range(2)) / 32
    assert terms["l2_norm_loss"].item() == pytest.approx(want, rel=1e-5)
    cfg = dict(cc.cfg)
    loss, _ = training_loss(losses, terms, 0, 10, cfg)  # batchtopk's default: the authors' norm
    assert loss.item() == pytest.approx(want + cfg["aux_coeff"] * terms["aux_loss"].item(), rel=1e-5)
    loss, _ = training_loss(losses, terms, 0, 10, dict(cfg, recon_loss="squared"))
    assert loss.item() == pytest.approx(losses.l2_loss.item() + cfg["aux_coeff"] * terms["aux_loss"].item(), rel=1e-5)


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
    cfg = tiny_cfg(tmp_path, architecture=architecture, k=6, num_tokens=32 * 40, threshold_start_step=5)
    trainer = Trainer(cfg, models[0], models[1], random_tokens(300, cfg["seq_len"]))
    logs = [trainer.step() for _ in range(40)]
    trained = "l2_norm_loss" if architecture == "batchtopk" else "l2_loss"  # each one's reconstruction term
    assert sum(float(l[trained]) for l in logs[-5:]) < sum(float(l[trained]) for l in logs[:5])
    if architecture == "batchtopk":
        assert all(float(l["l0_loss"]) == pytest.approx(6.0) for l in logs)
        assert float(logs[-1]["threshold"]) > 0 and "aux_loss" in logs[-1]
        assert all(float(l["l1_coeff"]) == 0.0 for l in logs)
    trainer.save()
    loaded = CrossCoder.load(trainer.crosscoder.save_dir)
    assert loaded.architecture == architecture
