"""Partitioned dictionaries (crossdiff/arch/partition.py): dedicated-feature blocks and designated shared latents."""
import pytest
import torch

from conftest import tiny_cfg
from crosscoder import CrossCoder
from crossdiff.arch.partition import (
    DESIGNATED,
    FREE,
    PartitionError,
    k_shares,
    latent_owner,
    partition_of,
    shard_latents,
)
from crossdiff.config.schema import ConfigError, validate_cfg
from trainer import Trainer

DFC = {"exclusive_fraction": 0.125, "shared_fraction": 0.125}  # of 64 latents: 8 + 8 exclusive, 8 tied, 40 free


class RandomBatches:
    def __init__(self, cfg, seed=0):
        self.g, self.shape = torch.Generator().manual_seed(seed), (cfg["batch_size"], cfg["n_models"], cfg["d_in"])

    def next(self):
        # a sparse-ish signal, so that latents fire unevenly and some die (AuxK acts)
        return torch.randn(*self.shape, generator=self.g) * (torch.rand(self.shape[0], 1, 1, generator=self.g) < 0.5)


def test_blocks_are_laid_out_in_order_and_every_shard_holds_its_slice_of_each():
    p = partition_of(tiny_cfg(n_models=3, model_names=["a", "b", "c"], dict_size=64, **DFC))
    assert p.blocks() == [(0, 0, 8), (1, 8, 16), (2, 16, 24), (DESIGNATED, 24, 32), (FREE, 32, 64)]
    owner = latent_owner(p, torch.arange(64))
    assert owner.tolist() == [0] * 8 + [1] * 8 + [2] * 8 + [DESIGNATED] * 8 + [FREE] * 32
    shards = [shard_latents(p, (i, 4)) for i in range(4)]
    torch.testing.assert_close(torch.sort(torch.cat(shards)).values, torch.arange(64))
    for s in shards:  # a quarter of every block
        assert torch.bincount(latent_owner(p, s) + 2).tolist() == [2, 8, 2, 2, 2]
    torch.testing.assert_close(shard_latents(partition_of(tiny_cfg()), (1, 4)), torch.arange(16, 32))


@pytest.mark.parametrize("n_models", [2, 3])
def test_a_partitioned_crosscoder_starts_with_its_forbidden_weights_zero_and_tied_rows_equal(n_models):
    cfg = tiny_cfg(n_models=n_models, model_names=["a", "b", "c"][:n_models], **DFC)
    cc = CrossCoder(cfg)
    whole = CrossCoder(tiny_cfg(n_models=n_models, model_names=["a", "b", "c"][:n_models]))  # the same draw
    e = 8
    for m in range(n_models):
        for other in range(n_models):
            block = slice(other * e, (other + 1) * e)
            if other != m:
                assert cc.W_dec[block, m].abs().max() == 0 and cc.W_enc[m, :, block].abs().max() == 0
            else:
                torch.testing.assert_close(cc.W_dec[block, m], whole.W_dec[block, m], atol=0, rtol=0)
    tied = slice(n_models * e, n_models * e + 8)
    for m in range(1, n_models):
        torch.testing.assert_close(cc.W_dec[tied, m], cc.W_dec[tied, 0], atol=0, rtol=0)
    assert cc.verify_partition() == {"forbidden": 0.0, "tied": 0.0}


def test_gradients_equal_those_of_masked_weights_with_one_tied_vector_per_shared_latent():
    """The partitioned L1 crosscoder's loss and gradients equal a hand-written crosscoder whose
    forbidden weights are masked out in the forward and whose designated latents decode with one
    vector (a leaf of its own), penalised at shared_l1_scale x its norm."""
    cfg = tiny_cfg(**DFC, shared_l1_scale=0.15)
    cc = CrossCoder(cfg)
    with torch.no_grad():  # biases away from zero, so that every kind of latent fires
        cc.b_enc.uniform_(-0.05, 0.2, generator=torch.Generator().manual_seed(2))
    x = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(1))
    losses = cc.get_losses(x)
    (losses.l2_loss + 2.0 * losses.l1_loss).backward()

    W_enc = cc.W_enc.detach().clone().requires_grad_()
    W_dec = cc.W_dec.detach().clone().requires_grad_()
    u = cc.W_dec.detach()[16:24, 0].clone().requires_grad_()  # the tied vectors
    allowed = torch.ones(64, 2)
    allowed[0:8, 1] = 0
    allowed[8:16, 0] = 0
    enc = W_enc * allowed.T[:, None, :]
    dec = torch.cat([W_dec[:16] * allowed[:16, :, None], u[:, None].expand(-1, 2, -1), W_dec[24:]])
    f = torch.relu(torch.einsum("bmd,mdf->bf", x, enc) + cc.b_enc.detach())
    x_hat = torch.einsum("bf,fmd->bmd", f, dec) + cc.b_dec.detach()
    l2 = (x - x_hat).pow(2).sum((-1, -2)).mean()
    norms = dec.norm(dim=-1)
    weight = torch.cat([norms[:16].sum(-1), 0.15 * u.norm(dim=-1), norms[24:].sum(-1)])
    l1 = (f * weight).sum(-1).mean()
    (l2 + 2.0 * l1).backward()
    assert (f[:, 0:8] > 0).any() and (f[:, 8:16] > 0).any() and (f[:, 16:24] > 0).any()
    torch.testing.assert_close(losses.l2_loss, l2)
    torch.testing.assert_close(losses.l1_loss, l1)
    torch.testing.assert_close(cc.W_enc.grad, W_enc.grad)
    torch.testing.assert_close(cc.W_dec.grad[:16], W_dec.grad[:16])
    torch.testing.assert_close(cc.W_dec.grad[24:], W_dec.grad[24:])
    for m in range(2):  # each copy of a tied row receives the one vector's gradient
        torch.testing.assert_close(cc.W_dec.grad[16:24, m], u.grad)


@pytest.mark.parametrize("architecture", ["l1", "batchtopk"])
def test_training_keeps_the_partition_exactly_and_adam_never_moves_a_forbidden_weight(tmp_path, architecture):
    """60 steps (BatchTopK with AuxK over dead latents acting): every forbidden weight is exactly
    0, Adam's moments for them are 0, tied rows are equal; the checkpoint loads with its partition."""
    cfg = tiny_cfg(tmp_path, **DFC, architecture=architecture, k=4, dead_tokens=64, threshold_start_step=10,
                   num_tokens=32 * 60, lr=1e-2)
    trainer = Trainer(cfg, buffer=RandomBatches(cfg))
    logs = [trainer.step() for _ in range(60)]
    cc = trainer.crosscoder
    assert cc.verify_partition() == {"forbidden": 0.0, "tied": 0.0}
    moved = (cc.W_dec.detach() - CrossCoder(cfg).W_dec).abs().amax(-1)
    assert moved[0:8, 0].min() > 0 and moved[8:16, 1].min() > 0 and moved[16:24].min() > 0  # trained
    state = trainer.optimizer.state
    for moment in ("exp_avg", "exp_avg_sq"):
        assert state[cc.W_dec][moment][0:8, 1].abs().max() == 0 and state[cc.W_dec][moment][8:16, 0].abs().max() == 0
        assert state[cc.W_enc][moment][1, :, 0:8].abs().max() == 0 and state[cc.W_enc][moment][0, :, 8:16].abs().max() == 0
    if architecture == "batchtopk":
        assert max(float(log["aux_loss"]) for log in logs) > 0  # AuxK acted, and leaked nowhere
        assert float(logs[-1]["threshold"]) > 0 and float(logs[-1]["threshold_shared"]) > 0
    trainer.save()
    loaded = CrossCoder.load(cc.save_dir)
    assert loaded.partition == cc.partition and loaded.latent_owner().tolist() == cc.latent_owner().tolist()
    torch.testing.assert_close(loaded.W_dec, cc.W_dec.detach(), atol=0, rtol=0)


def test_with_exclusive_blocks_batchtopk_anneals_k_from_five_k_over_the_first_twentieth_as_the_dfc_authors():
    """The DFC authors' schedule (1000 -> 200 over 5k of 100k steps) by default once exclusive
    blocks exist: k at each of a 200-step run's steps is 5k falling linearly to k by step 10
    (computed here), then k; without exclusive blocks, or with k_max = k, k never moves."""
    def ks(**kw):
        cc = CrossCoder(tiny_cfg(architecture="batchtopk", k=4, num_tokens=32 * 200, **kw))
        out = []
        for step in range(200):
            cc.step_inputs(step, torch.zeros(64, dtype=torch.long))
            out.append(cc.k)
        return out

    want = [round(20 - 16 * step / 10) for step in range(10)] + [4] * 190
    assert ks(exclusive_fraction=0.125) == want
    assert ks() == ks(exclusive_fraction=0.125, k_max=4) == [4] * 200


def test_auxk_over_dead_exclusive_latents_reaches_no_forbidden_weight():
    cfg = tiny_cfg(exclusive_fraction=0.25, architecture="batchtopk", k=2, aux_k=16)
    cc = CrossCoder(cfg).train()
    x = torch.randn(32, 2, 32, generator=torch.Generator().manual_seed(4))
    _, _, terms = cc.losses_and_acts(x, dead_F=torch.ones(64, dtype=torch.bool))
    terms["aux_loss"].backward()
    assert terms["aux_loss"] > 0 and cc.W_dec.grad[0:16, 0].abs().max() > 0
    assert cc.W_dec.grad[0:16, 1].abs().max() == 0 and cc.W_dec.grad[16:32, 0].abs().max() == 0
    assert cc.W_enc.grad[1, :, 0:16].abs().max() == 0 and cc.W_enc.grad[0, :, 16:32].abs().max() == 0


def test_batchtopk_gives_the_designated_block_its_k_share_in_training_and_its_own_threshold_after():
    cfg = tiny_cfg(shared_fraction=0.25, architecture="batchtopk", k=8, shared_k_multiplier=2.0)
    assert k_shares(8, 16, 64, 2.0) == (4, 4)  # 8 x 2 x 16/64 = 4 of the 8
    cc = CrossCoder(cfg).train()
    with torch.no_grad():
        cc.b_enc.fill_(1.0)  # every score positive: the counts are exact
    x = torch.randn(32, 2, 32, generator=torch.Generator().manual_seed(5))
    _, acts, _ = cc.losses_and_acts(x)
    tied = cc.latent_owner() == DESIGNATED
    assert int((acts[:, tied] > 0).sum()) == 4 * 32 and int((acts[:, ~tied] > 0).sum()) == 4 * 32
    assert cc.threshold.shape == (2,) and (cc.threshold > 0).all()
    pre = torch.relu(cc.encode(x, apply_relu=False)).detach()
    scores = pre * cc.decoder_norms().sum(-1).detach()
    cc.eval()
    got = cc.encode(x)
    want = pre * (scores > torch.where(tied, cc.threshold[1], cc.threshold[0]))
    torch.testing.assert_close(got, want)


def test_a_checkpoint_whose_weights_break_its_partition_is_refused(tmp_path):
    cc = CrossCoder(tiny_cfg(tmp_path, **DFC))
    with torch.no_grad():
        cc.W_enc[1, 3, 2] = 1e-3  # model 1 reads a latent exclusive to model 0
    cc.save()
    with pytest.raises(PartitionError, match="largest forbidden weight 0.001"):
        CrossCoder.load(cc.save_dir)


@pytest.mark.parametrize("overrides, match", [
    ({"exclusive_fraction": 0.3, "shared_fraction": 0.5}, "overlap: together they exceed dict_size 64"),
    ({"exclusive_fraction": 0.01}, "'exclusive_fraction' = 0.01 gives no latent"),
    ({"exclusive_fraction": 0.125, "latent_shards": 16}, "'exclusive_fraction': each model's exclusive block"),
    ({"shared_fraction": 0.125, "latent_shards": 16}, "'shared_fraction': the designated shared block"),
    ({"shared_fraction": 0.25, "architecture": "batchtopk", "shared_l1_scale": 0.1},
     "'shared_l1_scale' is the l1 crosscoder's"),
    ({"shared_fraction": 0.25, "shared_k_multiplier": 3.0}, "'shared_k_multiplier' is the batchtopk crosscoder's"),
    ({"shared_fraction": 0.25, "architecture": "batchtopk", "k": 1}, "needs k >= 2"),
    ({"exclusive_fraction": 0.5}, "'exclusive_fraction' must be a number in \\[0, 0.5\\)"),
])
def test_partitions_that_cannot_be_built_are_config_errors_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate_cfg(tiny_cfg(**overrides))
    if "latent_shards" not in overrides:  # the constructor refuses them too
        with pytest.raises(ConfigError, match=match):
            CrossCoder(tiny_cfg(**overrides))
