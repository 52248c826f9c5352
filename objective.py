"""The training maths apart from the loop: the reference's schedules (learning rate, L1 warm-up)
and the objective, as small pure functions (tested without models), and its optimiser.

The loss terms come from CrossCoder.losses_and_acts (crosscoder.py).
"""
import torch

from config import effective


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


def training_loss(losses, terms, step, total_steps, cfg):
    """The objective, apart from the update: (loss, the L1 coefficient used).
    l1 (the reference): l2 + l1_coeff_at(step) * l1. batchtopk: recon + aux_coeff * AuxK, no L1
    penalty (sparsity is the top-k; AuxK revives dead latents). The reconstruction term is the
    reference's squared error summed over models and d_in, or with recon_loss "norm" (the
    authors' BatchTopK trainer) the mean over tokens and models of the error's L2 norm."""
    recon = terms["l2_norm_loss"] if effective(cfg, "recon_loss") == "norm" else losses.l2_loss
    if cfg["architecture"] == "batchtopk":
        return recon + cfg["aux_coeff"] * terms["aux_loss"], 0.0
    l1_coeff = l1_coeff_at(step, total_steps, cfg["l1_coeff"])
    return recon + l1_coeff * losses.l1_loss, l1_coeff


def make_optimizer(params, cfg):
    """The reference's Adam (default eps, no weight decay), fused into one kernel per step where
    the device supports it: the same update, but one pass over the weights and the optimiser
    state instead of seven (on CPU at the Gemma shape these passes took ~8% of a step)."""
    params = list(params)
    kwargs = dict(lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]))
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.Adam(params, **kwargs)
