import hashlib
import json

import pytest
import torch

from buffer import ActivationStore
from conftest import random_tokens, tiny_cfg, tiny_model, torchrun
from crossdiff.config.plan import sequences_needed
from crossdiff.sources.store import harvest
from trainer import Trainer


def test_a_run_from_the_store_follows_a_live_run_within_bf16_rounding_of_its_inputs(tmp_path, models):
    """The store serves the live buffer's rows in its order, each value within two bf16 roundings
    (2^-7 relative: the live buffer rounds x * s, the store rounds x and then scales it); over 30
    Adam steps that difference moves the loss by under 1 % and the weights by under 2 %."""
    from buffer import Buffer

    cfg = tiny_cfg(tmp_path, num_tokens=32 * 30)
    tokens = random_tokens(600, cfg["seq_len"])
    harvest(cfg, list(models), tokens, tmp_path / "store", sequences_needed(cfg, 30))
    rows_live, rows_store = Buffer(dict(cfg), models[0], models[1], tokens), ActivationStore(dict(cfg), tmp_path / "store")
    for _ in range(3):
        a, b = rows_live.next(), rows_store.next()
        assert ((a - b).abs() <= 2**-7 * a.abs() + 1e-6).all()
    live = Trainer(dict(cfg), models[0], models[1], tokens)
    stored = Trainer(dict(cfg), buffer=ActivationStore(dict(cfg), tmp_path / "store"))
    for _ in range(30):
        a, b = live.step(), stored.step()
    assert float(a["l2_loss"]) == pytest.approx(float(b["l2_loss"]), rel=1e-2)
    for name in ("W_enc", "W_dec", "b_dec"):
        w_live, w_store = getattr(live.crosscoder, name), getattr(stored.crosscoder, name)
        assert (w_live - w_store).norm() / w_live.norm() < 0.02, name
    assert stored.buffer.token_pointer == live.buffer.token_pointer
    assert stored.cfg["normalisation_factor"] == pytest.approx(live.cfg["normalisation_factor"])


def test_two_processes_harvest_the_store_one_process_harvests(tmp_path, two_rank_runs):
    """torchrun with 2 ranks, 7 shards of 8 sequences: each rank writes its shards (0, 2, 4, 6
    and 1, 3, 5) and rank 0 the metadata; shards, tokens and factors equal a one-process harvest."""
    root, _, _ = two_rank_runs
    stores = {"one": tmp_path / "one", "two": root / "harvest"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks ran one thread each: the same matmul kernels
    try:
        harvest(tiny_cfg(), [tiny_model(1), tiny_model(2)], random_tokens(50, 9), stores["one"], 50,
                shard_sequences=8)
    finally:
        torch.set_num_threads(threads)
    one, two = (json.loads((stores[d] / "meta.json").read_text()) for d in ("one", "two"))
    for meta in (one, two):  # each record's own hash (it covers harvested_by, so the two differ)
        assert meta.pop("record_sha256") == hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    assert two.pop("harvested_by") == 2 and one.pop("harvested_by") == 1 and one == two
    assert one["shard_sequences"] == [8] * 6 + [2]
    for i in range(7):
        assert (stores["one"] / f"shard_{i:05d}.bin").read_bytes() == (stores["two"] / f"shard_{i:05d}.bin").read_bytes(), i
    assert torch.equal(torch.load(stores["one"] / "tokens.pt"), torch.load(stores["two"] / "tokens.pt"))


def test_torchrun_train_harvests_the_missing_toy_store_once_and_trains_from_it_with_two_processes(tmp_path, toy_run):
    """`torchrun train.py --preset toy --store_dir DIR` with no store at DIR: the 2 ranks harvest
    what data_tokens reads (once, for any world size: store.py's count), then train num_tokens
    from it, twice over (wrap_tokens), with the store's factors (ranks running the models would
    each measure their own and combine them)."""
    from crossdiff.config.schema import complete_cfg
    from crossdiff.sources import store

    _, _, data = toy_run
    common = ["--preset", "toy", "--num_tokens", "51200", "--data_tokens", "25600", "--wrap_tokens", "true",
              "--data_dir", str(data), "--store_dir", str(tmp_path / "acts"), "--wandb_mode", "disabled"]
    out = torchrun("train.py", *common, "--checkpoint_dir", str(tmp_path / "ckpt"), timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.count("harvested ") == 1 and "with 2 processes" in out.stdout
    meta = json.loads((tmp_path / "acts" / "meta.json").read_text())
    half = complete_cfg({"preset": "toy", "num_tokens": 25600})
    assert meta["n_sequences"] == store.sequences_for_any_world_size(half)
    from crosscoder import CrossCoder

    cc = CrossCoder.load(tmp_path / "ckpt" / "version_0")
    assert cc.cfg["step"] == 100 and cc.cfg["normalisation_factor"] == pytest.approx(meta["normalisation_factor"])
    assert out.stdout.count("training on the activations stored at") == 1
    assert cc.cfg["sequences_read"] > meta["n_sequences"]  # read around again


def test_a_store_too_large_for_its_disk_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    """store.py checks the free disk first (a full disk kills the harvest with SIGBUS): with 1 MB
    free, the toy store is refused naming its size, and no model is built. --dry_run prints the
    size: at the Gemma config, 3.8 TB."""
    import store
    from crossdiff.config.schema import ConfigError, complete_cfg
    from crossdiff.pairs import toy
    from crossdiff.sources import store as store_format

    def no_models(cfg):
        raise AssertionError("models loaded before the disk check")

    monkeypatch.setattr(toy, "build_toy_pair", no_models)
    monkeypatch.setattr(store_format, "free_disk_bytes", lambda path: 10**6)
    with pytest.raises(ConfigError, match=r"needs [\d.,]+ GB but .* has 0.0 GB free"):
        store.main(["--preset", "toy", "--store_dir", str(tmp_path / "s")])
    gemma = complete_cfg({"d_in": 2304, "hook_point": "blocks.14.hook_resid_pre"})  # the default pair's, read by --dry_run
    n = store_format.sequences_for_any_world_size(gemma)
    size = store_format.store_bytes(gemma, n)
    assert size == n * 1023 * 2 * 2304 * 2 + n * 1024 * 4 and 3.7e12 < size < 3.9e12
    store.main(["--store_dir", str(tmp_path / "s"), "--dry_run"])
    assert f"{n:,} sequences, {size / 1e9:,.1f} GB" in capsys.readouterr().out


def store_files(store):
    return {p.name: p.read_bytes() for p in sorted(store.iterdir())}


def test_a_killed_re_harvest_leaves_the_finished_store_whole(tmp_path, models, monkeypatch):
    """A second harvest into a finished store, stopped by Ctrl-C in its first shard, says how far it
    got and to run the command again, and changes no byte of the store (it writes beside it and
    swaps in only when complete), which still serves its rows; the next harvest completes."""
    from crossdiff.sources import store as fmt

    cfg, store = tiny_cfg(tmp_path), tmp_path / "store"
    harvest(cfg, list(models), random_tokens(20, 9), store, 20, shard_sequences=8)
    before = store_files(store)
    real, calls = fmt.run_models, []

    def killed_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fmt, "run_models", killed_on_the_second_batch)
    with pytest.raises(fmt.HarvestInterrupted, match=f"into {store} was interrupted after 4 of 20 sequences; the "
                                                     "store is as it was.* run the same command again"):
        harvest(cfg, list(models), random_tokens(20, 9, seed=1), store, 20, shard_sequences=8)
    assert store_files(store) == before
    assert ActivationStore(dict(cfg, wrap_tokens=True), store).next().abs().sum() > 0
    monkeypatch.setattr(fmt, "run_models", real)
    harvest(cfg, list(models), random_tokens(20, 9, seed=1), store, 20, shard_sequences=8)
    assert store_files(store) != before  # the new store, and no partial one left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == [".store.lock", "store"]


@pytest.mark.parametrize("stop_at", [2, 4])  # inside the first shard; in the second, the first one whole
def test_a_stopped_harvest_goes_on_where_it_stopped_and_writes_the_store_one_harvest_writes(tmp_path, models,
                                                                                          monkeypatch, stop_at):
    """Ctrl-C in the middle of a harvest keeps what it wrote: the same command runs the models only
    on the sequences not yet harvested, and the store it completes is byte for byte the store of a
    harvest never stopped. A partial harvest of other tokens is not gone on from: it starts again."""
    from crossdiff.sources import store as fmt

    cfg, tokens = tiny_cfg(tmp_path), random_tokens(20, 9, seed=3)
    harvest(cfg, list(models), tokens, tmp_path / "whole", 20, shard_sequences=8)
    real, seen, measured = fmt.run_models, [], []
    real_factors = fmt.norm_factors
    monkeypatch.setattr(fmt, "norm_factors", lambda *a, **k: measured.append(1) or real_factors(*a, **k))

    stops = [stop_at]

    def counted(models_, t, *args, **kwargs):  # Ctrl-C once, at the stop_at-th batch after a stop is set
        seen.append(len(t))
        if stops and len(seen) == stops[0]:
            stops.clear()
            raise KeyboardInterrupt
        return real(models_, t, *args, **kwargs)

    monkeypatch.setattr(fmt, "run_models", counted)
    store = tmp_path / "store"
    with pytest.raises(fmt.HarvestInterrupted):
        harvest(cfg, list(models), tokens, store, 20, shard_sequences=8)
    kept = (stop_at - 1) * cfg["model_batch_size"]  # the batches before the stopped one
    assert not store.exists() and (tmp_path / ".store.partial" / fmt.HARVEST_RECORD).is_file()
    seen.clear()
    harvest(cfg, list(models), tokens, store, 20, shard_sequences=8)
    assert sum(seen) == 20 - kept and len(measured) == 1  # no sequence harvested twice, the factors kept
    assert store_files(store) == store_files(tmp_path / "whole")

    seen.clear()
    stops.append(2)
    with pytest.raises(fmt.HarvestInterrupted):  # stopped again, then asked for other tokens
        harvest(cfg, list(models), tokens, tmp_path / "other", 20, shard_sequences=8)
    monkeypatch.setattr(fmt, "run_models", real)
    harvest(cfg, list(models), random_tokens(20, 9, seed=4), tmp_path / "other", 20, shard_sequences=8)
    harvest(cfg, list(models), random_tokens(20, 9, seed=4), tmp_path / "fresh", 20, shard_sequences=8)
    assert store_files(tmp_path / "other") == store_files(tmp_path / "fresh")


def test_a_harvest_into_a_store_another_harvest_is_writing_is_refused(tmp_path, models):
    """Two harvests into one store_dir do not race: while one holds the store's lock, another
    stops at once with an error naming the directory, before writing anything."""
    from crossdiff.sources.store import StoreError, store_lock

    cfg, store = tiny_cfg(tmp_path), tmp_path / "store"
    with store_lock(store):
        with pytest.raises(StoreError, match=f"another harvest is writing {store}"):
            harvest(cfg, list(models), random_tokens(20, 9), store, 20)
    assert not store.exists()
    harvest(cfg, list(models), random_tokens(20, 9), store, 20)  # the lock is free again
    assert (store / "meta.json").is_file()


def test_a_damaged_shard_or_an_edited_record_is_refused_when_a_run_opens_the_store(tmp_path, models):
    """The store records each file's sha256 and a hash of its own record: a shard with a zeroed
    block is refused naming it (verify_store false skips reading the shards, as stated), and a
    hand-edited normalisation factor is refused even then."""
    from crossdiff.sources.store import StoreError

    cfg, store = dict(tiny_cfg(tmp_path), wrap_tokens=True), tmp_path / "store"
    harvest(cfg, list(models), random_tokens(20, 9), store, 20, shard_sequences=8)
    ActivationStore(dict(cfg, store_prefetch=False), store)  # (no read ahead left running while the shard is rewritten)
    shard = store / "shard_00001.bin"
    data = bytearray(shard.read_bytes())
    data[100:4196] = bytes(4096)
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"{shard}: its sha256 differs from the one recorded"):
        ActivationStore(cfg, store)
    ActivationStore(dict(cfg, verify_store=False), store)
    meta = json.loads((store / "meta.json").read_text())
    meta["normalisation_factor"] = [1.0, 1.0]
    (store / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="meta.json.* was changed after the harvest"):
        ActivationStore(dict(cfg, verify_store=False), store)


def test_a_truncated_shard_or_record_is_an_error_naming_the_file(tmp_path, models):
    """A shard cut short (a disk that filled, a partial copy) is a StoreError naming it and both
    sizes even with verify_store false (np.memmap raised a ValueError naming no file); a cut
    meta.json is one naming meta.json."""
    from crossdiff.sources.store import StoreError

    cfg, store = dict(tiny_cfg(tmp_path), wrap_tokens=True, verify_store=False), tmp_path / "store"
    harvest(cfg, list(models), random_tokens(20, 9), store, 20, shard_sequences=8)
    shard = store / "shard_00002.bin"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(StoreError, match=f"{shard}: {size // 2:,} bytes, its record says {size:,}"):
        ActivationStore(cfg, store)
    meta = store / "meta.json"
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(StoreError, match=f"{meta}: cannot read the store's record"):
        ActivationStore(cfg, store)


def test_a_diff_sae_reads_a_crosscoders_store_rescaled_as_a_store_harvested_for_it(tmp_path, models):
    """The store records its scaling (norm_scale): a diff-SAE's store has one factor, the
    difference's; a diff-SAE reading a crosscoder's store (per-model factors) estimates that
    factor from the store's rows and serves them rescaled, the same rows as from its own store
    within two bf16 roundings, and trains on them."""
    from crossdiff.sources.activations import extract_activations

    per_model = tiny_cfg(tmp_path, wrap_tokens=True)
    diff = tiny_cfg(tmp_path, wrap_tokens=True, architecture="diff_sae", k=4)
    tokens = random_tokens(20, 9)
    harvest(per_model, list(models), tokens, tmp_path / "crosscoder", 20)
    harvest(diff, list(models), tokens, tmp_path / "diff", 20)
    own, other = ActivationStore(dict(diff), tmp_path / "diff"), ActivationStore(dict(diff), tmp_path / "crosscoder")
    s = own.meta["normalisation_factor"]
    n = diff["norm_estimate_batches"] * diff["model_batch_size"]  # the sequences the estimate reads
    h = [extract_activations(m, tokens[:n], "blocks.1.hook_resid_pre")[:, 1:] for m in models]
    assert s[0] == s[1] == pytest.approx(float(32 ** 0.5 / (h[1] - h[0]).norm(dim=-1).mean()), rel=1e-5)
    assert other.meta["normalisation_factor"][0] != other.meta["normalisation_factor"][1]  # per model
    torch.testing.assert_close(other.normalisation_factor, own.normalisation_factor, rtol=1e-2, atol=0)
    for _ in range(3):
        a, b = own.next(), other.next()
        assert ((a - b).abs() <= 2**-6 * a.abs() + 1e-5).all()
    trainer = Trainer(dict(diff), buffer=other)
    assert all(torch.isfinite(trainer.step()["loss"]) for _ in range(5))
    assert trainer.cfg["normalisation_factor"] == pytest.approx(other.normalisation_factor.tolist())


def test_reading_the_next_refresh_ahead_serves_the_same_rows_and_reads_them_in_the_background(tmp_path, models,
                                                                                               monkeypatch):
    """With store_prefetch, every refresh after the first fill is served from reads made by the
    background thread (none in the training thread), and the batches equal those of a store read
    inside each refresh, through wrap-arounds and a resume."""
    import threading

    cfg = tiny_cfg(tmp_path, wrap_tokens=True, store_prefetch=True)
    tokens = random_tokens(24, cfg["seq_len"])
    harvest(cfg, list(models), tokens, tmp_path / "store", 24)
    ahead, inside = (ActivationStore(dict(cfg, store_prefetch=p), tmp_path / "store") for p in (True, False))
    reads, real = [], ActivationStore._read

    def recorded(self, first, n):
        if self is ahead:
            reads.append(threading.current_thread().name)
        return real(self, first, n)

    monkeypatch.setattr(ActivationStore, "_read", recorded)
    refreshes = 0
    for _ in range(40):
        pointer = ahead.pointer
        assert torch.equal(ahead.next(), inside.next())
        refreshes += ahead.pointer < pointer
        assert ahead.token_pointer == inside.token_pointer
    assert refreshes >= 3 and ahead.sequences_run > 24  # it wrapped around the store
    assert len(reads) >= refreshes and all(r.startswith("store-prefetch") for r in reads)
    resumed = ActivationStore(dict(cfg), tmp_path / "store", state=ahead.state_dict())
    for _ in range(10):
        assert torch.equal(resumed.next(), inside.next())


def test_a_store_of_aligned_rows_serves_the_live_buffers_rows_and_trains_as_it_does(tmp_path):
    """Models of different tokenizers and widths (aligned rows): the harvested store holds each
    sequence's aligned tuples at the start of its rows (the count read back from tokens.pt), serves
    the live Buffer's rows in its order within bf16 rounding, and a run from it follows the live one."""
    from test_aligned import HOOKS, crosscoder_for

    from buffer import Buffer
    from crossdiff.sources.activations import run_models
    from crossdiff.sources.store import aligned_counts, read_store_meta

    _, models, rows = crosscoder_for(tmp_path)
    cfg = tiny_cfg(tmp_path, d_in=32, model_widths=[32, 24], pad_widths=True, seq_len=24, hook_point=HOOKS[0],
                   hook_points=HOOKS, dict_size=64, batch_size=16, buffer_mult=8, model_batch_size=3,
                   num_tokens=16 * 12, wrap_tokens=True)
    harvest(cfg, models, rows, tmp_path / "store", 30, shard_sequences=8)
    meta = read_store_meta(tmp_path / "store")
    assert meta["aligned"] and meta["model_widths"] == [32, 24] and meta["shard_sequences"] == [8, 8, 8, 6]
    counts = aligned_counts(tmp_path / "store", meta)
    want = (rows[:30, :, 2:] >= 1).all(-1).sum(1)
    assert torch.equal(counts, want) and (counts < 23).any()
    store = ActivationStore(dict(cfg), tmp_path / "store")
    s = torch.tensor(meta["normalisation_factor"])
    served = store.rows(0, 5).float()
    direct = run_models(models, rows[:5], HOOKS, first=1, d_in=32) * s[:, None]
    assert served.shape == direct.shape and ((served - direct).abs() <= 2**-8 * direct.abs() + 1e-6).all()
    live = Buffer(dict(cfg), models, rows[:30])
    for _ in range(4):
        a, b = live.next(), store.next()
        assert ((a - b).abs() <= 2**-7 * a.abs() + 1e-6).all()
    trainers = [Trainer(dict(cfg), models=models, tokens=rows[:30]),
                Trainer(dict(cfg), buffer=ActivationStore(dict(cfg), tmp_path / "store"))]
    for _ in range(12):
        a, b = (t.step() for t in trainers)
    assert float(a["l2_loss"]) == pytest.approx(float(b["l2_loss"]), rel=2e-2)
    assert trainers[1].crosscoder.W_dec[:, 1, 24:].abs().max() == 0  # the padding stays exactly zero
