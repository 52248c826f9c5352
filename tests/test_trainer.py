import os
import signal

import pytest
import torch

from conftest import random_tokens, tiny_cfg
from crosscoder import CrossCoder, complete_checkpoints
from trainer import NonFiniteError, Trainer, TrainingInterrupted, l1_coeff_at, lr_multiplier


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


def test_keyboard_interrupt_saves_then_reraises(tmp_path):
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
    assert complete_checkpoints(trainer.crosscoder.save_dir) == [0]
    assert trainer.step_counter == 7


def test_sigint_stops_after_the_step_saves_and_raises(tmp_path):
    cfg = tiny_cfg(tmp_path)
    x = torch.randn(cfg["batch_size"], 2, cfg["d_in"])
    trainer = Trainer(cfg, buffer=FixedSource(x, interrupt_at=5))
    with pytest.raises(TrainingInterrupted, match="SIGINT") as info:
        trainer.train()
    assert trainer.step_counter == 6 and info.value.save_dir == trainer.crosscoder.save_dir
    assert complete_checkpoints(trainer.crosscoder.save_dir) == [0]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


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
    first = Trainer(cfg2, models[0], models[1], tokens)

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
    second = Trainer(dict(cfg2), models[0], models[1], tokens, resume_from=first.crosscoder.save_dir)
    assert second.step_counter == n_steps // 2
    second.train()
    return straight, second


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, models):
    """N steps straight == N/2 steps, interrupt, resume, N/2 steps (buffer refreshes included)."""
    tokens = random_tokens(600, 9)
    straight, resumed = run_straight_and_resumed(tmp_path, models, tokens, n_steps=24)
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


def test_too_few_tokens_is_an_error_before_training(tmp_path, models):
    from buffer import TokensExhausted

    cfg = tiny_cfg(tmp_path, num_tokens=32 * 1000)
    with pytest.raises(TokensExhausted, match="needs"):
        Trainer(cfg, models[0], models[1], random_tokens(100, 9))


def test_wandb_offline_writes_a_run_under_the_checkpoint_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tiny_cfg(tmp_path, wandb_mode="offline")
    trainer = Trainer(cfg, buffer=RandomSource(cfg))
    trainer.train()
    runs = list((tmp_path / "checkpoints" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
