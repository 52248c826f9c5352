"""Data parallel's gradient reduction, measured on N processes:

    torchrun --nproc_per_node=2 -m tools.bench_dp [--shape gemma|toy] [--batch_size B] [--steps S]

Three ways to run the same data-parallel crosscoder step (forward, backward, gradients averaged
over the processes, an SGD step: unlike Adam's, it shows any factor in the averaged gradients in
the weights), each timed over S steps after one warm-up:
  none  no reduction: the compute alone, the floor;
  flat  ours (trainer.py): after the backward, every gradient in one flat tensor and one
        all-reduce (distributed.average_), then copied back;
  ddp   torch's DistributedDataParallel: bucketed all-reduces that overlap the backward;
  hooks one asynchronous all-reduce per weight, started by a post-accumulate-grad hook as soon as
        the backward has its gradient (W_dec's first, while the encoder's backward runs on),
        waited for before the optimizer (DDP's overlap without wrapping the model).
The extra time over none is what the reduction costs. The three must end on the same weights
(they average the same gradients); the script checks it. BatchTopK's global
selection and the fired-latent flags are reduced separately in both and are left out here (L1).
On CPUs the step's compute dwarfs the reduction; a GPU (NCCL) run answers the question for GPUs.
"""
import sys
import time

import torch
import torch.distributed as dist

from crosscoder import CrossCoder
from crossdiff.config.cli import parse_overrides
from crossdiff.config.schema import DEFAULTS, ConfigError
from crossdiff.scale import distributed

SHAPES = {"gemma": dict(d_in=2304, dict_size=2**14, batch_size=1024), "toy": dict(d_in=64, dict_size=1024, batch_size=512)}


class Step(torch.nn.Module):
    """The crosscoder's training loss as a module's forward, for DistributedDataParallel."""

    def __init__(self, crosscoder):
        super().__init__()
        self.crosscoder = crosscoder

    def forward(self, x_BMD):
        losses, _, terms = self.crosscoder.losses_and_acts(x_BMD)
        return self.crosscoder.training_loss(losses, terms, 0, 1)[0]


def run(mode, cfg, x_BMD, steps):
    """(seconds per step, the final weights) of `steps` steps in this mode."""
    torch.manual_seed(0)
    crosscoder = CrossCoder(cfg)
    step = Step(crosscoder)
    if mode == "ddp":
        step = torch.nn.parallel.DistributedDataParallel(step, forward_sync_buffers=False)
    optimizer = torch.optim.SGD(crosscoder.parameters(), lr=cfg["lr"])
    pending = []
    if mode == "hooks":
        for p in crosscoder.parameters():
            p.register_post_accumulate_grad_hook(lambda p: pending.append(dist.all_reduce(p.grad, async_op=True)))

    def one():
        step(x_BMD).backward()
        if mode == "flat":
            distributed.average_([p.grad for p in crosscoder.parameters()])
        if mode == "hooks":
            for work in pending:
                work.wait()
            pending.clear()
            for p in crosscoder.parameters():
                p.grad.div_(dist.get_world_size())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one()  # warm-up (DDP builds its buckets here)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    dist.barrier()
    return (time.perf_counter() - t0) / steps, {k: v.detach().clone() for k, v in crosscoder.state_dict().items()}


def main(argv):
    options, extras = parse_overrides(argv, {"device": "cpu"}, flags=("shape", "batch_size", "steps"))
    if extras.get("help"):
        print(__doc__)
        return 0
    if extras.get("shape", "gemma") not in SHAPES:
        raise ConfigError(f"--shape must be one of {list(SHAPES)}")
    if not distributed.launched():
        raise ConfigError("launch it with torchrun: torchrun --nproc_per_node=2 -m tools.bench_dp")
    shape = dict(SHAPES[extras.get("shape", "gemma")])
    shape["batch_size"] = int(extras.get("batch_size", shape["batch_size"]))
    steps = int(extras.get("steps", 5))
    device = distributed.setup(options["device"])
    n = distributed.world_size()
    cfg = dict(DEFAULTS, d_in=shape["d_in"], dict_size=shape["dict_size"], batch_size=shape["batch_size"],
               device=device, lr=0.1, hook_point="blocks.1.hook_resid_pre")
    local = shape["batch_size"] // n
    gen = torch.Generator().manual_seed(distributed.rank())  # each rank its own rows
    x_BMD = torch.randn(local, 2, shape["d_in"], generator=gen, device="cpu").to(device)
    results = {mode: run(mode, cfg, x_BMD, steps) for mode in ("none", "flat", "ddp", "hooks")}
    grads_mb = sum(v.numel() for v in results["flat"][1].values()) * 4 / 2**20  # (every state entry is a weight)
    if distributed.is_main():
        none = results["none"][0]
        print(f"bench_dp: {n} processes ({dist.get_backend()}), d_in {shape['d_in']}, dict {shape['dict_size']}, "
              f"batch {shape['batch_size']} ({local} per process), {grads_mb:.0f} MB of gradients, {steps} steps")
        for mode, (s, _) in results.items():
            print(f"{mode:>5}: {s * 1000:9.1f} ms/step" + ("" if mode == "none" else
                                                        f"   reduction {(s - none) * 1000:8.1f} ms"))
        for other in ("ddp", "hooks"):
            diff = max((results["flat"][1][k] - results[other][1][k]).abs().max().item() for k in results["flat"][1])
            print(f"flat vs {other}: largest weight difference after {steps + 1} steps {diff:.2e}")
    distributed.teardown(True)
    return 0


def cli(argv):
    try:
        return main(argv)
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":  # a torchrun worker leaves through distributed.exit_process
    distributed.run_script(cli, sys.argv[1:])
