import json

import pytest
import torch

from conftest import random_tokens, tiny_cfg, tiny_model
from crosscoder import CrossCoder
from crossdiff.config.cli import parse_sweep
from crossdiff.config.schema import ConfigError, expand
from sweep import Sweep
from trainer import Trainer


def test_the_grid_is_every_combination_with_each_value_parsed_to_its_type():
    axes = parse_sweep(["l1_coeff=1,2", "dict_size=16384,32768"])
    assert axes == {"l1_coeff": [1.0, 2.0], "dict_size": [16384, 32768]}
    assert parse_sweep(["l1_coeff=1,2 dict_size=16384,32768"]) == axes  # one quoted word
    grid = expand({"lr": 0.1}, axes)
    assert [(c["l1_coeff"], c["dict_size"]) for c in grid] == [(1.0, 16384), (1.0, 32768), (2.0, 16384), (2.0, 32768)]
    assert grid[1]["sweep"] == {"l1_coeff": 1.0, "dict_size": 32768} and grid[1]["lr"] == 0.1
    assert [c["architecture"] for c in expand({}, parse_sweep(["architecture=l1,batchtopk", "k=32"]))] == ["l1", "batchtopk"]


def stop_after(run, n_draws):
    """Make the sweep stop, as its SIGTERM handler would, after its n_draws-th batch."""
    import signal

    draw, calls = run.source.next, []

    def next_then_stop():
        calls.append(1)
        if len(calls) == n_draws:
            run._stop = signal.SIGTERM
        return draw()

    run.source.next = next_then_stop


def assert_same_weights(a, b, tol=1e-5):
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=tol, atol=tol)


@pytest.mark.parametrize("key, values", [("l1_coeff", [1.0, 3.0]), ("exclusive_fraction", [0.0, 0.125])])
def test_a_sweep_member_equals_the_same_config_trained_alone(tmp_path, key, values):
    """Two L1 crosscoders (l1_coeff 1 and 3; or standard and partitioned) on one real buffer over
    tiny models: the second member's weights equal a run of that config alone (its own buffer,
    same seed) to 1e-5, and its checkpoints sit in the sweep's version_1 with the sweep's values
    in its config (a partitioned member's loading with its partition)."""
    from crosscoder import CrossCoder

    models, tokens = [tiny_model(1), tiny_model(2)], random_tokens(300, 9)
    cfg = tiny_cfg(tmp_path / "sweep", num_tokens=32 * 12)
    run = Sweep(cfg, {key: values}, models=models, tokens=tokens)
    run.train()
    alone = Trainer(tiny_cfg(tmp_path / "alone", num_tokens=32 * 12, **{key: values[1]}), models=models, tokens=tokens)
    alone.train()
    assert_same_weights(run.trainers[1].crosscoder, alone.crosscoder)
    assert not torch.allclose(run.trainers[0].crosscoder.W_dec, alone.crosscoder.W_dec)  # the other member differs
    member = run.sweep_dir / "version_1"
    saved = json.loads((member / "0_cfg.json").read_text())
    assert saved["sweep"] == {key: values[1]} and saved["sweep_id"] == run.sweep_dir.name and saved["step"] == 12
    assert CrossCoder.load(member).partition.exclusive == (8 if key == "exclusive_fraction" else 0)
    manifest = json.loads((run.sweep_dir / "sweep.json").read_text())
    assert [m["dir"] for m in manifest["members"]] == ["version_0", "version_1"]


def test_a_member_that_diverges_stops_alone_and_the_others_finish(tmp_path):
    """lr 1e30 overflows one member within a few steps: it is reported and never saved with
    non-finite weights; the lr 1e-3 member trains to the end as it would alone."""
    models, tokens = [tiny_model(1), tiny_model(2)], random_tokens(300, 9)
    cfg = tiny_cfg(tmp_path, num_tokens=32 * 12, log_every=2)
    run = Sweep(cfg, {"lr": [1e-3, 1e30]}, models=models, tokens=tokens)
    logs = run.train()
    assert list(run.failed) == [1] and "non-finite" in run.failed[1]
    assert run.trainers[0].step_counter == 12 and torch.isfinite(torch.tensor(logs[0]["loss"]))
    bad = run.sweep_dir / "version_1"
    assert not list(bad.glob("*_cfg.json"))  # nothing saved: the first save would have been at the end
    alone = Trainer(tiny_cfg(tmp_path / "alone", num_tokens=32 * 12, log_every=2), models=models, tokens=tokens)
    alone.train()
    torch.testing.assert_close(run.trainers[0].crosscoder.W_dec, alone.crosscoder.W_dec, rtol=1e-5, atol=1e-5)


def test_an_interrupted_sweep_resumes_every_member_exactly(tmp_path):
    """24 steps straight equals 12 steps, a SIGTERM (every member saved), and Sweep.resume on the
    sweep's directory for 12 more, for both members, on real buffers (refilled on the way)."""
    from trainer import TrainingInterrupted

    models, tokens = [tiny_model(1), tiny_model(2)], random_tokens(300, 9)
    axes = {"l1_coeff": [1.0, 3.0]}
    straight = Sweep(tiny_cfg(tmp_path / "straight", num_tokens=32 * 24), axes, models=models, tokens=tokens)
    straight.train()
    run = Sweep(tiny_cfg(tmp_path / "stopped", num_tokens=32 * 24), axes, models=models, tokens=tokens)
    stop_after(run, 12)
    with pytest.raises(TrainingInterrupted):
        run.train()
    resumed = Sweep.resume(run.sweep_dir, models=models, tokens=tokens)
    assert [t.step_counter for t in resumed.trainers] == [12, 12]
    resumed.train()
    for a, b in zip(straight.trainers, resumed.trainers):
        assert_same_weights(a.crosscoder, b.crosscoder, tol=0)


def test_when_the_member_owning_the_buffer_diverges_the_others_resume_where_the_data_left_off(tmp_path):
    """Member 0 (which owns the shared buffer's saved state) diverges; the sweep is stopped at step
    12 and resumed: the surviving member continues the data from where it was, not from sequence 0,
    so it ends equal to its config trained alone for the 24 steps. A member's own directory
    without the data state is refused for a lone resume, instead of re-reading the tokens."""
    from crossdiff.io.checkpoint import CheckpointError
    from trainer import TrainingInterrupted

    models, tokens = [tiny_model(1), tiny_model(2)], random_tokens(300, 9)
    run = Sweep(tiny_cfg(tmp_path / "sweep", num_tokens=32 * 24, log_every=2), {"lr": [1e30, 1e-3]},
                models=models, tokens=tokens)
    stop_after(run, 12)
    with pytest.raises(TrainingInterrupted):
        run.train()
    assert list(run.failed) == [0]
    resumed = Sweep.resume(run.sweep_dir, models=models, tokens=tokens)
    assert [t.cfg["lr"] for t in resumed.trainers] == [1e-3] and resumed.trainers[0].step_counter == 12
    resumed.train()
    alone = Trainer(tiny_cfg(tmp_path / "alone", num_tokens=32 * 24, log_every=2), models=models, tokens=tokens)
    alone.train()
    assert_same_weights(resumed.trainers[0].crosscoder, alone.crosscoder)
    other = Sweep(tiny_cfg(tmp_path / "other", num_tokens=32 * 12), {"lr": [1e-3, 2e-3]}, models=models, tokens=tokens)
    other.train()  # member 1 never owned the buffer: its checkpoint holds no data state
    with pytest.raises(CheckpointError, match="no data state"):
        Trainer.resume(other.sweep_dir / "version_1", other.trainers[1].cfg, models=models, tokens=tokens)


def test_a_sweep_that_does_not_fit_names_the_members_to_drop():
    """Held memory adds up over members, step temporaries do not: with room for exactly the two
    small members and the largest step among them, the big member is the one named."""
    from sweep import check_sweep_fits, member_bytes

    cfgs = expand(tiny_cfg(d_in=64, batch_size=256), parse_sweep(["dict_size=1024,1024,8192"]))
    small, big = member_bytes(cfgs[0]), member_bytes(cfgs[2])
    assert big[0] == pytest.approx(8 * small[0], rel=0.01)  # held memory scales with the dictionary
    fits = 2 * small[0] + small[1]
    assert check_sweep_fits(cfgs[:2], fits) == fits
    with pytest.raises(ConfigError, match=r"drop dict_size=8192 \("):
        check_sweep_fits(cfgs, fits)
    with pytest.raises(ConfigError, match="drop dict_size=8192 .*; dict_size=1024"):
        check_sweep_fits(cfgs, small[0] + small[1])


def test_train_py_reads_the_sweep_validates_every_member_and_refuses_it_with_resume():
    from train import build_cfg

    cfg, extras = build_cfg(["--preset", "toy", "--sweep", "architecture=l1,batchtopk", "k=32", "--lr", "0.01"])
    assert extras["sweep"] == {"architecture": ["l1", "batchtopk"], "k": [32]} and cfg["lr"] == 0.01
    with pytest.raises(ConfigError, match="cannot vary 'batch_size'"):
        build_cfg(["--sweep", "batch_size=1,2"])
    with pytest.raises(ConfigError, match="threshold_start_step"):  # a member's own validation
        build_cfg(["--preset", "toy", "--num_tokens", "51200", "--sweep", "architecture=l1,batchtopk"])
    with pytest.raises(ConfigError, match="resumes from its directory alone"):
        build_cfg(["--resume", "checkpoints/sweep_0", "--sweep", "lr=1,2"])
    # the diff-SAE scales the activations by their difference, a crosscoder per model: one buffer cannot serve both
    with pytest.raises(ConfigError, match="scale the activations difference and per_model .* share one buffer"):
        build_cfg(["--preset", "toy", "--sweep", "architecture=batchtopk,diff_sae"])
    build_cfg(["--preset", "toy", "--sweep", "k=8,16", "--architecture", "diff_sae"])  # diff-SAEs among themselves


def test_members_are_placed_round_robin_and_each_device_is_checked_on_its_own():
    """Three members over two devices: 0 and 2 on "a", 1 on "b". Each device holds only its
    members, so a sweep too large for one device fits on two; each member reads its batch on its
    own device."""
    from sweep import SharedBatches, check_sweep_fits, member_bytes, place

    cfgs = place(expand(tiny_cfg(d_in=64, batch_size=256), parse_sweep(["l1_coeff=1,2,3"])), ["a", "b"])
    assert [c["device"] for c in cfgs] == ["a", "b", "a"]
    held, step = member_bytes(cfgs[0])
    with pytest.raises(ConfigError, match="drop"):
        check_sweep_fits(cfgs, 2 * held + step)  # one device: three members do not fit
    assert check_sweep_fits(cfgs, {"a": 2 * held + step, "b": held + step}) == 2 * held + step
    with pytest.raises(ConfigError, match="drop l1_coeff=1.0"):
        check_sweep_fits(cfgs, {"a": held + step, "b": held + step})
    shared = SharedBatches(source=None, device="meta")
    shared.batch = torch.ones(2, 2, 4)
    assert shared.next().device.type == "meta"


def test_sweep_devices_need_a_sweep():
    from train import build_cfg

    with pytest.raises(ConfigError, match="needs --sweep"):
        build_cfg(["--sweep_devices", "cuda:0,cuda:1"])
    _, extras = build_cfg(["--sweep", "lr=1,2", "--sweep_devices", "cuda:0,cuda:1"])
    assert extras["sweep_devices"] == ["cuda:0", "cuda:1"]


def test_sweep_devices_are_refused_under_torchrun(monkeypatch):
    """Under torchrun every process holds every member on its own device: --sweep_devices is a
    config error, raised before anything loads."""
    from train import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="drop --sweep_devices"):
        main(tiny_cfg(), sweep={"lr": [1.0, 2.0]}, sweep_devices=["cuda:0", "cuda:1"])


def test_a_member_split_over_latents_holds_its_share_and_steps_on_its_latent_groups_rows():
    """member_bytes over processes: with the dictionary in 2 shards a process holds half the
    latents' weights, gradients and Adam moments (fp32, 4 copies); its step is the one
    memory_per_rank gives for the latent group's rows (4 processes = 2 groups of 2)."""
    from crossdiff.scale.costs import memory_per_rank
    from sweep import member_bytes

    cfg = tiny_cfg(d_in=64, dict_size=1024, batch_size=256, latent_shards=2)
    held, step = member_bytes(cfg, n_processes=4)
    assert held == 16 * (2 * 2 * 64 * 512 + 512 + 2 * 64)
    assert held + step == memory_per_rank(64, 1024, CrossCoder.STEP_PHASES, 2, 128, 2)
    assert member_bytes(dict(cfg, latent_shards=1), 1)[0] > 1.9 * held


@pytest.mark.parametrize("latent_shards", [1, 2])
def test_a_two_process_sweep_stopped_on_one_rank_resumes_and_its_member_equals_the_lone_run(latent_shards, two_rank_runs):
    """A sweep (l1_coeff 3 and the default) under torchrun, 2 ranks on real buffers over tiny
    models, data parallel or with every member's dictionary split in 2: SIGTERM to rank 1 alone
    after 12 steps stops both ranks at the same step (the next stop check, 20) with every member
    saved; Sweep.resume on 2 ranks runs to 24, and the default member then equals the same config
    trained alone on 2 ranks (its own buffers, same seed) to 1e-5, while the other differs."""
    root, runs, resumes = two_rank_runs  # the resume is a second launch (conftest.py)
    assert "fresh buffers" not in runs + resumes
    for r in (0, 1):
        stopped, resumed, alone = (torch.load(root / f"{m}@{latent_shards}.rank{r}", weights_only=True)
                                   for m in ("sweep_signal", "sweep_resume", "straight"))
        assert stopped["stopped"] == 20 and stopped["steps"] == [20, 20]
        assert resumed["steps"] == [24, 24] and alone["step"] == 24
        for name, want in alone["weights"].items():
            torch.testing.assert_close(resumed["weights"][1][name], want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(resumed["weights"][0]["W_dec"], alone["weights"]["W_dec"])


def test_a_sweep_over_models_of_different_tokenizers_and_widths_equals_its_member_alone(tmp_path):
    """Aligned rows (a word and a character tokenizer, widths 32 and 24): the second member of an
    l1_coeff sweep on one buffer equals that config trained alone, and its padding stays 0."""
    from test_aligned import HOOKS, crosscoder_for

    _, models, rows = crosscoder_for(tmp_path)
    shape = dict(d_in=32, model_widths=[32, 24], pad_widths=True, seq_len=24, hook_point=HOOKS[0], hook_points=HOOKS,
                 dict_size=64, batch_size=16, buffer_mult=8, model_batch_size=3, num_tokens=16 * 8, wrap_tokens=True)
    run = Sweep(tiny_cfg(tmp_path / "sweep", **shape), {"l1_coeff": [1.0, 3.0]}, models=models, tokens=rows)
    run.train()
    alone = Trainer(tiny_cfg(tmp_path / "alone", **shape, l1_coeff=3.0), models=models, tokens=rows)
    alone.train()
    assert_same_weights(run.trainers[1].crosscoder, alone.crosscoder)
    assert run.trainers[1].crosscoder.W_dec[:, 1, 24:].abs().max() == 0
