"""crossdiff/arch/widths.py: models of different widths share one crosscoder, each padded with
zeros to the largest; a narrower model's weights in the padding are exactly zero at every step and
after a save and load."""
import pytest
import torch

from conftest import tiny_cfg
from crosscoder import CrossCoder
from crossdiff.arch.partition import PartitionError
from crossdiff.arch.widths import pad, valid_mask
from crossdiff.config.schema import ConfigError, validate_cfg
from trainer import Trainer

WIDTHS = {"d_in": 64, "model_widths": [64, 48]}


class PaddedBatches:
    """Random sparse-ish rows, each model's beyond its width zero (as the buffer serves them)."""

    def __init__(self, cfg, seed=0):
        self.g, self.cfg = torch.Generator().manual_seed(seed), cfg

    def next(self):
        B = self.cfg["batch_size"]
        rows = [pad(torch.randn(B, w, generator=self.g), self.cfg["d_in"]) for w in self.cfg["model_widths"]]
        return torch.stack(rows, 1) * (torch.rand(B, 1, 1, generator=self.g) < 0.5)


def padding_of(cc):
    pad_MD = ~valid_mask(cc.cfg["model_widths"], cc.cfg["d_in"])
    return torch.cat([cc.W_enc.detach().abs().amax(-1)[pad_MD], cc.W_dec.detach().abs().amax(0)[pad_MD],
                      cc.b_dec.detach().abs()[pad_MD]])


def test_a_narrower_models_decoder_starts_zero_in_the_padding_at_the_initial_norm():
    cc = CrossCoder(tiny_cfg(**WIDTHS))
    assert len(padding_of(cc)) == 16 * 3 and padding_of(cc).max() == 0
    norms = cc.W_dec.detach().norm(dim=-1)  # every model's vectors at dec_init_norm, the narrower's too
    torch.testing.assert_close(norms, torch.full_like(norms, cc.cfg["dec_init_norm"]))
    same = CrossCoder(tiny_cfg(d_in=64))  # same-width models: the reference's draw, unchanged
    torch.testing.assert_close(same.W_dec[:, 0], cc.W_dec[:, 0], atol=0, rtol=0)


def test_no_gradient_reaches_the_padding_even_from_inputs_that_are_not_zero_there():
    cc = CrossCoder(tiny_cfg(**WIDTHS))
    x = torch.randn(32, 2, 64)  # the narrower model's padding deliberately not zero
    losses = cc.get_losses(x)
    (losses.l2_loss + losses.l1_loss).backward()
    pad_MD = ~valid_mask([64, 48], 64)
    assert cc.W_enc.grad[pad_MD].abs().max() == 0 and cc.W_dec.grad[:, pad_MD].abs().max() == 0
    assert cc.b_dec.grad[pad_MD].abs().max() == 0
    assert cc.W_enc.grad[~pad_MD].abs().max() > 0 and cc.W_dec.grad[:, ~pad_MD].abs().max() > 0


@pytest.mark.parametrize("architecture", ["l1", "batchtopk"])
def test_widths_64_and_48_train_save_and_load_with_the_padding_exactly_zero(tmp_path, architecture):
    cfg = tiny_cfg(tmp_path, **WIDTHS, architecture=architecture, k=4, dead_tokens=64, threshold_start_step=10,
                   num_tokens=32 * 40, lr=1e-2, exclusive_fraction=0.125)
    trainer = Trainer(cfg, buffer=PaddedBatches(cfg))
    for _ in range(40):
        trainer.step()
    cc = trainer.crosscoder
    assert padding_of(cc).max() == 0
    moved = (cc.W_dec.detach() - CrossCoder(cfg).W_dec).abs()
    assert moved[8:, 1, :48].amax(-1).min() > 0  # (latents 0-7 are exclusive to model 0) the narrower model's own coordinates trained
    for moment in ("exp_avg", "exp_avg_sq"):
        assert trainer.optimizer.state[cc.W_dec][moment][:, 1, 48:].abs().max() == 0
        assert trainer.optimizer.state[cc.W_enc][moment][1, 48:].abs().max() == 0
    trainer.save()
    loaded = CrossCoder.load(cc.save_dir)
    assert loaded.cfg["model_widths"] == [64, 48] and padding_of(loaded).max() == 0
    torch.testing.assert_close(loaded.W_dec, cc.W_dec.detach(), atol=0, rtol=0)
    # the norms a relative-norm analysis reads are the models' own: the padding adds nothing
    own = torch.stack([cc.W_dec.detach()[:, 0].norm(dim=-1), cc.W_dec.detach()[:, 1, :48].norm(dim=-1)], -1)
    torch.testing.assert_close(loaded.decoder_norms().detach(), own)


def test_a_checkpoint_with_weight_in_the_padding_is_refused(tmp_path):
    cfg = tiny_cfg(tmp_path, **WIDTHS)
    cc = CrossCoder(cfg)
    with torch.no_grad():
        cc.W_dec[3, 1, 50] = 1e-3
    cc.save()
    with pytest.raises(PartitionError, match="padding"):
        CrossCoder.load(cc.save_dir)


@pytest.mark.parametrize("overrides, match", [
    ({"model_widths": [64, 48, 32]}, "lists 3 widths but n_models=2"),
    ({"model_widths": [60, 48]}, "the largest must be d_in"),
    ({"model_widths": [64, 48], "architecture": "diff_sae", "threshold_start_step": 5}, "needs models of one width"),
    ({"model_widths": [64, 0]}, "positive integers"),
    ({"model_widths": [64, 48], "shared_fraction": 0.1}, "which models of widths \\[64, 48\\] do not share"),
])
def test_inconsistent_widths_are_config_errors_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate_cfg(tiny_cfg(**dict({"d_in": 64}, **overrides)))


def test_b_dec_started_at_the_first_batchs_median_keeps_the_padding_zero_whatever_the_inputs_hold_there(tmp_path):
    cfg = tiny_cfg(tmp_path, **WIDTHS, architecture="batchtopk", k=4, threshold_start_step=2, num_tokens=32 * 4,
                   b_enc_init="centred")

    class Noisy:  # every coordinate random, the narrower model's padding too
        g = torch.Generator().manual_seed(1)

        def next(self):
            return torch.randn(32, 2, 64, generator=self.g) + 3.0

    trainer = Trainer(cfg, buffer=Noisy())
    for _ in range(3):
        trainer.step()
    b_dec = trainer.crosscoder.b_dec.detach()
    assert b_dec[1, :48].abs().min() > 0 and b_dec[1, 48:].abs().max() == 0
    assert padding_of(trainer.crosscoder).max() == 0
