"""What a config implies before anything loads, and the checks on it there: the positions kept
per row, how many sequences a run reads (the buffer's fill and refreshes), the buffer's bytes and
whether they fit the machine, the process mesh, the hooks (each model's, the blocks they need),
the models' shapes (from their configs, no weights), an activation store's limits. Each one key
alone is the table's to check (schema.py).

The buffer holds about batch_size * buffer_mult token positions, fills fully at the start and
refills half of itself once that half has been served (buffer.Buffer, as the reference).
"""
import os
import re

import torch

from crossdiff.config.schema import ConfigError, effective


def hook_layer(hook_point):
    """The block index of 'blocks.L.<...>', or None for hooks outside the blocks."""
    m = re.match(r"blocks\.(\d+)\.", hook_point)
    return int(m.group(1)) if m else None


def norm_width(cfg):
    """The width whose square root each model's mean activation norm is scaled to: d_in (the
    reference), or for models of different widths their mean (the DFC paper's sqrt((d1 + d2) / 2))."""
    widths = cfg.get("model_widths") or []
    return sum(widths) / len(widths) if widths else cfg["d_in"]


def hooks_of(cfg):
    """[M] each model's hook point: hook_points, or hook_point for every model (M: n_models, or
    the models a partial config names)."""
    return list(cfg.get("hook_points") or [cfg["hook_point"]] * (cfg.get("n_models") or len(cfg["model_names"])))


def layers_needed(hook_point):
    """Blocks a model must hold to give the activations at hook_point: L for
    blocks.L.hook_resid_pre (the input of block L is the output of blocks 0..L-1), L + 1 for any
    other hook inside block L, 0 for the embeddings, None (all of them) for hooks after the blocks."""
    layer = hook_layer(hook_point)
    if layer is not None:
        return layer if hook_point == f"blocks.{layer}.hook_resid_pre" else layer + 1
    return 0 if hook_point in ("hook_embed", "hook_pos_embed") else None

def first_n(cfg):
    """Positions dropped at the start of every row (config key ignore_first_n, or its auto value)."""
    return effective(cfg, "ignore_first_n")


def positions(cfg):
    """Positions per row that reach the crosscoder before any exclusion: seq_len - ignore_first_n."""
    return cfg["seq_len"] - first_n(cfg)


def buffer_sequences(cfg):
    """Sequences the buffer holds: about batch_size * buffer_mult rows of seq_len - ignore_first_n
    positions (BOS dropped), an even number, so that a refresh refills exactly the half next()
    served (the reference left a few rows to be served twice when it was odd). With positions
    left out (tokenmask) a refresh reads on until its rows are filled."""
    return max(2, cfg["batch_size"] * cfg["buffer_mult"] // positions(cfg) // 2 * 2)


def steps_per_refresh(cfg):
    """next() calls from one refresh to the next: a refresh comes once the pointer passes
    half the buffer less one batch (Buffer.next)."""
    half_rows = buffer_sequences(cfg) * positions(cfg) // 2
    return (half_rows - cfg["batch_size"]) // cfg["batch_size"] + 1


def sequences_needed(cfg, total_steps):
    """How many token sequences a run of total_steps batches reads: one full fill, then half a
    buffer at every refresh."""
    n = buffer_sequences(cfg)
    return n + (total_steps // steps_per_refresh(cfg)) * (n // 2)


def buffer_bytes(cfg):
    """Memory the buffer needs at its peak: bf16 rows [rows, n_models, d_in], twice (the shuffle
    makes a permuted copy)."""
    rows = buffer_sequences(cfg) * positions(cfg)
    return 2 * rows * cfg["n_models"] * cfg["d_in"] * 2


def meminfo_available(text):
    """Bytes the kernel says can be allocated without swapping (MemAvailable: free memory plus the
    page cache it can drop) from /proc/meminfo's text, or None when it has no such line."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # kB
    return None


def available_bytes(device):
    """Memory a new allocation can take on device: CUDA's free memory; on the CPU, MemAvailable
    (not MemFree, which leaves out the page cache: after reading a dataset it is a fraction of what
    can be had), else psutil's, else the physical memory (macOS without psutil)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            found = meminfo_available(f.read())
        if found is not None:
            return found
    except OSError:
        pass
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_buffer_fits(cfg, models_bytes=0):
    """A clear error, before allocating anything, for a buffer larger than the free memory.
    models_bytes: what the models will take on the same device, when they are not loaded yet."""
    need, free = buffer_bytes(cfg), available_bytes(cfg["device"])
    if need + models_bytes > free:
        beside = f" beside the models' {models_bytes / 2**30:.1f} GiB (fp32)" if models_bytes else ""
        raise ConfigError(
            f"the activation buffer needs {need / 2**30:.1f} GiB of {cfg['device']} memory at its peak{beside} but "
            f"{free / 2**30:.1f} GiB is free: lower buffer_mult (now {cfg['buffer_mult']}) or batch_size "
            f"(now {cfg['batch_size']})" + (", or train from a store (store_dir: the models are not loaded)"
                                            if models_bytes else ""))


class TokensExhausted(RuntimeError):
    """The token tensor has no sequences left for a refresh."""


# ---------------------------------------------------------------- a rank's source
def check_enough_sequences(cfg, local_cfg, have, total_steps, state=None, source="the dataset", world_size=1):
    """A TokensExhausted, before any model loads when it can, when this rank's `have` sequences
    (None: unknown) cannot feed the steps left: a full fill, then half a buffer per refresh (an
    exact resume keeps its filled buffer). state: the trainer state resumed from, or None; world_size:
    the data-parallel processes (the message gives the whole run's figures)."""
    buffer_state = state and state.get("buffer")
    start, read = (int(state["step"]), int(buffer_state["token_pointer"])) if buffer_state else (0, 0)
    need = sequences_needed(local_cfg, total_steps - start)
    if buffer_state is not None and "buffer" in buffer_state:
        need -= buffer_sequences(local_cfg)
    w = world_size
    if have is not None and need > have - read and not cfg["wrap_tokens"]:
        fill = buffer_sequences(local_cfg) * w
        steps = (f"num_tokens={cfg['num_tokens']:,} reads {need * w - fill:,} more" if need * w > fill else
                 "no more for its steps")
        raise TokensExhausted(
            f"the run needs {need * w:,} sequences of {cfg['seq_len']} tokens but {source} has {have * w:,}: the "
            f"buffer's first fill takes {fill:,} (batch_size {cfg['batch_size']} x buffer_mult "
            f"{cfg['buffer_mult']} rows, {positions(cfg)} a sequence) and {steps} as it refreshes half of it; "
            "lower buffer_mult or num_tokens, add data, or set wrap_tokens=True to reuse it")


def check_mesh(latent_shards, world_size):
    """The process mesh world_size = data-parallel groups x latent_shards, or a ConfigError."""
    if latent_shards > 1 and world_size == 1:
        raise ConfigError(f"latent_shards={latent_shards} needs as many processes: launch with "
                          f"torchrun --nproc_per_node={latent_shards} (or a multiple)")
    if world_size % latent_shards:
        raise ConfigError(f"latent_shards={latent_shards} does not divide the {world_size} processes: the mesh "
                          "is data-parallel groups x latent_shards")
    return world_size // latent_shards


def check_against_model(cfg, model_cfg):
    """Checks that need the model's architecture (a TransformerLens config, no weights)."""
    if cfg["seq_len"] > model_cfg.n_ctx:
        raise ConfigError(f"config key 'seq_len' = {cfg['seq_len']} exceeds the model's context of {model_cfg.n_ctx}")
    need = None if cfg.get("hook_point") is None else layers_needed(cfg["hook_point"])
    if need is not None and need > model_cfg.n_layers:
        raise ConfigError(f"config key 'hook_point' = {cfg['hook_point']!r} is beyond the model: it has "
                          f"{model_cfg.n_layers} layers (--layer 0 to {model_cfg.n_layers})")
    if cfg.get("d_in") is not None and cfg["d_in"] != model_cfg.d_model and not cfg.get("model_widths"):
        raise ConfigError(f"config key 'd_in' = {cfg['d_in']} but the model's d_model is {model_cfg.d_model}")


def check_no_exclusions(cfg):
    """A ConfigError for exclusions with an activation store (store.py): a store holds every
    position of its rows past ignore_first_n (its layout has fixed rows per sequence)."""
    if cfg.get("exclude_tokens") or cfg.get("outlier_norm_multiple"):
        raise ConfigError("an activation store keeps every position: exclude_tokens and outlier_norm_multiple "
                          "apply to live training only (drop --store_dir, or these keys)")
