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
import torch.distributed as dist

from sharding import any_over_shards, aux_keep_mask, gather, sum_over_shards


def batch_topk_mask(scores_BF, k, group=None, rows=None):
    """Boolean mask of the k * B largest scores of the batch, and the smallest kept score.

    group: a process group whose ranks each hold an equal share of one batch's scores (data
    parallel: rows; latent shards: columns; or both), `rows` rows in all (default: B per rank):
    the k * rows largest scores over all of them are kept, as one process would on the whole
    batch. Each rank sends only its own k * rows largest scores (a superset of its share of the
    global selection), never its [B, F] matrix."""
    B, F = scores_BF.shape
    ranks = 1 if group is None else dist.get_world_size(group)
    n_keep = min(k * (rows or B * ranks), B * F * ranks)
    if ranks == 1:
        kept = scores_BF.flatten().topk(n_keep, sorted=False)
        mask = torch.zeros(B * F, dtype=torch.bool, device=scores_BF.device)
        mask[kept.indices] = True
        return mask.view(B, F), kept.values.min()
    candidates = scores_BF.detach().flatten().topk(min(n_keep, B * F), sorted=False).values
    cutoff = gather(candidates, group).topk(n_keep, sorted=False).values.min()
    # ties at the cutoff are kept too (topk would keep some of them); a zero cutoff keeps zeros,
    # which select nothing
    return scores_BF >= cutoff, cutoff


def update_threshold(threshold, min_kept_score, decay=0.99):
    """Exponential moving average of the smallest kept score; a negative threshold means none
    estimated yet, and the first estimate is taken as is. No host sync."""
    new = decay * threshold + (1 - decay) * min_kept_score
    return torch.where(threshold < 0, min_kept_score, new)


def aux_loss(err_BMD, pre_BF, W_dec_FMD, dead_F, aux_k, latent_group=None):
    """AuxK: reconstruct the (detached) error from the aux_k largest activations of dead latents
    per token; squared error summed over models and d_in, mean over the batch. Zero when no
    latent is dead. latent_group: the dictionary is split over these processes (sharding.py)."""
    acts_BF = torch.relu(pre_BF.float()).masked_fill(~dead_F, 0.0)
    if latent_group is None:
        top = acts_BF.topk(min(aux_k, acts_BF.shape[1]), dim=-1)
        sparse_BF = torch.zeros_like(acts_BF).scatter(-1, top.indices, top.values)
    else:  # the aux_k largest of each row over every shard's latents
        sparse_BF = acts_BF * aux_keep_mask(acts_BF, aux_k, latent_group)
    err_hat_BMD = sum_over_shards(torch.einsum("bf,fmd->bmd", sparse_BF, W_dec_FMD.float()), latent_group)
    loss = (err_hat_BMD - err_BMD.detach().float()).pow(2).sum((-1, -2)).mean()
    return loss * any_over_shards(dead_F.any(), latent_group)
