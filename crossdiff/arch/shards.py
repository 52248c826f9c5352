"""A dictionary split over latent shards: the maths each shard's step needs, over the process
group the trainer's Mesh names (None: the dictionary is whole, and each function is the identity
or the single-process operation).

In a latent group of S processes, shard s holds latents [s * f, (s + 1) * f) (of a partitioned
dictionary, the s-th slice of every block: partition.shard_latents): its columns of W_enc and
b_enc, its rows of W_dec, their gradients and Adam state; b_dec is replicated. Every process of
the group sees the group's whole batch, so encoding needs no communication. The decoder's partial
reconstructions, the L1 and L0 sums and the AuxK reconstruction are summed over the group with
sum_over_shards, whose backward is the identity: every process then computes the same loss from
the same sum, so each partial's gradient is the sum's (Megatron-LM's "reduce from the
model-parallel region", Shoeybi et al. 2019, section 3).

Shape legend: B batch (one data group's rows), M models, D d_in, F latents, f = F / S (one shard).
"""
import torch
import torch.distributed as dist

from crossdiff.arch.partition import shard_latents
from crossdiff.arch.widths import is_padded, valid_mask, widths_of

# ---------------------------------------------------------------- latent shards
INIT_CHUNK = 4096  # latents per draw when initialising (memory: one chunk, not the dictionary)


class _SumOverShards(torch.autograd.Function):
    """All-reduce (sum) in fp32, whatever the partials' dtype (bf16 under step_dtype bf16), as a
    whole dictionary's matmul accumulates; the backward passes the gradient through."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.dtype = t.dtype
        t = t.to(torch.float32, copy=True)
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


def sum_over_shards(t, group):
    """t summed over the shards of a latent group (t itself when the dictionary is whole)."""
    return t if group is None else _SumOverShards.apply(t, group)


def any_over_shards(flag, group):
    """A boolean 0-d tensor: true on every shard when true on any."""
    if group is None:
        return flag
    flag = flag.float()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return flag > 0


def init_decoder(cfg, latents_f):
    """Rows latents_f (global indices, ascending within each block) of the initial W_dec [F, M, D]
    for cfg's seed: random directions of norm dec_init_norm. Drawn a chunk at a time from one
    generator, so that every shard gets exactly its rows of the whole dictionary's draw without
    holding the whole dictionary."""
    F, M, D = cfg["dict_size"], cfg["n_models"], cfg["d_in"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    out_fMD = torch.empty(len(latents_f), M, D, device="cpu")
    last = int(latents_f.max()) + 1 if len(latents_f) else 0
    for start in range(0, last, INIT_CHUNK):
        block = torch.randn(min(INIT_CHUNK, F - start), M, D, generator=gen)
        here = torch.nonzero((latents_f >= start) & (latents_f < start + len(block))).flatten()
        out_fMD[here] = block[latents_f[here] - start]
    if is_padded(cfg):  # a narrower model's decoder: its own coordinates only, at the same norm
        out_fMD *= valid_mask(widths_of(cfg), D, device="cpu")[None]
    return out_fMD / out_fMD.norm(dim=-1, keepdim=True) * cfg["dec_init_norm"]


def gather(t, group, dim=0):
    """Each process's t concatenated along dim in the group's rank order (no gradient); t itself
    when group is None."""
    if group is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def aux_keep_mask(acts_BF, aux_k, group):
    """The aux_k largest dead-latent activations of each row over all shards, as a mask of this
    shard's [B, f] (ties at the cut are kept; zeros select nothing)."""
    top_Bk = acts_BF.detach().topk(min(aux_k, acts_BF.shape[1]), dim=-1).values
    candidates_BK = gather(top_Bk, group, dim=1)
    cutoff_B = candidates_BK.topk(min(aux_k, candidates_BK.shape[1]), dim=-1).values[:, -1]
    return acts_BF >= cutoff_B[:, None]


def clip_grad_norm_(crosscoder, max_norm, group):
    """torch.nn.utils.clip_grad_norm_ over the whole dictionary: the squared norms of the sharded
    gradients (LATENT_AXIS) summed over the shards, the replicated ones (the same on every shard)
    counted once."""
    params = dict(crosscoder.named_parameters())
    sharded = [p for name, p in params.items() if name in LATENT_AXIS]
    replicated = [p for name, p in params.items() if name not in LATENT_AXIS]
    sq = torch.stack([p.grad.float().pow(2).sum() for p in sharded]).sum()
    dist.all_reduce(sq, group=group)
    sq = sq + torch.stack([p.grad.float().pow(2).sum() for p in replicated]).sum()
    total = sq.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's own formula
    for p in params.values():
        p.grad.mul_(scale.to(p.grad.dtype))
    return total


# The axis of the latents in each parameter; b_dec (and a BatchTopK threshold) are replicated.
LATENT_AXIS = {"W_enc": -1, "W_dec": 0, "b_enc": 0}


def take_shard(name, t, latents_f):
    """Parameter `name`'s part for the latents latents_f (global indices; itself when it is
    replicated). Reads only those rows of a memory-mapped t."""
    axis = LATENT_AXIS.get(name)
    return t if axis is None else t.index_select(axis % t.dim(), latents_f)


@torch.no_grad()
def gather_weights(crosscoder):
    """The whole dictionary's weights, on the CPU of global rank 0, None on the other ranks.
    Shard s of the first data group (global rank s) sends its slices to rank 0 one tensor at a
    time; rank 0 writes each into a host tensor, so no device ever holds more than its own shard
    and one received slice."""
    index, count = crosscoder.shard
    rank = dist.get_rank()
    if rank >= count:  # another data group holds the same weights
        return None
    out = {}
    for name, param in crosscoder.named_parameters():
        local = param.detach().contiguous()
        axis = LATENT_AXIS.get(name)
        if axis is None:
            out[name] = local.cpu() if rank == 0 else None
            continue
        if rank != 0:
            dist.send(local, dst=0)
            continue
        f = local.shape[axis]
        shape = list(local.shape)
        shape[axis] = f * count
        whole = out[name] = torch.empty(shape, dtype=local.dtype, device="cpu")
        whole.index_copy_(axis % whole.dim(), crosscoder.latents.cpu(), local.cpu())
        received = torch.empty_like(local) if count > 1 else None
        for source in range(1, count):
            dist.recv(received, src=source)
            latents_f = shard_latents(crosscoder.partition, (source, count))
            whole.index_copy_(axis % whole.dim(), latents_f, received.cpu())
    if rank != 0:
        return None
    for name in crosscoder.EXTRA_STATE:  # replicated, as b_dec (a BatchTopK threshold)
        out[name] = getattr(crosscoder, name).detach().cpu()
    return out
