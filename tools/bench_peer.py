"""Our BatchTopK training step beside dictionary_learning's, timed side by side in one process:

    python -m tools.bench_peer --peer PATH [--dict_sizes 8192,16384] [--rounds 3] [--threads 1] [--compile]

PATH is a checkout of science-of-finetuning/dictionary_learning (the BatchTopK crosscoder of
Minder, Dumas et al. 2025), whose `dictionary_learning/` folder is imported as it is. Its
trainer's `update` (forward, AuxK, backward, clipping, Adam, its schedule) is timed against our
`Trainer.step` (the same, and the dead-latent bookkeeping), dense and with `--sparse_step true`,
on the same batch, each variant's step in turn, for several rounds; the table gives each one's
median and its speed against the peer's. --compile adds our dense step with its crosscoder's
forward compiled by torch.compile (inductor), and how far its weights end from the eager step's
after the same steps. The peer's package `__init__` files are skipped (they import
nnsight, which its step does not use); its utils.py needs `pip install zstandard`.

Shape (the issue's): d_in 768, batch 1024, k 100, 2 models, fp32, one thread by default.

Shape legend: B batch, M models, D d_in.
"""
import argparse
import importlib
import statistics
import sys
import time
import types
from pathlib import Path

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


def ours(dict_size, x_BMD, sparse, compiled=False):
    """Our Trainer's step; compiled: its crosscoder's forward (and so its backward) by torch.compile."""
    cfg = dict(DEFAULTS, architecture="batchtopk", d_in=D_IN, dict_size=dict_size, batch_size=BATCH, k=K,
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--peer", required=True, help="a checkout of science-of-finetuning/dictionary_learning")
    parser.add_argument("--dict_sizes", default="8192,16384", help="dictionary sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps of each variant, taken in turn")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    parser.add_argument("--compile", action="store_true", help="also our dense step with torch.compile (inductor), "
                        "and how far its weights end from the eager step's")
    a = parser.parse_args(argv)
    torch.set_num_threads(a.threads)
    module = import_peer(a.peer)
    x_BMD = torch.randn(BATCH, 2, D_IN, generator=torch.Generator().manual_seed(0))
    print(f"d_in {D_IN}, batch {BATCH}, k {K}, 2 models, fp32, {a.threads} thread(s), {a.rounds} rounds; "
          "seconds per step (median)")
    print(f"{'dict':>7}  {'dictionary_learning':>20}  {'ours, dense':>18}  {'ours, sparse_step':>22}")
    for F in (int(s) for s in a.dict_sizes.split(",")):
        steps = {"peer": peer(module, F, x_BMD), "dense": ours(F, x_BMD, False), "sparse": ours(F, x_BMD, True)}
        if a.compile:
            steps["compiled"] = ours(F, x_BMD, False, compiled=True)
        for step in steps.values():  # the first step (b_dec's geometric median, allocations) untimed
            step()
        times = {name: [] for name in steps}
        for _ in range(a.rounds):
            for name, step in steps.items():
                t = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        print(f"{F:>7}  {med['peer']:>19.2f}s  {med['dense']:>7.2f}s ({med['peer'] / med['dense']:.2f}x)  "
              f"{med['sparse']:>11.2f}s ({med['peer'] / med['sparse']:.2f}x)", flush=True)
        if a.compile:  # the same steps on the same batches from the same weights: how far apart they end
            eager, compiled = (steps[n].__self__.crosscoder.state_dict() for n in ("dense", "compiled"))
            apart = max(float((compiled[k] - v).abs().max() / v.abs().max().clamp(min=1e-12)) for k, v in eager.items())
            print(f"{'':>7}  torch.compile'd dense step {med['compiled']:.2f}s: {med['dense'] / med['compiled']:.2f}x the "
                  f"eager one; after {a.rounds + 1} steps the weights differ by {apart:.1e} of their largest", flush=True)


if __name__ == "__main__":
    main()
