"""Weights & Biases logging for training runs: online when credentials exist, else offline.

wandb must never stop a training run: a failed online start falls back to offline, a failed
offline start disables logging, each with a message.
"""
import netrc
import os
from pathlib import Path

from checkpoint import checkpoint_root


def has_credentials():
    """An API key in the environment or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def start_run(cfg, run_id=None):
    """A wandb run logging under the checkpoint directory (resumed when run_id is given), or
    None with cfg wandb_mode "disabled". wandb_mode None picks online or offline by credentials."""
    mode = cfg["wandb_mode"]
    if mode == "disabled":
        return None
    import wandb

    if mode is None:
        mode = "online" if has_credentials() else "offline"
        if mode == "offline":
            print("wandb: no credentials found, logging offline (set wandb_mode or run `wandb login`)")
    wandb_dir = checkpoint_root(cfg)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(project=cfg["wandb_project"], entity=cfg["wandb_entity"], config=cfg,
                  dir=str(wandb_dir), id=run_id, resume="allow" if run_id else None)
    if cfg.get("sweep_id"):  # a sweep's members: one run each, in one group, from one process
        kwargs.update(group=cfg["sweep_id"], name=" ".join(f"{k}={v}" for k, v in cfg["sweep"].items()),
                      reinit="create_new")
    try:
        return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60), **kwargs)
    except Exception as e:
        if mode != "online":
            print(f"wandb: disabled ({type(e).__name__}: {e})")
            return None
        print(f"wandb: online init failed ({type(e).__name__}: {e}); logging offline instead")
        return wandb.init(mode="offline", **kwargs)


def finish_run(run):
    """Close the run; for an offline run, say how to upload it."""
    if run is None:
        return
    offline, run_dir = getattr(run, "offline", False), Path(run.dir).parent
    run.finish()
    if offline:
        print(f"wandb: offline run saved; upload it with `wandb sync {run_dir}`")
