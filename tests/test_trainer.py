import os
import signal

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import random_tokens, tiny_cfg
from crosscoder import CrossCoder, l1_coeff_at
from crossdiff.io.checkpoint import complete_checkpoints
from trainer import NonFiniteError, Trainer, TrainingInterrupted, lr_multiplier


def test_the_lr_of_every_step_follows_the_schedule_through_trainer_step(tmp_path):
    """Adam runs each step at lr * lr_multiplier(step): constant for 80% of the steps, then the
    linear decay. A frozen lr (or one a step late) fails here."""
    cfg = tiny_cfg(tmp_path, num_tokens=32 * 20, lr=1e-3)
    trainer = Trainer(cfg, buffer=RandomSource(cfg))
    seen, logged = [], []
    step_fn = trainer.optimizer.step

    def record(*a, **kw):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        return step_fn(*a, **kw)

    trainer.optimizer.step = record
    for _ in range(20):
        logged.append(float(trainer.step()["lr"]))
    want = [1e-3 * lr_multiplier(i, 20) for i in range(20)]
    assert want[15] == pytest.approx(1e-3) and want[16] == pytest.approx(1e-3) and want[18] == pytest.approx(5e-4)
    torch.testing.assert_close(torch.tensor(seen), torch.tensor(want))
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(want))


class FixedSource:
    """An activation source that serves the same batch, optionally poisoned at some step."""

    def __init__(self, x, nan_at=None, interrupt_at=None):
        self.x, self.nan_at, self.interrupt_at, self.calls = x, nan_at, interrupt_at, 0

    def next(self):
        self.calls += 1
        if self.calls - 1 == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        if self.calls - 1 == self.nan_at:
            return torch.full_like(self.x, float("nan"))
        return self.x


class RandomSource:
    def __init__(self, cfg, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.shape = (cfg["batch_size"], cfg.get("n_models", 2), cfg["d_in"])

    def next(self):
        return torch.randn(*self.shape, generator=self.g)


def test_one_step_lowers_the_loss_on_a_fixed_batch(tmp_path):
    cfg = tiny_cfg(tmp_path, l1_coeff=0.0)
    x = torch.randn(cfg["batch_size"], 2, cfg["d_in"])
    trainer = Trainer(cfg, buffer=FixedSource(x))
    before = trainer.crosscoder.get_losses(x).l2_loss.item()
    log = trainer.step()
    assert float(log["loss"]) == pytest.approx(before)
    assert trainer.crosscoder.get_losses(x).l2_loss.item() < before


def test_two_steps_equal_the_reference_update_with_plain_adam(tmp_path):
    """Our step (fused Adam, batch-first L1) = the reference's: loss, backward, clip at 1.0,
    single-tensor Adam at the scheduled lr, with the L1 warm-up reaching step 1."""
    cfg = tiny_cfg(tmp_path, num_tokens=32 * 10, l1_coeff=2.0)
    source = RandomSource(cfg, seed=1)
    trainer = Trainer(cfg, buffer=source)
    ref = CrossCoder(cfg)
    ref.load_state_dict(trainer.crosscoder.state_dict())
    opt = torch.optim.Adam(ref.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                           foreach=False, fused=False)
    replay = RandomSource(cfg, seed=1)
    for i in range(2):
        trainer.step()
        x = replay.next()
        acts = torch.relu(torch.einsum("bmd,mdf->bf", x, ref.W_enc) + ref.b_enc)
        x_hat = torch.einsum("bf,fmd->bmd", acts, ref.W_dec) + ref.b_dec
        l2 = (x_hat - x).pow(2).sum((-1, -2)).mean()
        l1 = (acts * ref.W_dec.norm(dim=-1).sum(-1)).sum(-1).mean()
        (l2 + l1_coeff_at(i, 10, 2.0) * l1).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    for name, p in ref.named_parameters():
        assert torch.allclose(getattr(trainer.crosscoder, name), p, atol=1e-6, rtol=1e-5), name


def test_bf16_step_stays_within_one_percent_of_fp32_and_keeps_fp32_weights(tmp_path):
    """step_dtype="bf16" runs the matmuls in bf16 (the losses differ from fp32) but over 30
    steps every logged loss stays within 1% of the fp32 run; weights and Adam state stay fp32."""
    runs = {}
    for dtype in ("fp32", "bf16"):
        cfg = tiny_cfg(tmp_path, num_tokens=32 * 30, l1_coeff=1.0, step_dtype=dtype, d_in=64, dict_size=256)
        trainer = Trainer(cfg, buffer=RandomSource(cfg, seed=2))
        runs[dtype] = [trainer.step() for _ in range(30)], trainer
    for key in ("l2_loss", "l1_loss", "explained_variance"):
        a = torch.stack([log[key] for log in runs["fp32"][0]])
        b = torch.stack([log[key] for log in runs["bf16"][0]])
        assert not torch.equal(a, b), f"{key}: bf16 autocast had no effect"
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-3), key
    trainer = runs["bf16"][1]
    assert all(p.dtype == torch.float32 for p in trainer.crosscoder.parameters())
    assert all(v.dtype == torch.float32 for st in trainer.optimizer.state.values()
               for k, v in st.items() if k != "step")


# Ops that wait for the device: a read to the host (.item(), float(t), `if t`), nonzero and the
# ops built on it, and a tensor literal (torch.tensor(...): a copy from the host on a GPU).
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "lift_fresh")


class RecordOps(TorchDispatchMode):
    """Every op dispatched, and "bool index" for indexing with a boolean mask (its kernel runs a
    nonzero this mode does not see)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "index" in name and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                   for a in args if isinstance(a, (list, tuple)) for i in a):
            name += " bool index"
        self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("architecture,partition", [
    ("l1", {}), ("batchtopk", {}), ("l1", {"exclusive_fraction": 0.125, "shared_fraction": 0.25}),
    ("batchtopk", {"exclusive_fraction": 0.125, "shared_fraction": 0.25})])
def test_a_training_step_makes_no_host_sync(tmp_path, architecture, partition):
    """No op in a (non-log) step of any architecture, partitioned or not, waits for the device:
    none of SYNC_OPS and no boolean-mask indexing (the controls show the detector sees each)."""
    cfg = tiny_cfg(tmp_path, architecture=architecture, k=4, **partition)
    trainer = Trainer(cfg, buffer=RandomSource(cfg))
    trainer.step()  # step 0 also checks the batch's shape
    with RecordOps() as control:
        float(torch.ones(()).sum())
        torch.tensor(1.0)
        torch.ones(3)[torch.tensor([True, False, True])]
    assert [any(s in op for op in control.ops) for s in ("_local_scalar_dense", "lift_fresh", "bool index")] == [True] * 3
    with RecordOps() as rec:
        trainer.step()
    assert len(rec.ops) > 50
    assert [op for op in rec.ops if any(s in op for s in SYNC_OPS + ("bool index",))] == []


def test_step_returns_the_reference_log_keys(tmp_path):
    cfg = tiny_cfg(tmp_path)
    log = Trainer(cfg, buffer=RandomSource(cfg)).step()
    assert set(log) == {"loss", "l2_loss", "l1_loss", "l0_loss", "l1_coeff", "lr",
                        "explained_variance", "explained_variance_A", "explained_variance_B"}


def test_fifty_steps_through_the_real_buffer_lower_l2(tmp_path, models):
    cfg = tiny_cfg(tmp_path, num_tokens=32 * 50, l1_coeff=0.5)
    tokens = random_tokens(600, cfg["seq_len"])
    trainer = Trainer(cfg, models[0], models[1], tokens)
    logs = [trainer.step() for _ in range(50)]
    first = sum(float(l["l2_loss"]) for l in logs[:5]) / 5
    last = sum(float(l["l2_loss"]) for l in logs[-5:]) / 5
    assert last < 0.7 * first
    assert all(torch.isfinite(l["explained_variance"]) for l in logs)
    # the normalisation factors measured by the buffer reach the checkpoint config
    trainer.save()
    loaded = CrossCoder.load(trainer.crosscoder.save_dir)
    assert loaded.cfg["normalisation_factor"] == pytest.approx(trainer.buffer.normalisation_factor.tolist())


def test_source_with_wrong_shape_is_a_clear_error(tmp_path):
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(ValueError, match=r"shape.*expected"):
        Trainer(cfg, buffer=FixedSource(torch.zeros(3, 2, cfg["d_in"]))).step()


def test_dead_fraction_counts_latents_that_never_fire(tmp_path):
    cfg = tiny_cfg(tmp_path, dead_window=3)
    trainer = Trainer(cfg, buffer=RandomSource(cfg))
    with torch.no_grad():
        trainer.crosscoder.b_enc[:16] = -1e4  # these 16 of 64 can never fire
    for _ in range(4):
        trainer.step()
    assert trainer.dead_fraction().item() == pytest.approx(16 / 64)


def test_checkpoint_at_end_with_schedule_finished(tmp_path):
    cfg = tiny_cfg(tmp_path)
    trainer = Trainer(cfg, buffer=RandomSource(cfg))
    trainer.train()
    assert trainer.step_counter == 20
    assert complete_checkpoints(trainer.crosscoder.save_dir) == [0]
    loaded = CrossCoder.load(trainer.crosscoder.save_dir)
    assert torch.equal(loaded.W_dec, trainer.crosscoder.W_dec)


def test_periodic_checkpoints(tmp_path):
    cfg = tiny_cfg(tmp_path, save_every=6)
    trainer = Trainer(cfg, buffer=RandomSource(cfg))
    trainer.train()
    # after steps 6, 12, 18 and at the end (20)
    assert complete_checkpoints(trainer.crosscoder.save_dir) == [0, 1, 2, 3]
    assert [p.name for p in trainer.crosscoder.save_dir.glob("*_trainer.pt")] == ["3_trainer.pt"]


def test_every_checkpoint_config_records_its_training_step(tmp_path):
    """Periodic saves at steps 6, 12, 18, the final one at 20, and an interrupt save at the step
    it happened: each checkpoint's config says which."""
    from crossdiff.io.checkpoint import read_cfg

    cfg = tiny_cfg(tmp_path, save_every=6)
    trainer = Trainer(cfg, buffer=RandomSource(cfg))
    trainer.train()
    assert [read_cfg(trainer.crosscoder.save_dir, k)["step"] for k in range(4)] == [6, 12, 18, 20]
    x = torch.randn(cfg["batch_size"], 2, cfg["d_in"])
    interrupted = Trainer(tiny_cfg(tmp_path), buffer=FixedSource(x, interrupt_at=4))
    with pytest.raises(TrainingInterrupted):
        interrupted.train()
    assert read_cfg(interrupted.crosscoder.save_dir)["step"] == 5


def test_a_keyboard_interrupt_inside_a_step_saves_nothing_and_reraises(tmp_path):
    """The interrupt lands inside step 8 (its batch is being read): weights, optimizer and buffer
    disagree there, so no checkpoint is written (none existed: save_every is larger)."""
    cfg = tiny_cfg(tmp_path)

    class Exploding(RandomSource):
        def next(self):
            self.n = getattr(self, "n", 0) + 1
            if self.n == 8:
                raise KeyboardInterrupt
            return super().next()

    trainer = Trainer(cfg, buffer=Exploding(cfg))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.crosscoder.save_dir is None and not (tmp_path / "checkpoints").exists()
    assert trainer.step_counter == 7


def test_sigint_stops_after_the_step_saves_and_raises(tmp_path):
    cfg = tiny_cfg(tmp_path)
    x = torch.randn(cfg["batch_size"], 2, cfg["d_in"])
    trainer = Trainer(cfg, buffer=FixedSource(x, interrupt_at=5))
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    if before[0] == signal.SIG_IGN:  # under nohup or some CI runners: the interrupt would never arrive
        signal.signal(signal.SIGINT, signal.default_int_handler)
        before = signal.default_int_handler, before[1]
    try:
        with pytest.raises(TrainingInterrupted, match="SIGINT") as info:
            trainer.train()
        # the handlers in place before train() are back, whatever they were
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    finally:
        signal.signal(signal.SIGINT, before[0])
    assert trainer.step_counter == 6 and info.value.save_dir == trainer.crosscoder.save_dir
    assert complete_checkpoints(trainer.crosscoder.save_dir) == [0]


def test_nan_loss_stops_training_and_never_saves_nan_weights(tmp_path):
    cfg = tiny_cfg(tmp_path, save_every=4, log_every=5)
    x = torch.randn(cfg["batch_size"], 2, cfg["d_in"])
    trainer = Trainer(cfg, buffer=FixedSource(x, nan_at=6))
    with pytest.raises(NonFiniteError, match=r"step 6.*activations") as info:
        trainer.train()
    assert "step 4" in str(info.value)  # names the last good checkpoint
    version_dir = trainer.crosscoder.save_dir
    assert complete_checkpoints(version_dir) == [0]
    assert all(torch.isfinite(p).all() for p in CrossCoder.load(version_dir).parameters())


def run_straight_and_resumed(tmp_path, models, tokens, n_steps, **kw):
    cfg = tiny_cfg(tmp_path / "straight", num_tokens=32 * n_steps, **kw)
    straight = Trainer(cfg, models[0], models[1], tokens)
    straight.train()

    cfg2 = tiny_cfg(tmp_path / "resumed", num_tokens=32 * n_steps, **kw)
    first = Trainer(cfg2, models=list(models), tokens=tokens)  # the keyword form equals the reference's

    real_next = first.buffer.next
    calls = {"n": 0}

    def next_then_interrupt():
        calls["n"] += 1
        if calls["n"] == n_steps // 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_next()

    first.buffer.next = next_then_interrupt
    with pytest.raises(TrainingInterrupted, match="SIGTERM"):
        first.train()
    assert first.step_counter == n_steps // 2
    second = Trainer.resume(first.crosscoder.save_dir, dict(cfg2), models=list(models), tokens=tokens)
    assert second.step_counter == n_steps // 2
    second.train()
    return straight, second


@pytest.mark.parametrize("partition", [{}, {"exclusive_fraction": 0.125, "shared_fraction": 0.125}])
def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, models, partition):
    """N steps straight == N/2 steps, interrupt, resume, N/2 steps (buffer refreshes included);
    also for a partitioned dictionary."""
    tokens = random_tokens(600, 9)
    straight, resumed = run_straight_and_resumed(tmp_path, models, tokens, n_steps=24, **partition)
    assert resumed.crosscoder.partition == straight.crosscoder.partition
    assert resumed.buffer.token_pointer == straight.buffer.token_pointer
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.allclose(getattr(resumed.crosscoder, name), getattr(straight.crosscoder, name), atol=1e-6)
    # the resumed run kept writing into the same version directory
    assert complete_checkpoints(resumed.crosscoder.save_dir) == [0, 1]


def test_resume_without_saved_buffer_reads_on_from_the_token_pointer(tmp_path, models):
    tokens = random_tokens(600, 9)
    straight, resumed = run_straight_and_resumed(tmp_path, models, tokens, n_steps=24, checkpoint_buffer=False)
    assert resumed.step_counter == 24
    assert resumed.buffer.token_pointer > straight.buffer.token_pointer  # fresh fill, no data reused


def test_wandb_offline_writes_a_run_under_the_checkpoint_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tiny_cfg(tmp_path, wandb_mode="offline")
    trainer = Trainer(cfg, buffer=RandomSource(cfg))
    trainer.train()
    runs = list((tmp_path / "checkpoints" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1


@pytest.mark.parametrize("form", ["positional", "buffer"])
def test_the_references_own_config_and_call_forms_train(tmp_path, monkeypatch, models, form):
    """Trainer(cfg, model_A, model_B, all_tokens) and Trainer(cfg, buffer=source) with exactly the
    reference's keys: they train to the end and save under checkpoints/ (here a temporary root),
    and the weights equal those of the same run on the config completed from config.DEFAULTS."""
    from conftest import reference_cfg
    from crossdiff.config.schema import complete_cfg
    from crossdiff.io import checkpoint
    from tools.planted import PlantedFeatureSource

    monkeypatch.setattr(checkpoint, "DEFAULT_CHECKPOINT_DIR", tmp_path / "checkpoints")
    tokens = random_tokens(200, 9)
    runs = []
    for cfg in (reference_cfg(), complete_cfg(reference_cfg(), validate=False)):
        if form == "positional":
            trainer = Trainer(cfg, models[0], models[1], tokens)
        else:
            trainer = Trainer(cfg, buffer=PlantedFeatureSource(cfg, n_shared=8, n_base_only=4, n_chat_only=4))
        trainer.train()
        runs.append(trainer)
    assert runs[0].step_counter == 6 and complete_checkpoints(runs[0].crosscoder.save_dir) == [0]
    torch.testing.assert_close(runs[0].crosscoder.W_dec, runs[1].crosscoder.W_dec)


def test_batchtopk_counts_latents_dead_within_a_short_run_by_default(tmp_path):
    """dead_tokens at its default follows the run: min(10M, num_tokens // 10) tokens. A latent that
    never fires in a 100-step run of 32 tokens a step counts dead after 320 tokens (10 steps), so
    AuxK acts on it; at the authors' fixed 10M tokens it would never count dead in such a run."""
    from crossdiff.config.schema import effective
    from tools.planted import PlantedFeatureSource

    cfg = tiny_cfg(tmp_path, architecture="batchtopk", k=2, num_tokens=32 * 100, threshold_start_step=10)
    assert cfg["dead_tokens"] is None and effective(cfg, "dead_tokens") == 320
    assert effective(dict(cfg, num_tokens=4 * 10**9), "dead_tokens") == 10_000_000
    trainer = Trainer(cfg, buffer=PlantedFeatureSource(cfg, n_shared=8, n_base_only=4, n_chat_only=4))
    assert trainer.crosscoder.dead_window(trainer.step_counter) == 10
    with torch.no_grad():
        trainer.crosscoder.b_enc[0] = -1e3  # latent 0 can never fire
    aux = [float(trainer.step()["aux_loss"]) for _ in range(12)]
    assert trainer.steps_since_fired[0] == 12
    # dead once 10 batches have passed without it firing, this one counted (the authors' counter
    # is reset or advanced before AuxK): from the tenth step (index 9) on, AuxK acts
    assert aux[:9] == [0.0] * 9 and all(a > 0 for a in aux[9:])


# ---------------------------------------------------------------- test_objective.py
def test_lr_schedule_at_start_5pct_80pct_and_end():
    total = 1000
    assert lr_multiplier(0, total) == 1.0
    assert lr_multiplier(50, total) == 1.0
    assert lr_multiplier(799, total) == 1.0
    assert lr_multiplier(800, total) == pytest.approx(1.0)
    assert lr_multiplier(900, total) == pytest.approx(0.5)
    assert lr_multiplier(1000, total) == pytest.approx(0.0)


def test_l1_warmup_at_start_5pct_80pct_and_end():
    total = 1000
    assert l1_coeff_at(0, total, 2.0) == 0.0
    assert l1_coeff_at(25, total, 2.0) == pytest.approx(1.0)
    assert l1_coeff_at(50, total, 2.0) == 2.0
    assert l1_coeff_at(800, total, 2.0) == 2.0
    assert l1_coeff_at(999, total, 2.0) == 2.0


def test_a_tf32_step_runs_forward_and_backward_at_high_matmul_precision_and_restores_it(tmp_path):
    """step_dtype tf32: torch's float32 matmul precision is "high" (TF32 on CUDA) through the
    forward and the backward, and as before after the step; on a CPU, which has no TF32, the step
    equals the fp32 step."""
    seen = []
    x = torch.randn(32, 2, 32, generator=torch.Generator().manual_seed(0))
    runs = {}
    for dtype in ("fp32", "tf32"):
        trainer = Trainer(tiny_cfg(tmp_path / dtype, step_dtype=dtype), buffer=type("F", (), {"next": lambda s: x})())
        real = trainer.crosscoder.training_loss

        def spy(*args, real=real):
            seen.append(torch.get_float32_matmul_precision())
            return real(*args)

        trainer.crosscoder.training_loss = spy
        trainer.step()
        runs[dtype] = trainer.crosscoder
    assert seen == ["highest", "high"] and torch.get_float32_matmul_precision() == "highest"
    torch.testing.assert_close(runs["tf32"].W_dec, runs["fp32"].W_dec, atol=0, rtol=0)


@pytest.mark.parametrize("architecture", ["l1", "batchtopk"])
def test_a_centred_b_enc_starts_every_pre_activation_at_the_first_batchs_median(tmp_path, architecture):
    """b_enc_init centred: before the first update b_enc = -<m, W_enc> (m the first batch's
    geometric median, computed here independently), so a token at the median has pre-activation
    0 for every latent. On data sharing a large common direction (as Gemma-3's residual) every
    latent then fires on some token of the batch; with b_enc at zero the latents facing away from
    that direction fire on none."""
    from trainer import geometric_median

    torch.manual_seed(0)
    common_D = torch.randn(32)
    batch = 3 * torch.randn(64, 2, 32) + 10 * common_D / common_D.norm() * 32 ** 0.5

    class Source:
        def next(self):
            return batch

    fired = {}
    for init in ("zeros", "centred"):
        cfg = tiny_cfg(tmp_path / init, architecture=architecture, k=4, num_tokens=64 * 4, batch_size=64,
                       threshold_start_step=1, b_enc_init=init)
        trainer = Trainer(cfg, buffer=Source())
        cc, seen = trainer.crosscoder, {}
        orig = cc.losses_and_acts

        def spy(x, *a, cc=cc, seen=seen, orig=orig, **kw):
            seen.setdefault("b_enc", cc.b_enc.detach().clone())
            seen.setdefault("pre", cc.encode(x, apply_relu=False).detach())
            return orig(x, *a, **kw)

        cc.losses_and_acts = spy
        W_enc_before = cc.W_enc.detach().clone()
        trainer.step()
        median = geometric_median(batch)
        want = -sum(median[m] @ W_enc_before[m] for m in range(2)) if init == "centred" else torch.zeros(64)
        torch.testing.assert_close(seen["b_enc"], want)
        fired[init] = float((seen["pre"] > 0).any(0).float().mean())
    assert fired["centred"] == 1.0 and fired["zeros"] < 0.75, fired
