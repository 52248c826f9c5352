"""Partitioned dictionaries, for every architecture and number of models: latents exclusive to one
model by construction (Dedicated Feature Crosscoders, Jiralerspong & Bricken 2026, arXiv
2602.11729; their code superkaiba/dfc_learning) and designated shared latents whose decoder is one
vector for all models (Anthropic, "Insights on Crosscoder Model Diffing", Feb 2025; the DFC
paper's App. B.3 "DSF" variant for BatchTopK).

The dictionary is laid out in blocks, in this order (the DFC authors' order, then ours):
    [exclusive to model 0 | exclusive to model 1 | ... | designated shared | the free rest]
int(exclusive_fraction * dict_size) latents per model (the authors' rounding), int(shared_fraction
* dict_size) designated shared. A latent exclusive to model m has zero encoder columns and decoder
rows in every other model, and those weights receive no gradient (`constrained`): Adam's moments
for them stay zero, so the weights stay exactly zero, and no loss (AuxK included) can reach them.
As the authors, the biases are not masked. A designated shared latent's decoder rows are equal in
every model and receive the gradient of one tied vector (the sum of the models' gradients), so
Adam keeps them equal. The free latents are a standard crosscoder's.

Under latent shards every block splits evenly: shard i holds the i-th slice of each block, in
block order (`shard_latents`), so each process holds its share of every block.

Shape legend: f this shard's latents, F all latents, M models, D d_in, B batch.
"""
from typing import NamedTuple

import torch

from crossdiff.config.schema import partition_sizes

FREE, DESIGNATED = -1, -2  # latent_owner's labels besides the model index of an exclusive latent
TIED_TOLERANCE = 1e-6  # tied rows: relative; forbidden weights must be exactly 0


class PartitionError(ValueError):
    pass


class Partition(NamedTuple):
    dict_size: int
    n_models: int
    exclusive: int  # latents exclusive to each model
    shared: int  # designated shared latents

    @property
    def active(self):
        return self.exclusive > 0 or self.shared > 0

    def blocks(self):
        """[(owner, start, stop)]: each model's exclusive block, the designated block, the free rest
        (empty blocks left out)."""
        out, start = [], 0
        for owner, size in [(m, self.exclusive) for m in range(self.n_models)] + [(DESIGNATED, self.shared)]:
            out.append((owner, start, start + size))
            start += size
        out.append((FREE, start, self.dict_size))
        return [b for b in out if b[2] > b[1]]


def partition_of(cfg):
    """The partition cfg's fractions make (a standard crosscoder's, one free block, when both are
    0); config.partition_sizes rounds them and config.validate_cfg checks them."""
    return Partition(cfg["dict_size"], cfg["n_models"], *partition_sizes(cfg))


def shard_latents(p, shard=(0, 1)):
    """[f] the global indices of the latents shard (index, count) holds, in its local order: the
    index-th slice of every block (a contiguous slice without a partition)."""
    index, count = shard
    parts = []
    for _, start, stop in p.blocks():
        n = (stop - start) // count
        if n * count != stop - start:
            raise PartitionError(f"a block of {stop - start} latents does not split into {count} shards")
        parts.append(torch.arange(start + index * n, start + (index + 1) * n, device="cpu"))
    return torch.cat(parts)


def latent_owner(p, latents_f):
    """[f] for each latent: the model it is exclusive to, DESIGNATED, or FREE."""
    owner_f = torch.full(latents_f.shape, FREE, dtype=torch.long, device=latents_f.device)
    for owner, start, stop in p.blocks():
        owner_f[(latents_f >= start) & (latents_f < stop)] = owner
    return owner_f


def allowed_mask(owner_f, n_models):
    """[f, M] bool: latent j may read from and write to model m (not exclusive to another)."""
    models_M = torch.arange(n_models, device=owner_f.device)
    return (owner_f[:, None] < 0) | (owner_f[:, None] == models_M[None, :])


# ---------------------------------------------------------------- gradients and weights
def project_decoder_grad(grad_fMD, allowed_fM, tied_f):
    """The gradient a partitioned decoder receives: zero where forbidden, the sum over models on
    tied (designated shared) rows (the gradient of one vector used by every model)."""
    grad_fMD = torch.where(allowed_fM[..., None], grad_fMD, 0)
    return torch.where(tied_f[:, None, None], grad_fMD.sum(1, keepdim=True).expand_as(grad_fMD), grad_fMD)


def project_encoder_grad(grad_MDf, allowed_fM):
    """The gradient a partitioned encoder receives: zero where forbidden."""
    return torch.where(allowed_fM.T[:, None, :], grad_MDf, 0)


class _Constrained(torch.autograd.Function):
    """The weight itself in the forward (a view, no copy); its gradient projected in the backward."""

    @staticmethod
    def forward(ctx, weight, project):
        ctx.project = project
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return ctx.project(grad), None


def constrained(weight, project):
    """weight, whose gradient passes through project (a function of it) when it flows back."""
    return _Constrained.apply(weight, project)


@torch.no_grad()
def impose_(W_enc_MDf, W_dec_fMD, allowed_fM, tied_f):
    """Make freshly initialised weights obey the partition: forbidden weights zero, every model's
    decoder row of a tied latent equal to model 0's."""
    W_enc_MDf.mul_(allowed_fM.T[:, None, :].to(W_enc_MDf.dtype))
    W_dec_fMD.mul_(allowed_fM[..., None].to(W_dec_fMD.dtype))
    W_dec_fMD[tied_f] = W_dec_fMD[tied_f, :1].expand(-1, W_dec_fMD.shape[1], -1)


@torch.no_grad()
def violations(W_enc_MDf, W_dec_fMD, allowed_fM, tied_f):
    """{"forbidden": the largest |weight| the partition forbids, "tied": the largest difference
    between a tied row and model 0's, relative to the largest tied norm}."""
    forbidden = torch.cat([W_enc_MDf.detach().float().abs().amax(1).T[~allowed_fM],
                           W_dec_fMD.detach().float().abs().amax(-1)[~allowed_fM]])
    tied_fMD = W_dec_fMD.detach().float()[tied_f]
    tied = torch.zeros((), device=W_dec_fMD.device)
    if len(tied_fMD):
        scale = tied_fMD.norm(dim=-1).max().clamp_min(1e-30)
        tied = (tied_fMD - tied_fMD[:, :1]).abs().max() / scale
    return {"forbidden": float(forbidden.max()) if len(forbidden) else 0.0, "tied": float(tied)}


def check_violations(found, where=""):
    """Raise PartitionError when the weights break the partition (violations' result)."""
    if found["forbidden"] > 0 or found["tied"] > TIED_TOLERANCE:
        raise PartitionError(f"{where}: the weights break the partition: largest forbidden weight "
                             f"{found['forbidden']:.3g} (must be 0: the partition's, or a narrower model's padding), "
                             f"tied decoders differ by {found['tied']:.3g} (at most {TIED_TOLERANCE:g})")
    return found


# ---------------------------------------------------------------- the architectures' terms
def l1_weights(norms_fM, tied_f, shared_l1_scale):
    """[f] each latent's L1 weight: its decoder norms summed over models (the reference), and a
    tied latent's single norm times shared_l1_scale (Anthropic's reduced penalty on the designated
    block: it pays for one vector, at 0.1-0.2 of the baseline)."""
    return torch.where(tied_f, shared_l1_scale * norms_fM[:, 0], norms_fM.sum(-1))


def k_shares(k, shared, dict_size, multiplier):
    """(k of the rest, k of the designated block) for BatchTopK with a designated shared block: the
    block gets `multiplier` times its proportional share of k, rounded, at least 1 and leaving
    the rest at least 1 (the DFC paper's App. B.3 gives the block "a larger k share" and found 2x
    best; the rounding is ours)."""
    if shared == 0:
        return k, 0
    k_shared = min(max(1, round(k * multiplier * shared / dict_size)), k - 1)
    return k - k_shared, k_shared
