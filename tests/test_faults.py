"""The fault suite: kills, interrupts, bad config, bad data, bad files, numerics, disk."""
import errno
import math
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO, run_script, tiny_cfg
from crosscoder import CrossCoder
from crossdiff.config.schema import SCHEMA, ConfigError, validate_cfg
from crossdiff.io.checkpoint import CheckpointError, complete_checkpoints, latest_checkpoint
from train import default_cfg
from trainer import NonFiniteError, Trainer

TOY_ARGS = ["--preset", "toy", "--wandb_mode", "disabled", "--progress", "false"]
SHORT = ["--num_tokens", "150000", "--save_every", "20"]


def start_train(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(version_dir, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if version_dir.is_dir() and complete_checkpoints(version_dir):
            return
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def final_weights(version_dir):
    return CrossCoder.load(version_dir).state_dict()


# ------------------------------------------------------------------ kills and interrupts
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(toy_run, tmp_path):
    _, _, data = toy_run
    straight = run_script("train.py", *TOY_ARGS, *SHORT, "--data_dir", str(data), "--checkpoint_dir", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    expected = final_weights(tmp_path / "a" / "version_0")

    version_dir = tmp_path / "b" / "version_0"
    rng = random.Random(0)
    proc = start_train(*TOY_ARGS, *SHORT, "--data_dir", str(data), "--checkpoint_dir", str(tmp_path / "b"))
    for kill in range(2):  # each resume starts a process (seconds of imports): two kills
        wait_for_checkpoint(version_dir, proc)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        CrossCoder.load(version_dir)  # the newest complete checkpoint always loads
        proc = start_train("--resume", str(version_dir))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    got = final_weights(version_dir)
    for name, want in expected.items():
        assert torch.allclose(got[name], want, atol=1e-5), name


def _slow_save_then_block(root, ready):
    cc = CrossCoder(tiny_cfg(checkpoint_dir=str(root)))
    cc.save()
    real_save = torch.save

    def slow(obj, f):
        real_save(obj, f)
        f.flush()
        ready.set()
        time.sleep(60)  # killed here, in the middle of writing checkpoint 1

    torch.save = slow
    cc.save()


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_slow_save_then_block, args=(tmp_path, ready))
    child.start()
    assert ready.wait(60)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    version_dir = tmp_path / "version_0"
    assert latest_checkpoint(version_dir) == 0
    CrossCoder.load(version_dir)
    # the next save cleans the partial file and reuses nothing of it
    cc = CrossCoder.load(version_dir)
    cc.save()
    assert not [p for p in version_dir.iterdir() if p.name.endswith(".tmp")]
    assert complete_checkpoints(version_dir) == [0, 1]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_saves_and_exits_non_zero_with_a_message(toy_run, tmp_path, sig, code):
    _, _, data = toy_run
    proc = start_train(*TOY_ARGS, "--save_every", "100000", "--num_tokens", "3000000",
                       "--data_dir", str(data), "--checkpoint_dir", str(tmp_path))
    for line in proc.stdout:  # wait until the training loop has started
        if line.startswith("training"):
            break
    time.sleep(1.0)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "training interrupted" in err and "--resume" in err and "Traceback" not in err
    assert complete_checkpoints(tmp_path / "version_0")


# ------------------------------------------------------------------ bad config
_WRONG = {int: st.one_of(st.text(max_size=5), st.floats(allow_nan=False).filter(lambda v: not v.is_integer()), st.booleans()),
          float: st.one_of(st.text(max_size=5), st.booleans(), st.none()),
          str: st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans()),
          bool: st.one_of(st.integers(), st.text(max_size=5)),
          list: st.one_of(st.integers(), st.text(max_size=5)),
          "ints": st.one_of(st.integers(), st.text(max_size=5), st.lists(st.text(max_size=3), min_size=1), st.just([True])),
          "str?": st.one_of(st.integers(), st.booleans(), st.floats(allow_nan=False)),
          "int?": st.one_of(st.text(max_size=5), st.booleans(), st.floats(allow_nan=False).filter(lambda v: not v.is_integer()))}


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_every_key_with_a_wrong_type_is_an_error_naming_it(data):
    key = data.draw(st.sampled_from(sorted(SCHEMA)))
    value = data.draw(_WRONG[SCHEMA[key].kind])
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate_cfg(dict(default_cfg, **{key: value}))


_SIZES = [k for k, spec in SCHEMA.items() if spec.kind is int and spec.need == "a positive number"]


@settings(max_examples=100, deadline=None)
@given(key=st.sampled_from(_SIZES), value=st.integers(max_value=0))
def test_zero_or_negative_sizes_are_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate_cfg(dict(default_cfg, **{key: value}))


@given(key=st.sampled_from(["lr", "l1_coeff", "beta1", "dec_init_norm", "aux_coeff"]),
       value=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_non_finite_numbers_are_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate_cfg(dict(default_cfg, **{key: value}))


def test_a_buffer_that_cannot_fit_in_memory_fails_before_any_model_loads():
    out = run_script("train.py", "--preset", "toy", "--buffer_mult", "100000000", timeout=120)
    assert out.returncode != 0
    assert "buffer_mult" in out.stderr and "memory" in out.stderr and "Traceback" not in out.stderr
    assert "building the toy model pair" not in out.stdout


def test_resume_from_a_directory_without_checkpoints_is_a_clear_error(tmp_path):
    (tmp_path / "version_0").mkdir()
    out = run_script("train.py", "--resume", str(tmp_path / "version_0"), timeout=120)
    assert out.returncode != 0 and "no complete checkpoint" in out.stderr and "Traceback" not in out.stderr
    out = run_script("train.py", "--resume", str(tmp_path / "nowhere"), timeout=120)
    assert out.returncode != 0 and "not found" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------ bad files
class Source:
    def __init__(self, cfg, scale=1.0):
        self.g, self.cfg, self.scale = torch.Generator().manual_seed(0), cfg, scale

    def next(self):
        return self.scale * torch.randn(self.cfg["batch_size"], 2, self.cfg["d_in"], generator=self.g)


def test_a_corrupted_trainer_state_is_named_on_resume(tmp_path):
    cfg = tiny_cfg(tmp_path)
    trainer = Trainer(cfg, buffer=Source(cfg))
    trainer.step()
    trainer.save()
    state = trainer.crosscoder.save_dir / "0_trainer.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="0_trainer.pt"):
        Trainer(tiny_cfg(tmp_path), buffer=Source(cfg), resume_from=trainer.crosscoder.save_dir)


# ------------------------------------------------------------------ numerics
def test_an_overflowing_loss_stops_and_names_the_step_and_source(tmp_path):
    cfg = tiny_cfg(tmp_path, log_every=3)
    trainer = Trainer(cfg, buffer=Source(cfg, scale=1e30))
    with pytest.raises(NonFiniteError, match=r"step 0.*loss"):
        trainer.train()
    assert trainer.crosscoder.save_dir is None  # nothing was saved


def test_non_finite_gradients_stop_and_name_the_step_and_source(tmp_path):
    cfg = tiny_cfg(tmp_path, log_every=4)
    trainer = Trainer(cfg, buffer=Source(cfg))
    for _ in range(2):
        trainer.step()
    trainer.save()
    trainer.crosscoder.W_dec.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteError, match=r"step 2.*gradients.*step 2\)"):
        trainer.train()
    assert complete_checkpoints(trainer.crosscoder.save_dir) == [0]


# ------------------------------------------------------------------ disk
def test_a_failed_checkpoint_write_is_reported_and_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    cfg = tiny_cfg(tmp_path, save_every=5)
    trainer = Trainer(cfg, buffer=Source(cfg))
    calls = {"n": 0}
    real_replace = os.replace

    def failing_replace(src, dst):
        calls["n"] += 1
        if calls["n"] > 4:  # the first checkpoint (weights, trainer state, their sha256, config) succeeds
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    assert "could not save" in capsys.readouterr().out
    version_dir = trainer.crosscoder.save_dir
    assert complete_checkpoints(version_dir) == [0]
    assert not [p for p in version_dir.iterdir() if p.name.endswith(".tmp")]
    CrossCoder.load(version_dir)


class SignalsInsideAStep:
    """A batch source that, at step `at`, delivers two SIGINTs to this process while the step is
    under way (the second raises KeyboardInterrupt inside the step, as a double Ctrl-C does)."""

    def __init__(self, cfg, at):
        self.cfg, self.at, self.served = cfg, at, 0
        self.gen = torch.Generator().manual_seed(0)

    def next(self):
        if self.served == self.at:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        self.served += 1
        return torch.randn(self.cfg["batch_size"], 2, self.cfg["d_in"], generator=self.gen)


def test_a_double_ctrl_c_inside_a_step_saves_no_half_finished_step(tmp_path, capsys):
    """Only a state at a step boundary is ever saved: a second Ctrl-C that lands inside a step
    stops at once without a checkpoint of that step; the last checkpoint (step 4, from
    save_every) stays the newest, and the run says it saved nothing."""
    cfg = tiny_cfg(tmp_path, num_tokens=32 * 20, save_every=4)
    trainer = Trainer(cfg, buffer=SignalsInsideAStep(cfg, at=6))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    version_dir = trainer.crosscoder.save_dir
    assert complete_checkpoints(version_dir) == [0]
    assert CrossCoder.load(version_dir).cfg["step"] == 4
    assert "inside step 7" in capsys.readouterr().out
