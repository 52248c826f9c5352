"""BatchTopK's maths (Bussmann et al. 2024; the recipe of Minder, Dumas et al. 2025): the selection
of the k x batch largest scores, over processes too; the inference threshold; k's annealing; the
AuxK loss over dead latents (Gao et al. 2024, B.1), dense and over the kept entries only
(arch/sparse.py). BatchTopKCrossCoder (crosscoder.py) is the architecture built from them.

Shape legend: B batch, M models, D d_in, F latents (this shard's).
"""
import torch
import torch.distributed as dist

from crossdiff.arch.shards import any_over_shards, aux_keep_mask, gather, sum_over_shards
from crossdiff.arch.sparse import kept_entries, kept_preactivations, sparse_decode


def batch_topk_mask(scores_BF, k, group=None, rows=None):
    """Mask of the k * B largest scores of the batch, and the smallest positive kept score (0 when
    none), which the inference threshold tracks. group: ranks holding equal shares of one batch's
    scores (rows, columns or both), `rows` rows in all: the k * rows largest over all are kept, as
    one process would. Each rank sends only its own k * rows largest (a superset of its share),
    never its [B, F] matrix."""
    B, F = scores_BF.shape
    ranks = 1 if group is None else dist.get_world_size(group)
    n_keep = min(k * (rows or B * ranks), B * F * ranks)
    if ranks == 1:
        kept = scores_BF.flatten().topk(n_keep, sorted=False)
        mask = torch.zeros(B * F, dtype=torch.bool, device=scores_BF.device).index_fill_(0, kept.indices, True)
        return mask.view(B, F), min_positive(kept.values)
    candidates = scores_BF.detach().flatten().topk(min(n_keep, B * F), sorted=False).values
    kept = gather(candidates, group).topk(n_keep, sorted=False).values
    # ties at the cutoff are kept too (topk would keep some of them); a zero cutoff keeps zeros,
    # which select nothing
    return scores_BF >= kept.min(), min_positive(kept)


def min_positive(values):
    """The smallest positive value, or 0 when there is none (the authors' update_threshold)."""
    return torch.where(values > 0, values, torch.inf).min().nan_to_num(posinf=0.0)


def update_threshold(threshold, min_kept_score, decay=0.999):
    """EMA of the smallest positive kept score (the authors' threshold_beta 0.999); a negative
    threshold means none yet, and the first estimate is taken as is. No host sync."""
    new = decay * threshold + (1 - decay) * min_kept_score
    return torch.where(threshold < 0, min_kept_score, new)


def k_at(step, k, k_max=None, annealing_steps=0):
    """k annealed linearly from k_max to k over annealing_steps, rounded, at least 1 (the authors');
    k without annealing (their trainer holds k_max at annealing_steps 0, contradicting their runs'
    names with its 2048 default; we keep k)."""
    if k_max is None or annealing_steps <= 0 or step >= annealing_steps:
        return k
    return max(1, int(round(k_max - (k_max - k) * step / annealing_steps)))


@torch.no_grad()
def aux_selection(pre_BF, dead_F, aux_k, latent_group=None, norms_F=None):
    """[B, F] bool: each row's aux_k most active dead latents (over every shard's latents with a
    latent_group), ranked by activation x norms_F when given (the authors: the summed decoder
    norms); entries with zero activation left out (they would add nothing)."""
    rank_BF = torch.relu(pre_BF.detach().float()).masked_fill_(~dead_F, 0.0)  # one float [B, F], scaled in place
    active_BF = rank_BF > 0
    if norms_F is not None:
        rank_BF.mul_(norms_F.detach().float())
    if latent_group is None:
        top = rank_BF.topk(min(aux_k, rank_BF.shape[1]), dim=-1).indices
        keep_BF = torch.zeros_like(rank_BF, dtype=torch.bool).scatter_(-1, top, True)
    else:
        keep_BF = aux_keep_mask(rank_BF, aux_k, latent_group)
    return keep_BF.logical_and_(active_BF)


def aux_error_loss(err_hat_BMD, err_BMD, normalise=True, data_group=None):
    """The AuxK loss of a reconstruction of the (detached) error: squared error summed over models
    and d_in, mean over the batch; normalise: divided by the error's variance over the (global:
    data_group's) batch, as Gao et al. and the authors."""
    err_BMD = err_BMD.detach().float()
    loss = (err_hat_BMD - err_BMD).pow(2).sum((-1, -2)).mean()
    if normalise:
        loss = (loss / residual_variance(err_BMD, data_group)).nan_to_num(0.0)
    return loss


def aux_loss(err_BMD, pre_BF, W_dec_FMD, dead_F, aux_k, latent_group=None, norms_F=None, normalise=True,
             data_group=None):
    """AuxK: the error reconstructed from each token's aux_k most active dead latents
    (aux_selection), decoded with the plain activations and without the decoder bias
    (aux_error_loss); 0 when none is dead. latent_group: the shards."""
    sparse_BF = torch.relu(pre_BF.float()) * aux_selection(pre_BF, dead_F, aux_k, latent_group, norms_F)
    err_hat_BMD = sum_over_shards(torch.einsum("bf,fmd->bmd", sparse_BF, W_dec_FMD.float()), latent_group)
    return aux_error_loss(err_hat_BMD, err_BMD, normalise, data_group) * any_over_shards(dead_F.any(), latent_group)


def aux_loss_kept(err_BMD, pre_BF, x_BMD, W_enc_MDF, b_enc_F, W_dec_FMD, dead_F, aux_k, latent_group=None,
                  norms_F=None, normalise=True, data_group=None):
    """aux_loss over the kept entries only (arch/sparse.py): the same selection and loss, from a dense
    pre_BF without a graph; the gradients reach W_enc, b_enc and W_dec through the kept dead
    latents alone. The caller skips it when no latent is dead anywhere."""
    kept = kept_entries(aux_selection(pre_BF, dead_F, aux_k, latent_group, norms_F))
    values_N = torch.relu(kept_preactivations(pre_BF, x_BMD, W_enc_MDF, b_enc_F, kept)).float()
    err_hat_BMD = sum_over_shards(sparse_decode(values_N, kept, W_dec_FMD.float()), latent_group)
    return aux_error_loss(err_hat_BMD, err_BMD, normalise, data_group)


@torch.no_grad()
def residual_variance(r_BMD, data_group=None):
    """mean_B sum_MD (r - mean_B r)^2 over the rows of every rank of data_group (the global
    batch), from its sums in float64: one all-reduce, no host sync."""
    if data_group is None:
        return (r_BMD - r_BMD.mean(0)).pow(2).sum((-1, -2)).mean()
    r = r_BMD.double().flatten(1)
    sums = torch.cat([r.sum(0), r.pow(2).sum().view(1), r.new_full((1,), r.shape[0])])
    dist.all_reduce(sums, group=data_group)
    n = sums[-1]
    mean_sq = sums[:-2].div(n).pow(2).sum()
    return (sums[-2] / n - mean_sq).float()
