import json
import pickle

import pytest
import torch

from conftest import random_tokens, tiny_cfg
from crosscoder import CrossCoder, LossOutput
from crossdiff.arch.batchtopk import aux_loss, batch_topk_mask, k_at, update_threshold
from crossdiff.io.checkpoint import CheckpointError, latest_checkpoint, latest_version_dir
from trainer import Trainer, geometric_median


def cc_cfg(tmp_path=None, **kw):
    return tiny_cfg(tmp_path, **kw)


def test_parameter_and_output_shapes():
    cc = CrossCoder(cc_cfg(d_in=5, dict_size=7))
    assert cc.W_enc.shape == (2, 5, 7) and cc.W_dec.shape == (7, 2, 5)
    assert cc.b_enc.shape == (7,) and cc.b_dec.shape == (2, 5)
    x = torch.randn(3, 2, 5)
    assert cc.encode(x).shape == (3, 7)
    assert cc.decode(cc.encode(x)).shape == (3, 2, 5) and cc(x).shape == (3, 2, 5)


def test_hand_set_crosscoder_gives_hand_computed_outputs_and_losses():
    cc = CrossCoder(cc_cfg(d_in=2, dict_size=2))
    with torch.no_grad():
        # latent 0 reads model 0's first coordinate, latent 1 reads model 1's second.
        cc.W_enc.copy_(torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]))
        cc.b_enc.copy_(torch.tensor([0.0, -1.0]))
        cc.W_dec.copy_(torch.tensor([[[1.0, 0.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 1.0]]]))
        cc.b_dec.copy_(torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    x = torch.tensor([[[2.0, 1.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, 0.0]]])
    # token 0: f0 = relu(2) = 2, f1 = relu(2*1 - 1) = 1; token 1: f0 = relu(-1) = 0, f1 = relu(-1) = 0
    assert torch.equal(cc.encode(x), torch.tensor([[2.0, 1.0], [0.0, 0.0]]))
    assert torch.equal(cc.encode(x, apply_relu=False), torch.tensor([[2.0, 1.0], [-1.0, -1.0]]))
    x_hat = cc(x)
    # token 0: model 0 = 2*[1,0] + [0.5,0] = [2.5,0]; model 1 = 2*[3,4] + 1*[0,1] = [6,9]
    assert torch.equal(x_hat, torch.tensor([[[2.5, 0.0], [6.0, 9.0]], [[0.5, 0.0], [0.0, 0.0]]]))
    losses = cc.get_losses(x)
    # squared errors: token 0: (0.5^2 + 1) + (36 + 64) = 101.25; token 1: 1.5^2 = 2.25
    assert losses.l2_loss.item() == pytest.approx((101.25 + 2.25) / 2)
    # decoder norm sums: latent 0: 1 + 5 = 6; latent 1: 0 + 1 = 1 -> token 0: 2*6 + 1*1 = 13
    assert losses.l1_loss.item() == pytest.approx(13 / 2)
    assert losses.l0_loss.item() == pytest.approx(1.0)
    # batch mean per model: model 0 [0.5, 0.5], model 1 [0, 0.5]
    var0 = (1.5**2 + 0.5**2, 1.5**2 + 0.5**2)  # model 0, tokens 0 and 1
    var1 = (0.5**2, 0.5**2)
    ev_a = ((1 - 1.25 / var0[0]) + (1 - 2.25 / var0[1])) / 2
    ev_b = ((1 - 100 / var1[0]) + (1 - 0 / var1[1])) / 2
    ev = ((1 - 101.25 / (var0[0] + var1[0])) + (1 - 2.25 / (var0[1] + var1[1]))) / 2
    assert losses.explained_variance_A.item() == pytest.approx(ev_a)
    assert losses.explained_variance_B.item() == pytest.approx(ev_b)
    assert losses.explained_variance.item() == pytest.approx(ev)


@pytest.mark.parametrize("n_models", [2, 3])
@torch.no_grad()
def test_get_losses_equals_naive_per_model_loop(n_models):
    torch.manual_seed(0)
    cc = CrossCoder(cc_cfg(d_in=6, dict_size=10, n_models=n_models, seed=3))
    with torch.no_grad():
        cc.b_enc.normal_()
        cc.b_dec.normal_()
    x = torch.randn(8, n_models, 6)
    losses = cc.get_losses(x)
    l2, l1, l0, ev_m = 0.0, 0.0, 0.0, [0.0] * n_models
    for b in range(8):
        pre = cc.b_enc.clone()
        for m in range(n_models):
            pre = pre + x[b, m] @ cc.W_enc[m]
        f = torch.relu(pre)
        err_total, var_total = 0.0, 0.0
        for m in range(n_models):
            x_hat = f @ cc.W_dec[:, m] + cc.b_dec[m]
            err = ((x_hat - x[b, m]) ** 2).sum()
            var = ((x[b, m] - x[:, m].mean(0)) ** 2).sum()
            err_total, var_total = err_total + err, var_total + var
            ev_m[m] += (1 - err / var) / 8
        l2 += err_total / 8
        l1 += sum(f[i] * sum(cc.W_dec[i, m].norm() for m in range(n_models)) for i in range(10)) / 8
        l0 += (f > 0).sum() / 8
    assert losses.l2_loss.item() == pytest.approx(float(l2), rel=1e-5)
    assert losses.l1_loss.item() == pytest.approx(float(l1), rel=1e-5)
    assert losses.l0_loss.item() == pytest.approx(float(l0))
    assert losses.explained_variance_A.item() == pytest.approx(float(ev_m[0]), rel=1e-5)
    assert losses.explained_variance_B.item() == pytest.approx(float(ev_m[1]), rel=1e-5)


def test_init_decoder_norms_and_encoder_is_decoder_transpose():
    cc = CrossCoder(cc_cfg(d_in=16, dict_size=20, dec_init_norm=0.08))
    assert torch.allclose(cc.W_dec.norm(dim=-1), torch.full((20, 2), 0.08))
    assert torch.equal(cc.W_enc, cc.W_dec.permute(1, 2, 0))
    assert torch.all(cc.b_enc == 0) and torch.all(cc.b_dec == 0)


def test_same_seed_same_weights_and_no_global_rng_side_effect():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = CrossCoder(cc_cfg(seed=5))
    assert torch.equal(torch.rand(1), expected_next)  # construction left the global RNG alone
    b = CrossCoder(cc_cfg(seed=5))
    c = CrossCoder(cc_cfg(seed=6))
    assert torch.equal(a.W_dec, b.W_dec) and not torch.equal(a.W_dec, c.W_dec)


@pytest.mark.parametrize("enc_dtype,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_from_config_and_losses_in_float32(enc_dtype, dtype):
    cc = CrossCoder(cc_cfg(enc_dtype=enc_dtype))
    assert all(p.dtype == dtype for p in cc.parameters())
    losses = cc.get_losses(torch.randn(4, 2, 32))
    assert all(v.dtype == torch.float32 for v in losses)


def test_relative_norm_and_cosine_on_hand_set_decoder():
    cc = CrossCoder(cc_cfg(d_in=2, dict_size=3))
    with torch.no_grad():
        cc.W_dec.copy_(torch.tensor([
            [[1.0, 0.0], [0.0, 0.0]],   # base only -> 0
            [[0.0, 0.0], [0.0, 2.0]],   # chat only -> 1
            [[3.0, 0.0], [0.0, 3.0]],   # shared, orthogonal -> 0.5, cos 0
        ]))
    assert torch.allclose(cc.relative_decoder_norm(), torch.tensor([0.0, 1.0, 0.5]))
    assert torch.allclose(cc.decoder_norms(), torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]))
    assert cc.decoder_cosine_similarity()[2].item() == pytest.approx(0.0)
    with torch.no_grad():
        cc.W_dec[2, 1] = torch.tensor([6.0, 0.0])
    assert cc.decoder_cosine_similarity()[2].item() == pytest.approx(1.0)


def test_folded_crosscoder_equals_normalise_crosscoder_unnormalise():
    torch.manual_seed(0)
    cc = CrossCoder(cc_cfg(d_in=8, dict_size=16, n_models=3))
    with torch.no_grad():
        cc.b_enc.normal_(0, 0.1)
        cc.b_dec.normal_()
    s = torch.tensor([0.27, 0.24, 1.7])
    x_raw = torch.randn(5, 3, 8) * 10
    expected = cc(x_raw * s[None, :, None]) / s[None, :, None]
    folded = cc.fold_normalisation(s)
    assert torch.allclose(folded(x_raw), expected, atol=1e-5)
    assert torch.allclose(folded.encode(x_raw), cc.encode(x_raw * s[None, :, None]), atol=1e-5)
    # factors recorded in the config are used by default
    cc.cfg["normalisation_factor"] = s.tolist()
    assert torch.allclose(cc.fold_normalisation()(x_raw), expected, atol=1e-5)


def test_construction_creates_no_directory(tmp_path):
    CrossCoder(cc_cfg(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_save_load_round_trip_and_versions_never_overwrite(tmp_path):
    cfg = cc_cfg(tmp_path, normalisation_factor=[0.5, 0.25])
    cc = CrossCoder(cfg)
    with torch.no_grad():
        cc.b_dec.normal_()
    cc.save()
    cc.save()
    other = CrossCoder(cfg)
    other.save()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["version_0", "version_1"]
    assert sorted(p.name for p in (root / "version_0").iterdir()) == ["0.pt", "0.sha256", "0_cfg.json", "1.pt", "1.sha256",
                                                                        "1_cfg.json"]
    loaded = CrossCoder.load(root / "version_0", 1)
    x = torch.randn(4, 2, 32)
    assert torch.equal(loaded(x), cc(x))
    assert loaded.cfg["normalisation_factor"] == [0.5, 0.25]
    assert latest_checkpoint(root / "version_0") == 1
    assert latest_version_dir(root) == root / "version_1"
    # newest checkpoint by default
    assert torch.equal(CrossCoder.load(root / "version_0").W_dec, cc.W_dec)


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    cc = CrossCoder(cc_cfg(tmp_path))
    path = cc.save()
    before = path.read_bytes()

    def exploding_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    cc.save_version = 0  # force a rewrite of the same file name
    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError):
        cc.save()
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def write_published_layout(root, cc, drop_d_in=True):
    sub = root / "blocks.14.hook_resid_pre"
    sub.mkdir(parents=True)
    cfg = {k: v for k, v in cc.cfg.items() if not (drop_d_in and k == "d_in")}
    cfg.pop("n_models", None)
    cfg["device"] = "cuda:0"  # as published: must not matter on a CPU machine
    (sub / "cfg.json").write_text(json.dumps(cfg))
    torch.save({k: getattr(cc, k).detach() for k in ("W_enc", "W_dec", "b_enc", "b_dec")}, sub / "cc_weights.pt")


def test_load_from_hf_reads_a_local_directory_in_the_published_layout(tmp_path):
    cc = CrossCoder(cc_cfg(d_in=12, dict_size=24))
    write_published_layout(tmp_path, cc)
    loaded = CrossCoder.load_from_hf(str(tmp_path), device="cpu")
    assert loaded.cfg["d_in"] == 12 and loaded.cfg["n_models"] == 2 and loaded.cfg["architecture"] == "l1"
    x = torch.randn(3, 2, 12)
    assert torch.equal(loaded(x), cc(x))


def test_three_models_train_step_and_round_trip(tmp_path):
    cc = CrossCoder(cc_cfg(tmp_path, n_models=3, model_names=["a", "b", "c"]))
    x = torch.randn(16, 3, 32)
    cc.get_losses(x).l2_loss.backward()
    assert cc.W_dec.grad.shape == (64, 3, 32)
    cc.save()
    assert torch.equal(CrossCoder.load(tmp_path / "checkpoints" / "version_0")(x), cc(x))


# ------------------------------------------------------------------ bad input
@pytest.fixture
def saved(tmp_path):
    cc = CrossCoder(cc_cfg(tmp_path))
    cc.save()
    return tmp_path / "checkpoints" / "version_0"


def test_missing_weights_file_is_named(saved):
    (saved / "0.pt").unlink()
    with pytest.raises(FileNotFoundError, match="0.pt"):
        CrossCoder.load(saved, 0)


def test_directory_without_checkpoints_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        CrossCoder.load(tmp_path)


def test_config_missing_a_key_is_named(saved):
    cfg = json.loads((saved / "0_cfg.json").read_text())
    del cfg["dict_size"]
    (saved / "0_cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"0_cfg.json.*dict_size"):
        CrossCoder.load(saved, 0)


def test_unknown_enc_dtype_is_named(saved):
    cfg = json.loads((saved / "0_cfg.json").read_text())
    cfg["enc_dtype"] = "fp8"
    (saved / "0_cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"0_cfg.json.*fp8"):
        CrossCoder.load(saved, 0)


def test_shapes_that_disagree_with_config_are_named(saved):
    cfg = json.loads((saved / "0_cfg.json").read_text())
    cfg["dict_size"] = 128
    (saved / "0_cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"0.pt.*W_enc.*shape"):
        CrossCoder.load(saved, 0)


def test_config_that_is_not_json_is_named(saved):
    (saved / "0_cfg.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"0_cfg.json.*JSON"):
        CrossCoder.load(saved, 0)


def test_truncated_weights_are_named(saved):
    """Checked against their recorded sha256 first; unchecked, torch's own error is named too."""
    data = (saved / "0.pt").read_bytes()
    (saved / "0.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"0.pt: its sha256 differs"):
        CrossCoder.load(saved, 0)
    with pytest.raises(CheckpointError, match=r"0.pt.*cannot read"):
        CrossCoder.load(saved, 0, verify=False)


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the hostile file is pickled on purpose
def test_loading_never_executes_pickled_code(saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(saved / "0.pt", "wb") as f:
        pickle.dump({"W_enc": _Evil()}, f)
    with pytest.raises(CheckpointError):
        CrossCoder.load(saved, 0)
    assert not (tmp_path / "PWNED").exists()


def test_the_references_own_config_builds_a_crosscoder_with_todays_defaults_for_the_rest():
    """CrossCoder(cfg) with exactly the reference's keys: the weights are those of the same config
    completed from config.DEFAULTS (the missing keys take their defaults), and the crosscoder is
    the reference's L1 one on two models."""
    from conftest import REFERENCE_KEYS, reference_cfg
    from crossdiff.config.schema import complete_cfg

    cfg = reference_cfg()
    assert set(cfg) == set(REFERENCE_KEYS)
    cc = CrossCoder(cfg)
    full = CrossCoder(complete_cfg(cfg))
    assert cc.architecture == "l1" and cc.n_models == 2
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(cc, name), getattr(full, name))
    assert set(cfg) == set(REFERENCE_KEYS)  # the caller's dict is left as it was


def test_an_unknown_key_is_refused_with_the_clis_suggestion():
    from conftest import reference_cfg
    from crossdiff.config.schema import ConfigError

    with pytest.raises(ConfigError, match="unknown config key 'l1_coef' \\(did you mean 'l1_coeff'\\?\\)"):
        CrossCoder(reference_cfg(l1_coef=2))


def test_analysis_helpers_return_detached_tensors():
    """relative_decoder_norm, decoder_cosine_similarity and norm_difference: plain values (no
    autograd graph, no warning when converted), equal to the same maths on the weights' data."""
    from crossdiff.diffing.measures import norm_difference

    cc = CrossCoder(cc_cfg(d_in=4, dict_size=6))
    norms = cc.W_dec.data.norm(dim=-1)
    want_rel = norms[:, 1] / norms.sum(-1)
    for value in (cc.relative_decoder_norm(), cc.decoder_cosine_similarity(), norm_difference(cc)):
        assert not value.requires_grad
    torch.testing.assert_close(cc.relative_decoder_norm(), want_rel)
    torch.testing.assert_close(cc.decoder_cosine_similarity(),
                               torch.nn.functional.cosine_similarity(cc.W_dec.data[:, 0], cc.W_dec.data[:, 1], dim=-1))


# ---------------------------------------------------------------- test_batchtopk.py
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
    assert trainer.crosscoder.dead_window(trainer.step_counter) == 3  # ceil(95 / 32) batches of 32 tokens
    trainer.steps_since_fired[:5] = torch.tensor([0, 2, 3, 4, 100])
    assert trainer.dead_fraction().item() == pytest.approx(3 / cfg["dict_size"])


@pytest.mark.parametrize("sparse_step", [False, True])
def test_auxk_uses_the_authors_dead_set_counted_after_this_batchs_firings(tmp_path, monkeypatch, sparse_step):
    """dictionary_learning's BatchTopKTrainer resets the counter of every latent that fires in the
    batch, then takes as dead those whose counter reached the window: a latent that fires now is
    never dead now. Over 12 training steps (window 2 batches, k 2 of 64 latents) the dead set AuxK
    receives equals that rule, replayed here from each step's activations; the set counted before
    the batch (what AuxK used) differs on some step."""
    import crosscoder as module

    cfg = tiny_cfg(tmp_path, architecture="batchtopk", k=2, dead_tokens=2 * 32, sparse_step=sparse_step,
                   num_tokens=32 * 12)
    gen = torch.Generator().manual_seed(5)
    trainer = Trainer(cfg, buffer=type("S", (), {"next": lambda self: torch.randn(32, 2, 32, generator=gen)})())
    received, fired = [], []
    name = "aux_loss_kept" if sparse_step else "aux_loss"
    real_aux, real_step = getattr(module, name), trainer.crosscoder.losses_and_acts

    def aux(*args, **kwargs):
        received.append(args[6 if sparse_step else 3].clone())
        return real_aux(*args, **kwargs)

    def losses_and_acts(*args, **kwargs):
        out = real_step(*args, **kwargs)
        acts = out[1].to_dense() if out[1].is_sparse else out[1]  # (the sparse step's are a sparse tensor)
        fired.append((acts.detach() > 0).any(0))
        if len(received) < len(fired):  # no latent dead at this step
            received.append(torch.zeros(64, dtype=torch.bool))
        return out

    monkeypatch.setattr(module, name, aux)
    trainer.crosscoder.losses_and_acts = losses_and_acts
    for _ in range(12):
        trainer.step()
    since, before_differs = torch.zeros(64, dtype=torch.long), False
    for step, (got, now) in enumerate(zip(received, fired)):
        counted_before = since >= 2
        since = torch.where(now, 0, since + 1)
        assert torch.equal(got, since >= 2), step
        before_differs |= not torch.equal(counted_before, since >= 2)
    assert before_differs and any(r.any() for r in received)


def test_the_norm_reconstruction_loss_is_the_mean_l2_norm_per_token_and_model():
    cc = btk().train()
    x = torch.randn(16, 2, 32)
    losses, _, terms = cc.losses_and_acts(x)
    acts = cc.encode(x)
    err = x - cc.decode(acts)
    want = sum(float(err[b, m].detach().norm()) for b in range(16) for m in range(2)) / 32
    assert terms["l2_norm_loss"].item() == pytest.approx(want, rel=1e-5)
    cfg = dict(cc.cfg)
    loss, _ = cc.training_loss(losses, terms, 0, 10)  # batchtopk's default: the authors' norm
    assert loss.item() == pytest.approx(want + cfg["aux_coeff"] * terms["aux_loss"].item(), rel=1e-5)
    loss, _ = CrossCoder(dict(cfg, recon_loss="squared")).training_loss(losses, terms, 0, 10)
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


def test_training_loss_is_l2_plus_the_scheduled_l1_or_l2_plus_weighted_auxk():
    """The objective alone, on made-up numbers: L1 crosscoders add l1_coeff_at(step) * l1 (half
    the coefficient halfway through the warm-up) to the squared error; BatchTopK adds
    aux_coeff * AuxK and no L1 to the mean error norm (the authors'), or to the squared error."""
    def training_loss(losses, terms, step, total_steps, cfg):  # the objective of the architecture cfg names
        return CrossCoder(tiny_cfg(**cfg)).training_loss(losses, terms, step, total_steps)

    losses = LossOutput(*[torch.tensor(v) for v in (3.0, 10.0, 5.0, 0.5, 0.5, 0.5)])
    aux = {"aux_loss": torch.tensor(8.0), "l2_norm_loss": torch.tensor(1.5)}
    loss, coeff = training_loss(losses, aux, 25, 1000, {"architecture": "l1", "l1_coeff": 2.0, "aux_coeff": 0.25})
    assert coeff == pytest.approx(1.0) and float(loss) == pytest.approx(3.0 + 1.0 * 10.0)
    loss, coeff = training_loss(losses, aux, 900, 1000, {"architecture": "l1", "l1_coeff": 2.0, "aux_coeff": 0.25})
    assert coeff == 2.0 and float(loss) == pytest.approx(23.0)
    btk = {"architecture": "batchtopk", "l1_coeff": 2.0, "aux_coeff": 0.25}
    loss, coeff = training_loss(losses, aux, 25, 1000, btk)
    assert coeff == 0.0 and float(loss) == pytest.approx(1.5 + 0.25 * 8.0)
    loss, coeff = training_loss(losses, aux, 25, 1000, dict(btk, recon_loss="squared"))
    assert coeff == 0.0 and float(loss) == pytest.approx(3.0 + 0.25 * 8.0)
    loss, _ = training_loss(losses, aux, 900, 1000, {"architecture": "l1", "l1_coeff": 2.0, "recon_loss": "norm"})
    assert float(loss) == pytest.approx(1.5 + 2.0 * 10.0)


@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
def test_loading_a_checkpoint_draws_no_random_initialisation(tmp_path, monkeypatch, shard):
    """A load builds uninitialised weights and fills them from the file: the random draw (minutes
    for a 2^20-latent dictionary) never runs, and the weights are the saved ones."""
    import crosscoder

    cc = CrossCoder(cc_cfg(tmp_path, architecture="batchtopk"))
    cc.save()

    def no_draw(*args):
        raise AssertionError("init_decoder ran during a load")

    monkeypatch.setattr(crosscoder, "init_decoder", no_draw)
    loaded = CrossCoder.load(cc.save_dir, shard=shard)
    rows = slice(None) if shard == (0, 1) else slice(cc.W_dec.shape[0] // 2, None)
    torch.testing.assert_close(loaded.W_dec, cc.W_dec[rows].detach(), atol=0, rtol=0)
    torch.testing.assert_close(loaded.W_enc, cc.W_enc[..., rows].detach(), atol=0, rtol=0)


class _Batches:
    """Seeded pairs whose chat activation is the base one plus, on a third of the rows, one of 8
    fixed directions at a random strength (a difference a small dictionary can learn)."""

    def __init__(self, cfg, seed=0):
        self.g, self.cfg = torch.Generator().manual_seed(seed), cfg
        self.directions = torch.randn(8, cfg["d_in"], generator=torch.Generator().manual_seed(99))

    def next(self):
        B, D = self.cfg["batch_size"], self.cfg["d_in"]
        base = torch.randn(B, D, generator=self.g) * 3
        which = torch.randint(8, (B,), generator=self.g)
        strength = torch.rand(B, 1, generator=self.g) * 2 * (torch.rand(B, 1, generator=self.g) < 0.3)
        return torch.stack([base, base + strength * self.directions[which]], 1)


def test_the_diff_sae_is_a_batchtopk_sae_on_the_chat_minus_base_difference():
    """Its training-mode losses and activations equal a plain BatchTopK SAE computed by hand on
    d = x_chat - x_base (encoder W_enc[chat], decoder W_dec[:, chat], bias b_dec[chat]): the k * B
    largest scores f * |d_j| kept, l2 the mean squared error of d."""
    cfg = cc_cfg(architecture="diff_sae", k=3, batch_size=16)
    cc = CrossCoder(cfg)
    with torch.no_grad():
        cc.b_enc.copy_(torch.randn(cfg["dict_size"], generator=torch.Generator().manual_seed(1)) * 0.1)
        cc.b_dec[1].copy_(torch.randn(cfg["d_in"], generator=torch.Generator().manual_seed(2)) * 0.1)
    x = _Batches(cfg).next()
    losses, acts, _ = cc.train().losses_and_acts(x)
    d = x[:, 1] - x[:, 0]
    W, b, V, c = cc.W_enc[1].detach(), cc.b_enc.detach(), cc.W_dec[:, 1].detach(), cc.b_dec[1].detach()
    pre = torch.relu(d @ W + b)
    scores = (pre * V.norm(dim=-1)).flatten()
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[scores.topk(3 * 16).indices] = True
    f = pre * keep.view_as(pre)
    torch.testing.assert_close(acts.detach(), f, atol=1e-5, rtol=1e-5)
    d_hat = f @ V + c
    assert float(losses.l2_loss) == pytest.approx(float((d - d_hat).pow(2).sum(-1).mean()), rel=1e-5)
    assert float(losses.explained_variance_A) == float(losses.explained_variance_B) == pytest.approx(
        float(1 - ((d - d_hat).pow(2).sum(-1) / (d - d.mean(0)).pow(2).sum(-1)).mean()), rel=1e-5)
    assert cc.relative_decoder_norm().eq(1).all()  # every latent lives in the difference


@pytest.mark.parametrize("sparse_step", [False, True])
def test_training_keeps_the_diff_sae_layout_exactly_and_it_survives_a_save_and_load(tmp_path, sparse_step):
    """Through Trainer steps (Adam, clipping, AuxK, the median initialisation): the base encoder
    stays exactly the chat one's negative, the base decoder and decoder bias exactly 0; the loss
    falls; the checkpoint loads as a DiffSAE, and one whose base decoder was altered is refused."""
    from crossdiff.arch.partition import PartitionError

    cfg = cc_cfg(tmp_path, architecture="diff_sae", k=4, num_tokens=32 * 40, dead_tokens=64, threshold_start_step=5,
                 sparse_step=sparse_step, lr=3e-3)
    trainer = Trainer(cfg, buffer=_Batches(cfg))
    logs = [trainer.log(trainer.step()) for _ in range(40)]
    cc = trainer.crosscoder
    assert torch.equal(cc.W_enc[0], -cc.W_enc[1]) and not cc.W_dec[:, 0].any() and not cc.b_dec[0].any()
    assert logs[-1]["l2_loss"] < 0.5 * logs[0]["l2_loss"]
    assert max(log["aux_loss"] for log in logs) > 0  # AuxK took part
    trainer.save()
    loaded = CrossCoder.load(cc.save_dir)
    assert type(loaded).__name__ == "DiffSAE" and torch.equal(loaded.W_enc, cc.W_enc.detach())
    x = _Batches(cfg, seed=5).next()
    torch.testing.assert_close(loaded.encode(x), loaded.encode(loaded.target(x)), atol=1e-5, rtol=1e-5)
    state = torch.load(latest_version_dir(cfg["checkpoint_dir"]) / "0.pt", weights_only=True)
    state["W_dec"][0, 0, 0] = 1e-3
    torch.save(state, tmp_path / "altered.pt")
    with pytest.raises(PartitionError, match="largest forbidden weight 0.001"):
        CrossCoder._from_state(dict(loaded.cfg), state, "cpu", where="altered")


def test_a_diff_sae_refuses_a_partition_other_model_counts_and_unequal_factors():
    from crossdiff.config.schema import ConfigError, validate_cfg

    for bad, match in (({"shared_fraction": 0.25}, "'shared_fraction' = 0.25: architecture 'diff_sae' takes no partition"),
                       ({"exclusive_fraction": 0.125}, "'exclusive_fraction' = 0.125"),
                       ({"n_models": 3}, "2 models; n_models is 3")):
        with pytest.raises(ConfigError, match=match):
            validate_cfg(cc_cfg(architecture="diff_sae", **bad))
        with pytest.raises(ConfigError, match=match):
            CrossCoder(cc_cfg(architecture="diff_sae", **bad))
    with pytest.raises(ValueError, match="one factor for both models"):
        CrossCoder(cc_cfg(architecture="diff_sae")).fold_normalisation([0.5, 0.7])
    folded = CrossCoder(cc_cfg(architecture="diff_sae")).fold_normalisation([0.5, 0.5])
    assert folded.verify_partition()["forbidden"] == 0 and torch.equal(folded.W_enc[0], -folded.W_enc[1])


def test_the_batchtopk_step_skips_auxk_before_any_latent_can_be_dead(monkeypatch):
    """Before dead_window steps no latent can be dead: step_inputs passes no dead mask and AuxK's
    decode and top-k never run (known on the host: no sync); from then on the mask is the
    latents stale for dead_window steps, and AuxK runs."""
    import crosscoder

    cc = CrossCoder(cc_cfg(architecture="batchtopk", k=4, dead_tokens=32 * 5, batch_size=32)).train()
    assert cc.dead_window(0) == 5
    calls, real = [], crosscoder.aux_loss
    monkeypatch.setattr(crosscoder, "aux_loss", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(32, 2, cc.cfg["d_in"])
    stale = torch.full((cc.cfg["dict_size"],), 3)
    early = cc.step_inputs(3, stale)
    assert early["dead_F"] is None
    _, _, terms = cc.losses_and_acts(x, **early)
    assert calls == [] and float(terms["aux_loss"]) == 0
    late = cc.step_inputs(4, stale + 1)
    assert late["dead_F"].all()
    cc.losses_and_acts(x, **late)
    assert calls == [1]


def test_under_bf16_autocast_the_pre_activations_stay_bf16_and_equal_fp32_within_its_precision():
    """encode's [B, F] pre-activations under CPU bf16 autocast are bf16 (adding the fp32 b_enc
    would promote them to fp32, doubling the step's largest temporaries), and match fp32's."""
    torch.manual_seed(0)
    cc = CrossCoder(tiny_cfg())
    with torch.no_grad():
        cc.b_enc.normal_()
    x = torch.randn(8, 2, cc.cfg["d_in"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pre = cc.encode(x, apply_relu=False)
    assert pre.dtype == torch.bfloat16
    torch.testing.assert_close(pre.float(), cc.encode(x, apply_relu=False), rtol=0.05, atol=0.1)


def test_folding_in_chunks_gives_the_weights_of_one_fold(monkeypatch):
    """fold_normalisation folds FOLD_CHUNK latents at a time in place: chunks of 5 (not dividing
    the dictionary) give bitwise the weights of a single chunk, and the original is untouched."""
    import crosscoder

    torch.manual_seed(0)
    cc = CrossCoder(tiny_cfg())
    before = {n: p.detach().clone() for n, p in cc.named_parameters()}
    whole = cc.fold_normalisation([0.5, 3.0])
    monkeypatch.setattr(crosscoder, "FOLD_CHUNK", 5)
    chunked = cc.fold_normalisation([0.5, 3.0])
    for name, p in whole.named_parameters():
        assert torch.equal(p, dict(chunked.named_parameters())[name]), name
    assert torch.equal(whole.W_enc[1], before["W_enc"][1] * 3.0)
    assert all(torch.equal(p, before[n]) for n, p in cc.named_parameters())
