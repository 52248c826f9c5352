"""Harvest once, train many: an on-disk store of normalised activations.

    python store.py --preset toy --store_dir data/acts_toy [--key value ...]
    torchrun --nproc_per_node=8 store.py --store_dir /shared/acts    # data parallel

harvests what a training run with that config would read (the same tokens, in order) into
memory-mapped bf16 shards, with the normalisation factors and the token ids (provenance) beside
them. Any number of runs then train from it (`python train.py --store_dir DIR`, under torchrun
with any number of processes, or Trainer(cfg, buffer=buffer.ActivationStore(cfg, dir))): it refreshes
and shuffles exactly as the live Buffer does, reading rows instead of running the models.

Under torchrun each rank harvests every w-th shard (shard i: rank i % w) into the same
directory; rank 0 measures the normalisation factors and, once every rank is done, writes the
one metadata file. The store is the same as one process writes.

Shape legend: N sequences, S seq_len, R rows (N * (S - 1)), M models, D d_in.
"""
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import distributed
from activations import run_models
from buffer import SHARD_SEQUENCES, norm_factors, sequences_needed, shard_path
from checkpoint import atomic_write_text
from config import ConfigError, data_tokens
from tokenmask import check_no_exclusions, first_n, positions

@torch.no_grad()
def harvest(cfg, models, tokens_NS, store_dir, n_sequences, shard_sequences=SHARD_SEQUENCES):
    """Write the activations of tokens_NS[:n_sequences] (BOS dropped, normalised per model, bf16),
    shard_sequences sequences per file. Under torchrun, every rank calls it with the same
    arguments and writes its own shards."""
    check_no_exclusions(cfg)
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    n_sequences = min(n_sequences, len(tokens_NS))
    device = next(models[0].parameters()).device
    # The live buffer measures the factors the same way, on the same first sequences.
    factors_M = norm_factors(cfg, models, tokens_NS) if distributed.is_main() else None
    factors_M = torch.tensor(distributed.broadcast(factors_M.tolist() if factors_M is not None else None),
                             device=device)
    rows_per_seq, M, D, first_pos = positions(cfg), len(models), models[0].cfg.d_model, first_n(cfg)
    shards = [min(shard_sequences, n_sequences - first) for first in range(0, n_sequences, shard_sequences)]
    rank, w = distributed.rank(), distributed.world_size()
    for i in range(rank, len(shards), w):
        first, n = i * shard_sequences, shards[i]
        mm = np.memmap(shard_path(store_dir, i), dtype=np.int16, mode="w+", shape=(n * rows_per_seq, M, D))
        for start in tqdm(range(0, n, cfg["model_batch_size"]), desc=f"harvesting shard {i}" + f" (rank {rank})" * (w > 1),
                          leave=False, disable=not cfg["progress"]):
            t = tokens_NS[first + start : first + min(start + cfg["model_batch_size"], n), : cfg["seq_len"]]
            rows_RMD = (run_models(models, t, cfg["hook_point"], first_pos).float() * factors_M[:, None]).to(torch.bfloat16)
            mm[start * rows_per_seq : start * rows_per_seq + len(rows_RMD)] = rows_RMD.view(torch.int16).cpu().numpy()
        mm.flush()
    distributed.barrier()  # every rank's shards are on disk (the ranks' shares differ by one shard at most)
    if distributed.is_main():
        torch.save(tokens_NS[:n_sequences, : cfg["seq_len"]].clone(), store_dir / "tokens.pt")
        meta = {"hook_point": cfg["hook_point"], "model_names": cfg["model_names"], "n_models": M, "d_in": D,
                "seq_len": cfg["seq_len"], "normalisation_factor": factors_M.tolist(), "n_sequences": n_sequences,
                "sequences_per_shard": shard_sequences, "shard_sequences": shards, "dataset": cfg["dataset"],
                "preset": cfg.get("preset"), "harvested_by": w, "ignore_first_n": first_pos}
        if cfg.get("preset") == "toy":
            meta["toy_seed"] = cfg["toy_seed"]  # which toy pair
        atomic_write_text(store_dir / "meta.json", json.dumps(meta, indent=2))  # written last: marks the store complete
    distributed.barrier()
    return store_dir


def sequences_for_any_world_size(cfg, max_processes=64):
    """Sequences a run with this config reads (of data_tokens) at any data-parallel world size up to
    max_processes that splits its batch (each rank's smaller buffer refreshes on its own
    schedule, so the total differs slightly with the world size)."""
    steps = data_tokens(cfg) // cfg["batch_size"]
    return max(w * sequences_needed(dict(cfg, batch_size=cfg["batch_size"] // w), steps)
               for w in range(1, max_processes + 1) if cfg["batch_size"] % w == 0)


def store_bytes(cfg, n_sequences):
    """Disk a store of n_sequences takes: bf16 rows [n * P, M, D] and the int32 token ids."""
    rows = n_sequences * positions(cfg)
    return rows * cfg["n_models"] * cfg["d_in"] * 2 + n_sequences * cfg["seq_len"] * 4


def free_disk_bytes(path):
    """Free bytes on the file system that holds path (or would, once its folders are made)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk(cfg, n_sequences):
    """A ConfigError, before any model loads, when the store would not fit on its disk (a full
    disk would otherwise kill the harvest with SIGBUS, writing through the memory map)."""
    need, free = store_bytes(cfg, n_sequences), free_disk_bytes(cfg["store_dir"])
    if need > free:
        raise ConfigError(f"the store of {n_sequences:,} sequences needs {need / 1e9:,.1f} GB but {cfg['store_dir']} "
                          f"has {free / 1e9:,.1f} GB free: lower num_tokens or choose another store_dir")
    return need, free


def main(argv):
    from distributed import resolve_device
    from cli import build_cfg
    from utils import library_progress, prepare_models

    usage = "usage: [torchrun --nproc_per_node=N] store.py --store_dir DIR [--dry_run] [--preset toy] [--key value ...]"
    flags = {"dry_run": "print the store's size and the disk's free space, harvest nothing"}
    cfg, extras = build_cfg(argv, flags=flags, usage=usage, switches=tuple(flags))
    if cfg["store_dir"] is None:
        sys.exit(usage + " (--help: every key)")
    library_progress(cfg["progress"])
    prepare_models(cfg)  # d_in and the hook from the models' configs (the store's size needs them)
    n = sequences_for_any_world_size(cfg)
    size = f"{n:,} sequences, {store_bytes(cfg, n) / 1e9:,.1f} GB, into {cfg['store_dir']} " \
           f"({free_disk_bytes(cfg['store_dir']) / 1e9:,.1f} GB free there)"
    if "dry_run" in extras:
        print(f"the store at this config: {size}")
        return
    cfg["device"] = distributed.setup(cfg["device"]) if distributed.launched() else cfg["device"]
    cfg["device"] = resolve_device(cfg["device"])
    build(cfg)
    if distributed.is_main():
        print(f"train from it with `python train.py --store_dir {cfg['store_dir']} ...` (the same config) or under "
              "torchrun")


def build(cfg):
    """Harvest the store at cfg["store_dir"] for this config (prepared: utils.prepare_models; on
    its device), the free disk checked before any model loads: the models and tokens load here and
    are let go when it is done. train.py calls it when the store a config names is missing."""
    from utils import load_models_and_tokens

    n = sequences_for_any_world_size(cfg)
    check_disk(cfg, n)
    started = time.time()
    models, tokens = load_models_and_tokens(cfg)
    n = min(n, len(tokens))
    if distributed.is_main():
        print(f"harvesting {n:,} sequences ({store_bytes(cfg, n) / 1e9:,.1f} GB) into {cfg['store_dir']}")
    harvest(cfg, models, tokens, cfg["store_dir"], n)
    if distributed.is_main():
        print(f"harvested {n:,} sequences into {cfg['store_dir']}"
              f"{f' with {distributed.world_size()} processes' * (distributed.world_size() > 1)} "
              f"in {time.time() - started:.0f} s")


def cli(argv):
    from data import DataError
    from utils import SetupError

    clean = False
    try:
        main(argv)
        clean = True
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except (SetupError, DataError, OSError) as e:
        sys.exit(f"error: {e}")
    finally:
        distributed.teardown(clean)


if __name__ == "__main__":
    distributed.run_script(cli, sys.argv[1:])
