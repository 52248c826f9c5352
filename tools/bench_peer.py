"""Our BatchTopK training step beside dictionary_learning's, timed side by side in one process:

    python -m tools.bench_peer --peer PATH [--dict_sizes 8192,16384] [--rounds 3] [--threads 1] [--compile]
    python -m tools.bench_peer --reference PATH [--dict_sizes 8192] ...

PATH is a checkout of science-of-finetuning/dictionary_learning (the BatchTopK crosscoder of
Minder, Dumas et al. 2025), whose `dictionary_learning/` folder is imported as it is. Its
trainer's `update` (forward, AuxK, backward, clipping, Adam, its schedule) is timed against our
`Trainer.step` (the same, and the dead-latent bookkeeping), dense and with `--sparse_step true`,
on the same batch, each variant's step in turn, for several rounds; the table gives each one's
median and its speed against the peer's. --compile adds our dense step with its crosscoder's
forward compiled by torch.compile (inductor), and how far its weights end from the eager step's
after the same steps. The peer's package `__init__` files are skipped (they import
nnsight, which its step does not use); its utils.py needs `pip install zstandard`. --reference
times the L1 step of the reference (ckkissane/crosscoder-model-diff-replication, its crosscoder.py
and its Trainer.step's work) against ours, likewise.

Shape (the issue's): d_in 768, batch 1024, k 100, 2 models, fp32, one thread by default.

Shape legend: B batch, M models, D d_in.
"""
import argparse
import importlib
import importlib.util
import statistics
import sys
import time
import types
from pathlib import Path

import einops
import numpy
import torch

from crossdiff.config.schema import DEFAULTS
from trainer import Trainer

D_IN, BATCH, K = 768, 1024, 100


def import_peer(path):
    """dictionary_learning's crosscoder trainer module, from the checkout at path."""
    root = Path(path) / "dictionary_learning"
    if not (root / "trainers" / "crosscoder.py").is_file():
        sys.exit(f"error: --peer {path}: no dictionary_learning/trainers/crosscoder.py there (a checkout of "
                 "science-of-finetuning/dictionary_learning)")
    for name, where in (("dictionary_learning", root), ("dictionary_learning.trainers", root / "trainers")):
        package = types.ModuleType(name)  # the package without its __init__ (which imports nnsight)
        package.__path__ = [str(where)]
        sys.modules[name] = package
    try:
        return importlib.import_module("dictionary_learning.trainers.crosscoder")
    except ModuleNotFoundError as e:
        sys.exit(f"error: the peer's code needs {e.name}: pip install {e.name}")


class Same:
    """The same batch at every step."""

    def __init__(self, x_BMD):
        self.x_BMD = x_BMD

    def next(self):
        return self.x_BMD


def ours(dict_size, x_BMD, sparse, compiled=False, architecture="batchtopk"):
    """Our Trainer's step; compiled: its crosscoder's forward (and so its backward) by torch.compile."""
    cfg = dict(DEFAULTS, architecture=architecture, d_in=D_IN, dict_size=dict_size, batch_size=BATCH, k=K,
               sparse_step=sparse, num_tokens=BATCH * 10**6, device="cpu", wandb_mode="disabled", progress=False,
               model_names=["a", "b"], model_name="a", hook_point="blocks.1.hook_resid_pre", log_every=10**9,
               save_every=10**9)
    trainer = Trainer(cfg, buffer=Same(x_BMD))
    if compiled:
        trainer.crosscoder.losses_and_acts = torch.compile(trainer.crosscoder.losses_and_acts)
    return trainer.step


def peer(module, dict_size, x_BMD):
    trainer = module.BatchTopKCrossCoderTrainer(steps=10**6, activation_dim=D_IN, dict_size=dict_size, k=K, layer=0,
                                                lm_name="bench", num_layers=2, device="cpu", seed=0)
    step = iter(range(10**9))
    return lambda: trainer.update(next(step), x_BMD.clone())  # (update normalises its input in place)


def import_reference(path):
    """The reference's crosscoder.py (ckkissane/crosscoder-model-diff-replication) from a checkout,
    as a module of its own name. Its `from utils import *` gets torch, einops, numpy and Path, all
    it reads from there: the reference's utils.py imports notebook libraries (IPython, plotly)
    that its step does not use."""
    file = Path(path) / "crosscoder.py"
    if not file.is_file():
        sys.exit(f"error: --reference {path}: no crosscoder.py there (a checkout of "
                 "ckkissane/crosscoder-model-diff-replication)")
    shim = types.ModuleType("utils")
    shim.torch, shim.einops, shim.np, shim.Path = torch, einops, numpy, Path
    saved = sys.modules.get("utils")
    sys.modules["utils"] = shim
    try:
        spec = importlib.util.spec_from_file_location("reference_crosscoder", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["utils"]
        else:
            sys.modules["utils"] = saved
    return module


def reference(module, dict_size, x_BMD):
    """The reference Trainer.step's work on a given batch: get_losses, l2 + l1_coeff * l1, backward,
    clipping, Adam, the schedule, and the losses read to the host as its loss_dict does."""
    cfg = dict(DEFAULTS, d_in=D_IN, dict_size=dict_size, enc_dtype="fp32", device="cpu")
    crosscoder = module.CrossCoder(cfg)
    optimizer = torch.optim.Adam(crosscoder.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def step():
        losses = crosscoder.get_losses(x_BMD)
        loss = losses.l2_loss + cfg["l1_coeff"] * losses.l1_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(crosscoder.parameters(), max_norm=1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        return {name: value.mean().item() for name, value in losses._asdict().items()}

    return step


def timed(steps, rounds):
    """{name: median seconds of its step}: each step once untimed (b_dec's geometric median, the
    allocations), then each in turn, rounds times."""
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--peer", help="a checkout of science-of-finetuning/dictionary_learning")
    parser.add_argument("--reference", help="a checkout of ckkissane/crosscoder-model-diff-replication: its L1 "
                        "step beside ours")
    parser.add_argument("--dict_sizes", default="8192,16384", help="dictionary sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps of each variant, taken in turn")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    parser.add_argument("--compile", action="store_true", help="also our dense step with torch.compile (inductor), "
                        "and how far its weights end from the eager step's")
    a = parser.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.peer is None and a.reference is None:
        sys.exit("error: give --peer (dictionary_learning's BatchTopK) or --reference (the reference's L1), or both")
    x_BMD = torch.randn(BATCH, 2, D_IN, generator=torch.Generator().manual_seed(0))
    sizes = [int(size) for size in a.dict_sizes.split(",")]
    if a.reference is not None:
        module = import_reference(a.reference)
        print(f"L1: d_in {D_IN}, batch {BATCH}, 2 models, fp32, {a.threads} thread(s), {a.rounds} rounds; seconds "
              "per step (median)")
        print(f"{'dict':>7}  {'the reference':>14}  {'ours':>16}")
        for F in sizes:
            med = timed({"reference": reference(module, F, x_BMD), "ours": ours(F, x_BMD, False, architecture="l1")},
                        a.rounds)
            print(f"{F:>7}  {med['reference']:>13.2f}s  {med['ours']:>6.2f}s ({med['reference'] / med['ours']:.2f}x)",
                  flush=True)
    if a.peer is None:
        return
    module = import_peer(a.peer)
    print(f"d_in {D_IN}, batch {BATCH}, k {K}, 2 models, fp32, {a.threads} thread(s), {a.rounds} rounds; "
          "seconds per step (median)")
    print(f"{'dict':>7}  {'dictionary_learning':>20}  {'ours, dense':>18}  {'ours, sparse_step':>22}")
    for F in sizes:
        steps = {"peer": peer(module, F, x_BMD), "dense": ours(F, x_BMD, False), "sparse": ours(F, x_BMD, True)}
        if a.compile:
            steps["compiled"] = ours(F, x_BMD, False, compiled=True)
        med = timed(steps, a.rounds)
        print(f"{F:>7}  {med['peer']:>19.2f}s  {med['dense']:>7.2f}s ({med['peer'] / med['dense']:.2f}x)  "
              f"{med['sparse']:>11.2f}s ({med['peer'] / med['sparse']:.2f}x)", flush=True)
        if a.compile:  # the same steps on the same batches from the same weights: how far apart they end
            eager, compiled = (steps[n].__self__.crosscoder.state_dict() for n in ("dense", "compiled"))
            apart = max(float((compiled[k] - v).abs().max() / v.abs().max().clamp(min=1e-12)) for k, v in eager.items())
            print(f"{'':>7}  torch.compile'd dense step {med['compiled']:.2f}s: {med['dense'] / med['compiled']:.2f}x the "
                  f"eager one; after {a.rounds + 1} steps the weights differ by {apart:.1e} of their largest", flush=True)


if __name__ == "__main__":
    main()
