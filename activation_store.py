"""Reading an activation store written by store.py: ActivationStore serves its rows as the live
Buffer serves fresh ones.

Layout of a store directory: shard_00000.bin, shard_00001.bin, ... (bf16 rows [sequences * (S-1),
M, D], SHARD_SEQUENCES sequences per file, normalised per model), tokens.pt (the token ids, for
provenance) and meta.json (written last: its presence marks the store complete).

Shape legend: S seq_len, R rows, M models, D d_in.
"""
import json
from pathlib import Path

import numpy as np
import torch

from buffer import RowBuffer
from config import ConfigError, completed

SHARD_SEQUENCES = 4096  # sequences per shard file
# The config keys a store must share with a run that trains from it (toy_seed: only toy stores
# record it; a store from before model_names and dataset were compared has them all the same).
STORE_KEYS = ("hook_point", "seq_len", "d_in", "n_models", "model_names", "dataset", "toy_seed")


def shard_path(store_dir, i):
    return Path(store_dir) / f"shard_{i:05d}.bin"


def read_meta(store_dir):
    """The metadata of a complete store (meta.json is written last)."""
    meta_file = Path(store_dir) / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"no complete activation store at {store_dir} (meta.json missing)")
    return json.loads(meta_file.read_text())


class ActivationStore(RowBuffer):
    """Serves harvested rows exactly as the live Buffer serves fresh ones: same sizes, refresh,
    shuffle, state and resume. first_sequence, stride: read the store's sequences first_sequence,
    first_sequence + stride, ... (a data-parallel rank's share, as it reads tokens live)."""

    def __init__(self, cfg, store_dir, state=None, first_sequence=0, stride=1):
        cfg = completed(cfg)
        self.store_dir = Path(store_dir)
        self.meta = read_meta(store_dir)
        # What was harvested from what: the same models, data, hook and shapes as the run, or an error
        # (a store of other models would train without complaint on the wrong activations).
        for key in STORE_KEYS:
            if key in self.meta and cfg.get(key) != self.meta[key]:
                raise ConfigError(f"config {key}={cfg.get(key)!r} but the store at {store_dir} was harvested with "
                                  f"{self.meta[key]!r}: harvest a store for this config (store.py) or train live")
        self.ids = range(first_sequence, self.meta["n_sequences"], stride)  # this reader's sequences, in order
        self.per_shard = self.meta.get("sequences_per_shard", SHARD_SEQUENCES)
        super().__init__(cfg, len(self.ids), self.meta["n_models"], self.meta["d_in"])
        R = cfg["seq_len"] - 1
        self._shards = [np.memmap(shard_path(self.store_dir, i), dtype=np.int16, mode="r", shape=(n * R, self.meta["n_models"], self.meta["d_in"]))
                        for i, n in enumerate(self.meta["shard_sequences"])]
        if state is not None:
            self.load_state_dict(state)
        else:
            self.normalisation_factor = torch.tensor(self.meta["normalisation_factor"], device=self.device)
            self.refresh()

    def _serve_scale(self):
        return None  # rows are stored normalised

    def rows(self, first, n):
        """Rows [n * (S-1), M, D] (bf16) of this reader's sequences first..first+n, as harvested."""
        R, out = self.cfg["seq_len"] - 1, []
        ids = self.ids[first : first + n]
        runs = [(ids.start, len(ids))] if ids.step == 1 else [(i, 1) for i in ids]  # a strided share: one by one
        for first_sequence, n in runs:
            while n > 0:
                shard, offset = divmod(first_sequence, self.per_shard)
                take = min(n, self.meta["shard_sequences"][shard] - offset)
                out.append(self._shards[shard][offset * R : (offset + take) * R])
                first_sequence, n = first_sequence + take, n - take
        # one copy out of the read-only memory map, into a tensor torch may write
        return torch.from_numpy(np.concatenate(out)).view(torch.bfloat16).to(self.device)
