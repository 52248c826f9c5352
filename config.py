"""The config: every key's type, allowed values, meaning and default; the presets; completing a
partial config (complete_cfg: the CLI, the constructors and the loaders all use it); `--key value`
parsing, `--help`, validation.

A typo fails in a second with a message naming the key, not an hour into a run. A leaf module: it
imports nothing from the repo, and not torch.
"""
import difflib
import math
import re
from typing import Callable, NamedTuple, Optional

DTYPE_NAMES = ("fp32", "fp16", "bf16")  # crosscoder.DTYPES maps them to torch dtypes
ARCHITECTURES = ("l1", "batchtopk")
WANDB_MODES = (None, "online", "offline", "disabled")
STEP_DTYPES = ("fp32", "bf16")
B_DEC_INITS = (None, "zeros", "geometric_median")
RECON_LOSSES = (None, "squared", "norm")


class Key(NamedTuple):
    """One config key. kind: int, float, str, bool, list (of str), "str?" or "int?" (or None)."""
    kind: object
    check: Optional[Callable]
    need: str  # what the check requires, for the error message
    doc: str   # one line for --help


# The reference's l1_coeff was an int, which made `--l1_coeff 1.5` fail: every float key accepts
# ints and floats.
_pos = (lambda v: v > 0, "a positive number")
_nonneg = (lambda v: v >= 0, "a number >= 0")
_beta = (lambda v: 0 <= v < 1, "a number in [0, 1)")
_free = (None, "")
SCHEMA = {
    "seed": Key(int, *_nonneg, "seeds the crosscoder's initialisation and the buffer's shuffling"),
    "batch_size": Key(int, *_pos, "token positions per training step"),
    "buffer_mult": Key(int, *_pos, "the buffer holds about batch_size * buffer_mult positions"),
    "lr": Key(float, *_pos, "Adam learning rate (constant for 80% of the steps, then linear to 0)"),
    "num_tokens": Key(int, *_pos, "training tokens in all: steps = num_tokens // batch_size"),
    "l1_coeff": Key(float, *_nonneg, "weight of the decoder-norm-weighted L1 penalty (warmed up over 5%)"),
    "beta1": Key(float, *_beta, "Adam beta1"),
    "beta2": Key(float, *_beta, "Adam beta2"),
    "d_in": Key(int, *_pos, "residual width at the hook point (the models' d_model)"),
    "dict_size": Key(int, *_pos, "number of latents F"),
    "seq_len": Key(int, lambda v: v >= 2, "an integer >= 2 (position 0, BOS, is dropped)",
                   "tokens per sequence run through the models (BOS included, then dropped)"),
    "enc_dtype": Key(str, lambda v: v in DTYPE_NAMES, f"one of {sorted(DTYPE_NAMES)}",
                     "dtype of the crosscoder's weights"),
    "model_name": Key(str, *_free, "the reference's name of the base model (kept for its notebooks)"),
    "model_names": Key(list, *_free, "models to diff, comma-separated: index 0 base, 1 chat (hub names "
                                     "or local directories named after them)"),
    "site": Key(str, *_free, "the reference's name of the hook site (informational)"),
    "device": Key("str?", *_free, "cuda, cpu, cuda:1 ...; none picks cuda when available"),
    "model_batch_size": Key(int, *_pos, "sequences per forward pass of the models"),
    "log_every": Key(int, *_pos, "steps between logged metrics"),
    "save_every": Key(int, *_pos, "steps between checkpoints"),
    "dec_init_norm": Key(float, *_pos, "initial norm of every decoder vector"),
    "hook_point": Key(str, lambda v: v.startswith("blocks.") or v.startswith("hook_") or v.startswith("ln_final"),
                      "a TransformerLens hook name such as 'blocks.14.hook_resid_pre'",
                      "TransformerLens hook whose activations are diffed"),
    "wandb_project": Key(str, *_free, "Weights & Biases project"),
    "wandb_entity": Key("str?", *_free, "Weights & Biases entity (none: your default)"),
    "n_models": Key(int, lambda v: v >= 2, "an integer >= 2", "number of models sharing the dictionary"),
    "architecture": Key(str, lambda v: v in ARCHITECTURES, f"one of {list(ARCHITECTURES)}",
                        "l1 (the reference) or batchtopk (Minder, Dumas et al. 2025)"),
    "k": Key(int, *_pos, "batchtopk: mean active latents per token (k * batch_size kept per batch)"),
    "aux_coeff": Key(float, *_nonneg, "batchtopk: weight of the AuxK loss that revives dead latents"),
    "aux_k": Key("int?", *_pos, "batchtopk: dead latents used per token by the AuxK loss (none: d_in // 2)"),
    "aux_normalise": Key(bool, *_free, "batchtopk: divide the AuxK loss by the error's variance over the batch"),
    "threshold_beta": Key(float, *_beta, "batchtopk: EMA decay of the inference threshold"),
    "threshold_start_step": Key(int, *_nonneg, "batchtopk: the inference threshold is estimated after this step"),
    "dead_tokens": Key("int?", *_pos, "batchtopk: tokens without firing after which AuxK counts a latent dead "
                                      "(none: min(10M, num_tokens // 10))"),
    "k_max": Key("int?", *_pos, "batchtopk: anneal k linearly from k_max over k_annealing_steps (none: no annealing)"),
    "k_annealing_steps": Key(int, *_nonneg, "batchtopk: steps over which k falls from k_max to k"),
    "b_dec_init": Key("str?", lambda v: v in B_DEC_INITS, f"one of {list(B_DEC_INITS)}",
                      "zeros or geometric_median (of the first batch); none: geometric_median for batchtopk, "
                      "zeros for l1"),
    "recon_loss": Key("str?", lambda v: v in RECON_LOSSES, f"one of {list(RECON_LOSSES)}",
                      "squared (sum of squares per token) or norm (L2 norm per token and model, mean); "
                      "none: norm for batchtopk, squared for l1"),
    "norm_estimate_batches": Key(int, *_pos, "model batches used to estimate the normalisation factors"),
    "wrap_tokens": Key(bool, *_free, "when the tokens run out: false stops with a message, true wraps"),
    "checkpoint_buffer": Key(bool, *_free, "save the buffer with each checkpoint for an exact resume"),
    "dead_window": Key(int, *_pos, "l1: steps without firing after which the logged dead_fraction counts a latent"),
    "store_dir": Key("str?", *_free, "an activation store (store.py) to train from instead of running the "
                                     "models; store.py writes it there"),
    "dataset": Key(str, *_free, "training tokens: a hub dataset id, a local datasets dir, or a .pt tensor"),
    "checkpoint_dir": Key("str?", *_free, "where version_N/ folders go (none: checkpoints/ beside the code)"),
    "data_dir": Key("str?", *_free, "where downloads and the toy pair are cached (none: data/ beside the code)"),
    "wandb_mode": Key("str?", lambda v: v in WANDB_MODES, f"one of {list(WANDB_MODES)}",
                      "none: online with credentials, else offline; or online, offline, disabled"),
    "progress": Key(bool, *_free, "show progress bars"),
    "latent_shards": Key(int, *_pos, "split the dictionary over this many processes (torchrun): world size = "
                                     "data-parallel groups x latent_shards"),
    "step_dtype": Key(str, lambda v: v in STEP_DTYPES, f"one of {list(STEP_DTYPES)}",
                      "crosscoder matmuls: fp32 (the reference) or bf16 autocast (weights stay fp32)"),
    "toy_seed": Key(int, *_nonneg, "toy preset: seeds the toy model pair and its text (not the crosscoder: "
                                   "a seed sweep keeps the pair)"),
}
PILE_LMSYS_DATASET = "ckkissane/pile-lmsys-mix-1m-tokenized-gemma-2"  # the reference's training tokens

# Every key's default: the Gemma-2-2b replication (train.py applies a user's edits over these).
DEFAULTS = {
    # --- the reference's keys and defaults
    "seed": 49,
    "batch_size": 4096,
    "buffer_mult": 128,
    "lr": 5e-5,
    "num_tokens": 400_000_000,
    "l1_coeff": 2.0,
    "beta1": 0.9,
    "beta2": 0.999,
    "d_in": 2304,  # Gemma-2-2b d_model
    "dict_size": 2**14,
    "seq_len": 1024,
    "enc_dtype": "fp32",
    "model_name": "gemma-2-2b",
    "site": "resid_pre",
    "device": None,  # None: cuda if available, else cpu (the reference fixed the first GPU)
    "model_batch_size": 4,
    "log_every": 100,
    "save_every": 30000,
    "dec_init_norm": 0.08,
    "hook_point": "blocks.14.hook_resid_pre",  # residual entering block 14 of 26
    "wandb_project": "crosscoder-model-diff",
    "wandb_entity": None,
    # --- keys this repo adds
    "model_names": ["gemma-2-2b", "gemma-2-2b-it"],  # index 0 base, index 1 chat
    "n_models": 2,
    "architecture": "l1",  # "l1" (the reference) or "batchtopk" (Minder, Dumas et al. 2025)
    # batchtopk's recipe, as the authors' BatchTopKCrossCoderTrainer (Minder, Dumas et al. 2025)
    "k": 100,  # mean active latents per token (k * batch_size kept per batch)
    "aux_coeff": 1 / 32,  # weight of the AuxK loss that revives dead latents
    "aux_k": None,  # dead latents used by the AuxK loss per token (None: d_in // 2)
    "aux_normalise": True,  # divide the AuxK loss by the error's variance over the batch
    "threshold_beta": 0.999,  # EMA decay of the inference threshold
    "threshold_start_step": 1000,  # the threshold is estimated after this step
    "dead_tokens": None,  # AuxK counts a latent dead after this many tokens without firing (None: min(10M, num_tokens // 10))
    "k_max": None,  # anneal k from k_max down to k over k_annealing_steps (None: constant k)
    "k_annealing_steps": 0,
    "b_dec_init": None,  # "zeros" or "geometric_median" (None: the latter for batchtopk, zeros for l1)
    "recon_loss": None,  # "squared" or "norm" (None: norm for batchtopk, squared for l1 as the reference)
    "dataset": PILE_LMSYS_DATASET,  # hub id, local datasets dir, or .pt token tensor
    "norm_estimate_batches": 100,  # model batches used to estimate the normalisation factors
    "wrap_tokens": False,  # when the tokens run out: False stops with a message, True wraps
    "checkpoint_buffer": True,  # save the buffer with each checkpoint for an exact resume
    "store_dir": None,  # train from an activation store written by store.py (None: run the models)
    "step_dtype": "fp32",  # crosscoder matmuls: fp32 (the reference) or bf16 autocast (weights stay fp32)
    "latent_shards": 1,  # torchrun: split the dictionary over this many processes (sharding.py)
    "dead_window": 1000,  # l1: steps without firing after which the logged dead_fraction counts a latent
    "checkpoint_dir": None,  # None: checkpoints/ beside this file
    "data_dir": None,  # None: data/ beside this file
    "wandb_mode": None,  # None: online with credentials, else offline; or "disabled"
    "progress": True,
    "toy_seed": 49,  # --preset toy: the pair and its text (toy.py), apart from the crosscoder's seed
}
# `--preset toy`: the embedded CPU default (toy.py builds the pair), applied over DEFAULTS.
TOY_CFG = {
    "d_in": 64, "dict_size": 1024, "seq_len": 32, "batch_size": 512, "buffer_mult": 64,
    "num_tokens": 1_000_000, "lr": 1e-3, "l1_coeff": 2.0, "model_batch_size": 256,
    "log_every": 100, "save_every": 2000, "hook_point": "blocks.2.hook_resid_pre",
    "model_names": ["toy-base", "toy-chat"], "model_name": "toy-base", "norm_estimate_batches": 8,
    "device": "cpu", "dataset": "toy",
}
PRESETS = {"gemma": {}, "toy": TOY_CFG}
# Keys that may change when resuming; the others come from the checkpoint's config.
RESUME_OVERRIDABLE = {"device", "log_every", "save_every", "wandb_mode", "wandb_project", "wandb_entity",
                      "progress", "checkpoint_buffer", "data_dir", "dataset", "wrap_tokens", "step_dtype",
                      "store_dir"}

# Written into the config by training, not set by users.
DERIVED_KEYS = {"normalisation_factor", "folded_normalisation_factor", "preset", "step", "world_size",
                "sequences_read",  # token sequences the run had read at that checkpoint, wraps included
                "source",  # where a crosscoder trained elsewhere was read from (published.py)
                "sweep", "sweep_id"}  # a sweep member's values and its sweep's directory name (sweep.py)


def effective(cfg, key):
    """The value a key whose default (none) depends on the run takes: aux_k d_in // 2 (the
    authors' heuristic, Gao et al. B.1); b_dec_init and recon_loss the authors' choice for
    batchtopk, the reference's for l1; dead_tokens a tenth of the run, at most 10M. Configs saved
    before these keys existed get the same."""
    value = cfg.get(key)
    if value is not None:
        return value
    batchtopk = cfg["architecture"] == "batchtopk"
    if key == "aux_k":
        return cfg["d_in"] // 2
    if key == "b_dec_init":
        return "geometric_median" if batchtopk else "zeros"
    if key == "recon_loss":
        return "norm" if batchtopk else "squared"
    if key == "dead_tokens":
        # Deviation from the authors' fixed 10M tokens (about 5-10% of their runs): in a run under
        # ~10M tokens no latent would ever count as dead and AuxK would never act. A tenth of the
        # run, capped at their 10M, is their 10M on their runs.
        return max(1, min(10_000_000, cfg["num_tokens"] // 10))
    raise KeyError(key)


def hook_layer(hook_point):
    """The block index of 'blocks.L.<...>', or None for hooks outside the blocks."""
    m = re.match(r"blocks\.(\d+)\.", hook_point)
    return int(m.group(1)) if m else None


def layers_needed(hook_point):
    """Blocks a model must hold to give the activations at hook_point: L for
    blocks.L.hook_resid_pre (the input of block L is the output of blocks 0..L-1), L + 1 for any
    other hook inside block L, 0 for the embeddings, None (all of them) for hooks after the blocks."""
    layer = hook_layer(hook_point)
    if layer is not None:
        return layer if hook_point == f"blocks.{layer}.hook_resid_pre" else layer + 1
    return 0 if hook_point in ("hook_embed", "hook_pos_embed") else None


class ConfigError(ValueError):
    pass


def _unknown_key(key):
    close = difflib.get_close_matches(key, list(SCHEMA), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def parse_value(key, text):
    """A command-line string -> the key's type, or a ConfigError naming the key."""
    if key not in SCHEMA:
        raise _unknown_key(key)
    kind = SCHEMA[key].kind
    try:
        if kind in ("str?", "int?") and text.lower() in ("none", "null", ""):
            return None
        if kind == "str?":
            return text
        if kind is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if kind in (int, "int?"):
            value = float(text.replace("_", ""))  # accepts 4e8 and 400_000_000
            if not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(text)
        if kind is list:
            return [part for part in text.split(",") if part]
        return text
    except ValueError:
        name = {int: "an integer", "int?": "an integer or none", float: "a number", bool: "true or false"}.get(kind, kind)
        raise ConfigError(f"--{key}: expected {name}, got {text!r}") from None


def parse_overrides(argv, cfg, flags=("preset", "resume"), switches=()):
    """The one command-line parser of every script. Applies `--key value` (or `--key=value`)
    pairs to a copy of cfg, each value parsed to its key's type. Returns (cfg, extras): extras
    holds the script's own flags (not config keys) as strings, its switches (flags without a
    value) as True, and "help": True for --help or -h."""
    cfg, extras = dict(cfg), {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--help", "-h") or arg[2:] in switches:
            extras["help" if arg in ("--help", "-h") else arg[2:]] = True
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value, got {arg!r}")
        key, _, value = arg[2:].partition("=")
        if not _:
            if not args:
                raise ConfigError(f"--{key} needs a value")
            value = args.pop(0)
        if key in flags:
            extras[key] = value
        else:
            cfg[key] = parse_value(key, value)
    return cfg, extras


def format_help(usage, defaults, flags=None, presets=None):
    """--help text: usage, the script's own flags, then every config key with its default (and
    each preset's value where it differs) and its one-line meaning from SCHEMA."""
    lines = [usage]
    if flags:
        lines += ["", "flags:"] + [f"  --{name:<22} {doc}" for name, doc in flags.items()]
    if defaults:
        lines += ["", "config keys (--key value; lists comma-separated; none for an empty optional value):"]
    for key, value in defaults.items():
        shown = as_text(value)
        for name, preset in (presets or {}).items():
            if key in preset and preset[key] != value:
                shown += f" ({name}: {as_text(preset[key])})"
        doc = SCHEMA[key].doc if key in SCHEMA else ""
        lines.append(f"  --{key:<22} {shown:<34} {doc}")
    return "\n".join(lines)


def as_text(value):
    """A value as it is typed on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def validate_cfg(cfg, across=True):
    """One clear ConfigError for the first invalid key; returns cfg unchanged when valid. across:
    also the checks between keys that a training run needs (latent shards, the BatchTopK threshold's
    steps, one name per model); the constructors check each key alone."""
    for key, value in cfg.items():
        if key in DERIVED_KEYS:
            continue
        if key not in SCHEMA:
            raise _unknown_key(key)
        kind, check, need, _ = SCHEMA[key]
        if value is None and kind in ("str?", "int?"):
            continue  # none: the key's default behaviour (see its doc)
        if kind == "str?":
            ok = isinstance(value, str)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok and not math.isfinite(value):
                raise ConfigError(f"config key '{key}' must be finite, got {value}")
        elif kind in (int, "int?"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, kind)
        if not ok:
            tname = {"str?": "a string or None", "int?": "an integer or None", list: "a list of strings"}.get(kind, getattr(kind, "__name__", kind))
            raise ConfigError(f"config key '{key}' must be {tname}, got {value!r} ({type(value).__name__})")
        if check is not None and not check(value):
            raise ConfigError(f"config key '{key}' must be {need}, got {value!r}")
    if not across:
        return cfg
    if "latent_shards" in cfg and "dict_size" in cfg and cfg["dict_size"] % cfg["latent_shards"]:
        raise ConfigError(f"dict_size {cfg['dict_size']} does not split into latent_shards={cfg['latent_shards']} "
                          "equal shards: choose a multiple")
    if cfg.get("architecture") == "batchtopk" and {"threshold_start_step", "num_tokens", "batch_size"} <= set(cfg):
        steps = cfg["num_tokens"] // cfg["batch_size"]
        if cfg["threshold_start_step"] >= steps - 1:
            raise ConfigError(f"threshold_start_step={cfg['threshold_start_step']} leaves none of the {steps} steps "
                              "to estimate the BatchTopK inference threshold: lower it (e.g. to steps // 2)")
    if "model_names" in cfg and "n_models" in cfg and len(cfg["model_names"]) != cfg["n_models"]:
        raise ConfigError(f"config key 'model_names' lists {len(cfg['model_names'])} models but n_models={cfg['n_models']}")
    return cfg


def complete_cfg(cfg, base=None, validate=True):
    """How every config is completed, once: base (DEFAULTS, or train.py's edited copy) <- the
    config's preset <- cfg. A partial config (the reference's own dict, or a config saved by an
    older version) gets today's defaults for the keys it lacks. validate: refuse an unknown key
    (with a suggestion) or a bad value, as the CLI does; loaders of saved configs pass False.
    Returns a new dict."""
    preset = cfg.get("preset") or "gemma"
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    out = {**(DEFAULTS if base is None else base), **PRESETS[preset], **cfg, "preset": preset}
    if not validate and preset == "toy" and "toy_seed" not in cfg and "seed" in cfg:
        out["toy_seed"] = cfg["seed"]  # a toy run saved before toy_seed: its pair was built from its seed
    return validate_cfg(out) if validate else out


def completed(cfg):
    """What a constructor (CrossCoder, Buffer, Trainer) works on: cfg itself when it holds every
    key (so a caller's dict keeps receiving what training writes into it, as in the reference),
    else a completed copy; each key validated either way (the checks between keys are the CLI's)."""
    if all(key in cfg for key in DEFAULTS):
        return validate_cfg(cfg, across=False)
    return validate_cfg(complete_cfg(cfg, validate=False), across=False)


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
    need = layers_needed(cfg["hook_point"])
    if need is not None and need > model_cfg.n_layers:
        raise ConfigError(f"config key 'hook_point' = {cfg['hook_point']!r} is not in a model with "
                          f"{model_cfg.n_layers} layers")
    if cfg["d_in"] != model_cfg.d_model:
        raise ConfigError(f"config key 'd_in' = {cfg['d_in']} but the model's d_model is {model_cfg.d_model}")
