"""The config's schema: every key's type and allowed values, `--key value` parsing, validation.

The default values live in train.py (the dict users edit); this file only says what is valid,
so that a typo fails in a second with a message naming the key, not an hour into a run.
"""
import difflib
import math

from crosscoder import DTYPES

ARCHITECTURES = ("l1", "batchtopk")
WANDB_MODES = (None, "online", "offline", "disabled")
STEP_DTYPES = ("fp32", "bf16")

# key -> (type, check or None, what the check requires). Types: int, float, str, bool, list
# (of str), "str?" (a string or None). The reference's l1_coeff was an int, which made
# `--l1_coeff 1.5` fail: every float key accepts ints and floats.
_pos = (lambda v: v > 0, "a positive number")
_nonneg = (lambda v: v >= 0, "a number >= 0")
_beta = (lambda v: 0 <= v < 1, "a number in [0, 1)")
SCHEMA = {
    "seed": (int, *_nonneg),
    "batch_size": (int, *_pos),
    "buffer_mult": (int, *_pos),
    "lr": (float, *_pos),
    "num_tokens": (int, *_pos),
    "l1_coeff": (float, *_nonneg),
    "beta1": (float, *_beta),
    "beta2": (float, *_beta),
    "d_in": (int, *_pos),
    "dict_size": (int, *_pos),
    "seq_len": (int, lambda v: v >= 2, "an integer >= 2 (position 0, BOS, is dropped)"),
    "enc_dtype": (str, lambda v: v in DTYPES, f"one of {sorted(DTYPES)}"),
    "model_name": (str, None, ""),
    "model_names": (list, None, ""),
    "site": (str, None, ""),
    "device": ("str?", None, ""),
    "model_batch_size": (int, *_pos),
    "log_every": (int, *_pos),
    "save_every": (int, *_pos),
    "dec_init_norm": (float, *_pos),
    "hook_point": (str, lambda v: v.startswith("blocks.") or v.startswith("hook_") or v.startswith("ln_final"),
                   "a TransformerLens hook name such as 'blocks.14.hook_resid_pre'"),
    "wandb_project": (str, None, ""),
    "wandb_entity": ("str?", None, ""),
    "n_models": (int, lambda v: v >= 2, "an integer >= 2"),
    "architecture": (str, lambda v: v in ARCHITECTURES, f"one of {list(ARCHITECTURES)}"),
    "k": (int, *_pos),
    "aux_coeff": (float, *_nonneg),
    "aux_k": (int, *_pos),
    "norm_estimate_batches": (int, *_pos),
    "wrap_tokens": (bool, None, ""),
    "checkpoint_buffer": (bool, None, ""),
    "dead_window": (int, *_pos),
    "dataset": (str, None, ""),
    "checkpoint_dir": ("str?", None, ""),
    "data_dir": ("str?", None, ""),
    "wandb_mode": ("str?", lambda v: v in WANDB_MODES, f"one of {list(WANDB_MODES)}"),
    "progress": (bool, None, ""),
    "step_dtype": (str, lambda v: v in STEP_DTYPES, f"one of {list(STEP_DTYPES)}"),
}
# Written into the config by training, not set by users.
DERIVED_KEYS = {"normalisation_factor", "folded_normalisation_factor", "preset"}


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
    kind = SCHEMA[key][0]
    try:
        if kind == "str?":
            return None if text.lower() in ("none", "null", "") else text
        if kind is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is int:
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
        name = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, kind)
        raise ConfigError(f"--{key}: expected {name}, got {text!r}") from None


def parse_overrides(argv, cfg):
    """Apply `--key value` (or `--key=value`) pairs to a copy of cfg. Returns (cfg, extras)
    where extras holds the non-config flags --preset and --resume."""
    cfg, extras = dict(cfg), {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value, got {arg!r}")
        key, _, value = arg[2:].partition("=")
        if not _:
            if not args:
                raise ConfigError(f"--{key} needs a value")
            value = args.pop(0)
        if key in ("preset", "resume"):
            extras[key] = value
        else:
            cfg[key] = parse_value(key, value)
    return cfg, extras


def validate_cfg(cfg):
    """One clear ConfigError for the first invalid key; returns cfg unchanged when valid."""
    for key, value in cfg.items():
        if key in DERIVED_KEYS:
            continue
        if key not in SCHEMA:
            raise _unknown_key(key)
        kind, check, need = SCHEMA[key]
        if kind == "str?":
            ok = value is None or isinstance(value, str)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok and not math.isfinite(value):
                raise ConfigError(f"config key '{key}' must be finite, got {value}")
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, kind)
        if not ok:
            tname = {"str?": "a string or None", list: "a list of strings"}.get(kind, getattr(kind, "__name__", kind))
            raise ConfigError(f"config key '{key}' must be {tname}, got {value!r} ({type(value).__name__})")
        if check is not None and not check(value):
            raise ConfigError(f"config key '{key}' must be {need}, got {value!r}")
    if "model_names" in cfg and "n_models" in cfg and len(cfg["model_names"]) != cfg["n_models"]:
        raise ConfigError(f"config key 'model_names' lists {len(cfg['model_names'])} models but n_models={cfg['n_models']}")
    return cfg


def check_against_model(cfg, model_cfg):
    """Checks that need the model's architecture (a TransformerLens config, no weights)."""
    from buffer import hook_layer

    if cfg["seq_len"] > model_cfg.n_ctx:
        raise ConfigError(f"config key 'seq_len' = {cfg['seq_len']} exceeds the model's context of {model_cfg.n_ctx}")
    layer = hook_layer(cfg["hook_point"])
    if layer is not None and layer >= model_cfg.n_layers:
        raise ConfigError(f"config key 'hook_point' = {cfg['hook_point']!r} is not in a model with "
                          f"{model_cfg.n_layers} layers")
    if cfg["d_in"] != model_cfg.d_model:
        raise ConfigError(f"config key 'd_in' = {cfg['d_in']} but the model's d_model is {model_cfg.d_model}")
