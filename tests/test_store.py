import pytest
import torch

from buffer import Buffer, extract_activations, sequences_needed
from conftest import random_tokens, tiny_cfg
from store import ActivationStore, harvest
from trainer import Trainer


def test_store_gives_back_exactly_the_harvested_rows(tmp_path, models):
    cfg = tiny_cfg(tmp_path)
    tokens = random_tokens(40, cfg["seq_len"])
    harvest(cfg, list(models), tokens, tmp_path / "store", 40)
    store = ActivationStore(cfg, tmp_path / "store")
    live = Buffer(cfg, models[0], models[1], tokens)
    x = torch.stack([extract_activations(m, tokens[:30], cfg["hook_point"])[:, 1:] for m in models], 2)
    expected = (x.flatten(0, 1) * live.normalisation_factor[:, None]).to(torch.bfloat16)
    assert torch.equal(store.rows(0, 30), expected)
    assert torch.equal(store.rows(7, 3), expected[7 * 8 : 10 * 8])
    assert store.normalisation_factor.tolist() == pytest.approx(live.normalisation_factor.tolist())
    assert torch.equal(torch.load(tmp_path / "store" / "tokens.pt"), tokens[:40])  # provenance


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


def test_a_store_for_another_config_is_refused(tmp_path, models):
    cfg = tiny_cfg(tmp_path)
    harvest(cfg, list(models), random_tokens(20, cfg["seq_len"]), tmp_path / "store", 20)
    with pytest.raises(ValueError, match="hook_point"):
        ActivationStore(tiny_cfg(tmp_path, hook_point="blocks.0.hook_resid_pre"), tmp_path / "store")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ActivationStore(cfg, tmp_path / "nowhere")
