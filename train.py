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

from config import (DEFAULTS, RESUME_OVERRIDABLE, TOY_CFG, ConfigError, as_text, check_against_model, check_mesh,
                    complete_cfg, format_help, parse_overrides, validate_cfg)
from checkpoint import CheckpointError, read_cfg, resolve_version_dir
from crosscoder import resolve_device
import distributed
from buffer import TokensExhausted, check_buffer_fits
from trainer import NonFiniteError, Trainer, TrainingInterrupted
from utils import (DataError, SetupError, check_tokens, in_notebook, keep_freed_memory,
                   load_gemma_pair, load_tokens)

# %%
# The config: every key, its default and its meaning live in config.py (`python train.py --help`
# lists them). Edit here, e.g. default_cfg.update(l1_coeff=1.5, dict_size=2**15), or override
# from the shell with --key value.
default_cfg = dict(DEFAULTS)
FLAGS = {"preset": "gemma (default: the Gemma-2-2b replication) or toy (embedded CPU pair, minutes)",
         "resume": "a checkpoints/version_N directory: continue that run exactly",
         "sweep": "key=v1,v2 [key=v1,v2 ...]: train the grid of crosscoders on one harvest (sweep.py)",
         "sweep_devices": "DEVICE,DEVICE,...: place the sweep's members round-robin (default: all on device)",
         "help": "print this and exit"}

# %%
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


def build_cfg(argv, base_cfg=default_cfg, flags=None, usage="usage: python train.py [--preset toy] [--resume DIR] [--sweep key=v1,v2 ...] [--key value ...]",
              switches=()):
    """base_cfg <- preset <- --key value overrides, or, with --resume, the saved config <- the
    overrides a resume may change. Returns (cfg, extras): extras holds the flags given (FLAGS, and
    a script's own flags: name -> help; its switches, flags without a value, as True). --help
    prints every flag and key and exits."""
    all_flags = dict(flags or {}, **FLAGS)
    argv, sweep_specs = split_sweep(argv)
    given, extras = parse_overrides(argv, {}, flags=tuple(all_flags), switches=switches)  # the keys typed, nothing else
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
        cfg = complete_cfg(dict(given, preset=extras.get("preset", "gemma")), base_cfg, validate=False)
    validate_cfg(cfg)  # derived keys (normalisation_factor, preset) are skipped by the validator
    if extras.get("sweep"):
        from sweep import expand

        for member in expand(cfg, extras["sweep"]):
            validate_cfg(member)
    return cfg, extras


def load_models_and_tokens(cfg, fresh=True):
    """The models (index 0 base, 1 chat) and the training tokens of a complete config. fresh (not a
    resume): the tokens are checked for enough sequences before any model loads."""
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
    if fresh and cfg["store_dir"] is None:
        from sources import check_enough_sequences

        local_cfg = dict(cfg, batch_size=distributed.local_batch_size(cfg["batch_size"]))
        check_enough_sequences(cfg, local_cfg, len(tokens[distributed.rank()::distributed.world_size()]),
                               cfg["num_tokens"] // cfg["batch_size"])
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
        models, tokens = load_models_and_tokens(cfg, fresh=resume is None)
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
        print(f"next: python analysis.py --checkpoint {trainer.crosscoder.save_dir}  (figures, summary.txt and "
              f"the latent dashboard, dashboard.html, in {trainer.crosscoder.save_dir / 'analysis'})")
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
