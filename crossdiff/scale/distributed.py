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
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from crossdiff.config.schema import ConfigError

_control = None  # a gloo group for host-side flags, so that NCCL runs never sync a GPU for them
_timeout_s = 600  # setup's: how long a collective waits for the slowest rank
_patient = {}  # gloo groups that wait longer, by the seconds they add (patient_group)
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
    global _control, _mesh, _timeout_s
    if not launched():
        return device
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout, _timeout_s = datetime.timedelta(seconds=timeout_s), timeout_s
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
        _patient.clear()


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
        code = cli(argv) or 0
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


def any_rank(flag, group=None):
    """True on every rank when flag is true on any rank (a host-side all-reduce; group: a
    patient_group, to wait longer for a rank's long work)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device="cpu")  # (the gloo control group)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group if group is not None else _control)
    return bool(t.item())


def patient_group(seconds):
    """A gloo group of every rank whose collectives wait `seconds` longer than setup's timeout
    (rounded up to whole minutes; made once per length): where one rank's work, such as rank 0
    writing a large checkpoint, can outlast a collective's timeout. Every rank calls it at the
    same point with the same seconds, before that work starts (making a group is a collective)."""
    if world_size() == 1:
        return None
    minutes = max(1, -(-int(seconds) // 60))
    if minutes not in _patient:
        _patient[minutes] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=_timeout_s + 60 * minutes))
    return _patient[minutes]


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


def build_once(build, flag, what, poll_s=1.0):
    """build() in one process per machine (the local main) while the others poll the file system
    for its end, with no timeout: a build can outlast any collective's (the offline real pair takes
    ~20 minutes; a barrier gives up after setup's timeout_s). The others then call build() too, so
    it must only read what a finished build left. flag: a path for the notes `flag`.PORT.done and
    .failed (PORT: this job's MASTER_PORT, so that two jobs on one machine keep theirs apart); a
    waiting process whose builder failed exits naming `what` (the builder prints the error)."""
    if world_size() == 1:
        return build()
    job = os.environ.get("MASTER_PORT", "0")
    done, failed = (flag.with_name(f"{flag.name}.{job}{end}") for end in (".done", ".failed"))
    if is_local_main():  # an earlier run's notes go before anyone looks for them
        done.unlink(missing_ok=True)
        failed.unlink(missing_ok=True)
    barrier()
    if is_local_main():
        try:
            result = build()
        except BaseException as e:
            failed.parent.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{type(e).__name__}: {e}")
            raise
        done.parent.mkdir(parents=True, exist_ok=True)
        done.touch()
        return result
    while not done.is_file():
        if failed.is_file():
            sys.exit(f"error: {what} failed in the first process of this machine: {failed.read_text()}")
        time.sleep(poll_s)
    return build()


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


