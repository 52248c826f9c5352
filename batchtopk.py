"""BatchTopK selection for crosscoders, the auxiliary loss that revives dead latents, and the rest
of the training recipe of the paper's authors (Minder, Dumas et al. 2025, "Overcoming Sparsity
Artifacts in Crosscoders"; their code: science-of-finetuning/dictionary_learning,
trainers/crosscoder.py, BatchTopKCrossCoderTrainer), as small functions.

Shape legend: B batch, M models, D d_in, F latents.

BatchTopK (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders") keeps, over the whole batch,
the k * B largest scores instead of an L1 penalty; for a crosscoder the score of latent j is its
activation times the sum over models of its decoder norms. At inference a fixed threshold on the
score, estimated during training, replaces the batch-level choice so that a token's latents do
not depend on the rest of its batch. The auxiliary loss (Gao et al. 2024, "Scaling and
evaluating sparse autoencoders", AuxK, appendix B.1) asks the aux_k most active dead latents to
reconstruct the main reconstruction error.
"""
import torch
import torch.distributed as dist

from sharding import any_over_shards, aux_keep_mask, gather, sum_over_shards


def batch_topk_mask(scores_BF, k, group=None, rows=None):
    """Boolean mask of the k * B largest scores of the batch, and the smallest positive kept
    score (0 when none is positive), which the inference threshold tracks.

    group: a process group whose ranks each hold an equal share of one batch's scores (data
    parallel: rows; latent shards: columns; or both), `rows` rows in all (default: B per rank):
    the k * rows largest scores over all of them are kept, as one process would on the whole
    batch. Each rank sends only its own k * rows largest scores (a superset of its share of the
    global selection, and all of its positive scores whenever the global cutoff is 0), never its
    [B, F] matrix."""
    B, F = scores_BF.shape
    ranks = 1 if group is None else dist.get_world_size(group)
    n_keep = min(k * (rows or B * ranks), B * F * ranks)
    if ranks == 1:
        kept = scores_BF.flatten().topk(n_keep, sorted=False)
        mask = torch.zeros(B * F, dtype=torch.bool, device=scores_BF.device)
        mask[kept.indices] = True
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
    """Exponential moving average of the smallest positive kept score; a negative threshold means
    none estimated yet, and the first estimate is taken as is. No host sync. The authors: decay
    (their threshold_beta) 0.999, updated only after threshold_start_step (the trainer's part)."""
    new = decay * threshold + (1 - decay) * min_kept_score
    return torch.where(threshold < 0, min_kept_score, new)


def k_at(step, k, k_max=None, annealing_steps=0):
    """k annealed linearly from k_max down to k over the first annealing_steps steps, rounded, at
    least 1 (the authors' k annealing); k itself without annealing. (Their trainer holds k_max when
    annealing_steps is 0, which with their script's k_max default of 2048 contradicts the k of
    their runs' names; we keep k.)"""
    if k_max is None or annealing_steps <= 0 or step >= annealing_steps:
        return k
    return max(1, int(round(k_max - (k_max - k) * step / annealing_steps)))


def aux_loss(err_BMD, pre_BF, W_dec_FMD, dead_F, aux_k, latent_group=None, norms_F=None, normalise=True,
             data_group=None):
    """AuxK: reconstruct the (detached) error from the aux_k dead latents of each token with the
    largest activations, decoded without the decoder bias; squared error summed over models and
    d_in, mean over the batch. Zero when no latent is dead.

    norms_F: the latents are chosen by activation x this (the decoder norms summed over models, as
    the authors choose them), the values decoded are the plain activations; None: by activation.
    normalise: divided by the error's variance over the batch, mean_B sum_MD (e - mean_B e)^2, as
    Gao et al. and the authors do (over the global batch: data_group's rows together).
    latent_group: the dictionary is split over these processes (sharding.py)."""
    acts_BF = torch.relu(pre_BF.float()).masked_fill(~dead_F, 0.0)
    rank_BF = acts_BF if norms_F is None else acts_BF * norms_F.detach().float()
    if latent_group is None:
        top = rank_BF.topk(min(aux_k, rank_BF.shape[1]), dim=-1)
        sparse_BF = torch.zeros_like(acts_BF).scatter(-1, top.indices, acts_BF.gather(-1, top.indices))
    else:  # the aux_k largest of each row over every shard's latents
        sparse_BF = acts_BF * aux_keep_mask(rank_BF, aux_k, latent_group)
    err_hat_BMD = sum_over_shards(torch.einsum("bf,fmd->bmd", sparse_BF, W_dec_FMD.float()), latent_group)
    err_BMD = err_BMD.detach().float()
    loss = (err_hat_BMD - err_BMD).pow(2).sum((-1, -2)).mean()
    if normalise:
        loss = (loss / residual_variance(err_BMD, data_group)).nan_to_num(0.0)
    return loss * any_over_shards(dead_F.any(), latent_group)


@torch.no_grad()
def residual_variance(r_BMD, data_group=None):
    """mean_B sum_MD (r - mean_B r)^2 over the rows of every rank of data_group (the global
    batch), from its sums in float64: one all-reduce, no host sync."""
    if data_group is None:
        return (r_BMD - r_BMD.mean(0)).pow(2).sum((-1, -2)).mean()
    r = r_BMD.double().flatten(1)
    sums = torch.cat([r.sum(0), r.pow(2).sum().view(1), torch.tensor([r.shape[0]], dtype=r.dtype, device=r.device)])
    dist.all_reduce(sums, group=data_group)
    n = sums[-1]
    mean_sq = sums[:-2].div(n).pow(2).sum()
    return (sums[-2] / n - mean_sq).float()


@torch.no_grad()
def geometric_median(x_BMD, group=None, max_iter=100, tol=1e-5):
    """[M, D]: each model's geometric median of the batch (Weiszfeld's iteration from the mean, at
    most max_iter steps, stopping when every model's estimate moves less than tol), over the rows
    of every rank of group. The authors start b_dec there from the first batch."""
    x = x_BMD.float()

    def total(t):  # a sum over the batch, over every rank's rows
        t = t.sum(0)
        if group is not None:
            dist.all_reduce(t, group=group)
        return t

    guess_MD = total(x) / total(torch.ones(x.shape[0], 1, device=x.device))
    for _ in range(max_iter):
        # (a point exactly at the estimate would get an infinite weight: the authors' code gives NaN)
        w_BM = 1 / (x - guess_MD).norm(dim=-1).clamp_min(1e-12)
        new_MD = total(w_BM[..., None] * x) / total(w_BM)[:, None]
        done = ((new_MD - guess_MD).norm(dim=-1) < tol).all()
        guess_MD = new_MD
        if done:  # the same on every rank: every rank holds the same estimate
            break
    return guess_MD
