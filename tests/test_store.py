import json

import pytest
import torch

from buffer import ActivationStore
from conftest import random_tokens, tiny_cfg, tiny_model, torchrun
from crossdiff.config.plan import sequences_needed
from crossdiff.sources.store import harvest
from trainer import Trainer


def test_a_run_from_the_store_equals_a_live_run_on_the_same_tokens(tmp_path, models):
    cfg = tiny_cfg(tmp_path, num_tokens=32 * 30)
    tokens = random_tokens(600, cfg["seq_len"])
    harvest(cfg, list(models), tokens, tmp_path / "store", sequences_needed(cfg, 30))
    live = Trainer(dict(cfg), models[0], models[1], tokens)
    stored = Trainer(dict(cfg), buffer=ActivationStore(dict(cfg), tmp_path / "store"))
    for _ in range(30):
        a, b = live.step(), stored.step()
    assert float(a["l2_loss"]) == pytest.approx(float(b["l2_loss"]), rel=1e-2)
    # the inputs differ by bf16 rounding only (bf16(x * s) vs bf16(x) * s); Adam carries that on
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
