"""A run's Weights & Biases log: online when credentials exist, offline otherwise, disabled on
request; every rank but the first logs nothing.
"""
import netrc
import os
from pathlib import Path

from crossdiff.io.checkpoint import checkpoint_root


# ---------------------------------------------------------------- Weights & Biases
# wandb must never stop a training run: a failed online start falls back to offline, a failed
# offline start disables logging, each with a message.
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
    None with cfg wandb_mode "disabled" or when wandb cannot start. wandb_mode None picks online
    or offline by credentials. Offline, wandb's own banner and sync hints are silenced: one line
    says where the run is and how to upload it."""
    mode = cfg["wandb_mode"]
    if mode == "disabled":
        return None
    import wandb

    why = ""
    if mode is None:
        mode = "online" if has_credentials() else "offline"
        why = " (no credentials: run `wandb login` or set wandb_mode)" if mode == "offline" else ""
    wandb_dir = checkpoint_root(cfg)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(project=cfg["wandb_project"], entity=cfg["wandb_entity"], config=cfg,
                  dir=str(wandb_dir), id=run_id, resume="allow" if run_id else None)
    if cfg.get("sweep_id"):  # a sweep's members: one run each, in one group, from one process
        kwargs.update(group=cfg["sweep_id"], name=" ".join(f"{k}={v}" for k, v in cfg["sweep"].items()),
                      reinit="create_new")

    def init(mode):
        return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60, silent=mode == "offline"), **kwargs)

    try:
        run = init(mode)
    except Exception as e:
        if mode != "online":
            print(f"wandb: disabled ({type(e).__name__}: {e})")
            return None
        why, mode = f" (online start failed: {type(e).__name__}: {e})", "offline"
        try:
            run = init(mode)
        except Exception as e2:  # wandb must never stop a training run
            print(f"wandb: disabled{why}; offline failed too ({type(e2).__name__}: {e2})")
            return None
    if mode == "offline":
        run_dir = Path(run.dir).parent if hasattr(run, "dir") else wandb_dir
        print(f"wandb: logging offline{why} to {run_dir}; upload it later with `wandb sync {run_dir}`")
    return run


def finish_run(run):
    """Close the run (an offline one's upload command was printed when it started)."""
    if run is not None:
        run.finish()
