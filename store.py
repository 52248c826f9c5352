"""Harvest once, train many: an on-disk store of normalised activations.

    python store.py --preset toy --store_dir data/acts_toy [--key value ...]
    torchrun --nproc_per_node=8 store.py --store_dir /shared/acts    # data parallel

harvests what a training run with that config would read (the same tokens, in order) into
memory-mapped bf16 shards, with the normalisation factors and the token ids (provenance) beside
them (the format, its reader and writer: crossdiff/sources/store.py). Any number of runs then
train from it (`python train.py --store_dir DIR`, under torchrun with any number of processes, or
Trainer(cfg, buffer=buffer.ActivationStore(cfg, dir))): it refreshes and shuffles exactly as the
live Buffer does, reading rows instead of running the models.
"""
import sys
import time

from crossdiff.config.cli import build_cfg
from crossdiff.config.schema import ConfigError
from crossdiff.scale import distributed
from crossdiff.scale.distributed import resolve_device
from crossdiff.scale.process import library_progress
from crossdiff.sources.mix import DataError
from crossdiff.sources.models import SetupError
from crossdiff.sources.store import (
    HarvestInterrupted,
    check_disk,
    free_disk_bytes,
    harvest,
    sequences_for_any_world_size,
    store_bytes,
)
from utils import load_models_and_tokens, prepare_models


def main(argv):
    usage = "usage: [torchrun --nproc_per_node=N] store.py --store_dir DIR [--dry_run] [--preset toy] [--key value ...]"
    flags = {"dry_run": "print the store's size and the disk's free space, harvest nothing"}
    cfg, extras = build_cfg(argv, flags=flags, usage=usage, switches=tuple(flags))
    if cfg["store_dir"] is None:
        sys.exit(usage + " (--help: every key)")
    library_progress(cfg["progress"])
    # The process group first: one process per machine builds what the preset needs (prepare_models)
    cfg["device"] = distributed.setup(cfg["device"]) if distributed.launched() else cfg["device"]
    prepare_models(cfg)  # d_in and the hook from the models' configs (the store's size needs them)
    n = sequences_for_any_world_size(cfg)
    size = f"{n:,} sequences, {store_bytes(cfg, n) / 1e9:,.1f} GB, into {cfg['store_dir']} " \
           f"({free_disk_bytes(cfg['store_dir']) / 1e9:,.1f} GB free there)"
    if "dry_run" in extras:
        print(f"the store at this config: {size}")
        return
    cfg["device"] = resolve_device(cfg["device"])
    build(cfg)
    if distributed.is_main():
        print(f"train from it with `python train.py --store_dir {cfg['store_dir']} ...` (the same config) or under "
              "torchrun")


def build(cfg):
    """Harvest the store at cfg["store_dir"] for this config (prepared: utils.prepare_models; on
    its device), the free disk checked before any model loads: the models and tokens load here and
    are let go when it is done. train.py calls it when the store a config names is missing."""
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
    clean = False
    try:
        main(argv)
        clean = True
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except (SetupError, DataError, OSError) as e:
        sys.exit(f"error: {e}")
    except HarvestInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.teardown(clean)


if __name__ == "__main__":
    distributed.run_script(cli, sys.argv[1:])
