"""Trains a CrossCoder on batches from a Buffer (or any object with next() -> [B, M, D]).

Shape legend: B batch, M models, D d_in, F latents.

Faithful to the reference: Adam (fused into one kernel where the device has one: the same
update); lr constant for 80% of the steps then linear to 0; L1 coefficient warmed up linearly
over the first 5%; gradient norm clipped at 1.0; loss = l2 + l1_coeff(t) * l1. No host sync in
a step: numbers are read only at log steps. step_dtype "bf16" runs the step's matmuls under bf16
autocast (the reference: fp32).
"""
import contextlib
import signal

import torch
import torch.distributed as dist
from einops import einsum
from tqdm.auto import tqdm

from buffer import make_batch_source, rebase_state
from crosscoder import CrossCoder
from crossdiff.arch.shards import clip_grad_norm_, gather, gather_weights
from crossdiff.arch.sparse import fired_latents
from crossdiff.config.plan import buffer_bytes
from crossdiff.config.schema import Config, ConfigError, completed, effective
from crossdiff.io.checkpoint import (
    SHARD_STATE,
    WRITE_BYTES_PER_S,
    CheckpointError,
    atomic_torch_save,
    latest_checkpoint,
    next_version_dir,
    prune_trainer_states,
    rank_state_file,
    read_trainer_state,
    resolve_version_dir,
)
from crossdiff.io.wandb_run import finish_run, start_run
from crossdiff.scale import distributed
from crossdiff.scale.costs import held_bytes
from crossdiff.scale.process import install_stop_handlers, restore_handlers

LOG_KEYS = ("loss", "l2_loss", "l1_loss", "l0_loss", "l1_coeff", "lr",
            "explained_variance", "explained_variance_A", "explained_variance_B")
NONFINITE_SOURCES = {1: "the activations served by the buffer", 2: "the loss (overflow in the forward pass)",
                     3: "the gradients (overflow in the backward pass)"}


def lr_multiplier(step, total_steps):
    """1 for the first 80% of steps, then linear decay to 0 at the end (reference)."""
    if step < 0.8 * total_steps:
        return 1.0
    return 1.0 - (step - 0.8 * total_steps) / (0.2 * total_steps)


def make_optimizer(params, cfg):
    """The reference's Adam (default eps, no weight decay), fused into one kernel per step where
    the device supports it: the same update, but one pass over the weights and the optimiser
    state instead of seven (on CPU at the Gemma shape these passes took ~8% of a step)."""
    params = list(params)
    kwargs = dict(lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]))
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.Adam(params, **kwargs)


@torch.no_grad()
def centred_b_enc(median_MD, W_enc_MDF):
    """[F] b_enc that centres each latent's pre-activation on the data: -<median, W_enc[:, :, j]>,
    so pre = <x - median, W_enc> at the start. Each latent then fires on about the half of the
    tokens on its side of the median, whatever common direction every token shares."""
    return -einsum(median_MD.to(W_enc_MDF.dtype), W_enc_MDF, "model d_in, model d_in latent -> latent")


@torch.no_grad()
def geometric_median(x_BMD, group=None, max_iter=100, tol=1e-5):
    """[M, D]: each model's geometric median of the batch (Weiszfeld's iteration from the mean, at
    most max_iter steps, stopping when every model's estimate moves less than tol), over the rows
    of every rank of group. The authors start b_dec there from the first batch."""
    x = x_BMD.float()

    def total(t):  # a sum over the batch, over every rank's rows
        t = t.sum(0)
        if group is not None:
            dist.all_reduce(t, group=group)
        return t

    guess_MD = total(x) / total(torch.ones(x.shape[0], 1, device=x.device))
    for _ in range(max_iter):
        # (a point exactly at the estimate would get an infinite weight: the authors' code gives NaN)
        w_BM = 1 / (x - guess_MD).norm(dim=-1).clamp_min(1e-12)
        new_MD = total(w_BM[..., None] * x) / total(w_BM)[:, None]
        done = ((new_MD - guess_MD).norm(dim=-1) < tol).all()
        guess_MD = new_MD
        if done:  # the same on every rank: every rank holds the same estimate
            break
    return guess_MD


class NonFiniteError(RuntimeError):
    pass


class TrainingInterrupted(RuntimeError):
    """Raised after a SIGINT/SIGTERM stopped training and a checkpoint was saved."""

    def __init__(self, signum, step):
        super().__init__(f"received {signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.save_dir = signum, step, None


@contextlib.contextmanager
def matmul_precision(precision):
    """torch.set_float32_matmul_precision inside the block ("high": TF32 matmuls on CUDA GPUs that
    have them; a CPU ignores it), the previous setting restored after; None: unchanged."""
    previous = torch.get_float32_matmul_precision()
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class Trainer:
    """Trainer(cfg, models=[base, chat], tokens=all_tokens) builds a Buffer as the reference did;
    Trainer(cfg, buffer=source) trains on any source of [batch_size, n_models, d_in] batches;
    Trainer.resume(version_dir, cfg, ...) continues a run from its newest checkpoint. The
    reference's positional form Trainer(cfg, model_A, model_B, all_tokens) still works."""

    def __init__(self, cfg, model_A=None, model_B=None, all_tokens=None, *, models=None, tokens=None, buffer=None,
                 resume_from=None):
        self.cfg = cfg = completed(cfg)  # the reference's own key set works: the other keys take their defaults
        self.total_steps = cfg["num_tokens"] // cfg["batch_size"]
        if self.total_steps < 1:
            raise ValueError(f"num_tokens={cfg['num_tokens']} is less than one batch of {cfg['batch_size']}")
        if models is None and model_A is not None:  # the reference's positional form
            models = list(model_A) if isinstance(model_A, (list, tuple)) else [model_A, model_B]
            tokens = all_tokens if all_tokens is not None else (model_B if isinstance(model_A, (list, tuple)) else None)
        state = None
        shard = distributed.latent_shard()  # (index, count): this rank's slice of the latents (crossdiff/scale/distributed.py)
        if shard[1] != cfg["latent_shards"]:
            raise ConfigError(f"latent_shards={cfg['latent_shards']} but this process's mesh splits the latents "
                              f"{shard[1]} way(s): launch with torchrun and call distributed.setup(device, "
                              f"latent_shards={cfg['latent_shards']}) first (train.py does)")
        if resume_from is not None:
            version_dir = resolve_version_dir(resume_from)
            k = latest_checkpoint(version_dir)
            self.crosscoder = CrossCoder.load(version_dir, k, device=cfg["device"], shard=shard)
            state = read_trainer_state(version_dir, k, distributed.rank(), distributed.world_size(), shard[0])
        else:
            self.crosscoder = CrossCoder(cfg, shard)
        self.crosscoder.cfg = cfg  # one dict: factors the buffer measures reach the checkpoint
        self.crosscoder.train()  # BatchTopK selects per batch in training (a loaded model is in eval)
        # Data parallel (torchrun): this rank serves batch_size / world_size rows a step from its
        # own share of the sequences; gradients are averaged over the ranks in step().
        self.world_size = distributed.world_size()
        local_cfg = Config(cfg, batch_size=distributed.local_batch_size(cfg["batch_size"]))  # checked above
        # The process groups of a step's collectives (BatchTopK's global selection, latent shards'
        # sums, AuxK's and b_dec's global-batch statistics), passed to the crosscoder each step.
        self.mesh = distributed.training_mesh()
        if self.world_size > 1:
            cfg["world_size"] = self.world_size
        if resume_from is not None and buffer is None and distributed.any_rank(
                distributed.is_main() and state.get("buffer") is None):
            raise CheckpointError(
                f"{version_dir} holds no data state (buffer and token pointer), so a resume would read the tokens "
                "again from sequence 0. Its run did not own the data source (a sweep member other than the one "
                "that saved the shared buffer): resume the sweep from its directory instead")
        # sequences the run read before this view of the tokens began (buffer.rebase_state)
        every_rank_saved = not distributed.any_rank(state is not None and state.get("buffer") is None)
        state, self.sequence_offset = rebase_state(state, self.world_size, every_rank_saved)
        if buffer is None:
            buffer = make_batch_source(cfg, local_cfg, models, tokens, state, self.sequence_offset, self.total_steps)
        elif state is not None and state.get("buffer") is not None:
            buffer.load_state_dict(state["buffer"])
        self.buffer = buffer
        factor = getattr(buffer, "normalisation_factor", None)
        if factor is not None:
            buffer.normalisation_factor = distributed.combine_factors(factor)  # every rank scales alike
            cfg["normalisation_factor"] = torch.as_tensor(buffer.normalisation_factor, device="cpu").tolist()

        # Rank 0's write (weights, Adam moments: 38.6 GB at 2^20) can outlast a collective: the others wait
        # in a group sized to it, made now (a group needs the launcher's store, gone at a SIGTERM's save).
        written = held_bytes(cfg["d_in"], cfg["dict_size"], 1, cfg["n_models"]) * 3 // 4 + buffer_bytes(cfg)
        self.patient = distributed.patient_group(written / WRITE_BYTES_PER_S)
        device = self.crosscoder.W_enc.device
        self.optimizer = make_optimizer(self.crosscoder.parameters(), cfg)
        self.step_counter = 0
        F = self.crosscoder.b_enc.shape[0]  # this rank's latents
        self.steps_since_fired = torch.zeros(F, dtype=torch.long, device=device)
        # First step with a non-finite value, and where it came from; read only at log steps.
        self.bad_step = torch.tensor(-1, device=device)
        self.bad_source = torch.tensor(0, device=device)
        self.last_saved_step = None
        self.wandb_run = None
        self.wandb_id = None
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.step_counter = int(state["step"])
            self.steps_since_fired = state["steps_since_fired"].to(device)
            self.wandb_id = state.get("wandb_id")
            self.last_saved_step = self.step_counter

    @classmethod
    def resume(cls, version_dir, cfg, *, models=None, tokens=None, buffer=None):
        """Continue the run saved in version_dir from its newest checkpoint: weights, optimiser,
        step, dead-latent counters and (unless it was not saved) the buffer."""
        return cls(cfg, models=models, tokens=tokens, buffer=buffer, resume_from=version_dir)

    # ---------------------------------------------------------------- one step
    def step(self):
        """One optimisation step. Returns the reference's log dict; values are 0-d tensors
        (no host sync here; float(v) reads one)."""
        i = self.step_counter
        acts_BMD = self.buffer.next()
        if i == 0 or i == self.last_saved_step:
            self._check_batch(acts_BMD)
        latent_group = self.mesh.latent
        if latent_group is not None:  # every shard encodes the rows of its whole latent group
            acts_BMD = gather(acts_BMD, latent_group)
        cfg = self.cfg
        median_b_dec, centred = effective(cfg, "b_dec_init") == "geometric_median", cfg["b_enc_init"] == "centred"
        if i == 0 and (median_b_dec or centred):  # both from the first (global) batch's geometric median
            with torch.no_grad():
                median_MD = geometric_median(self.crosscoder.target(acts_BMD), self.mesh.data)
                if self.crosscoder.valid_MD is not None:  # a narrower model's padding stays 0 (arch/widths.py)
                    median_MD = median_MD * self.crosscoder.valid_MD
                if median_b_dec:  # the authors start b_dec there
                    self.crosscoder.b_dec.copy_(median_MD)
                if centred:  # deviation (off by default): see docs/design.md
                    self.crosscoder.b_enc.copy_(centred_b_enc(median_MD, self.crosscoder.W_enc))
        inputs = self.crosscoder.step_inputs(i, self.steps_since_fired)  # the architecture's (BatchTopK: k, dead latents)
        with matmul_precision("high" if cfg["step_dtype"] == "tf32" else None):  # forward and backward
            with self._step_autocast():
                losses, latents_BF, terms = self.crosscoder.losses_and_acts(acts_BMD, **inputs, mesh=self.mesh)
            loss, l1_coeff = self.crosscoder.training_loss(losses, terms, i, self.total_steps)
            loss.backward()
        fired_F = fired_latents(latents_BF)  # (the sparse step's are a sparse tensor)
        if self.world_size > 1:  # gradients averaged before clipping, as in one process; fired on any rank
            fired_count_F = fired_F.float()
            grads = [p.grad for p in self.crosscoder.parameters()]
            distributed.average_(grads + [fired_count_F], over=distributed.data_group())  # one all-reduce
            fired_F = fired_count_F > 0
        if latent_group is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.crosscoder.parameters(), max_norm=1.0)
        else:  # the norm of the whole dictionary's gradient
            grad_norm = clip_grad_norm_(self.crosscoder, max_norm=1.0, group=latent_group)
        lr = self.cfg["lr"] * lr_multiplier(i, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        with torch.no_grad():  # (the BatchTopK threshold needs no reduction: every rank saw the global cutoff)
            self.steps_since_fired = torch.where(fired_F, 0, self.steps_since_fired + 1)
            source = torch.where(~torch.isfinite(acts_BMD).all(), 1,
                                 torch.where(~torch.isfinite(loss), 2, torch.where(~torch.isfinite(grad_norm), 3, 0)))
            first = (self.bad_step < 0) & (source > 0)
            self.bad_step = torch.where(first, i, self.bad_step)
            self.bad_source = torch.where(first, source, self.bad_source)
        self.step_counter += 1
        values = (loss, losses.l2_loss, losses.l1_loss, losses.l0_loss, l1_coeff, lr,
                  losses.explained_variance, losses.explained_variance_A, losses.explained_variance_B)
        # host numbers (l1_coeff, lr) as CPU tensors, filled (no tensor literal, which the no-sync test flags)
        log = {k: (v.detach() if torch.is_tensor(v) else torch.full((), float(v), device="cpu"))
               for k, v in zip(LOG_KEYS, values)}
        return dict(log, **self.crosscoder.step_log(terms))

    def _step_autocast(self):
        """step_dtype "bf16": the encoder and decoder matmuls run in bf16 under autocast; the
        weights, the optimiser state and the loss maths stay fp32. The reference ran fp32."""
        enabled = self.cfg["step_dtype"] == "bf16"
        return torch.autocast(self.crosscoder.W_enc.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _check_batch(self, acts_BMD):
        want = (self.cfg["batch_size"] // self.world_size, self.cfg["n_models"], self.cfg["d_in"])
        if tuple(acts_BMD.shape) != want:
            per_rank = f" / {self.world_size} processes" if self.world_size > 1 else ""
            raise ValueError(f"the activation source returned shape {tuple(acts_BMD.shape)}, expected "
                             f"[batch_size{per_rank}, n_models, d_in] = {list(want)}")

    def dead_fraction(self):
        """Fraction of latents counted dead (the architecture's dead_window)."""
        return (self.steps_since_fired >= self.crosscoder.dead_window(self.step_counter)).float().mean()

    def check_finite(self):
        """Host sync: raise NonFiniteError if any step so far produced a NaN or Inf, on every rank
        together when any rank saw one (so that no rank waits in a collective the others left)."""
        bad_step, source = distributed.max_([int(self.bad_step), int(self.bad_source)])
        if bad_step >= 0:
            where = NONFINITE_SOURCES[source]
            raise NonFiniteError(
                f"non-finite value at step {bad_step}, from {where}. Training stopped; the weights "
                f"are no longer valid and were not saved. Last good checkpoint: {self._last_good()}")

    def _last_good(self):
        d = self.crosscoder.save_dir
        if d is None or self.last_saved_step is None:
            return "none (no checkpoint was written before the failure)"
        return f"{d} (step {self.last_saved_step})"

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self):
        keep_buffer = self.cfg["checkpoint_buffer"]
        buffer_state = None
        if hasattr(self.buffer, "state_dict"):
            buffer_state = self.buffer.state_dict()
            if not keep_buffer:
                buffer_state.pop("buffer", None)
        return {"optimizer": self.optimizer.state_dict(), "step": self.step_counter,
                "steps_since_fired": self.steps_since_fired, "buffer": buffer_state, "wandb_id": self.wandb_id,
                "world_size": self.world_size, "sequence_offset": self.sequence_offset}

    def save(self):
        """Checkpoint weights + config + trainer state, unless the weights are not finite.
        Only the newest trainer state is kept (it holds the buffer, which is large)."""
        self.check_finite()
        if distributed.any_rank(not all(torch.isfinite(p).all() for p in self.crosscoder.parameters())):
            raise NonFiniteError(f"weights are not finite at step {self.step_counter}; not saved. "
                                 f"Last good checkpoint: {self._last_good()}")
        state, weights = self.state_dict(), None
        run = getattr(self.buffer, "sequences_run", None)  # (None: a source that reads no sequences)
        if distributed.any_rank(run is not None):  # how far the run read: analysis.py holds out only the rest
            self.cfg["sequences_read"] = self.sequence_offset + self.world_size * distributed.max_([run or 0])[0]
        if self.world_size > 1:
            self._save_rank_states(state)
            if self.mesh.latent is not None:
                weights = gather_weights(self.crosscoder)  # the whole dictionary, on rank 0's host
        path, failed = None, None
        if distributed.is_main():  # rank 0 writes the checkpoint; the replicas are identical
            try:
                path = self.crosscoder.save(extra_state=state, step=self.step_counter, weights=weights)
                prune_trainer_states(path.parent, self.crosscoder.save_version - 1, self.world_size)
            except OSError as e:
                failed = e
        # Every rank learns whether rank 0's write failed, and all stop with the error: a rank
        # that went on would wait in the next step's collective until the timeout.
        if distributed.any_rank(failed is not None, group=self.patient):
            raise failed or OSError(f"rank 0 could not write checkpoint {self.crosscoder.save_version} into "
                                    f"{self.crosscoder.save_dir} (its error is in rank 0's output)")
        self.last_saved_step = self.step_counter
        return path

    def _save_rank_states(self, state):
        """Data parallel: ranks >= 1 write their own data state (and, split over the latents, their
        shard's) for checkpoint k before rank 0 writes the config that marks k complete, so a
        complete checkpoint has every rank's."""
        if distributed.is_main() and self.crosscoder.save_dir is None:
            self.crosscoder.save_dir = next_version_dir(self.cfg)
        save_dir, k = distributed.broadcast((str(self.crosscoder.save_dir), self.crosscoder.save_version))
        failed = None
        if not distributed.is_main():
            try:
                own = {"buffer": state["buffer"], "step": self.step_counter}
                if self.mesh.latent is not None:
                    own.update({key: state[key] for key in SHARD_STATE})
                atomic_torch_save(own, rank_state_file(save_dir, k, distributed.rank()))
            except OSError as e:
                failed = e
        if distributed.any_rank(failed is not None):  # every rank gives up this checkpoint together
            raise failed or OSError(f"another rank could not write its data state into {save_dir}")

    # ---------------------------------------------------------------- logging
    def log(self, log_dict, pbar=None):
        """Host sync: numbers for the console bar and wandb; also the NaN check."""
        self.check_finite()
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.bad_step.device)
                              for v in log_dict.values()] + [self.dead_fraction()])
        values = distributed.average_([values])[0].tolist()  # the mean over ranks of each metric
        out = dict(zip([*log_dict, "dead_fraction"], values))
        if self.wandb_run is not None:
            self.wandb_run.log(out, step=self.step_counter - 1)
        if pbar is not None:
            pbar.set_postfix(loss=f"{out['loss']:.4g}", l2=f"{out['l2_loss']:.4g}", l0=f"{out['l0_loss']:.1f}",
                             ev=f"{out['explained_variance']:.3f}", dead=f"{out['dead_fraction']:.2f}",
                             lr=f"{out['lr']:.2g}")
        return out

    # ---------------------------------------------------------------- the loop
    def train(self):
        """Train to total_steps. Saves every save_every steps, at the end, and when interrupted
        (Ctrl-C, SIGTERM) or failing; never saves non-finite weights. Raises TrainingInterrupted
        after saving on a signal. Returns the last log dict."""
        self._stop_signal = None
        old_handlers = install_stop_handlers(self._request_stop)
        main = distributed.is_main()
        if main:
            print(f"training steps {self.step_counter}..{self.total_steps} of {self.cfg['batch_size']} tokens"
                  + (f" over {self.world_size} processes" if self.world_size > 1 else "")
                  + "; Ctrl-C or SIGTERM saves a checkpoint and stops", flush=True)
        self.wandb_run = start_run(self.cfg, self.wandb_id) if main else None  # None when disabled
        if self.wandb_run is not None:
            self.wandb_id = self.wandb_run.id
        log, step_log = {}, None
        pbar = tqdm(range(self.step_counter, self.total_steps), initial=self.step_counter, total=self.total_steps,
                    desc="training", disable=not (self.cfg["progress"] and main), dynamic_ncols=True)
        self._mid_step = False  # between steps: the only state a checkpoint may hold
        try:
            for i in pbar:
                self._mid_step = True
                step_log = self.step()
                self._mid_step = False
                if i % self.cfg["log_every"] == 0:
                    log = self.log(step_log, pbar)
                if (i + 1) % self.cfg["save_every"] == 0:
                    self.save()
                if distributed.stop_agreed(self._stop_signal is not None, i):
                    raise TrainingInterrupted(self._stop_signal or signal.SIGTERM, self.step_counter)
            self.check_finite()
        except NonFiniteError:
            raise
        except BaseException as e:
            # Interrupt or failure: keep the work done so far, then re-raise; inside a step the
            # weights, optimizer and buffer disagree, so the last checkpoint stands.
            if self._mid_step:
                print(f"{type(e).__name__} inside step {self.step_counter + 1}: not saving a half-finished step; "
                      f"the last checkpoint is {self._last_good()}", flush=True)
            else:
                self._save_if_new(reason=f"{type(e).__name__}")
            if isinstance(e, TrainingInterrupted):
                e.save_dir = self.crosscoder.save_dir
            raise
        else:
            if step_log is not None and (self.step_counter - 1) % self.cfg["log_every"] != 0:
                log = self.log(step_log, pbar)  # the final numbers, when the last step was not a log step
            self._save_if_new(reason="end of training")
        finally:
            pbar.close()
            restore_handlers(old_handlers)
            finish_run(self.wandb_run)
            self.wandb_run = None
        return log

    def _request_stop(self, signum):
        """SIGINT/SIGTERM: stop after the current step, so the checkpoint is consistent; a second
        Ctrl-C interrupts at once."""
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _save_if_new(self, reason):
        if self.step_counter == self.last_saved_step or self.step_counter == 0:
            return
        try:
            path = self.save()
            if path is not None:
                print(f"checkpoint ({reason}) saved at step {self.step_counter}: {path}")
        except NonFiniteError as e:
            print(f"not saving after {reason}: {e}")
        except OSError as e:
            print(f"could not save a checkpoint after {reason} ({e}); the last good checkpoint is {self._last_good()}",
                  flush=True)
