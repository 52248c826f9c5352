"""BatchTopK selection for crosscoders, and the auxiliary loss that revives dead latents.

Shape legend: B batch, M models, D d_in, F latents.

BatchTopK (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders") keeps, over the whole batch,
the k * B largest scores instead of an L1 penalty; for a crosscoder the score of latent j is its
activation times the sum over models of its decoder norms (Minder, Dumas et al. 2025). At
inference a fixed threshold on the score, estimated during training, replaces the batch-level
choice so that a token's latents do not depend on the rest of its batch. The auxiliary loss
(Gao et al. 2024, "Scaling and evaluating sparse autoencoders", AuxK) asks the aux_k most active
dead latents to reconstruct the main reconstruction error.
"""
import torch


def batch_topk_mask(scores_BF, k):
    """Boolean mask of the k * B largest scores of the batch, and the smallest kept score."""
    B, F = scores_BF.shape
    n_keep = min(k * B, B * F)
    kept = scores_BF.flatten().topk(n_keep, sorted=False)
    mask = torch.zeros(B * F, dtype=torch.bool, device=scores_BF.device)
    mask[kept.indices] = True
    return mask.view(B, F), kept.values.min()


def update_threshold(threshold, min_kept_score, decay=0.99):
    """Exponential moving average of the smallest kept score; a negative threshold means none
    estimated yet, and the first estimate is taken as is. No host sync."""
    new = decay * threshold + (1 - decay) * min_kept_score
    return torch.where(threshold < 0, min_kept_score, new)


def aux_loss(err_BMD, pre_BF, W_dec_FMD, dead_F, aux_k):
    """AuxK: reconstruct the (detached) error from the aux_k largest activations of dead latents
    per token; squared error summed over models and d_in, mean over the batch. Zero when no
    latent is dead."""
    acts_BF = torch.relu(pre_BF.float()).masked_fill(~dead_F, 0.0)
    kk = min(aux_k, acts_BF.shape[1])
    top = acts_BF.topk(kk, dim=-1)
    sparse_BF = torch.zeros_like(acts_BF).scatter(-1, top.indices, top.values)
    err_hat_BMD = torch.einsum("bf,fmd->bmd", sparse_BF, W_dec_FMD.float())
    loss = (err_hat_BMD - err_BMD.detach().float()).pow(2).sum((-1, -2)).mean()
    return loss * dead_F.any()
