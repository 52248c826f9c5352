"""Where a run's batches come from: the paired activation Buffer, which runs every model on the
same tokens (crossdiff/sources/activations.py) and serves shuffled batches, or an ActivationStore, which serves
rows harvested by store.py the same way; make_batch_source picks one for each data-parallel rank.

Shape legend: B batch (token positions), M models, D d_in, N sequences, S seq_len (positions), R rows.

Like the reference: the buffer holds ~batch_size * buffer_mult token positions in bf16, fills
fully at the start, and once half of it has been served refills that half and reshuffles.
Each model's activations are scaled by a factor that makes their mean norm sqrt(d_in).
"""
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from crossdiff.config.plan import (
    TokensExhausted,
    buffer_sequences,
    check_buffer_fits,
    check_enough_sequences,
    hooks_of,
    positions,
)
from crossdiff.config.schema import ConfigError, completed, effective
from crossdiff.scale import distributed
from crossdiff.sources.activations import check_models, factors_from_rows, norm_factors, run_models
from crossdiff.sources.store import (
    aligned_counts,
    check_store_matches,
    open_shards,
    read_rows,
    read_store_meta,
    verify_store,
)
from crossdiff.sources.tokenmask import PositionFilter


def take(pointer, n, n_sequences, wrap):
    """(first, count, the pointer after): the next sequences to read from pointer, at most n;
    wraps around to the first sequence only when wrap."""
    available = n_sequences - pointer
    if available < n:
        if not wrap:
            raise TokensExhausted(
                f"ran out of tokens: need {n} more sequences at sequence {pointer} of "
                f"{n_sequences}; lower num_tokens, add data, or set wrap_tokens=True")
        if available == 0:
            return take(0, n, n_sequences, wrap)
        n = available
    return pointer, n, pointer + n


class RowBuffer:
    """The reference's buffer machinery over any source of per-sequence rows: about
    batch_size * buffer_mult rows in bf16, filled fully at the start; once half has been served,
    that half is refilled with the next sequences and the whole buffer reshuffled.
    Subclasses give rows(first, n): the rows [n * positions, M, D] of sequences first..first+n, or
    fewer when positions are left out (tokenmask): a refresh then reads on until its rows are
    filled, and keeps what overflows for the next (pending).

    next() -> float32 [batch_size, n_models, d_in] on cfg["device"], normalised per model.
    """

    def __init__(self, cfg, n_sequences, n_models, d_in):  # (cfg completed by the subclass)
        self.cfg, self.n_sequences = cfg, n_sequences
        self.device = torch.device(cfg["device"])
        self.seq_len = cfg["seq_len"]
        self.positions = positions(cfg)  # seq_len - ignore_first_n (the BOS dropped)
        self.model_batch_size = cfg["model_batch_size"]
        self.batch_size = cfg["batch_size"]
        self.buffer_batches = buffer_sequences(cfg)
        self.buffer_size = self.buffer_batches * self.positions
        if self.buffer_size // 2 < 2 * self.batch_size:
            raise ValueError(f"buffer of {self.buffer_size} rows is too small for batch_size "
                             f"{self.batch_size}: raise buffer_mult")
        self.wrap = cfg["wrap_tokens"]
        check_buffer_fits(cfg)
        self.buffer = torch.zeros(self.buffer_size, n_models, d_in, dtype=torch.bfloat16, device=self.device)
        # A CPU generator on every device: its state resumes on any device (a CUDA generator's
        # state cannot be loaded into a CPU one). The permutation is drawn on the CPU and moved.
        self.generator = torch.Generator().manual_seed(cfg["seed"])
        self.normalisation_factor = None
        self.pointer = 0        # next row of the buffer to serve
        self.token_pointer = 0  # next sequence to read
        self.sequences_run = 0  # total sequences read (wraps included)
        self.pending = None     # rows read past the last refresh's end (only when positions are left out)
        self.first = True

    def rows(self, first, n):
        raise NotImplementedError

    def _take(self, n):
        """(first, count) of the next sequences to read, at most n; wraps around only if cfg asks."""
        first, n, self.token_pointer = take(self.token_pointer, n, self.n_sequences, self.wrap)
        self.sequences_run += n
        return first, n

    def refresh_reads(self):
        """The (first, count) reads the next refresh makes, in order, when no position is left out
        (every sequence gives `positions` rows): as refresh and _take compute them."""
        target, pointer, row, reads = self.buffer_size // 2, self.token_pointer, 0, []
        while row < target:
            want = min(self.model_batch_size, -(-(target - row) // self.positions))
            first, n, pointer = take(pointer, want, self.n_sequences, self.wrap)
            reads.append((first, n))
            row += n * self.positions
        return reads

    @torch.no_grad()
    def refresh(self):
        """Fill the whole buffer (first call) or its first half, then shuffle it all.

        Deviation from the reference: it sliced all_tokens[token_pointer : min(token_pointer +
        model_batch_size, num_batches)], comparing an index with a count, so every refresh after
        the first read no tokens and training cycled over the first fill. We read the next
        sequences every time.
        """
        target = self.buffer_size if self.first else self.buffer_size // 2
        show = self.cfg["progress"] and (self.first or target // self.positions >= 32 * self.model_batch_size)
        bar = tqdm(total=target, desc="filling buffer" if self.first else "refreshing buffer", unit="row",
                   leave=False, disable=not show)
        row = 0
        while row < target:
            if self.pending is not None:  # rows the last refresh read past its end
                acts, self.pending = self.pending, None
            else:  # without left-out positions, exactly the sequences that fill the target
                want = min(self.model_batch_size, -(-(target - row) // self.positions))
                first, n = self._take(want)  # fewer than want only when wrapping around the tokens
                acts = self.rows(first, n)
            k = min(len(acts), target - row)
            self.buffer[row : row + k] = acts[:k]
            if k < len(acts):
                self.pending = acts[k:].clone()
            row += k
            bar.update(k)
        bar.close()
        self.first = False
        perm = torch.randperm(self.buffer_size, generator=self.generator, device="cpu").to(self.device)
        self.buffer = self.buffer[perm]
        self.pointer = 0

    def _serve_scale(self):
        """Per-model multiplier for served rows: the normalisation factors (rows are stored raw);
        None serves them as they are."""
        return self.normalisation_factor

    @torch.no_grad()
    def next(self):
        out_BMD = self.buffer[self.pointer : self.pointer + self.batch_size].float()
        self.pointer += self.batch_size
        if self.pointer > self.buffer_size // 2 - self.batch_size:
            self.refresh()
        scale_M = self._serve_scale()
        return out_BMD if scale_M is None else out_BMD * scale_M[None, :, None]

    # ---------------------------------------------------------------- resume
    def state_dict(self):
        return {
            "buffer": self.buffer, "pointer": self.pointer, "token_pointer": self.token_pointer,
            "sequences_run": self.sequences_run, "first": self.first, "pending": self.pending,
            "normalisation_factor": self.normalisation_factor,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state):
        """Restore a saved state. Without its "buffer" tensor (cfg checkpoint_buffer=False) the
        buffer is refilled from the saved token pointer: no data reused, but a different order."""
        self.normalisation_factor = torch.as_tensor(state["normalisation_factor"], device=self.device).float()
        self.token_pointer, self.sequences_run = int(state["token_pointer"]), int(state["sequences_run"])
        pending = state.get("pending")
        self.pending = None if pending is None else pending.to(self.device)
        self._restore_generator(state["generator"])
        if "buffer" not in state:
            self.first = True
            self.refresh()
            return
        if tuple(state["buffer"].shape) != tuple(self.buffer.shape):
            raise ValueError(f"saved buffer has shape {tuple(state['buffer'].shape)}, "
                             f"this config needs {tuple(self.buffer.shape)}")
        self.buffer.copy_(state["buffer"])
        self.pointer, self.first = int(state["pointer"]), bool(state["first"])

    def _restore_generator(self, saved):
        """Checkpoints of earlier versions saved a CUDA generator's state, which a CPU generator
        cannot take: reseed from the seed and the sequences run (a different shuffle order from
        here on, the same data) and say so."""
        saved = torch.as_tensor(saved).cpu()
        if saved.shape == self.generator.get_state().shape:
            self.generator.set_state(saved)
            return
        print(f"buffer: the saved shuffling state ({saved.numel()} bytes) is not a CPU generator's; reseeding "
              "(the data is the same, the order of rows from here on differs)")
        self.generator.manual_seed(self.cfg["seed"] + self.sequences_run)


class Buffer(RowBuffer):
    """Buffer(cfg, model_A, model_B, all_tokens), or Buffer(cfg, [model_0, ..., model_M-1], all_tokens):
    runs every model on the same token sequences, read in order. Each model's activations are
    scaled by a factor that makes their mean norm sqrt(d_in)."""

    def __init__(self, cfg, model_A, model_B=None, all_tokens=None, state=None):
        cfg = completed(cfg)  # the reference's own key set works: the other keys take their defaults
        if isinstance(model_A, (list, tuple)):
            models, all_tokens = list(model_A), (model_B if all_tokens is None else all_tokens)
        else:
            models = [model_A, model_B]
        if len(models) != cfg["n_models"]:
            raise ValueError(f"cfg n_models={cfg['n_models']} but {len(models)} models were given")
        aligned = all_tokens is not None and all_tokens.ndim == 3  # (sources/aligned_mix.py: [N, S, 2M])
        if all_tokens is None or all_tokens.ndim != 2 + aligned or all_tokens.shape[0] == 0:
            raise ValueError("all_tokens must be a non-empty [n_sequences, seq_len] tensor (or aligned rows "
                             "[n_sequences, seq_len, 2 * n_models])")
        if all_tokens.shape[1] < cfg["seq_len"]:
            raise ValueError(f"token sequences have length {all_tokens.shape[1]} < seq_len={cfg['seq_len']}")
        if cfg["hook_point"] is None:
            raise ConfigError("config key 'hook_point' is none: give it (or --layer L), or let train.py read it "
                              "from the models' configs")
        self.models, self.hook_point, self.all_tokens = models, hooks_of(cfg), all_tokens
        check_models(models, self.hook_point, cfg["d_in"], cfg.get("model_widths"))
        self.keep = PositionFilter(cfg, models)
        if aligned and self.keep.active:
            raise ConfigError("exclude_tokens and outlier_norm_multiple do not apply to a mix for models of "
                              "different tokenizers yet (only its aligned positions are read): drop them")
        super().__init__(cfg, len(all_tokens), len(models), cfg["d_in"])
        if state is not None:
            self.load_state_dict(state)
        else:
            self.normalisation_factor = self.estimate_norm_scaling_factors()
            self.refresh()

    def rows(self, first, n):
        """Activations [n * P, M, D] of sequences first..first+n, raw, at the positions that count
        (the first ignore_first_n of each row dropped; fewer rows when positions are left out)."""
        return run_models(self.models, self.all_tokens[first : first + n, : self.seq_len], self.hook_point,
                          self.keep.first, self.keep, self.cfg["d_in"])

    def estimate_norm_scaling_factors(self):
        """Per model: sqrt(d_in) / mean activation norm, over norm_estimate_batches model batches
        from the start of the tokens (the token pointer does not move, as in the reference).

        The reference included the BOS position here (but dropped it in training); Gemma's BOS
        residual norm is far larger than other tokens', which skewed the factor. We drop BOS in
        both."""
        return norm_factors(self.cfg, self.models, self.all_tokens).to(self.device)


class ActivationStore(RowBuffer):
    """Serves harvested rows (crossdiff/sources/store.py's format) exactly as the live Buffer
    serves fresh ones: same sizes, refresh, shuffle, state and resume. first_sequence, stride: read
    the store's sequences first_sequence, first_sequence + stride, ... (a data-parallel rank's
    share, as it reads tokens live). A store of aligned rows (models of different tokenizers)
    serves each sequence's real rows only, as the live Buffer does, and reads no refresh ahead
    (its reads depend on how many rows each sequence has)."""

    def __init__(self, cfg, store_dir, state=None, first_sequence=0, stride=1):
        cfg = completed(cfg)
        self.store_dir = Path(store_dir)
        self.meta = read_store_meta(store_dir)
        check_store_matches(cfg, self.meta, store_dir)
        if cfg["verify_store"]:
            verify_store(self.store_dir, self.meta)
        self.ids = range(first_sequence, self.meta["n_sequences"], stride)  # this reader's sequences, in order
        super().__init__(cfg, len(self.ids), self.meta["n_models"], self.meta["d_in"])
        self._shards = open_shards(self.store_dir, self.meta, positions(cfg))
        self.counts = aligned_counts(self.store_dir, self.meta)  # real rows per sequence (aligned rows), or None
        # The next refresh's reads, made in the background while training runs (store_prefetch):
        # (first, n) -> a future of its rows, in pinned memory when they go to a GPU.
        self._ahead, self._reader = {}, None
        if cfg["store_prefetch"] and self.counts is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="store-prefetch")
            # its thread ends with the store (or at exit), pending reads cancelled
            weakref.finalize(self, self._reader.shutdown, wait=False, cancel_futures=True)
        # Rows are stored normalised with the store's factors. A run of the other scaling
        # (norm_scale: a diff-SAE on a crosscoder's store) rescales them as they are served, by
        # factors estimated from the store's first rows as a live run estimates them.
        self.stored_factor = torch.tensor(self.meta["normalisation_factor"], device=self.device)
        self.rescaled = self.meta.get("norm_scale", "per_model") != effective(cfg, "norm_scale")
        if state is not None:
            self.load_state_dict(state)
        else:
            self.normalisation_factor = self.stored_factor
            if self.rescaled:
                n = min(cfg["norm_estimate_batches"] * cfg["model_batch_size"], len(self.ids))
                raw_RMD = self.rows(0, n).float() / self.stored_factor[None, :, None]
                self.normalisation_factor = factors_from_rows(raw_RMD, effective(cfg, "norm_scale")).to(self.device)
            self.refresh()

    def _serve_scale(self):
        return self.normalisation_factor / self.stored_factor if self.rescaled else None  # stored normalised

    def rows(self, first, n):
        """Rows [n * P, M, D] (bf16) of this reader's sequences first..first+n, as harvested."""
        ahead = self._ahead.pop((first, n), None)
        block = ahead.result() if ahead is not None else self._read(first, n)
        return block.to(self.device, non_blocking=True)

    def _read(self, first, n):
        ids, R = self.ids[first : first + n], positions(self.cfg)
        block = read_rows(self._shards, self.meta, ids, R, pin=self.device.type == "cuda" and self.counts is None)
        if self.counts is None:
            return block
        counts = self.counts[ids.start:ids.stop:ids.step]  # (ids: a range of this reader's sequences)
        return block[(torch.arange(R, device="cpu")[None] < counts[:, None]).flatten()]

    def refresh(self):
        super().refresh()
        if self._reader is not None:  # the next refresh's rows, read while this half is served
            try:
                self._ahead = {r: self._reader.submit(self._read, *r) for r in self.refresh_reads()}
            except TokensExhausted:  # the run ends before it: nothing to read ahead
                self._ahead = {}

    def load_state_dict(self, state):
        self._ahead = {}  # read for another pointer
        super().load_state_dict(state)


def rebase_state(state, world_size_now, every_rank_saved=True):
    """(trainer state to resume from, sequence offset) for a run resumed with world_size_now
    processes. state["buffer"] is this rank's saved data state. The ranks of a run read their
    sequences strided (rank r: offset + r, + r + w, ...), so together they have used the first
    offset + w * pointer sequences. The same number of processes, each with its own saved state
    (every_rank_saved), resumes exactly. Another number, or a checkpoint without every rank's
    state, refills fresh buffers from there (the same data from there on, in a new order) and
    says so."""
    if state is None or state.get("buffer") is None:
        return state, 0
    saved_world, buffer_state = state.get("world_size", 1), state["buffer"]
    offset = state.get("sequence_offset", 0)
    if saved_world == world_size_now and every_rank_saved:
        return state, offset
    offset += saved_world * int(buffer_state["token_pointer"])
    if distributed.is_main():
        print(f"resuming a {saved_world}-process run with {world_size_now} process(es): fresh buffers from "
              f"sequence {offset:,} (the same data from there on, in a new order)")
    fresh = {k: v for k, v in buffer_state.items() if k not in ("buffer", "pending")}
    return dict(state, buffer=dict(fresh, token_pointer=0, sequences_run=0)), offset


def make_batch_source(cfg, local_cfg, models, tokens, state, sequence_offset, total_steps):
    """This rank's source of [batch_size / world size, M, D] batches: a live Buffer over the
    models, or the activation store at cfg["store_dir"]. Rank r of w reads sequences
    sequence_offset + r, + r + w, ...: all ranks together read in order. state: the trainer state
    to resume from (its "buffer" is this rank's), or None. Checks first that there are enough
    sequences for the steps left."""
    w = distributed.world_size()
    first = sequence_offset + distributed.rank()
    buffer_state = state and state.get("buffer")
    if cfg["store_dir"] is not None:
        have, source = len(range(first, read_store_meta(cfg["store_dir"])["n_sequences"], w)), f"the store at {cfg['store_dir']}"
    else:
        tokens = tokens[first::w] if tokens is not None else None
        have, source = (len(tokens) if tokens is not None else None), "the dataset"
    check_enough_sequences(cfg, local_cfg, have, total_steps, state, source, world_size=w)
    if cfg["store_dir"] is not None:
        if distributed.is_main():
            print(f"training on the activations stored at {cfg['store_dir']} ({have * w:,} sequences); "
                  "the models are not run")
        return ActivationStore(local_cfg, cfg["store_dir"], state=buffer_state, first_sequence=first, stride=w)
    return Buffer(local_cfg, models, tokens, state=buffer_state)
