import pytest
import torch

from crosscoder import LossOutput
from objective import l1_coeff_at, lr_multiplier, training_loss


def test_lr_schedule_at_start_5pct_80pct_and_end():
    total = 1000
    assert lr_multiplier(0, total) == 1.0
    assert lr_multiplier(50, total) == 1.0
    assert lr_multiplier(799, total) == 1.0
    assert lr_multiplier(800, total) == pytest.approx(1.0)
    assert lr_multiplier(900, total) == pytest.approx(0.5)
    assert lr_multiplier(1000, total) == pytest.approx(0.0)


def test_l1_warmup_at_start_5pct_80pct_and_end():
    total = 1000
    assert l1_coeff_at(0, total, 2.0) == 0.0
    assert l1_coeff_at(25, total, 2.0) == pytest.approx(1.0)
    assert l1_coeff_at(50, total, 2.0) == 2.0
    assert l1_coeff_at(800, total, 2.0) == 2.0
    assert l1_coeff_at(999, total, 2.0) == 2.0


def test_training_loss_is_l2_plus_the_scheduled_l1_or_l2_plus_weighted_auxk():
    """The objective alone, on made-up numbers: L1 crosscoders add l1_coeff_at(step) * l1 (half
    the coefficient halfway through the warm-up) to the squared error; BatchTopK adds
    aux_coeff * AuxK and no L1 to the mean error norm (the authors'), or to the squared error."""
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
