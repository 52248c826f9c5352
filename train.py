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
import time

import torch

import store
from crosscoder import CrossCoder
from crossdiff.config.cli import build_cfg as build_cli_cfg
from crossdiff.config.cli import in_notebook
from crossdiff.config.plan import TokensExhausted, available_bytes, buffer_bytes, check_buffer_fits, check_mesh
from crossdiff.config.schema import DEFAULTS, Config, ConfigError, complete_cfg, expand
from crossdiff.diffing.classes import latent_classes, relative_norms, separation_note
from crossdiff.io.checkpoint import CheckpointError, check_checkpoint_dir, resolve_version_dir
from crossdiff.pairs.toy import format_report, organism_report, toy_report
from crossdiff.scale import distributed
from crossdiff.scale.process import keep_freed_memory, library_progress
from crossdiff.sources.aligned_mix import is_aligned
from crossdiff.sources.mix import DataError
from crossdiff.sources.footprint import pair_bytes
from crossdiff.sources.models import SetupError
from crossdiff.sources.store import HarvestInterrupted, is_complete_store
from sweep import Sweep, check_sweep_fits, member_name, place
from trainer import NonFiniteError, Trainer, TrainingInterrupted
from utils import load_models_and_tokens, prepare_models

# %%
# The config: every key, its default and its meaning live in crossdiff/config/schema.py (`python train.py --help`
# lists them). Edit here, e.g. default_cfg.update(l1_coeff=1.5, dict_size=2**15), or override
# from the shell with --key value.
default_cfg = dict(DEFAULTS)


def build_cfg(argv, **kwargs):
    """default_cfg (as edited above) <- preset <- --key value, or a resume's saved config (crossdiff/config/cli.py)."""
    return build_cli_cfg(argv, default_cfg, **kwargs)


# %%
def main(cfg, resume=None, sweep=None, resume_overrides=None, sweep_devices=None):
    """Train one crosscoder (or a sweep's grid of them on one harvest); under torchrun, one
    data-parallel replica per process. Each step is one call; everything that can be checked
    without the models is checked before any loads."""
    cfg = cfg if isinstance(cfg, Config) else complete_cfg(cfg)  # the config, completed and checked once
    n_processes = start_processes(cfg, sweep_devices)  # torchrun's groups, the device
    check_checkpoint_dir(cfg, resolve_version_dir(resume) if resume is not None else None)  # writable, now
    prepare_models(cfg)  # d_in and hook_point from the models' configs; a preset's pair and mix built
    check_memory(cfg, sweep, sweep_devices, n_processes)  # the buffer (and a sweep's members) fit
    if cfg["store_dir"] is not None and resume is None and not is_complete_store(cfg["store_dir"]):
        store.build(cfg)  # the store the config names, harvested once (the next run reads it)
    models, tokens = None, None
    if cfg["store_dir"] is None or cfg["preset"] == "toy":  # (the toy report needs the models)
        models, tokens = load_models_and_tokens(cfg, fresh=resume is None)  # checked against each other
    if sweep or (resume is not None and (resolve_version_dir(resume) / "sweep.json").is_file()):
        return train_sweep(cfg, sweep, resume, resume_overrides, sweep_devices, models, tokens)
    trainer = (Trainer.resume(resume, cfg, models=models, tokens=tokens) if resume is not None
               else Trainer(cfg, models=models, tokens=tokens))
    log = trainer.train()
    report(trainer, log, models)
    return trainer


def start_processes(cfg, sweep_devices):
    """The process group under torchrun, and the device: a clear error, before anything loads,
    for a mesh that does not divide or a GPU preset without a GPU. Returns the process count."""
    n_processes = int(os.environ.get("WORLD_SIZE", "1"))
    check_mesh(cfg["latent_shards"], n_processes)
    if sweep_devices and n_processes > 1:
        raise ConfigError("--sweep_devices places a one-process sweep's members; under torchrun every process "
                          "holds every member on its own device (drop --sweep_devices)")
    if distributed.launched():
        distributed.local_batch_size(cfg["batch_size"], n_processes)
        cfg["device"] = distributed.setup(cfg["device"], latent_shards=cfg["latent_shards"])
    if cfg["device"] is None and cfg["preset"] != "toy" and not torch.cuda.is_available():
        what = ("the Gemma-2-2b replication needs a CUDA GPU (two 2B-parameter models and a 524k-row activation "
                "buffer)" if cfg["preset"] == "gemma" else f"the {cfg['preset']} preset expects a CUDA GPU")
        raise SetupError(
            f"{what}, and none was found. Run `python train.py --preset toy` (minutes) or `--preset "
            "gemma3-270m-offline` (real weights, about an hour) on a CPU, or pass --device cpu to try anyway.")
    cfg["device"] = distributed.resolve_device(cfg["device"])
    if cfg["device"] == "cpu":
        keep_freed_memory()  # CPU steps otherwise re-fault their large temporaries every step
    library_progress(cfg["progress"])
    return n_processes


def check_memory(cfg, sweep, sweep_devices, n_processes):
    """The buffer and the models (their fp32 weights, read from their files' headers) against the
    free memory; a sweep's members (weights, Adam state, their step) placed on their devices beside
    them. Before any model is loaded. Training from a store loads no models (the toy's are KBs)."""
    if sweep and sweep_devices:  # the models and the buffer go with the first member
        cfg["device"] = sweep_devices[0]
    models = 0 if cfg["store_dir"] is not None or cfg["preset"] == "toy" else pair_bytes(cfg) or 0
    check_buffer_fits(cfg, models)
    if sweep:
        members = place(expand(cfg, sweep), sweep_devices or [cfg["device"]])
        check_sweep_fits(members, {d: available_bytes(d) - (buffer_bytes(cfg) + models) * (d == cfg["device"])
                                   for d in dict.fromkeys(m["device"] for m in members)}, n_processes)


def train_sweep(cfg, sweep, resume, resume_overrides, sweep_devices, models, tokens):
    """A sweep's members trained on one harvest (or a sweep resumed), then each one's result."""
    if resume is not None:
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
            print(format_report(toy_report(whole_crosscoder(t), models[0], models[1], t.cfg)))
    print(f"done: the sweep is in {run.sweep_dir} (sweep.json lists its members)")
    return run


def report(trainer, log, models):
    """The final losses, the toy pair's report (what the crosscoder found against the known
    difference), and where the checkpoints are."""
    if not distributed.is_main():
        return
    cfg = trainer.cfg
    print("final: " + format_log(log))
    print("(the last batch's figures; explained_variance is the reference's mean over tokens of 1 - |err|^2 / "
          "|x - batch mean|^2, so analysis.py's per-model figures, pooled over held-out tokens, differ)")
    cc = whole_crosscoder(trainer)
    note = separation_note(latent_classes(cc), relative_norms(cc), one_vocabulary=not is_aligned(cfg["dataset"]))
    if note:
        print(f"note: {note}")
    if cfg["preset"] == "toy":
        organism = organism_report(models[0], models[1], cfg)
        print(format_report(toy_report(cc, models[0], models[1], cfg), organism))
    print(f"done: checkpoints in {trainer.crosscoder.save_dir}")
    print(f"next: python analysis.py --checkpoint {trainer.crosscoder.save_dir}  (figures, summary.txt and "
          f"the latent dashboard, dashboard.html, in {trainer.crosscoder.save_dir / 'analysis'})")


def format_log(log):
    return ", ".join(f"{k} {v:.4g}" for k, v in log.items())


def whole_crosscoder(trainer):
    """The trainer's crosscoder; a dictionary split over the latents is read whole from the
    checkpoint just written (on rank 0)."""
    return trainer.crosscoder if trainer.cfg["latent_shards"] == 1 else CrossCoder.load(trainer.crosscoder.save_dir)


def cli(argv):
    clean = False
    try:
        cfg, extras = build_cfg(argv)
        started = time.time()
        main(cfg, extras.get("resume"), extras.get("sweep"), extras.get("resume_overrides"), extras.get("sweep_devices"))
        clean = True
        if distributed.is_main():
            print(f"wall time {time.time() - started:.0f} s")
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except TrainingInterrupted as e:
        if distributed.is_main():
            launcher = f"torchrun --nproc_per_node={distributed.world_size()}" if distributed.launched() else "python"
            print(f"training interrupted ({e}); resume with: {launcher} train.py --resume {e.save_dir}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except HarvestInterrupted as e:
        if distributed.is_main():
            print(f"stopped: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once (the trainer said what was saved)
        if distributed.is_main():
            print("interrupted at once by a second Ctrl-C; resume from the last checkpoint with: python train.py "
                  "--resume <its version directory>", file=sys.stderr)
        sys.exit(130)
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
