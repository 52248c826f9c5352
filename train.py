# %% [markdown]
# # Train a crosscoder on a base model and its chat fine-tune
# Edit `default_cfg` below, or override any key from the shell:
#   python train.py --preset toy                      # embedded CPU default, minutes
#   python train.py                                   # the Gemma-2-2b replication (GPU, hub access)
#   python train.py --l1_coeff 1.5 --dict_size 32768  # any key, validated before any model loads
#   python train.py --resume checkpoints/version_3    # continue an interrupted run
#   python train.py --sweep l1_coeff=1,2,4            # three crosscoders on one harvest (sweep.py)
# %%
import os
import sys
from pathlib import Path

import torch

from config import ConfigError, check_against_model, check_mesh, format_help, parse_overrides, validate_cfg
from checkpoint import CheckpointError, read_cfg, resolve_version_dir
from crosscoder import resolve_device
import distributed
from buffer import TokensExhausted, check_buffer_fits
from trainer import NonFiniteError, Trainer, TrainingInterrupted
from utils import (PILE_LMSYS_DATASET, DataError, SetupError, check_tokens, in_notebook, keep_freed_memory,
                   load_gemma_pair, load_tokens)

# %%
default_cfg = {
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
    "dead_tokens": 10_000_000,  # AuxK counts a latent dead after this many tokens without firing
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
}
# `--preset toy`: the embedded CPU default (toy.py builds the pair), applied over default_cfg.
TOY_CFG = {
    "d_in": 64, "dict_size": 1024, "seq_len": 32, "batch_size": 512, "buffer_mult": 64,
    "num_tokens": 1_000_000, "lr": 1e-3, "l1_coeff": 2.0, "model_batch_size": 256,
    "log_every": 100, "save_every": 2000, "hook_point": "blocks.2.hook_resid_pre",
    "model_names": ["toy-base", "toy-chat"], "model_name": "toy-base", "norm_estimate_batches": 8,
    "device": "cpu", "dataset": "toy",
    # batchtopk: the authors count a latent dead after 10M tokens, 10% of their 100M-token runs;
    # the toy's 1M tokens, scaled alike (at 10M AuxK would never act here)
    "dead_tokens": 100_000,
}
PRESETS = {"gemma": {}, "toy": TOY_CFG}
FLAGS = {"preset": "gemma (default: the Gemma-2-2b replication) or toy (embedded CPU pair, minutes)",
         "resume": "a checkpoints/version_N directory: continue that run exactly",
         "sweep": "key=v1,v2 [key=v1,v2 ...]: train the grid of crosscoders on one harvest (sweep.py)",
         "sweep_devices": "DEVICE,DEVICE,...: place the sweep's members round-robin (default: all on device)",
         "help": "print this and exit"}
# Keys that may change when resuming; the others come from the checkpoint's config.
RESUME_OVERRIDABLE = {"device", "log_every", "save_every", "wandb_mode", "wandb_project", "wandb_entity",
                      "progress", "checkpoint_buffer", "data_dir", "dataset", "wrap_tokens", "step_dtype",
                      "store_dir"}


# %%
def complete_cfg(cfg, base_cfg=default_cfg):
    """base_cfg <- the config's preset <- cfg: how every config is completed, once. A config
    saved by an older version gets today's defaults for the keys it predates."""
    preset = cfg.get("preset", "gemma")
    return {**base_cfg, **PRESETS.get(preset, {}), **cfg, "preset": preset}


def split_sweep(argv):
    """(argv without --sweep, the sweep's key=values items or None): --sweep takes every following
    word that is not a flag (`--sweep a=1,2 b=3` as well as `--sweep "a=1,2 b=3"`)."""
    rest, specs, words = [], None, list(argv)
    while words:
        word = words.pop(0)
        if word == "--sweep" or word.startswith("--sweep="):
            specs = [word.partition("=")[2]] if "=" in word else []
            while words and not words[0].startswith("--"):
                specs.append(words.pop(0))
        else:
            rest.append(word)
    return rest, specs


def build_cfg(argv, base_cfg=default_cfg, flags=None, usage="usage: python train.py [--preset toy] [--resume DIR] [--sweep key=v1,v2 ...] [--key value ...]"):
    """default_cfg <- preset <- --key value overrides (or the saved config with --resume).
    Returns (cfg, extras): extras holds the flags given (FLAGS, and a script's own flags: name ->
    help). --help prints every flag and key and exits."""
    all_flags = dict(flags or {}, **FLAGS)
    argv, sweep_specs = split_sweep(argv)
    cfg, extras = parse_overrides(argv, base_cfg, flags=tuple(all_flags))
    if sweep_specs is not None:
        from sweep import parse_sweep

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
    resume = extras.get("resume")
    if resume is not None:
        version_dir = resolve_version_dir(resume)
        if (version_dir / "sweep.json").is_file():  # a sweep: its first member's config is the base
            from sweep import member_dirs

            version_dir = member_dirs(version_dir)[0]
        saved = read_cfg(version_dir)
        saved.pop("step", None)  # the trainer state holds the step to resume from
        changed = {k for k in cfg if k in base_cfg and cfg[k] != base_cfg[k]}
        refused = sorted(changed - RESUME_OVERRIDABLE)
        if refused:
            raise ConfigError(f"cannot change {refused} when resuming; they come from {version_dir}")
        if saved.get("architecture") == "batchtopk" and "recon_loss" not in saved:
            print(f"note: {version_dir} is a BatchTopK run from before the authors' recipe (threshold, dead "
                  "latents, AuxK, loss); it continues under the recipe's defaults")
        extras["resume_overrides"] = {k: cfg[k] for k in changed}
        cfg = complete_cfg(dict(saved, **{k: cfg[k] for k in changed}))
    else:
        preset = extras.get("preset", "gemma")
        if preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
        cfg, _ = parse_overrides(argv, dict(base_cfg, **PRESETS[preset]), flags=tuple(all_flags))
        cfg["preset"] = preset
    validate_cfg(cfg)  # derived keys (normalisation_factor, preset) are skipped by the validator
    if extras.get("sweep"):
        from sweep import expand

        for member in expand(cfg, extras["sweep"]):
            validate_cfg(member)
    return cfg, extras


def load_models_and_tokens(cfg):
    """The models (index 0 base, 1 chat) and the training tokens of a complete config."""
    if cfg["preset"] == "toy":
        from toy import build_toy_pair

        if not distributed.is_main():
            distributed.barrier()  # rank 0 builds (or reads) the cached pair first
        base, chat, tokens, _ = build_toy_pair(cfg)
        if distributed.is_main():
            distributed.barrier()
        return [base, chat], tokens
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    for name in cfg["model_names"]:  # architecture checks from TransformerLens's built-in config
        is_dir = (Path(name) / "config.json").is_file()  # a local copy, named after its model
        check_against_model(cfg, get_pretrained_model_config(Path(name).name if is_dir else name))
    tokens = load_tokens(cfg["dataset"], cfg)
    return load_gemma_pair(cfg), tokens


def main(cfg, resume=None, sweep=None, resume_overrides=None, sweep_devices=None):
    """Train one crosscoder (or a sweep's grid of them on one harvest); under torchrun, one
    data-parallel replica per process."""
    n_processes = int(os.environ.get("WORLD_SIZE", "1"))
    check_mesh(cfg["latent_shards"], n_processes)  # before anything loads
    if sweep_devices and n_processes > 1:
        raise ConfigError("--sweep_devices places a one-process sweep's members; under torchrun every process "
                          "holds every member on its own device (drop --sweep_devices)")
    if distributed.launched():
        distributed.local_batch_size(cfg["batch_size"], n_processes)
        cfg["device"] = distributed.setup(cfg["device"], latent_shards=cfg["latent_shards"])
    if cfg["device"] is None and cfg["preset"] != "toy" and not torch.cuda.is_available():
        raise SetupError(
            "the Gemma-2-2b replication needs a CUDA GPU (two 2B-parameter models and a "
            "524k-row activation buffer), and none was found. Run `python train.py --preset toy` "
            "to see the whole pipeline on a CPU, or pass --device cpu to try anyway.")
    cfg["device"] = resolve_device(cfg["device"])
    if cfg["device"] == "cpu":
        keep_freed_memory()  # CPU steps otherwise re-fault their large temporaries every step
    check_buffer_fits(cfg)  # before any model is loaded
    if sweep:  # every member's weights and Adam state, on its device, beside the buffer
        from buffer import available_bytes, buffer_bytes
        from sweep import check_sweep_fits, expand, place

        if sweep_devices:  # the models and the buffer go with the first member
            cfg["device"] = sweep_devices[0]
        members = place(expand(cfg, sweep), sweep_devices or [cfg["device"]])
        check_sweep_fits(members, {d: available_bytes(d) - buffer_bytes(cfg) * (d == cfg["device"])
                                   for d in dict.fromkeys(m["device"] for m in members)}, n_processes)
    models, tokens = None, None
    if cfg["store_dir"] is None or cfg["preset"] == "toy":  # (the toy report needs the models)
        models, tokens = load_models_and_tokens(cfg)
        for model in models:
            check_against_model(cfg, model.cfg)
            check_tokens(tokens, cfg["seq_len"], model.cfg.d_vocab)
    resume_sweep = resume is not None and (resolve_version_dir(resume) / "sweep.json").is_file()
    if sweep or resume_sweep:
        from sweep import Sweep, member_name

        if resume_sweep:
            overrides = resume_overrides or {}
            run = Sweep.resume(resolve_version_dir(resume), lambda saved: complete_cfg(dict(saved, **overrides)),
                               models=models, tokens=tokens)
        else:
            run = Sweep(cfg, sweep, models=models, tokens=tokens, devices=sweep_devices)
        logs = run.train()
        if not distributed.is_main():
            return run
        for i, (t, log) in enumerate(zip(run.trainers, logs)):
            result = "stopped: non-finite (see above)" if i in run.failed else format_log(log)
            print(f"member {member_name(t.cfg['sweep'])}: {result}; checkpoints in {t.crosscoder.save_dir}")
            if cfg["preset"] == "toy" and i not in run.failed:
                from toy import format_report, toy_report

                print(format_report(toy_report(whole_crosscoder(t), models[0], models[1], t.cfg)))
        print(f"done: the sweep is in {run.sweep_dir} (sweep.json lists its members)")
        return run
    if resume is not None:
        trainer = Trainer.resume(resume, cfg, models=models, tokens=tokens)
    else:
        trainer = Trainer(cfg, models=models, tokens=tokens)
    log = trainer.train()
    if distributed.is_main():
        print("final: " + format_log(log))
        if cfg["preset"] == "toy":
            from toy import format_report, organism_report, toy_report

            organism = organism_report(models[0], models[1], cfg)
            print(format_report(toy_report(whole_crosscoder(trainer), models[0], models[1], cfg), organism))
        print(f"done: checkpoints in {trainer.crosscoder.save_dir}")
    return trainer


def format_log(log):
    return ", ".join(f"{k} {v:.4g}" for k, v in log.items())


def whole_crosscoder(trainer):
    """The trainer's crosscoder; a dictionary split over the latents is read whole from the
    checkpoint just written (on rank 0)."""
    from crosscoder import CrossCoder

    return trainer.crosscoder if trainer.cfg["latent_shards"] == 1 else CrossCoder.load(trainer.crosscoder.save_dir)


def cli(argv):
    clean = False
    try:
        cfg, extras = build_cfg(argv)
        main(cfg, extras.get("resume"), extras.get("sweep"), extras.get("resume_overrides"), extras.get("sweep_devices"))
        clean = True
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except TrainingInterrupted as e:
        if distributed.is_main():
            launcher = f"torchrun --nproc_per_node={distributed.world_size()}" if distributed.launched() else "python"
            print(f"training interrupted ({e}); resume with: {launcher} train.py --resume {e.save_dir}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except (NonFiniteError, TokensExhausted, SetupError, DataError, FileNotFoundError, CheckpointError, OSError) as e:
        sys.exit(f"error: {e}")
    finally:
        distributed.teardown(clean)


# %%
if __name__ == "__main__":
    if in_notebook():  # no argv parsing inside IPython, as the reference
        notebook_cfg = dict(default_cfg, preset="gemma")
        trainer = main(notebook_cfg)
    else:  # under torchrun, each worker leaves without Python's shutdown (distributed.exit_process)
        distributed.run_script(cli, sys.argv[1:])
