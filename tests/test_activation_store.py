"""ActivationStore: a harvested store read back as the live buffer would serve it."""
import pytest
import torch

from activation_store import ActivationStore
from buffer import Buffer, extract_activations
from conftest import random_tokens, tiny_cfg
from store import harvest


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


def test_a_store_for_another_config_is_refused(tmp_path, models):
    cfg = tiny_cfg(tmp_path)
    harvest(cfg, list(models), random_tokens(20, cfg["seq_len"]), tmp_path / "store", 20)
    with pytest.raises(ValueError, match="hook_point"):
        ActivationStore(tiny_cfg(tmp_path, hook_point="blocks.0.hook_resid_pre"), tmp_path / "store")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ActivationStore(cfg, tmp_path / "nowhere")


@pytest.mark.parametrize("key, value", [("model_names", ["c", "d"]), ("dataset", "another/dataset")])
def test_a_store_harvested_from_other_models_or_data_is_refused(tmp_path, models, key, value):
    """The store records which models and which data it was harvested from; a run of other models
    or data (same shapes and hook: nothing else would tell) is refused, naming the key."""
    from config import ConfigError

    cfg = tiny_cfg(tmp_path)
    harvest(cfg, list(models), random_tokens(40, cfg["seq_len"]), tmp_path / "store", 40)
    ActivationStore(cfg, tmp_path / "store")  # the same config reads it
    with pytest.raises(ConfigError, match=f"config {key}=.* but the store at .* was harvested with"):
        ActivationStore(tiny_cfg(tmp_path, **{key: value}), tmp_path / "store")


def test_a_strided_reader_serves_the_rows_of_its_share_of_the_sequences(tmp_path, models):
    """ActivationStore(first_sequence=r, stride=w) -- data-parallel rank r of w -- serves, as its
    sequences 0, 1, 2, ..., the store's sequences r, r + w, r + 2w, ..., across shard boundaries."""
    cfg = tiny_cfg(tmp_path, batch_size=8)  # a buffer of 8 sequences: the share of 10 fills it
    harvest(cfg, list(models), random_tokens(30, cfg["seq_len"]), tmp_path / "store", 30, shard_sequences=4)
    whole = ActivationStore(cfg, tmp_path / "store")
    share = ActivationStore(cfg, tmp_path / "store", first_sequence=1, stride=3)
    assert share.n_sequences == 10  # sequences 1, 4, ..., 28
    R = cfg["seq_len"] - 1
    want = torch.cat([whole.rows(s, 1) for s in range(1, 30, 3)][2:7])
    assert torch.equal(share.rows(2, 5), want) and len(want) == 5 * R
