"""Data parallelism with 2 gloo processes on this CPU, launched by torchrun from the test itself
(one thread each, a timeout, nothing left behind)."""
import os
import re
import subprocess
import sys

import pytest
import torch
from dp_worker import STEPS, GlobalBatches

from conftest import REPO, free_port, run_script, tiny_cfg, torchrun
from crosscoder import CrossCoder
from crossdiff.config.schema import ConfigError, validate_cfg
from trainer import Trainer


@pytest.mark.parametrize("architecture", ["l1", "batchtopk", "diff_sae"])
def test_data_parallel_steps_equal_single_process_steps_on_the_global_batch(tmp_path, architecture, two_rank_runs):
    """6 steps on 2 ranks, each fed half of the same global batches: both replicas end identical,
    and equal 6 single-process steps on the whole batches, weights and logged metrics (gradients
    averaged before clipping; BatchTopK keeps k * the global batch over both ranks, so its
    selection, its threshold and its dead-latent AuxK are those of one process)."""
    root, _, _ = two_rank_runs
    steps = STEPS
    got, other = (torch.load(root / f"{architecture}.rank{r}", weights_only=True) for r in (0, 1))
    for name, value in got["weights"].items():
        torch.testing.assert_close(other["weights"][name], value, atol=0, rtol=0)
    assert got["logs"] == other["logs"]  # the logged metrics are reduced over the ranks
    cfg = tiny_cfg(tmp_path / "single", num_tokens=32 * 20, architecture=architecture, k=4, dead_window=2, dead_tokens=64, threshold_start_step=0)
    single = Trainer(cfg, buffer=GlobalBatches(cfg, slice(None)))
    logs = [single.log(single.step()) for _ in range(steps)]
    for name, want in single.crosscoder.state_dict().items():
        torch.testing.assert_close(got["weights"][name], want.detach(), atol=1e-5, rtol=1e-5)
    keys = ["loss", "l2_loss", "l1_loss", "l0_loss", "dead_fraction"] + ["aux_loss", "threshold"] * (architecture != "l1")
    for key in keys:
        torch.testing.assert_close(torch.tensor([g[key] for g in got["logs"]]),
                                   torch.tensor([s[key] for s in logs]), atol=1e-4, rtol=1e-4)
    if architecture != "l1":
        assert single.crosscoder.threshold > 0 and max(s["aux_loss"] for s in logs) > 0  # both paths exercised
    if architecture == "diff_sae":  # its layout held exactly on both ranks (base encoder = -chat's, base decoder 0)
        assert torch.equal(got["weights"]["W_enc"][0], -got["weights"]["W_enc"][1])
        assert not got["weights"]["W_dec"][:, 0].any() and not got["weights"]["b_dec"][0].any()


def test_batch_topk_over_two_ranks_keeps_what_one_process_keeps_on_the_whole_batch(two_rank_runs):
    """batch_topk_mask with a group: each rank's mask is its rows of the one-process mask on the
    concatenated batch, and both report the same cutoff."""
    root, _, _ = two_rank_runs
    from crossdiff.arch.batchtopk import batch_topk_mask

    scores_BF = torch.relu(torch.randn(16, 40, generator=torch.Generator().manual_seed(3)))
    want_mask, want_min = batch_topk_mask(scores_BF, 5)
    for r in (0, 1):
        got = torch.load(root / f"topk.rank{r}", weights_only=True)
        torch.testing.assert_close(got["mask"], want_mask[8 * r : 8 * (r + 1)], atol=0, rtol=0)
        torch.testing.assert_close(got["min_kept"], want_min)


def test_a_batch_that_does_not_split_over_the_processes_is_a_config_error():
    out = torchrun("train.py", "--preset", "toy", "--batch_size", "511", timeout=120)
    assert out.returncode != 0
    assert "batch_size 511 does not split over 2 processes" in out.stderr
    assert 'train.py", line' not in out.stderr  # a message, not a traceback from our code (torchrun adds its own)


def test_sigterm_to_the_launcher_saves_once_and_the_run_resumes_with_two_or_one_process(tmp_path, toy_run):
    """SIGTERM to torchrun mid-run: every rank stops at the same step and rank 0 saves once (every
    rank's data state with it). The run then resumes to the end with 2 processes, exactly, and (a
    copy of it) with 1 process, which says it starts from fresh buffers at the position the 2
    ranks had reached."""
    import shutil
    import signal
    import time

    _, _, data = toy_run
    args = ["train.py", "--preset", "toy", "--num_tokens", str(512 * 160), "--save_every", "20", "--data_dir", str(data),
            "--checkpoint_dir", str(tmp_path / "ckpt"), "--wandb_mode", "disabled"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    version = tmp_path / "ckpt" / "version_0"
    try:
        deadline = time.time() + 240
        while not (version / "0_cfg.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (version / "0_cfg.json").exists(), "no periodic checkpoint within 240 s"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.communicate()
    assert proc.returncode != 0 and out.count("checkpoint (TrainingInterrupted) saved") == 1, out[-2000:] + err[-2000:]
    from crossdiff.io.checkpoint import read_cfg

    stopped = read_cfg(version)["step"]  # the newest checkpoint is the interrupt's, at the step it names
    assert 20 <= stopped < 160 and f"checkpoint (TrainingInterrupted) saved at step {stopped}:" in out
    shutil.copytree(version, tmp_path / "one")
    two = torchrun("train.py", "--resume", str(version), timeout=600)  # exact: each rank's buffer state
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert read_cfg(version)["step"] == 160 and "fresh buffers" not in two.stdout
    # fresh buffers re-read a buffer's worth of sequences; the toy data is sized for a straight run
    one = subprocess.run([sys.executable, "train.py", "--resume", str(tmp_path / "one"), "--wrap_tokens", "true"],
                         cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    assert "resuming a 2-process run with 1 process(es)" in one.stdout and read_cfg(tmp_path / "one")["step"] == 160


@pytest.mark.parametrize("latent_shards", [1, 2])
def test_a_two_process_run_resumed_with_two_processes_equals_the_straight_run(latent_shards, two_rank_runs):
    """2 ranks on real buffers over the tiny models, data parallel or with the dictionary split
    in 2 (each shard's Adam state and counters saved beside the whole weights): 24 steps straight
    == 12 steps, save (the same launch), then a new torchrun that resumes and runs to 24 (each rank's buffer,
    pointers and RNG restored: buffer refreshes come every 4 steps), to the last bit."""
    root, runs, resumes = two_rank_runs  # the resume is the second launch: from disk alone
    assert "fresh buffers" not in runs + resumes
    from crossdiff.io.checkpoint import rank_state_file

    version = root / f"halves@{latent_shards}" / "version_0"  # only the newest checkpoint's data states are kept
    assert rank_state_file(version, 1, 1).is_file() and not rank_state_file(version, 0, 1).exists()
    for r in (0, 1):
        straight, resumed = (torch.load(root / f"{m}@{latent_shards}.rank{r}", weights_only=True)
                             for m in ("straight", "resume"))
        assert resumed["step"] == straight["step"] == 24
        assert resumed["token_pointer"] == straight["token_pointer"] > 16  # refreshed after the resume
        for name, want in straight["weights"].items():
            torch.testing.assert_close(resumed["weights"][name], want, atol=0, rtol=0)


def test_a_killed_rank_ends_the_job_without_hanging_and_the_last_checkpoint_loads(tmp_path, toy_run):
    """SIGKILL one worker mid-run: torchrun stops the other and exits non-zero within a minute
    (no rank is left waiting in an all-reduce), no worker survives, and the newest periodic
    checkpoint loads."""
    import signal
    import time

    from crosscoder import CrossCoder

    _, _, data = toy_run
    marker = tmp_path / "ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", "train.py", "--preset", "toy", "--num_tokens",
                             str(512 * 4000), "--save_every", "10", "--data_dir", str(data), "--checkpoint_dir",
                             str(marker), "--wandb_mode", "disabled"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    version = marker / "version_0"
    try:
        deadline = time.time() + 240
        while not (version / "0_cfg.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (version / "0_cfg.json").exists(), "no periodic checkpoint within 240 s"
        workers = subprocess.run(["pgrep", "-f", str(marker)], capture_output=True, text=True).stdout.split()
        workers = [int(p) for p in workers if int(p) != proc.pid]
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        t0 = time.time()
        proc.communicate(timeout=120)
        assert proc.returncode != 0 and time.time() - t0 < 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.communicate()
    time.sleep(1)
    assert subprocess.run(["pgrep", "-f", str(marker)], capture_output=True).stdout == b""  # no worker left
    assert CrossCoder.load(version).cfg["world_size"] == 2


def test_a_failed_checkpoint_write_on_rank_0_stops_every_rank_with_the_error(two_rank_runs):
    """Rank 0 cannot write the checkpoint at step 5 (disk full): every rank stops at that step with
    an OSError, instead of the other rank waiting in the next step's collective until the timeout
    (which would exceed this test's limit)."""
    root, _, _ = two_rank_runs
    got = [torch.load(root / f"save_fails.rank{r}", weights_only=True) for r in (0, 1)]
    assert "No space left on device" in got[0]["error"] and "rank 0 could not write" in got[1]["error"]
    assert got[0]["step"] == got[1]["step"] == 5


def test_on_a_cold_token_cache_one_process_converts_the_dataset_and_every_rank_reads_it(two_rank_runs):
    """Two ranks ask for a hub dataset that is not cached yet: one process downloads and converts
    it (written atomically, never to a shared temporary name), the other waits for its cache file;
    both get the same tokens."""
    root, _, _ = two_rank_runs
    assert (root / "conversions").read_text().split() == ["0"]
    got = [torch.load(root / f"convert_tokens.rank{r}", weights_only=True)["tokens"] for r in (0, 1)]
    torch.testing.assert_close(got[0], got[1], atol=0, rtol=0)
    assert got[0].shape == (40, 4) and got[0].dtype == torch.int32
    assert not list((root / "tokens").glob("*.tmp")) and not list((root / "tokens").glob(".*.tmp"))


# ---------------------------------------------------------------- Dictionaries split over the latents (crossdiff/arch/shards.py): 2 gloo processes launched by torchrun from
def test_a_shard_is_initialised_as_its_rows_of_the_whole_dictionary(monkeypatch):
    """CrossCoder(cfg, shard=(i, n)) holds exactly latents [i F/n, (i+1) F/n) of CrossCoder(cfg),
    also when the initial draw comes in several chunks."""
    from crossdiff.arch import shards

    monkeypatch.setattr(shards, "INIT_CHUNK", 24)  # 64 latents: chunks of 24, 24, 16
    cfg = tiny_cfg(dict_size=64)
    whole = CrossCoder(cfg)
    for i in range(4):
        part = CrossCoder(cfg, shard=(i, 4))
        rows = slice(16 * i, 16 * (i + 1))
        torch.testing.assert_close(part.W_dec, whole.W_dec[rows], atol=0, rtol=0)
        torch.testing.assert_close(part.W_enc, whole.W_enc[..., rows], atol=0, rtol=0)
        assert part.b_enc.shape == (16,) and part.b_dec.shape == whole.b_dec.shape


@pytest.mark.parametrize("mode", ["shard", "partition", "sparse"])
@pytest.mark.parametrize("shards", [2, 1])
def test_two_processes_equal_one_whole_dictionary_sharded_or_data_parallel(tmp_path, shards, mode, two_rank_runs):
    """6 steps on 2 processes, as 1 data group x 2 latent shards or 2 data groups x 1 shard: the
    logged losses, every rank's weights (its slice), the checkpoint (gathered whole, read by a
    plain CrossCoder.load) and a final training-mode forward -- BatchTopK's selected latents
    included -- and its gradients (each shard's slice) equal one process training the whole
    dictionary on the whole batches, to 1e-5. Partitioned (exclusive, designated shared and free
    blocks): each shard holds its slice of every block, and the gathered checkpoint keeps the
    partition exactly, with or without model 1 padded from width 24. BatchTopK's sparse step (crossdiff/arch/sparse.py), standard and partitioned, and the
    diff-SAE's (its layout kept exactly on every shard), against the dense step of one process."""
    from dp_worker import PARTITION, WIDTHS

    from crossdiff.arch.partition import partition_of, shard_latents
    root, _, _ = two_rank_runs
    steps = STEPS
    runs = {"sparse": [("batchtopk", "batchtopk", {}), ("partitioned", "batchtopk", PARTITION), ("diff_sae", "diff_sae", {})],
            "partition": [("l1", "l1", PARTITION), ("batchtopk", "batchtopk", PARTITION),
                          ("padded", "batchtopk", dict(exclusive_fraction=0.125, **WIDTHS))]}.get(
        mode, [("l1", "l1", {}), ("batchtopk", "batchtopk", {})])
    for name, architecture, partition in runs:
        cfg = tiny_cfg(tmp_path / "single", num_tokens=32 * 20, architecture=architecture, k=4, dead_window=2,
                       dead_tokens=64, threshold_start_step=0, **partition)
        single = Trainer(cfg, buffer=GlobalBatches(cfg, slice(None)))
        logs = [single.log(single.step()) for _ in range(steps)]
        want = {k: v.detach().clone() for k, v in single.crosscoder.state_dict().items()}  # as saved, before the forward
        x = torch.randn(32, 2, cfg["d_in"], generator=torch.Generator().manual_seed(7))
        losses, want_acts, _ = single.crosscoder.losses_and_acts(x)
        (losses.l2_loss + losses.l1_loss).backward()
        ranks = [torch.load(root / f"{mode}@{shards}.rank{r}", weights_only=True)[name] for r in (0, 1)]
        saved = CrossCoder.load(ranks[0]["save_dir"])  # (verifies the partition, and a narrower model's padding)
        assert saved.cfg["latent_shards"] == shards and saved.cfg["dict_size"] == 64
        if "model_widths" in partition:  # the padding exactly zero on every shard
            assert saved.W_dec.detach()[:, 1, 24:].abs().max() == 0 and saved.W_enc.detach()[1, 24:].abs().max() == 0
        for name, value in saved.state_dict().items():
            torch.testing.assert_close(value, want[name], atol=1e-5, rtol=1e-5)
        for r, got in enumerate(ranks):
            latents = shard_latents(partition_of(cfg), (r, 2)) if shards == 2 else slice(None)
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


def test_the_flat_all_reduce_ends_on_the_weights_distributed_data_parallel_gives():
    """bench_dp.py on 2 processes: our one flat all-reduce after the backward (what trainer.py
    does), torch's DistributedDataParallel and per-weight all-reduces started from gradient hooks
    average the same gradients, so 6 SGD steps end on the same weights; the benchmark prints each
    mode's time per step."""
    out = torchrun("tools/bench_dp.py", "--shape", "toy", "--steps", "5", timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    lines = {line.split(":")[0].strip(): line for line in out.stdout.splitlines()}
    assert {"none", "flat", "ddp", "hooks"} <= set(lines) and "ms/step" in lines["ddp"]
    for other in ("ddp", "hooks"):
        assert float(lines[f"flat vs {other}"].rsplit(" ", 1)[1]) <= 1e-6, lines[f"flat vs {other}"]


def test_a_full_disk_under_torchrun_stops_every_rank_within_seconds_naming_the_disk(tmp_path, toy_run):
    """A disk that takes no file larger than 64 KiB (RLIMIT_FSIZE: writes past it fail with EFBIG,
    as ENOSPC on a full disk; torch.save reports either as a RuntimeError): the first checkpoint
    fails on both ranks, every rank stops and torchrun exits non-zero within seconds, saying
    which file could not be written, how full its disk is, and that no checkpoint is good."""
    import resource
    import time

    _, _, data = toy_run

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        os.setsid()

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", "train.py", "--preset", "toy", "--num_tokens",
                             str(512 * 400), "--save_every", "10", "--data_dir", str(data), "--checkpoint_dir",
                             str(tmp_path / "ckpt"), "--wandb_mode", "disabled"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=small_disk)
    try:
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise AssertionError("torchrun hung on a full disk (killed after 150 s)")
    assert proc.returncode != 0 and time.time() - t0 < 120
    said = out + err
    assert "could not write" in said and "its disk has" in said and "MiB free" in said, said[-3000:]
    assert "the last good checkpoint is none" in said
    ours = [line for line in err.splitlines() if line.strip().startswith("File ") and "site-packages" not in line
            and "<frozen" not in line]
    assert not ours, ours  # a message, not our traceback (torchrun prints its own on any failed worker)


_SLOW_BUILD = '''
import sys, time, pathlib
sys.path.insert(0, {repo!r})
from crossdiff.scale import distributed
distributed.setup("cpu", timeout_s=2)  # a collective gives up after 2 s
out = pathlib.Path({out!r})
def build():
    if not (out / "built").is_file():
        if {fail}:
            raise RuntimeError("the fake build broke")
        time.sleep(6)  # three times the collective timeout
        (out / "built").write_text(f"by rank {{distributed.rank()}}")
    return (out / "built").read_text()
print(f"rank {{distributed.rank()}} has the build {{distributed.build_once(build, out / '.flag', 'the fake build')}}")
distributed.teardown()
'''


@pytest.mark.parametrize("fail", [False, True])
def test_one_process_builds_while_the_others_wait_past_the_collective_timeout(tmp_path, fail):
    """distributed.build_once, as the offline pair's ~20-minute build and the dataset download use
    it: rank 0 builds for 6 s under a 2 s collective timeout (a barrier there timed out) and rank
    1 waits, then reads what rank 0 built; a failed build ends both ranks with the builder's error."""
    script = tmp_path / "slow_build.py"
    script.write_text(_SLOW_BUILD.format(repo=str(REPO), out=str(tmp_path), fail=fail))
    out = torchrun(str(script), timeout=120)
    if fail:
        assert out.returncode != 0 and "the fake build broke" in out.stdout + out.stderr
        assert not (tmp_path / "built").exists()
        return
    assert out.returncode == 0, out.stderr[-3000:]
    # (the two ranks print at once: their lines may interleave in torchrun's stdout)
    assert sorted(re.findall(r"rank (\d) has the build by rank (\d)", out.stdout)) == [("0", "0"), ("1", "0")]


_SLOW_SAVE = '''
import os, sys, time
sys.path.insert(0, {repo!r})
sys.path.insert(0, os.path.join({repo!r}, "tests"))
import torch
torch.set_num_threads(1)
from conftest import tiny_cfg
from crosscoder import CrossCoder
from crossdiff.scale import distributed
from trainer import Trainer
distributed.setup("cpu", timeout_s=2)  # a collective gives up after 2 s
real_save = CrossCoder.save
def slow_save(self, *args, **kwargs):  # rank 0's write takes three times the collective timeout
    time.sleep(6)
    return real_save(self, *args, **kwargs)
if distributed.is_main():
    CrossCoder.save = slow_save
class Batches:
    def __init__(self, cfg):
        self.g = torch.Generator().manual_seed(distributed.rank())
        self.shape = (cfg["batch_size"] // 2, cfg["n_models"], cfg["d_in"])
    def next(self):
        return torch.randn(*self.shape, generator=self.g)
cfg = tiny_cfg(num_tokens=32 * 8, save_every=4, checkpoint_dir={out!r})
trainer = Trainer(cfg, buffer=Batches(cfg))
trainer.train()
print(f"rank {{distributed.rank()}} trained to step {{trainer.step_counter}}", flush=True)
distributed.teardown()
'''


def test_a_checkpoint_write_on_rank_0_longer_than_the_collective_timeout_does_not_stop_the_others(tmp_path):
    """Rank 0 takes 6 s to write each checkpoint under a 2 s collective timeout (a 2^20 dictionary's
    38.6 GB write takes minutes): the other rank waits for its outcome in a group sized to the
    write, both train to the end, and every checkpoint loads."""
    script = tmp_path / "slow_save.py"
    script.write_text(_SLOW_SAVE.format(repo=str(REPO), out=str(tmp_path / "ckpt")))
    out = torchrun(str(script), timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert sorted(re.findall(r"rank (\d) trained to step (\d+)", out.stdout)) == [("0", "8"), ("1", "8")]
    version = tmp_path / "ckpt" / "version_0"
    assert sorted(p.name for p in version.glob("*.pt") if p.stem.isdigit()) == ["0.pt", "1.pt"]  # steps 4 and 8
    assert CrossCoder.load(version).cfg["world_size"] == 2
