"""Sweeps in one pass: several crosscoders trained on the same activations, paying the harvest
(two models to the hook, ~4.4 GFLOP per token at Gemma-2-2b) once instead of once per member.

    python train.py --sweep l1_coeff=1,2,4                        # three crosscoders, one harvest
    python train.py --sweep "l1_coeff=1,2 dict_size=16384,32768"   # the grid: four crosscoders

Each member is a Trainer of its own (config, optimiser, NaN guard, checkpoints in its own
version directory under checkpoints/sweep_N/), fed by one shared source: every step the sweep
draws one batch and every member trains on it, so a member equals the same config trained alone
(same seed, hence the same batches). Only keys that change the crosscoder or its optimisation may
vary (the config table's sweep column): the models, hook, data, batch and buffer are what the members share.

Under torchrun every rank holds every member (data parallel, or its shard of each member's
latents with latent_shards > 1) and draws its share of the global batch from its own buffer, as
a single run does; rank 0 chooses the directories, logs and writes the checkpoints.
"""
import json
import signal
from pathlib import Path

from tqdm.auto import tqdm

from crosscoder import ARCHITECTURES
from crossdiff.config.schema import ConfigError, expand
from crossdiff.io.checkpoint import member_dirs, next_sweep_dir, next_version_dir, read_cfg
from crossdiff.io.wandb_run import finish_run, start_run
from crossdiff.scale import distributed
from crossdiff.scale.costs import held_bytes, memory_per_rank
from crossdiff.scale.process import install_stop_handlers, restore_handlers
from trainer import NonFiniteError, Trainer, TrainingInterrupted


def member_name(overrides):
    return " ".join(f"{k}={v}" for k, v in overrides.items())


class SharedBatches:
    """What each member's Trainer reads as its buffer: the batch the sweep drew for this step.
    The first member also saves and restores the real source's state (the others save none)."""

    def __init__(self, source, owner=False, device=None):
        self.source, self.owner, self.device, self.batch = source, owner, device, None

    def next(self):  # on the member's device (one copy per step when members are placed apart)
        return self.batch if self.device is None else self.batch.to(self.device, non_blocking=True)

    @property
    def sequences_run(self):  # how far the shared source has read (every member records it)
        return getattr(self.source, "sequences_run", None)

    @property
    def normalisation_factor(self):
        return getattr(self.source, "normalisation_factor", None)

    @normalisation_factor.setter
    def normalisation_factor(self, value):  # the owner's Trainer combines the ranks' factors, once
        if self.owner:
            self.source.normalisation_factor = value

    def __getattr__(self, name):  # state_dict / load_state_dict: the owner's only
        if name in ("state_dict", "load_state_dict") and self.owner:
            return getattr(self.source, name)
        raise AttributeError(name)


def member_bytes(cfg, n_processes=1):
    """(bytes a member holds on one process throughout: its latents' weights, gradients and Adam's
    two moments in fp32; bytes its step adds at the peak), from memory_per_rank. Over
    n_processes, each holds dict_size / latent_shards latents and steps on its latent group's rows."""
    d, f, m, shards = cfg["d_in"], cfg["dict_size"], cfg["n_models"], cfg["latent_shards"]
    held = held_bytes(d, f, shards, m)
    rows = cfg["batch_size"] // (n_processes // shards)
    return held, memory_per_rank(d, f, ARCHITECTURES[cfg["architecture"]].STEP_PHASES, shards, rows, m) - held


def place(cfgs, devices):
    """Member i on devices[i % len(devices)] (its config's device); the buffer and the models stay
    on devices[0], the first member's."""
    return [dict(c, device=devices[i % len(devices)]) for i, c in enumerate(cfgs)]


def check_sweep_fits(cfgs, free_bytes, n_processes=1):
    """The members step one after another, so a device needs its members' held memory plus the
    largest step's among them. A ConfigError, before any model loads, when that exceeds what the
    device has free (free_bytes: a number, or {device: bytes}; beside the buffer), naming the
    members to drop (the largest first). Returns the bytes needed (on the fullest device; per
    process under torchrun)."""
    if isinstance(free_bytes, dict):
        return max(check_sweep_fits([c for c in cfgs if c["device"] == d], free, n_processes)
                   for d, free in free_bytes.items() if any(c["device"] == d for c in cfgs))
    sizes = [member_bytes(c, n_processes) for c in cfgs]
    need = sum(h for h, _ in sizes) + max(s for _, s in sizes)
    if need <= free_bytes:
        return need
    order = sorted(range(len(cfgs)), key=lambda i: -sum(sizes[i]))
    drop = []
    for i in order:
        drop.append(i)
        kept = [sizes[j] for j in range(len(cfgs)) if j not in drop]
        if not kept or sum(h for h, _ in kept) + max(s for _, s in kept) <= free_bytes:
            break
    names = "; ".join(f"{member_name(cfgs[i]['sweep'])} ({sum(sizes[i]) / 2**30:.1f} GiB)" for i in drop)
    raise ConfigError(f"the sweep's {len(cfgs)} crosscoders need {need / 2**30:.1f} GiB but {free_bytes / 2**30:.1f} "
                      f"GiB is free beside the buffer: drop {names}, or run the sweep in parts")


def write_manifest(sweep_dir, axes, trainers):
    """sweep.json: the axes and each member's version directory and values."""
    members = [{"dir": t.crosscoder.save_dir.name, "values": t.cfg["sweep"]} for t in trainers]
    (sweep_dir / "sweep.json").write_text(json.dumps({"axes": axes, "members": members}, indent=2))


class Sweep:
    """Sweep(cfg, axes, models=..., tokens=...) builds one Trainer per grid point, all fed by the
    source the first one builds; train() steps every member on each batch. A member whose loss or
    weights turn non-finite stops alone (reported at the next log step); the others go on."""

    def __init__(self, cfg, axes, models=None, tokens=None, buffer=None, devices=None):
        main = distributed.is_main()  # rank 0 makes the directories; the others are told
        self.axes = axes
        self.sweep_dir = Path(distributed.broadcast(str(next_sweep_dir(cfg)) if main else None))
        cfgs = expand(dict(cfg, checkpoint_dir=str(self.sweep_dir), sweep_id=self.sweep_dir.name), axes)
        cfgs = place(cfgs, devices or [cfg["device"]])
        self._share(Trainer(cfgs[0], models=models, tokens=tokens, buffer=buffer),
                    [(c, lambda shared, c=c: Trainer(c, buffer=shared)) for c in cfgs[1:]])
        # version_i is member i, whatever the order of their first saves
        dirs = distributed.broadcast([str(next_version_dir(t.cfg)) for t in self.trainers] if main else None)
        for t, d in zip(self.trainers, dirs):
            t.crosscoder.save_dir = Path(d)
        if main:
            write_manifest(self.sweep_dir, axes, self.trainers)

    def _share(self, first, rest):
        """The first member's buffer becomes the sweep's source; every member reads it through
        SharedBatches (the first owns its saved state; the others, (cfg, build(shared)) pairs,
        read on their own device)."""
        self.source = first.buffer
        first.buffer = SharedBatches(self.source, owner=True)
        self.trainers = [first] + [build(SharedBatches(self.source, device=c["device"])) for c, build in rest]
        self.failed = {}  # member index -> why it stopped
        self.logs = [{} for _ in self.trainers]

    @classmethod
    def resume(cls, sweep_dir, complete=dict, models=None, tokens=None):
        """Continue a sweep from its members' newest checkpoints (all saved at the same step when
        the sweep stops or is interrupted); the first member's saved buffer serves them all, so the
        sweep resumes exactly. A member whose newest checkpoint is older (it stopped on a
        non-finite value) is left out, with how to resume it alone. complete(saved config) -> the
        member's config (train.py: today's defaults and the keys changed on the command line)."""
        self = cls.__new__(cls)
        self.sweep_dir = Path(sweep_dir)
        self.axes = json.loads((self.sweep_dir / "sweep.json").read_text())["axes"]
        dirs = member_dirs(self.sweep_dir)
        steps = [read_cfg(d).get("step") if list(d.glob("*_cfg.json")) else None for d in dirs]
        last = max((s for s in steps if s is not None), default=None)
        if last is None:
            raise FileNotFoundError(f"{self.sweep_dir}: no member has a checkpoint to resume from")
        for d, step in zip(dirs, steps):
            if step != last and distributed.is_main():
                print(f"sweep member {d.name} is left out: its newest checkpoint is at step {step}, the sweep's at "
                      f"{last}; resume it alone with: python train.py --resume {d}")
        members = [d for d, step in zip(dirs, steps) if step == last]
        cfgs = [complete({k: v for k, v in read_cfg(d).items() if k != "step"}) for d in members]
        self._share(Trainer.resume(members[0], cfgs[0], models=models, tokens=tokens),
                    [(c, lambda shared, d=d, c=c: Trainer.resume(d, c, buffer=shared))
                     for d, c in zip(members[1:], cfgs[1:])])
        return self

    def active(self):
        return [(i, t) for i, t in enumerate(self.trainers) if i not in self.failed]

    def step(self):
        """One batch from the shared source, one step of every active member on it: {index: log}."""
        batch = self.source.next()
        logs = {}
        for i, t in self.active():
            t.buffer.batch = batch
            logs[i] = t.step()
        return logs

    def _guard(self, i, fn, *args):
        """Run a member's log or save; a NonFiniteError stops that member only."""
        try:  # (every rank raises together: Trainer.check_finite asks them all)
            return fn(*args)
        except NonFiniteError as e:
            self.failed[i] = str(e)
            if distributed.is_main():
                print(f"sweep member {i} ({member_name(self.trainers[i].cfg['sweep'])}) stopped: {e}", flush=True)
            self._hand_over_source()

    def _hand_over_source(self):
        """The first active member owns the shared source's saved state: when the owner stops, the
        next saves it, so that a resume of the others continues the data where they left it."""
        active = self.active()
        for t in self.trainers:
            t.buffer.owner = bool(active) and t is active[0][1]

    def train(self):
        """Train every member to the end; saves as Trainer.train does (every save_every steps, at the
        end, on Ctrl-C / SIGTERM, then raising TrainingInterrupted). Returns each member's last log."""

        first, n, main, world = self.trainers[0], len(self.trainers), distributed.is_main(), distributed.world_size()
        cfg, self._stop = first.cfg, None
        old_handlers = install_stop_handlers(self._request_stop)
        if main:
            print(f"sweep of {n} crosscoders ({', '.join(member_name(t.cfg['sweep']) for t in self.trainers)}) on one "
                  f"harvest, steps {first.step_counter}..{first.total_steps}"
                  + (f" over {world} processes" if world > 1 else "") + f"; checkpoints in {self.sweep_dir}", flush=True)
        for t in self.trainers:
            t.wandb_run = start_run(t.cfg, t.wandb_id) if main else None
            t.wandb_id = t.wandb_run.id if t.wandb_run is not None else t.wandb_id
        pbar = tqdm(range(first.step_counter, first.total_steps), initial=first.step_counter, total=first.total_steps,
                    desc="sweep", disable=not (cfg["progress"] and main), dynamic_ncols=True)
        try:
            for step in pbar:
                for i, step_log in self.step().items():
                    t = self.trainers[i]
                    if step % cfg["log_every"] == 0 or step == first.total_steps - 1:
                        self.logs[i] = self._guard(i, t.log, step_log) or self.logs[i]
                    if (step + 1) % cfg["save_every"] == 0 and i not in self.failed:
                        self._guard(i, t.save)
                pbar.set_postfix(members=f"{len(self.active())}/{n}")
                if distributed.stop_agreed(self._stop is not None, step):
                    raise TrainingInterrupted(self._stop or signal.SIGTERM, first.step_counter)
        except BaseException as e:
            for i, t in self.active():  # keep every healthy member's work, then re-raise
                t._save_if_new(reason=type(e).__name__)
            if isinstance(e, TrainingInterrupted):
                e.save_dir = self.sweep_dir
            raise
        else:
            for i, t in self.active():
                self._guard(i, t._save_if_new, "end of training")
        finally:
            pbar.close()
            restore_handlers(old_handlers)
            for t in self.trainers:
                finish_run(t.wandb_run)
                t.wandb_run = None
        return self.logs

    def _request_stop(self, signum):
        if self._stop is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop = signum
