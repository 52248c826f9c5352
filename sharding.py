"""Dictionaries split over the latents: `torchrun --nproc_per_node=N train.py --latent_shards S`.

Shape legend: B batch (one data group's rows), M models, D d_in, F latents, f = F / S (one shard).

The processes form a 2-D mesh, world = data groups x S (distributed.setup). In a latent group of
S processes, shard s holds latents [s * f, (s + 1) * f): its columns of W_enc and b_enc, its rows
of W_dec, their gradients and Adam state; b_dec is replicated. Every process of the group sees
the group's whole batch, so encoding needs no communication. The decoder's partial
reconstructions, the L1 and L0 sums and the AuxK reconstruction are summed over the group with
sum_over_shards, whose backward is the identity: every process then computes the same loss from
the same sum, so each partial's gradient is the sum's (Megatron-LM's "reduce from the
model-parallel region", Shoeybi et al. 2019, section 3). Gradients are then averaged over the
data groups as in plain data parallelism.
"""
import torch
import torch.distributed as dist

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


def shard_rows(dict_size, shard):
    """The latents (a slice) that shard (index, count) holds."""
    index, count = shard
    f = dict_size // count
    return slice(index * f, (index + 1) * f)


def init_decoder(cfg, rows):
    """Rows `rows` (a slice) of the initial W_dec [F, M, D] for cfg's seed: random directions of norm
    dec_init_norm. Drawn a chunk at a time from one generator, so that every shard gets exactly
    its rows of the whole dictionary's draw without holding the whole dictionary."""
    F, M, D = cfg["dict_size"], cfg["n_models"], cfg["d_in"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    out_fMD = torch.empty(rows.stop - rows.start, M, D)
    for start in range(0, rows.stop, INIT_CHUNK):
        block = torch.randn(min(INIT_CHUNK, F - start), M, D, generator=gen)
        lo, hi = max(start, rows.start), min(start + len(block), rows.stop)
        if lo < hi:
            out_fMD[lo - rows.start : hi - rows.start] = block[lo - start : hi - start]
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


def take_shard(name, t, rows):
    """Parameter `name`'s slice for the latents `rows` (itself when it is replicated)."""
    axis = LATENT_AXIS.get(name)
    return t if axis is None else t.narrow(axis, rows.start, rows.stop - rows.start)


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
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        local = getattr(crosscoder, name).detach().contiguous()
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
        whole = out[name] = torch.empty(shape, dtype=local.dtype)
        whole.narrow(axis, 0, f).copy_(local)
        received = torch.empty_like(local) if count > 1 else None
        for source in range(1, count):
            dist.recv(received, src=source)
            whole.narrow(axis, source * f, f).copy_(received)
    if rank != 0:
        return None
    if crosscoder.architecture == "batchtopk":
        out["threshold"] = crosscoder.threshold.detach().cpu()
    return out


# Step memory beyond the weights, gradients and Adam state, at the step's peak, which comes in one
# of two phases: (fp32 copies of [rows, f], copies of W_dec's shard). L1: three [rows, f] (the
# pre-activations and activations kept for the backward pass, and the L0 count's or the
# gradient's temporary), or two plus the decoder norms' gradient before it is added to W_dec's;
# BatchTopK: eight [rows, f] (its scores, the flattened selection and AuxK's masked copy on top).
# Plus [rows, M, D] copies (inputs, reconstruction, error; sharded: the gathered rows and the
# summed reconstruction). Measured with torch's MemTracker on CPU steps at shapes from
# rows << M * D to rows >> M * D (tests/test_sharding.py checks the formula against it).
STEP_PHASES = {"l1": ((3, 0), (2, 1)), "batchtopk": ((8, 0),)}


def held_bytes(d_in, dict_size, shards=1, n_models=2):
    """Bytes one rank holds throughout training in fp32: its shard's weights, gradients and Adam
    moments (4 copies of W_enc, W_dec, b_enc; b_dec replicated)."""
    f = dict_size // shards
    return 4 * 4 * (2 * n_models * d_in * f + f + n_models * d_in)


def memory_per_rank(d_in, dict_size, shards=1, rows=4096, n_models=2, architecture="l1"):
    """Bytes one rank holds at the peak of a training step in fp32: held_bytes, plus the step's
    temporaries for `rows` rows (the latent group's batch: batch_size / data-parallel groups)."""
    f = dict_size // shards
    step = max(per_row * rows * f + per_decoder * n_models * d_in * f
               for per_row, per_decoder in STEP_PHASES[architecture])
    row_copies = 2 + 2 * (shards > 1)
    return held_bytes(d_in, dict_size, shards, n_models) + 4 * (step + row_copies * rows * n_models * d_in)


def memory_table(gpu_bytes=80e9, rows=4096, architecture="l1"):
    """The README's table: GB per rank, d_in 2304 and 3584, dict 2^14 ... 2^20, 1-8 shards."""
    lines = ["| d_in | dict_size | 1 shard | 2 shards | 4 shards | 8 shards |", "| --- | --- | --- | --- | --- | --- |"]
    for d_in in (2304, 3584):
        for log2 in range(14, 21):
            cells = []
            for shards in (1, 2, 4, 8):
                b = memory_per_rank(d_in, 2**log2, shards, rows, architecture=architecture)
                cells.append(f"{b / 1e9:.1f}" + ("" if b <= gpu_bytes else " (no)"))
            lines.append(f"| {d_in} | 2^{log2} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for arch in ("l1", "batchtopk"):
        print(f"\n{arch}: GB per rank at 4,096 rows per latent group, fp32; (no): over an 80 GB GPU")
        print(memory_table(architecture=arch))
