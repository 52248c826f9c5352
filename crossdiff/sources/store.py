"""The activation store's format, its one reader and its one writer: harvest once, train many.

A store directory holds shard_00000.bin, shard_00001.bin, ... (bf16 rows [sequences * R, M, D],
SHARD_SEQUENCES sequences per file, normalised per model), tokens.pt (the token ids, for
provenance) and meta.json (written last: its presence marks the store complete).

A store of aligned rows (models of different tokenizers, sources/aligned_mix.py; meta "aligned")
keeps the same layout: a sequence's aligned tuples fill the first of its R rows in order (at most
R: model 0's positions are distinct), zeros after; tokens.pt holds the aligned rows [N, S, 2M],
from which aligned_counts reads how many rows of each sequence are real. harvest writes
what a training run with that config would read (the same tokens, in order); buffer.ActivationStore
serves it through open_shards and read_rows exactly as the live Buffer serves fresh rows. The
script store.py runs a harvest from the command line.

Under torchrun each rank harvests every w-th shard (shard i: rank i % w) into the same
directory; rank 0 measures the normalisation factors and, once every rank is done, writes the
one metadata file. The store is the same as one process writes.

Shape legend: N sequences, S seq_len, R rows per sequence (S - ignore_first_n), M models, D d_in.
"""
import contextlib
import fcntl
import hashlib
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from crossdiff.config.plan import check_no_exclusions, first_n, hooks_of, positions, sequences_needed
from crossdiff.config.schema import ConfigError, data_tokens, effective
from crossdiff.io.checkpoint import atomic_write_text, file_sha256, staging_dir, swap_in
from crossdiff.scale import distributed
from crossdiff.sources.activations import norm_factors, run_models
from crossdiff.sources.aligned_mix import is_aligned, kept_tuples, split_aligned

SHARD_SEQUENCES = 4096  # sequences per shard file
# The config keys a store must share with a run that trains from it (toy_seed: only toy stores
# record it; a store from before model_names and dataset were compared has them all the same).
STORE_KEYS = ("hook_point", "seq_len", "d_in", "n_models", "model_names", "dataset", "toy_seed", "hook_points",
              "model_widths")


# ---------------------------------------------------------------- the format
class HarvestInterrupted(KeyboardInterrupt):
    """A Ctrl-C during a harvest: the store as it was, and the partial harvest beside it kept for
    the same command to go on from; its message says how far it got."""


class StoreError(OSError):
    """A store that cannot be written as asked (another harvest holds it) or read as recorded."""


def shard_path(store_dir, i):
    return Path(store_dir) / f"shard_{i:05d}.bin"


def is_complete_store(store_dir):
    return (Path(store_dir) / "meta.json").is_file()  # harvest writes it last


def record_hash(meta):
    """The sha256 of a store's record without this hash (canonical JSON): a hand edit shows."""
    rest = {k: v for k, v in meta.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def read_store_meta(store_dir):
    """The metadata of a complete store, or a StoreError naming meta.json when it cannot be read
    or was changed after the harvest."""
    if not is_complete_store(store_dir):
        raise FileNotFoundError(f"no complete activation store at {store_dir} (meta.json missing)")
    path = Path(store_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: cannot read the store's record ({type(e).__name__}: {e})") from None
    if "record_sha256" in meta and record_hash(meta) != meta["record_sha256"]:
        raise StoreError(f"{path} was changed after the harvest (its hash differs): its factors and shapes can no "
                         "longer be trusted; harvest the store again")
    return meta


def verify_store(store_dir, meta):
    """Every file the store's record lists against its sha256 (reads the whole store once: about
    0.6 s per GB on a 2-core AMD EPYC); a StoreError naming the first that differs."""
    for name, recorded in meta.get("sha256", {}).items():
        if file_sha256(Path(store_dir) / name) != recorded:
            raise StoreError(f"{Path(store_dir) / name}: its sha256 differs from the one recorded at the harvest: "
                             "the file is damaged; harvest the store again (or set verify_store false to train "
                             "on it anyway)")


def check_store_matches(cfg, meta, store_dir):
    """A ConfigError when the store was harvested from other models, data, hook, shapes or
    positions than cfg's (a store of other models would train without complaint on the wrong
    activations)."""
    for key in STORE_KEYS:
        if key in meta and cfg.get(key) != meta[key]:
            raise ConfigError(f"config {key}={cfg.get(key)!r} but the store at {store_dir} was harvested with "
                              f"{meta[key]!r}: harvest a store for this config (store.py) or train live")
    if meta.get("ignore_first_n", 1) != first_n(cfg):
        raise ConfigError(f"config ignore_first_n={first_n(cfg)} but the store at {store_dir} dropped the first "
                          f"{meta.get('ignore_first_n', 1)} positions of each row")
    check_no_exclusions(cfg)


def open_shards(store_dir, meta, rows_per_sequence):
    """Read-only memory maps of a store's shards, each [n * R, M, D] of bf16 bits (int16); a
    StoreError naming a shard that is missing or not the size its record says (truncated)."""
    shards = []
    for i, n in enumerate(meta["shard_sequences"]):
        path, shape = shard_path(store_dir, i), (n * rows_per_sequence, meta["n_models"], meta["d_in"])
        want = int(np.prod(shape)) * 2
        got = path.stat().st_size if path.is_file() else None
        if got != want:
            raise StoreError(f"{path}: {'missing' if got is None else f'{got:,} bytes'}, its record says "
                             f"{want:,} ({n} sequences of {rows_per_sequence} rows x {meta['n_models']} models x "
                             f"{meta['d_in']}): the store is damaged; harvest it again")
        shards.append(np.memmap(path, dtype=np.int16, mode="r", shape=shape))
    return shards


def aligned_counts(store_dir, meta):
    """[N] int64: the real rows of each sequence of a store of aligned rows (its aligned tuples
    whose every position is >= ignore_first_n), from its tokens.pt; None for any other store."""
    if not meta.get("aligned"):
        return None
    rows_NSK = torch.load(Path(store_dir) / "tokens.pt", map_location="cpu", weights_only=True, mmap=True)
    return kept_tuples(split_aligned(rows_NSK, meta["n_models"])[1], meta["ignore_first_n"]).sum(1)


def compact_aligned(rows_PMD, pairs_NSM, first, rows_per_sequence):
    """[N * R, M, D]: the rows of aligned tuples (at_aligned's order: row by row) placed at the start
    of their sequence's R rows, zeros after (the layout aligned_counts reads back)."""
    valid_NS = kept_tuples(pairs_NSM, first)
    n_P = torch.nonzero(valid_NS)[:, 0]
    counts_N = valid_NS.sum(1)
    slot_P = torch.arange(len(n_P), device=n_P.device) - (counts_N.cumsum(0) - counts_N)[n_P]
    out = rows_PMD.new_zeros(len(valid_NS) * rows_per_sequence, *rows_PMD.shape[1:])
    out[n_P * rows_per_sequence + slot_P] = rows_PMD
    return out


def read_rows(shards, meta, ids, rows_per_sequence, pin=False):
    """Rows [len(ids) * R, M, D] (bf16, on the CPU; in pinned memory with pin, for an
    asynchronous copy to a GPU) of the store's sequences ids (a range)."""
    per_shard, pieces = meta.get("sequences_per_shard", SHARD_SEQUENCES), []
    runs = [(ids.start, len(ids))] if ids.step == 1 else [(i, 1) for i in ids]  # a strided share: one by one
    for first_sequence, n in runs:
        while n > 0:
            shard, offset = divmod(first_sequence, per_shard)
            take = min(n, meta["shard_sequences"][shard] - offset)
            pieces.append(shards[shard][offset * rows_per_sequence : (offset + take) * rows_per_sequence])
            first_sequence, n = first_sequence + take, n - take
    # One copy out of the read-only memory map, by torch (which releases the GIL: a prefetching
    # thread reads while the training thread runs).
    out = torch.empty(sum(len(q) for q in pieces), meta["n_models"], meta["d_in"], dtype=torch.int16, device="cpu",
                      pin_memory=pin)
    at = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # only read here
        for q in pieces:
            out[at : at + len(q)].copy_(torch.from_numpy(q))
            at += len(q)
    return out.view(torch.bfloat16)


# ---------------------------------------------------------------- writing one
STORE_FILES = r"shard_\d{5}\.bin|tokens\.pt|meta\.json"  # what a store directory holds
# In the partial harvest beside the store: what it harvests (a harvest of anything else clears it
# and starts again), its factors, and each shard's sequences written (shard_NNNNN.done) or whole
# (shard_NNNNN.sha256). A harvest goes on from there; a shard's progress is written at most every
# PROGRESS_SECONDS and when the harvest is stopped.
HARVEST_RECORD = "harvest.json"
PROGRESS_SECONDS = 30.0


@contextlib.contextmanager
def store_lock(store_dir):
    """Hold store_dir for one harvest (an exclusive lock on a file beside it), or a StoreError at
    once when another harvest holds it."""
    store_dir = Path(store_dir)
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = store_dir.parent / f".{store_dir.name}.lock"
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"another harvest is writing {store_dir}: wait for it to end, or choose another "
                             f"store_dir (its lock: {lock})") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@torch.no_grad()
def harvest(cfg, models, tokens_NS, store_dir, n_sequences, shard_sequences=SHARD_SEQUENCES):
    """Write the activations of tokens_NS[:n_sequences] (BOS dropped, normalised per model, bf16),
    shard_sequences sequences per file, into a directory beside store_dir that replaces it once
    complete: a harvest killed at any moment leaves store_dir as it was, and the same harvest
    goes on from what the stopped one wrote (HARVEST_RECORD). One harvest at a time (store_lock). Under torchrun, every rank calls it with the same arguments and writes its own
    shards; rank 0 holds the lock and swaps the store in."""
    check_no_exclusions(cfg)
    store_dir = Path(store_dir)
    n_sequences = min(n_sequences, len(tokens_NS))
    with contextlib.ExitStack() as held:
        work, refused = None, None
        if distributed.is_main():
            record = harvest_record(cfg, tokens_NS, n_sequences, shard_sequences)
            try:
                held.enter_context(store_lock(store_dir))
                work = staging_dir(store_dir, STORE_FILES, keep=lambda w: read_harvest_record(w) == record)
                if read_harvest_record(work) is None:
                    atomic_write_text(work / HARVEST_RECORD, json.dumps({"record": record}))
            except OSError as e:  # held by another harvest, or a directory of other files in the way
                refused = str(e)
        work, refused = distributed.broadcast((str(work), refused))  # every rank stops, or writes there
        if refused is not None:
            raise StoreError(refused)
        try:
            write_store(cfg, models, tokens_NS, Path(work), n_sequences, shard_sequences)
        except KeyboardInterrupt:
            done = harvested(Path(work), shard_sizes(n_sequences, shard_sequences))
            raise HarvestInterrupted(f"the harvest into {store_dir} was interrupted after {done:,} of {n_sequences:,} "
                                     f"sequences; the store is as it was, and what was harvested is kept beside it "
                                     f"({Path(work).name}): run the same command again to go on from there") from None
        if distributed.is_main():
            swap_in(Path(work), store_dir)
        distributed.barrier()
    return store_dir


def write_store(cfg, models, tokens_NS, store_dir, n_sequences, shard_sequences):
    """The store's files in store_dir (each rank its shards; rank 0 the tokens, then meta.json),
    going on from what a stopped harvest of the same record wrote there."""
    device = next(models[0].parameters()).device
    factors_M = None
    if distributed.is_main():  # the live buffer measures them the same way, on the same first sequences
        kept = json.loads((store_dir / HARVEST_RECORD).read_text())
        if "factors" not in kept:
            kept["factors"] = norm_factors(cfg, models, tokens_NS).tolist()
            atomic_write_text(store_dir / HARVEST_RECORD, json.dumps(kept))
        factors_M = kept["factors"]
    factors_M = torch.tensor(distributed.broadcast(factors_M), device=device)
    rows_per_seq, M, D, first_pos = positions(cfg), len(models), cfg["d_in"], first_n(cfg)
    aligned = tokens_NS.ndim == 3  # rows of models of different tokenizers: each sequence's tuples, compacted
    shards = shard_sizes(n_sequences, shard_sequences)
    rank, w, batch = distributed.rank(), distributed.world_size(), cfg["model_batch_size"]
    for i in range(rank, len(shards), w):
        first, n = i * shard_sequences, shards[i]
        done = shard_done(store_dir, i, n)
        if done == n:
            continue
        mm = np.memmap(shard_path(store_dir, i), dtype=np.int16, mode="r+" if done else "w+",
                       shape=(n * rows_per_seq, M, D))
        saved_at = time.monotonic()
        try:
            for start in tqdm(range(done, n, batch), desc=f"harvesting shard {i}" + f" (rank {rank})" * (w > 1),
                              initial=done // batch, total=-(-n // batch), leave=False, disable=not cfg["progress"]):
                t = tokens_NS[first + start : first + min(start + batch, n), : cfg["seq_len"]]
                rows_RMD = (run_models(models, t, hooks_of(cfg), first_pos, d_in=D).float()
                            * factors_M[:, None]).to(torch.bfloat16)
                if aligned:
                    rows_RMD = compact_aligned(rows_RMD, split_aligned(t.to(rows_RMD.device), M)[1], first_pos,
                                               rows_per_seq)
                mm[start * rows_per_seq : start * rows_per_seq + len(rows_RMD)] = rows_RMD.view(torch.int16).cpu().numpy()
                done = start + len(t)
                if time.monotonic() - saved_at > PROGRESS_SECONDS:
                    save_progress(mm, store_dir, i, done)
                    saved_at = time.monotonic()
        finally:  # stopped or whole: what is written is on disk, and the count says how far it got
            save_progress(mm, store_dir, i, done)
            del mm
        atomic_write_text(store_dir / f"shard_{i:05d}.sha256", file_sha256(shard_path(store_dir, i)))
        (store_dir / f"shard_{i:05d}.done").unlink()
    distributed.barrier()  # every rank's shards are on disk (the ranks' shares differ by one shard at most)
    if distributed.is_main():
        torch.save(tokens_NS[:n_sequences, : cfg["seq_len"]].clone(), store_dir / "tokens.pt")
        sums = {shard_path(store_dir, i).name: (store_dir / f"shard_{i:05d}.sha256").read_text()
                for i in range(len(shards))}
        sums["tokens.pt"] = file_sha256(store_dir / "tokens.pt")
        for i in range(len(shards)):
            (store_dir / f"shard_{i:05d}.sha256").unlink()
        meta = {"hook_point": cfg["hook_point"], "model_names": cfg["model_names"], "n_models": M, "d_in": D,
                "seq_len": cfg["seq_len"], "normalisation_factor": factors_M.tolist(), "n_sequences": n_sequences,
                "sequences_per_shard": shard_sequences, "shard_sequences": shards, "dataset": cfg["dataset"],
                "preset": cfg.get("preset"), "harvested_by": w, "ignore_first_n": first_pos,
                "norm_scale": effective(cfg, "norm_scale"), "hook_points": cfg.get("hook_points"),
                "model_widths": cfg.get("model_widths"), "aligned": aligned}
        if cfg.get("preset") == "toy":
            meta["toy_seed"] = cfg["toy_seed"]  # which toy pair
        meta["sha256"] = sums
        meta["record_sha256"] = record_hash(meta)
        atomic_write_text(store_dir / "meta.json", json.dumps(meta, indent=2))  # written last: marks the store complete
        (store_dir / HARVEST_RECORD).unlink()


def harvest_record(cfg, tokens_NS, n_sequences, shard_sequences):
    """What a harvest writes, as its partial directory records it: a stopped harvest is gone on
    from only by one of the same record (the same keys, tokens, sequences and batches)."""
    tokens = tokens_NS[:n_sequences, : cfg["seq_len"]].contiguous().cpu()
    record = {**{key: cfg.get(key) for key in STORE_KEYS}, "n_sequences": n_sequences,
              "shard_sequences": shard_sequences, "model_batch_size": cfg["model_batch_size"],
              "ignore_first_n": first_n(cfg), "norm_scale": effective(cfg, "norm_scale"),
              "tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()}
    return json.loads(json.dumps(record))  # as read back (tuples as lists)


def read_harvest_record(work):
    """The record of the partial harvest in work, or None where it has none (or a damaged one)."""
    try:
        return json.loads((Path(work) / HARVEST_RECORD).read_text())["record"]
    except (OSError, ValueError, KeyError):
        return None


def shard_sizes(n_sequences, shard_sequences):
    return [min(shard_sequences, n_sequences - first) for first in range(0, n_sequences, shard_sequences)]


def shard_done(work, i, n):
    """How many of shard i's n sequences a partial harvest in work has written (all: its .sha256)."""
    if (Path(work) / f"shard_{i:05d}.sha256").is_file():
        return n
    try:
        return min(n, int((Path(work) / f"shard_{i:05d}.done").read_text()))
    except (OSError, ValueError):
        return 0


def save_progress(mm, work, i, done):
    """Shard i's rows up to sequence done on disk, then the count that says so."""
    mm.flush()
    atomic_write_text(Path(work) / f"shard_{i:05d}.done", str(done))


def harvested(work, shards):
    return sum(shard_done(work, i, n) for i, n in enumerate(shards))


def sequences_for_any_world_size(cfg, max_processes=64):
    """Sequences a run with this config reads (of data_tokens) at any data-parallel world size up to
    max_processes that splits its batch (each rank's smaller buffer refreshes on its own
    schedule, so the total differs slightly with the world size)."""
    steps = data_tokens(cfg) // cfg["batch_size"]
    return max(w * sequences_needed(dict(cfg, batch_size=cfg["batch_size"] // w), steps)
               for w in range(1, max_processes + 1) if cfg["batch_size"] % w == 0)


def store_bytes(cfg, n_sequences):
    """Disk a store of n_sequences takes: bf16 rows [n * P, M, D] and the int32 token ids (of an
    aligned mix: every model's tokens and the aligned positions, 2M per position)."""
    rows = n_sequences * positions(cfg)
    ids = 2 * cfg["n_models"] if is_aligned(cfg["dataset"]) else 1
    return rows * cfg["n_models"] * cfg["d_in"] * 2 + n_sequences * cfg["seq_len"] * 4 * ids


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
