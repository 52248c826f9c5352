"""The training maths apart from the loop and the update: the reference's schedules (learning
rate, L1 warm-up) and the objective, as small pure functions (tested without models).

The loss terms come from CrossCoder.losses_and_acts (crosscoder.py).
"""


def lr_multiplier(step, total_steps):
    """1 for the first 80% of steps, then linear decay to 0 at the end (reference)."""
    if step < 0.8 * total_steps:
        return 1.0
    return 1.0 - (step - 0.8 * total_steps) / (0.2 * total_steps)


def l1_coeff_at(step, total_steps, l1_coeff):
    """Linear warm-up from 0 to l1_coeff over the first 5% of steps, then constant (reference)."""
    if step < 0.05 * total_steps:
        return l1_coeff * step / (0.05 * total_steps)
    return l1_coeff


def training_loss(losses, aux_loss, step, total_steps, cfg):
    """The objective, apart from the update: (loss, the L1 coefficient used).
    l1 (the reference): l2 + l1_coeff_at(step) * l1. batchtopk: l2 + aux_coeff * AuxK, no L1
    penalty (sparsity is the top-k; AuxK revives dead latents)."""
    if cfg["architecture"] == "batchtopk":
        return losses.l2_loss + cfg["aux_coeff"] * aux_loss, 0.0
    l1_coeff = l1_coeff_at(step, total_steps, cfg["l1_coeff"])
    return losses.l2_loss + l1_coeff * losses.l1_loss, l1_coeff
