"""Data parallelism on PyTorch's own engine: torch.distributed, launched by torchrun (NCCL on GPUs,
gloo on CPU). Plain `python train.py` creates no process group: the world size is 1 and every
function here does nothing.

Each rank trains an identical replica of the crosscoder on its own share of the global batch:
its own token sequences, its own buffer (no activations cross the network). Gradients are
averaged before clipping, so one step equals a single-process step on the global batch.

Dictionaries split over the latents: `torchrun --nproc_per_node=N train.py --latent_shards S`.
The processes form a 2-D mesh, world = data groups x S (distributed.setup). In a latent group of
S processes, shard s holds latents [s * f, (s + 1) * f) (of a partitioned dictionary, the s-th
slice of every block: partition.shard_latents): its columns of W_enc and b_enc, its rows of W_dec, their gradients and Adam state; b_dec is replicated. Every process of the group sees
the group's whole batch, so encoding needs no communication. The decoder's partial
reconstructions, the L1 and L0 sums and the AuxK reconstruction are summed over the group with
sum_over_shards, whose backward is the identity: every process then computes the same loss from
the same sum, so each partial's gradient is the sum's (Megatron-LM's "reduce from the
model-parallel region", Shoeybi et al. 2019, section 3). Gradients are then averaged over the
data groups as in plain data parallelism.

The model knows no process group: the trainer passes it a Mesh (training_mesh) naming the
groups each collective of its step runs over.

Shape legend: B batch (one data group's rows), M models, D d_in, F latents, f = F / S (one shard).
"""
import datetime
import os
import sys
from typing import NamedTuple

import torch
import torch.distributed as dist

from config import ConfigError
from partition import shard_latents

_control = None  # a gloo group for host-side flags, so that NCCL runs never sync a GPU for them
_mesh = None  # with latent_shards > 1: the DeviceMesh (data, latent) of world = data groups x latent shards


def resolve_device(device=None):
    """None or "auto" -> "cuda" when available, else "cpu"; anything else is kept."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def group():
    """The process group of all ranks (None in one process)."""
    return dist.group.WORLD if world_size() > 1 else None


def is_main():
    """Rank 0 logs, shows the progress bar and writes checkpoints."""
    return rank() == 0


def is_local_main():
    """The first process on this machine (torchrun's LOCAL_RANK 0): it prepares node-local files."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def launched():
    """True in a process started by torchrun with more than one process in all."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device=None, timeout_s=600, latent_shards=1):
    """Join the process group torchrun describes in the environment and return this rank's
    device: cuda:LOCAL_RANK with NCCL when a GPU is asked for or available, else the CPU with
    gloo. A rank that dies makes the others fail after timeout_s instead of hanging.
    latent_shards > 1: a 2-D mesh, rank = data_index * latent_shards + latent_index. Called again
    in the same processes, it keeps the process group and rebuilds the mesh for latent_shards."""
    global _control, _mesh
    if not launched():
        return device
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
        _control = dist.new_group(backend="gloo", timeout=timeout) if use_cuda else None
    _mesh = None
    if latent_shards > 1:
        from torch.distributed.device_mesh import init_device_mesh

        _mesh = init_device_mesh("cuda" if use_cuda else "cpu", (world_size() // latent_shards, latent_shards),
                                 mesh_dim_names=("data", "latent"))
    return device if use_cuda else "cpu"


def latent_group():
    """The processes this rank's dictionary is split over (None: not split)."""
    return _mesh.get_group("latent") if _mesh is not None else None


def data_group():
    """The processes holding the same latents as this one, on other data (None in one process)."""
    return _mesh.get_group("data") if _mesh is not None else group()


def latent_shard():
    """(index of this rank's slice of the latents, number of slices)."""
    return (_mesh.get_local_rank("latent"), _mesh.size(1)) if _mesh is not None else (0, 1)


def teardown(clean=True):
    """Leave the process group. clean: every rank got here normally, so they first wait for one
    another (gloo aborts a process that destroys its group while a peer still talks to it); after
    a failure torchrun stops the others, and waiting could only hang."""
    global _control, _mesh
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
        _control = _mesh = None


def exit_process(code=0):
    """End a torchrun worker at once, after flushing its output. Python's own shutdown can still
    abort a worker after destroy_process_group ("terminate called without an active exception",
    about one run in ten with gloo here: c10d threads torn down during interpreter finalisation),
    which would fail the whole job after it finished. code: an exit status or a message (status 1)."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def run_script(cli, argv):
    """cli(argv) as a script's entry point; a torchrun worker then leaves through exit_process."""
    if not launched():
        return cli(argv)
    try:
        cli(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    exit_process(code)


def local_batch_size(batch_size, n_processes=None):
    """Rows each rank serves a step: batch_size / world size, or a ConfigError naming both."""
    n = n_processes or world_size()
    if batch_size % n:
        raise ConfigError(f"batch_size {batch_size} does not split over {n} processes "
                          f"(torchrun --nproc_per_node x --nnodes): choose a multiple of {n}")
    return batch_size // n


def shard(n):
    """This rank's contiguous share of n items (every rank gets n // world_size)."""
    per_rank = n // world_size()
    return slice(rank() * per_rank, (rank() + 1) * per_rank)


def sum_(tensors, over=None):
    """Replace each tensor, in place, by its sum over the ranks of the group `over` (default:
    all): one all-reduce for the whole list (each collective call has a fixed latency, ~2 ms with
    gloo on this CPU, so a step pays it once rather than once per tensor)."""
    if _size(over) == 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, group=over)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return tensors


def average_(tensors, over=None):
    """Replace each tensor, in place, by its mean over the ranks of `over` (one all-reduce)."""
    n = _size(over)
    for t in sum_(tensors, over) if n > 1 else ():
        t.div_(n)
    return tensors


def _size(over):
    return dist.get_world_size(over) if world_size() > 1 else 1


def any_rank(flag):
    """True on every rank when flag is true on any rank (a host-side all-reduce)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device="cpu")  # (the gloo control group)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return bool(t.item())


STOP_CHECK_EVERY = 10  # several processes: steps between the ranks' checks for a stop signal


def stop_agreed(stopping, step):
    """Whether to stop after this step, the same answer on every rank: one process answers its own
    flag at once; several ask each other after every STOP_CHECK_EVERY-th step (one host round
    trip, ~2 ms with gloo here), true when any rank's flag is set."""
    if world_size() == 1:
        return bool(stopping)
    return (step + 1) % STOP_CHECK_EVERY == 0 and any_rank(stopping)


def max_(values):
    """The elementwise maximum over the ranks of a list of ints (a host-side all-reduce)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.long, device="cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return t.tolist()


def combine_factors(factors_M):
    """Normalisation factors every rank agrees on. Each rank measured sqrt(d_in) / its mean
    activation norm on its own sequences; the factor of the mean norm over all ranks (equal
    counts) is the harmonic mean of their factors."""
    if world_size() == 1:
        return factors_M
    inverse = 1.0 / factors_M.double()
    average_([inverse])
    return (1.0 / inverse).to(factors_M.dtype)


def broadcast(obj):
    """Rank 0's value of a small picklable object, on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def barrier():
    if world_size() > 1:
        dist.barrier(group=_control)


class Mesh(NamedTuple):
    """The process groups one training step's collectives run over; Mesh() in one process."""
    world: object = None  # every rank: BatchTopK selects over the global batch
    latent: object = None  # the ranks this rank's dictionary is split over (None: whole)
    data: object = None  # the ranks holding the same latents on other data (None: no data parallel)
    data_parallel: int = 1  # data-parallel groups: the global batch is this many latent groups' rows


def training_mesh():
    """This process's Mesh, from the process groups setup() made."""
    if world_size() == 1:
        return Mesh()
    data_parallel = world_size() // latent_shard()[1]
    return Mesh(world=group(), latent=latent_group(), data=data_group() if data_parallel > 1 else None,
                data_parallel=data_parallel)


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
