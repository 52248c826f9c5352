"""Dictionaries split over the latents (sharding.py): 2 gloo processes launched by torchrun from
the test itself, checked against one process training the whole dictionary on the same batches."""
import pytest
import torch

from config import ConfigError, validate_cfg
from conftest import run_script, tiny_cfg, torchrun
from crosscoder import CrossCoder
from dp_worker import GlobalBatches
from trainer import Trainer


def test_a_shard_is_initialised_as_its_rows_of_the_whole_dictionary(monkeypatch):
    """CrossCoder(cfg, shard=(i, n)) holds exactly latents [i F/n, (i+1) F/n) of CrossCoder(cfg),
    also when the initial draw comes in several chunks."""
    import sharding

    monkeypatch.setattr(sharding, "INIT_CHUNK", 24)  # 64 latents: chunks of 24, 24, 16
    cfg = tiny_cfg(dict_size=64)
    whole = CrossCoder(cfg)
    for i in range(4):
        part = CrossCoder(cfg, shard=(i, 4))
        rows = slice(16 * i, 16 * (i + 1))
        torch.testing.assert_close(part.W_dec, whole.W_dec[rows], atol=0, rtol=0)
        torch.testing.assert_close(part.W_enc, whole.W_enc[..., rows], atol=0, rtol=0)
        assert part.b_enc.shape == (16,) and part.b_dec.shape == whole.b_dec.shape


@pytest.mark.parametrize("architecture", ["l1", "batchtopk"])
@pytest.mark.parametrize("shards", [2, 1])
def test_two_processes_equal_one_whole_dictionary_sharded_or_data_parallel(tmp_path, architecture, shards):
    """6 steps on 2 processes, as 1 data group x 2 latent shards or 2 data groups x 1 shard: the
    logged losses, every rank's weights (its slice), the checkpoint (gathered whole, read by a
    plain CrossCoder.load) and a final training-mode forward -- BatchTopK's selected latents
    included -- and its gradients (each shard's slice) equal one process training the whole
    dictionary on the whole batches, to 1e-5."""
    steps = 6
    out = torchrun("tests/shard_worker.py", str(tmp_path / "run.pt"), architecture, str(shards), str(steps))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    cfg = tiny_cfg(tmp_path / "single", num_tokens=32 * 20, architecture=architecture, k=4, dead_window=2, dead_tokens=64, threshold_start_step=0)
    single = Trainer(cfg, buffer=GlobalBatches(cfg, slice(None)))
    logs = [single.log(single.step()) for _ in range(steps)]
    want = {k: v.detach().clone() for k, v in single.crosscoder.state_dict().items()}  # as saved, before the forward
    x = torch.randn(32, 2, cfg["d_in"], generator=torch.Generator().manual_seed(7))
    losses, want_acts, _ = single.crosscoder.losses_and_acts(x)
    (losses.l2_loss + losses.l1_loss).backward()
    ranks = [torch.load(tmp_path / f"run.pt.rank{r}", weights_only=True) for r in (0, 1)]
    saved = CrossCoder.load(ranks[0]["save_dir"])
    assert saved.cfg["latent_shards"] == shards and saved.cfg["dict_size"] == 64
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(value, want[name], atol=1e-5, rtol=1e-5)
    for r, got in enumerate(ranks):
        latents = slice(32 * r, 32 * (r + 1)) if shards == 2 else slice(None)
        rows = slice(None) if shards == 2 else slice(16 * r, 16 * (r + 1))
        torch.testing.assert_close(got["weights"]["W_dec"], want["W_dec"][latents], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["weights"]["W_enc"], want["W_enc"][..., latents], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["weights"]["b_dec"], want["b_dec"], atol=1e-5, rtol=1e-5)
        assert torch.equal(got["acts"] > 0, want_acts[rows, latents] > 0)  # the same latents selected
        if shards == 2:  # the gradients of l2 + l1 on the same batch (data groups: each its own rows)
            cc = single.crosscoder
            for name, want_grad in (("W_enc", cc.W_enc.grad[..., latents]), ("W_dec", cc.W_dec.grad[latents]),
                                    ("b_enc", cc.b_enc.grad[latents]), ("b_dec", cc.b_dec.grad)):
                torch.testing.assert_close(got["grads"][name], want_grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got["acts"], want_acts[rows, latents], atol=1e-5, rtol=1e-5)
        keys = ["loss", "l2_loss", "l1_loss", "l0_loss", "dead_fraction"] + ["aux_loss", "threshold"] * (architecture != "l1")
        for key in keys:
            torch.testing.assert_close(torch.tensor([g[key] for g in got["logs"]]),
                                       torch.tensor([s[key] for s in logs]), atol=1e-4, rtol=1e-4)
    if architecture == "batchtopk":
        assert max(s["aux_loss"] for s in logs) > 0  # AuxK took part


def test_a_dictionary_or_a_mesh_that_does_not_split_is_a_config_error_before_any_model_loads():
    with pytest.raises(ConfigError, match="dict_size 100 does not split into latent_shards=3"):
        validate_cfg(tiny_cfg(dict_size=100, latent_shards=3))
    with pytest.raises(ConfigError, match="latent_shards=2 but this process's mesh splits the latents 1 way"):
        Trainer(tiny_cfg(latent_shards=2), buffer=GlobalBatches(tiny_cfg(), slice(None)))  # no mesh: not ignored
    one = run_script("train.py", "--preset", "toy", "--latent_shards", "2", timeout=120)
    assert one.returncode != 0 and "torchrun --nproc_per_node=2" in one.stderr and "Traceback" not in one.stderr
    two = torchrun("train.py", "--preset", "toy", "--latent_shards", "4", "--dict_size", "1024", timeout=120)
    assert two.returncode != 0 and "latent_shards=4 does not divide the 2 processes" in two.stderr
    assert "building the toy pair" not in two.stdout + two.stderr  # nothing loaded


def test_torchrun_trains_the_toy_preset_on_two_processes_with_the_dictionary_split_in_two(tmp_path, toy_run):
    """`torchrun --nproc_per_node=2 train.py --preset toy --latent_shards 2`: rank 0 alone prints
    and saves, in one version directory of the usual layout; the checkpoint loads whole in one
    process and records the world size; the run ends with the toy report of the whole
    dictionary, read back from that checkpoint. (The data-parallel toy run without shards is
    the SIGTERM test's, tests/test_distributed.py.)"""
    _, _, data = toy_run
    out = torchrun("train.py", "--preset", "toy", "--latent_shards", "2", "--num_tokens", "51200", "--data_dir",
                   str(data), "--checkpoint_dir", str(tmp_path / "ckpt"), "--wandb_mode", "disabled", timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.count("final: ") == 1 and out.stdout.count("latents: 1024, ") == 1
    assert "over 2 processes" in out.stdout
    cc = CrossCoder.load(tmp_path / "ckpt" / "version_0")
    assert cc.W_dec.shape[0] == 1024 and cc.cfg["latent_shards"] == 2 and cc.cfg["world_size"] == 2
    assert cc.cfg["step"] == 100 and cc.cfg["batch_size"] == 512
    assert not list((tmp_path / "ckpt").glob("version_1"))  # one run, one version directory


@pytest.mark.parametrize("architecture", ["l1", "batchtopk"])
def test_the_memory_formula_matches_what_a_training_step_allocates(architecture):
    """sharding.memory_per_rank against torch's MemTracker peak over one training step (weights,
    gradients, Adam state and temporaries), from rows < M x d_in to rows >> M x d_in, where the
    peak moves from the backward pass to the forward: within -5% / +25% (it rounds up)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from sharding import memory_per_rank

    for rows, d_in, latents in ((192, 96, 3072), (384, 48, 8192), (2048, 32, 2048)):
        cfg = tiny_cfg(d_in=d_in, dict_size=latents, batch_size=rows, num_tokens=rows * 10, architecture=architecture,
                       k=8, aux_k=64)
        x = torch.randn(rows, 2, d_in)
        trainer = Trainer(cfg, buffer=type("Fixed", (), {"next": lambda self: x})())
        trainer.step()  # Adam's state exists from here on
        tracker = MemTracker()
        tracker.track_external(trainer.crosscoder, trainer.optimizer, x)
        with tracker:
            trainer.step()
        measured = sum(v.get("Total", 0) for v in tracker.get_tracker_snapshot("peak").values())
        predicted = memory_per_rank(d_in, latents, 1, rows, architecture=architecture)
        assert 0.95 < predicted / measured < 1.25, (rows, d_in, latents, predicted / measured)
