"""Harvest once, train many: an on-disk store of normalised activations.

    python store.py --preset toy --store_dir data/acts_toy [--key value ...]

harvests what a training run with that config would read (the same tokens, in order) into
memory-mapped bf16 shards, with the normalisation factors and the token ids (provenance) beside
them. Any number of runs then train from it through Trainer(cfg, buffer=ActivationStore(cfg, dir)),
which refreshes and shuffles exactly as the live Buffer does, reading rows instead of running
the models.

Shape legend: N sequences, S seq_len, R rows (N * (S - 1)), M models, D d_in.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from activations import run_models
from buffer import RowBuffer, norm_factors, sequences_needed
from checkpoint import atomic_write_text

SHARD_SEQUENCES = 4096  # sequences per shard file


def _shard_path(store_dir, i):
    return Path(store_dir) / f"shard_{i:05d}.bin"


@torch.no_grad()
def harvest(cfg, models, tokens_NS, store_dir, n_sequences):
    """Write the activations of tokens_NS[:n_sequences] (BOS dropped, normalised per model, bf16)."""
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    n_sequences = min(n_sequences, len(tokens_NS))
    # The live buffer measures the factors the same way, on the same first sequences.
    hook = cfg["hook_point"]
    factors_M = norm_factors(cfg, models, tokens_NS).to(next(models[0].parameters()).device)
    rows_per_seq, M, D = cfg["seq_len"] - 1, len(models), models[0].cfg.d_model
    shards = []
    for first in range(0, n_sequences, SHARD_SEQUENCES):
        n = min(SHARD_SEQUENCES, n_sequences - first)
        mm = np.memmap(_shard_path(store_dir, len(shards)), dtype=np.int16, mode="w+", shape=(n * rows_per_seq, M, D))
        for start in tqdm(range(0, n, cfg["model_batch_size"]), desc=f"harvesting shard {len(shards)}", leave=False,
                          disable=not cfg["progress"]):
            t = tokens_NS[first + start : first + min(start + cfg["model_batch_size"], n), : cfg["seq_len"]]
            rows_RMD = (run_models(models, t, hook).float() * factors_M[:, None]).to(torch.bfloat16)
            mm[start * rows_per_seq : start * rows_per_seq + len(rows_RMD)] = rows_RMD.view(torch.int16).cpu().numpy()
        mm.flush()
        shards.append(n)
    torch.save(tokens_NS[:n_sequences, : cfg["seq_len"]].clone(), store_dir / "tokens.pt")
    meta = {"hook_point": cfg["hook_point"], "model_names": cfg["model_names"], "n_models": M, "d_in": D,
            "seq_len": cfg["seq_len"], "normalisation_factor": factors_M.tolist(), "n_sequences": n_sequences,
            "shard_sequences": shards, "dataset": cfg["dataset"], "preset": cfg.get("preset")}
    atomic_write_text(store_dir / "meta.json", json.dumps(meta, indent=2))  # written last: marks the store complete
    return store_dir


class ActivationStore(RowBuffer):
    """Serves harvested rows exactly as the live Buffer serves fresh ones: same sizes, refresh,
    shuffle, state and resume."""

    def __init__(self, cfg, store_dir, state=None):
        self.store_dir = Path(store_dir)
        meta_file = self.store_dir / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"no complete activation store at {store_dir} (meta.json missing)")
        self.meta = json.loads(meta_file.read_text())
        for key in ("hook_point", "seq_len", "d_in", "n_models"):
            if cfg[key] != self.meta[key]:
                raise ValueError(f"config {key}={cfg[key]!r} but the store at {store_dir} has {self.meta[key]!r}")
        super().__init__(cfg, self.meta["n_sequences"], self.meta["n_models"], self.meta["d_in"])
        R = cfg["seq_len"] - 1
        self._shards = [np.memmap(_shard_path(self.store_dir, i), dtype=np.int16, mode="r", shape=(n * R, self.meta["n_models"], self.meta["d_in"]))
                        for i, n in enumerate(self.meta["shard_sequences"])]
        if state is not None:
            self.load_state_dict(state)
        else:
            self.normalisation_factor = torch.tensor(self.meta["normalisation_factor"], device=self.device)
            self.refresh()

    def _serve_scale(self):
        return None  # rows are stored normalised

    def rows(self, first_sequence, n):
        """Rows [n * (S-1), M, D] (bf16) of sequences first..first+n, as harvested."""
        R, out = self.cfg["seq_len"] - 1, []
        while n > 0:
            shard, offset = divmod(first_sequence, SHARD_SEQUENCES)
            take = min(n, self.meta["shard_sequences"][shard] - offset)
            out.append(self._shards[shard][offset * R : (offset + take) * R])
            first_sequence, n = first_sequence + take, n - take
        # one copy out of the read-only memory map, into a tensor torch may write
        return torch.from_numpy(np.concatenate(out)).view(torch.bfloat16).to(self.device)


def main(argv):
    from crosscoder import resolve_device
    from train import build_cfg, load_models_and_tokens

    cfg, extras = build_cfg(argv, flags={"store_dir": "where to write the store (required)"},
                            usage="usage: python store.py --store_dir DIR [--preset toy] [--key value ...]")
    if "store_dir" not in extras:
        sys.exit("usage: python store.py --store_dir DIR [--preset toy] [--key value ...] (--help: every key)")
    cfg["device"] = resolve_device(cfg["device"])
    models, tokens = load_models_and_tokens(cfg)
    n = sequences_needed(cfg, cfg["num_tokens"] // cfg["batch_size"])
    harvest(cfg, models, tokens, extras["store_dir"], n)
    print(f"harvested {min(n, len(tokens))} sequences into {extras['store_dir']}; train from it with "
          f"Trainer(cfg, buffer=ActivationStore(cfg, {extras['store_dir']!r}))")


if __name__ == "__main__":
    main(sys.argv[1:])
