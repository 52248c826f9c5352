"""Where a run's batches come from: a live Buffer over the models or an activation store
(store.py), each data-parallel rank reading its share of the sequences.

Shape legend: B batch, M models, D d_in.
"""
import distributed
from activation_store import ActivationStore, read_meta
from buffer import Buffer, TokensExhausted, buffer_sequences, sequences_needed


def check_enough_sequences(cfg, local_cfg, have, total_steps, state=None, source="the dataset"):
    """A TokensExhausted, before any model loads when it can, when this rank's `have` sequences
    (None: unknown) cannot feed the steps left: a full fill, then half a buffer per refresh (an
    exact resume keeps its filled buffer). state: the trainer state resumed from, or None."""
    buffer_state = state and state.get("buffer")
    start, read = (int(state["step"]), int(buffer_state["token_pointer"])) if buffer_state else (0, 0)
    need = sequences_needed(local_cfg, total_steps - start)
    if buffer_state is not None and "buffer" in buffer_state:
        need -= buffer_sequences(local_cfg)
    w = distributed.world_size()
    if have is not None and need > have - read and not cfg["wrap_tokens"]:
        raise TokensExhausted(
            f"num_tokens={cfg['num_tokens']:,} needs {need * w:,} sequences of {cfg['seq_len']} tokens (buffer "
            f"refreshes included) but {source} has {have * w:,}; lower num_tokens, add data, or set "
            "wrap_tokens=True to reuse it")


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
        have, source = len(range(first, read_meta(cfg["store_dir"])["n_sequences"], w)), f"the store at {cfg['store_dir']}"
    else:
        tokens = tokens[first::w] if tokens is not None else None
        have, source = (len(tokens) if tokens is not None else None), "the dataset"
    check_enough_sequences(cfg, local_cfg, have, total_steps, state, source)
    if cfg["store_dir"] is not None:
        if distributed.is_main():
            print(f"training on the activations stored at {cfg['store_dir']} ({have * w:,} sequences); "
                  "the models are not run")
        return ActivationStore(local_cfg, cfg["store_dir"], state=buffer_state, first_sequence=first, stride=w)
    return Buffer(local_cfg, models, tokens, state=buffer_state)
